"""LyCORIS's LoHa and LoKr layers in LoRA files (kohya's names: `lora_unet_<module>.hada_w1_a`, `.lokr_w1`, ...): which
parts make a whole layer, and the weight difference each makes, as AUTOMATIC1111's Lora extension computes it
(extensions-builtin/Lora, network_hada.py and network_lokr.py; diffusers' LoKr conversion scales the same way).

- LoHa: (w1_a @ w1_b) * (w2_a @ w2_b), elementwise, times alpha / rank (w1_b's first axis).
- LoKr: kron(w1, w2), each factor whole (`lokr_w1`) or a product (`lokr_w1_a @ lokr_w1_b`); a convolution's whole
  w2 keeps its kernel axes and w1's entries scale its kernels. Times alpha / rank where a factor is a product (the
  rank: w2_b's first axis, else w1_b's), and 1 where both are whole (their alpha is ignored, as there).

Tucker factors (`hada_t1`, `hada_t2`, `lokr_t2`, LoRA's `lora_mid`) are refused by name, as DoRA and bias differences.
"""

from __future__ import annotations

import numpy as np

PARTS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                   "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"})
REFUSED = {"hada_t1": "a LoHa Tucker factor", "hada_t2": "a LoHa Tucker factor", "lokr_t2": "a LoKr Tucker factor",
           "lora_mid.weight": "a Tucker mid", "dora_scale": "a DoRA scale", "diff_b": "a bias difference"}
LOHA = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})


def algorithm(parts: set[str]) -> str | None:
    """What a module's parts (its alpha aside) make whole: "lora", "diff", "loha" or "lokr"; None: none of them."""
    if parts == {"lora_down.weight", "lora_up.weight"}:
        return "lora"
    if parts == {"diff"}:
        return "diff"
    if parts == LOHA:
        return "loha"
    if parts and parts <= PARTS - LOHA:
        factors = {part.removeprefix("lokr_") for part in parts}
        if all(factors & {f"w{i}", f"w{i}_a", f"w{i}_b"} in ({f"w{i}"}, {f"w{i}_a", f"w{i}_b"}) for i in (1, 2)):
            return "lokr"
    return None


def product(up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """up @ down, each flattened to a matrix (a convolution's kernel axes go with `down`'s inputs)."""
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def scale(alpha: float | None, rank_factor: np.ndarray | None) -> float:
    """alpha / rank, the rank being `rank_factor`'s first axis; 1 without an alpha or a factor."""
    return alpha / rank_factor.shape[0] if alpha is not None and rank_factor is not None else 1.0


def loha(factors: dict[str, np.ndarray], alpha: float | None) -> np.ndarray:
    """A LoHa layer's difference (factors by name without `hada_`)."""
    f = factors
    return product(f["w1_a"], f["w1_b"]) * product(f["w2_a"], f["w2_b"]) * scale(alpha, f["w1_b"])


def lokr(factors: dict[str, np.ndarray], alpha: float | None) -> np.ndarray:
    """A LoKr layer's difference (factors by name without `lokr_`), before the reshape to the weight's shape."""
    f = factors
    w1 = f["w1"] if "w1" in f else product(f["w1_a"], f["w1_b"])
    w2 = f["w2"] if "w2" in f else product(f["w2_a"], f["w2_b"])
    if w2.ndim == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)
    return np.kron(w1, w2) * scale(alpha, f.get("w2_b", f.get("w1_b")))
