"""Where a generation's random numbers come from: AUTOMATIC1111's "Random number generator source" (randn_source).

- "CPU": torch's CPU generators, one per image: diffusers' own noise (kiln's default). In txt2img this is also
  AUTOMATIC1111's CPU source, number for number. Where the VAE's latent distribution is sampled first (img2img,
  inpainting, the hires fix after an image upscaler) that sample comes from the same generator first, in diffusers'
  order, so those images' noise differs from AUTOMATIC1111's.
- "NV" and "GPU": the numbers torch.randn draws on an NVIDIA GPU (cuRAND's Philox4x32-10 as PyTorch's CUDA kernel
  uses it, computed here with numpy: any machine, CPU or GPU, gives the same noise). AUTOMATIC1111's GPU source on
  an NVIDIA card draws exactly these; it is its default, and an infotext without "RNG" means it. The noise is drawn
  in AUTOMATIC1111's order (the seed's first draw is the initial noise); the VAE's latent sample, which it draws from
  torch's global generator, comes from a stream of the seed that its draws never reach.

The samplers draw their own noise (ancestral, churn, SDE) through diffusers' randn_tensor; `adapt` lets the
scheduler modules' randn_tensor take a Philox generator (everything else goes to diffusers' own, unchanged).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

RANDN_SOURCES = ("GPU", "CPU", "NV")  # AUTOMATIC1111's choices, its default first
_MASK = 0xFFFFFFFF
_MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))  # Philox4x32 (Salmon et al., SC'11)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)  # the key's Weyl increments, one per round
# cuRAND's Box-Muller constants, float32 as its CURAND_2POW32_INV and CURAND_2POW32_INV_2PI
_INV_2POW32 = float(np.float32(2.3283064e-10))
_INV_2POW32_2PI = float(np.float32(2.3283064e-10) * np.float32(6.2831855))


def philox4x32(counter: np.ndarray, seed: int, rounds: int = 10) -> np.ndarray:
    """Philox4x32 of each column of `counter` (4 x n uint32) under the key `seed` (64 bits: low word, high word)."""
    c = [word.astype(np.uint64) for word in counter]
    keys = [seed & _MASK, (seed >> 32) & _MASK]
    mask = np.uint64(_MASK)
    for _ in range(rounds):
        low, high = c[0] * _MULTIPLIERS[0], c[2] * _MULTIPLIERS[1]  # 32 x 32 bits: exact in 64
        c = [(high >> np.uint64(32)) ^ c[1] ^ np.uint64(keys[0]), high & mask,
             (low >> np.uint64(32)) ^ c[3] ^ np.uint64(keys[1]), low & mask]
        keys = [(k + step) & _MASK for k, step in zip(keys, _KEY_STEPS)]
    return np.stack(c).astype(np.uint32)


class Philox:
    """A generator that draws what `torch.randn(shape, device="cuda")` draws after `torch.manual_seed(seed)`: each
    call one Philox counter further on (`offset`), element i from subsequence i, the first of cuRAND's Box-Muller
    pair. (PyTorch's kernel matches this while the tensor fits one pass of the GPU's threads: every SD latent.)
    `stream` > 0 draws from subsequences 2^32 * stream on, which the seed's own draws never reach."""

    def __init__(self, seed: int, stream: int = 0) -> None:
        self.seed, self.stream, self.offset = int(seed), stream, 0

    def randn(self, shape: tuple) -> torch.Tensor:
        import torch

        n = math.prod(shape)
        if n > 2**32:
            raise ValueError(f"Philox draws at most 2^32 numbers a call, not {n}")
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint64).astype(np.uint32)
        counter[3] = self.stream
        self.offset += 1
        bits = philox4x32(counter, self.seed)
        u = (bits[0].astype(np.float64) + 0.5) * _INV_2POW32
        v = (bits[1].astype(np.float64) + 0.5) * _INV_2POW32_2PI
        return torch.from_numpy((np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(shape))

    def get_state(self) -> tuple[int, int, int]:
        return self.seed, self.stream, self.offset


def generator(seed: int, source: str, stream: int = 0):
    """A fresh generator for `seed` from `source` (RANDN_SOURCES). A CPU generator has one stream: the VAE's sample
    and the noise come from it in diffusers' order."""
    import torch

    if source == "CPU":
        return torch.Generator().manual_seed(int(seed))
    return Philox(seed, stream)


def _philox(generator) -> bool:
    """Whether `generator` (one, or a list of one per image) is Philox."""
    return isinstance(generator[0] if isinstance(generator, list) and generator else generator, Philox)


def draw(shape: tuple, generator) -> torch.Tensor:
    """Standard normal noise of `shape` from one generator, or from one per image (a list: each image's (1, ...)
    slice from its own, as diffusers' randn_tensor draws)."""
    import torch

    if not _philox(generator):
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, dtype=torch.float32)
    generators = generator if isinstance(generator, list) else [generator]
    if len(generators) == 1:
        return generators[0].randn(tuple(shape))
    return torch.cat([g.randn((1, *shape[1:])) for g in generators])


def adapt(module) -> None:
    """Let `module`'s randn_tensor (a diffusers scheduler module's) take Philox generators; once per module."""
    original = getattr(module, "randn_tensor", None)
    if original is None or getattr(original, "takes_philox", False):
        return

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None, **kwargs):
        if not _philox(generator):
            return original(shape, generator=generator, device=device, dtype=dtype, layout=layout, **kwargs)
        noise = draw(tuple(shape), generator)
        return noise.to(device=device or noise.device, dtype=dtype or noise.dtype)

    randn_tensor.takes_philox = True
    module.randn_tensor = randn_tensor
