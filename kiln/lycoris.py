"""LyCORIS's LoHa and LoKr layers in LoRA files (kohya's names: `lora_unet_<module>.hada_w1_a`, `.lokr_w1`, ...) and
LoRA's Tucker mid: which parts make a whole layer, and the weight difference each makes, as AUTOMATIC1111's Lora
extension computes it (extensions-builtin/Lora: network_lora.py, network_hada.py, network_lokr.py, lyco_helpers.py;
diffusers' LoKr conversion scales the same way).

- LoRA with a Tucker mid (LoCon's CP decomposition): mid (rank, rank, kh, kw) between up (out, rank) and down
  (rank, in), times alpha / rank.
- LoHa: (w1_a @ w1_b) * (w2_a @ w2_b), elementwise, times alpha / rank (w1_b's first axis). With Tucker factors
  (`hada_t1`, `hada_t2`: a convolution's) each product is t between w_a (rank, out) and w_b (rank, in) instead.
- LoKr: kron(w1, w2), each factor whole (`lokr_w1`) or a product (`lokr_w1_a @ lokr_w1_b`); w2 may also be a Tucker
  factor (`lokr_t2` between w2_a and w2_b). A convolution's w2 keeps its kernel axes and w1's entries scale its
  kernels. Times alpha / rank where a factor is a product (the rank: w2_b's first axis, else w1_b's), and 1 where
  both are whole (their alpha is ignored, as there).

- DoRA (`dora_scale`, on any of them): the weight plus the difference, each input channel's column rescaled to the
  file's magnitude, less the weight (AUTOMATIC1111's apply_weight_decompose); the multiplier scales that.

Bias differences are refused by name (kiln.lora).
"""

from __future__ import annotations

import numpy as np

from kiln.errors import WeightsError

PARTS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                   "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})
REFUSED = {"diff_b": "a bias difference"}
DORA = "dora_scale"
LORA = frozenset({"lora_down.weight", "lora_up.weight"})
LOHA = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
_LOKR_FACTORS = ({"w1"}, {"w1_a", "w1_b"}), ({"w2"}, {"w2_a", "w2_b"}, {"w2_a", "w2_b", "t2"})


def algorithm(parts: set[str]) -> str | None:
    """What a module's parts (its alpha aside) make whole: "lora", "diff", "loha" or "lokr"; None: none of them."""
    if parts in (LORA, LORA | {"lora_mid.weight"}):
        return "lora"
    if parts == {"diff"}:
        return "diff"
    if parts in (LOHA, LOHA | {"hada_t1", "hada_t2"}):
        return "loha"
    if parts and all(part.startswith("lokr_") for part in parts):
        factors = {part.removeprefix("lokr_") for part in parts}
        if all(factors & set().union(*ways) in ways for ways in _LOKR_FACTORS):
            return "lokr"
    return None


def product(up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """up @ down, each flattened to a matrix (a convolution's kernel axes go with `down`'s inputs)."""
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def scale(alpha: float | None, rank_factor: np.ndarray | None) -> float:
    """alpha / rank, the rank being `rank_factor`'s first axis; 1 without an alpha or a factor."""
    return alpha / rank_factor.shape[0] if alpha is not None and rank_factor is not None else 1.0


def tucker(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """A Tucker factor: t (rank, rank, kh, kw) between wa (rank, out) and wb (rank, in), (out, in, kh, kw)."""
    return np.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def lora(up: np.ndarray, down: np.ndarray, mid: np.ndarray | None, alpha: float | None) -> np.ndarray:
    """A LoRA layer's difference: up @ down, or with a Tucker mid (rank, rank, kh, kw) between them."""
    if mid is None:
        change = product(up, down)
    else:
        change = np.einsum("nmkl,in,mj->ijkl", mid, up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1))
    return change * scale(alpha, down)


def loha(factors: dict[str, np.ndarray], alpha: float | None) -> np.ndarray:
    """A LoHa layer's difference (factors by name without `hada_`)."""
    f = factors
    halves = [tucker(f[f"t{i}"], f[f"w{i}_a"], f[f"w{i}_b"]) if f"t{i}" in f else product(f[f"w{i}_a"], f[f"w{i}_b"])
              for i in (1, 2)]
    return halves[0] * halves[1] * scale(alpha, f["w1_b"])


def lokr(factors: dict[str, np.ndarray], alpha: float | None) -> np.ndarray:
    """A LoKr layer's difference (factors by name without `lokr_`), before the reshape to the weight's shape."""
    f = factors
    w1 = f["w1"] if "w1" in f else product(f["w1_a"], f["w1_b"])
    if "w2" in f:
        w2 = f["w2"]
    else:
        w2 = tucker(f["t2"], f["w2_a"], f["w2_b"]) if "t2" in f else product(f["w2_a"], f["w2_b"])
    if w2.ndim == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)
    return np.kron(w1, w2) * scale(alpha, f.get("w2_b", f.get("w1_b")))


def dora(change: np.ndarray, weight: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """A DoRA layer's difference to `weight` (torch's layout) given its difference without DoRA: weight + change with
    each input channel's column (over the outputs and the kernel) scaled to norm `magnitude`, less weight. The
    magnitudes are kohya's, one per input channel ((1, in, 1, 1) or (in,)), which AUTOMATIC1111 reads; one per output
    (LyCORIS's wd_on_output, PEFT's) would be misread there, so it is refused."""
    inputs = weight.shape[1]
    if magnitude.size != inputs or (magnitude.ndim > 1 and magnitude.shape[0] != 1):
        raise WeightsError(f"a DoRA scale of shape {tuple(magnitude.shape)} for a weight of shape "
                           f"{tuple(weight.shape)}: kiln reads kohya's, one magnitude per input channel ((1, {inputs}"
                           f"{', 1, 1' if weight.ndim == 4 else ''})), as AUTOMATIC1111 does; one per output channel "
                           "(LyCORIS's wd_on_output) AUTOMATIC1111 would misread")
    merged = weight + change
    shape = (1, inputs) + (1,) * (weight.ndim - 2)
    norms = np.linalg.norm(merged.swapaxes(0, 1).reshape(inputs, -1), axis=1).reshape(shape)
    return merged * (magnitude.reshape(shape) / norms) - weight
