"""Seeds and the initial noise, as AUTOMATIC1111 uses them.

Seeds follow AUTOMATIC1111 (-1 draws one; image i of a batch uses seed + i), and noise is drawn exactly as diffusers
draws it (torch CPU generators, one per image), so a seed gives diffusers' image; or, with AUTOMATIC1111's GPU and NV
sources, as torch draws it on an NVIDIA GPU (orchestrator.pipeline.noise). A variation seed, "Resize seed from" and
the eta noise seed delta are Seeds' too.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import TYPE_CHECKING

from orchestrator.pipeline import noise

if TYPE_CHECKING:
    import torch

    from orchestrator.pipeline.requests import Txt2ImgRequest

MAX_SEED = 2**32 - 1


def draw_seed(seed: int) -> int:
    """AUTOMATIC1111's -1: a fresh random seed; any other seed as it is. Drawn once per job, so that n_iter runs
    chain from it."""
    return secrets.randbelow(MAX_SEED + 1) if seed == -1 else seed


def batch_seeds(seed: int, count: int) -> list[int]:
    """Image i of a batch uses seed + i (AUTOMATIC1111), wrapping at 2^32."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


class Seeds:
    """A run's seeds as AUTOMATIC1111 uses them (its ImageRNG): image i's seed and variation seed, how far its noise
    is slerped toward the variation seed's (`strength`), the size whose noise it keeps at the centre ("Resize seed
    from": `resize_from`, width x height in pixels), the eta noise seed delta (ENSD: after the initial noise, the
    samplers' own noise comes from generators seeded seed + delta), and the random number source
    (orchestrator.pipeline.noise)."""

    def __init__(self, seeds: list[int], subseeds: list[int] | None = None, strength: float = 0.0,
                 resize_from: tuple[int, int] | None = None, delta: int = 0, source: str = "CPU") -> None:
        self.seeds, self.subseeds, self.strength = seeds, subseeds, strength
        self.resize_from, self.delta, self.source = resize_from, delta, source
        self._reseeded: list[tuple] = []  # (generator, its state when made): the steps' generators under ENSD

    def generators(self) -> list:
        """Fresh generators, one per image: the initial noise's (and, drawn on, the samplers')."""
        return [noise.generator(s, self.source) for s in self.seeds]

    def for_latents(self, generators: list) -> list:
        """The generators the VAE's latent sample draws from: the images' own with the CPU source (before the noise,
        diffusers' order); otherwise a stream of each seed apart, so that the noise is the seed's first draw, as
        AUTOMATIC1111's (orchestrator.pipeline.noise)."""
        return generators if self.source == "CPU" else [noise.generator(s, self.source, 1) for s in self.seeds]

    def noise(self, shape: tuple, generator, scale_factor: int) -> torch.Tensor:
        """The initial noise, drawn like diffusers' (each image's generator); with a variation seed, slerped toward
        its noise; resized from another size, that size's noise pasted at the centre of this one's (the generator
        still draws this size's, so the samplers' later noise is the same as without)."""
        import torch

        small = None
        if self.resize_from is not None:
            small = (shape[1], self.resize_from[1] // scale_factor, self.resize_from[0] // scale_factor)
            small = None if small == tuple(shape[1:]) else small
        drawn = noise.draw(shape, generator)
        if self.strength == 0 and small is None:
            return drawn
        rows = []
        for i, seed in enumerate(self.seeds):
            own = drawn[i] if small is None else self._randn(seed, small)
            if self.strength > 0:
                own = slerp(self.strength, own, self._randn(self.subseeds[i], small or tuple(shape[1:])))
            rows.append(own if small is None else _centred(own, drawn[i]))
        return torch.stack(rows)

    def for_steps(self, generator):
        """The generator(s) a pass's steps draw from: the initial noise's, or with ENSD fresh ones from seed + delta
        (AUTOMATIC1111 reseeds right after each pass's initial noise)."""
        if not self.delta:
            return generator
        fresh = [noise.generator(s + self.delta, self.source) for s in self.seeds]
        self._reseeded += [(g, g.get_state()) for g in fresh]
        return fresh if len(fresh) > 1 else fresh[0]

    @property
    def delta_used(self) -> bool:
        """Whether a sampler drew from the reseeded generators, so that ENSD changed the image (AUTOMATIC1111 writes
        ENSD in the infotext only for the samplers it changes)."""
        import torch

        def same(a, b) -> bool:
            return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

        return any(not same(g.get_state(), state) for g, state in self._reseeded)

    def _randn(self, seed: int, shape: tuple) -> torch.Tensor:
        """A seed's first draw, from a fresh generator (AUTOMATIC1111's randn(seed, shape))."""
        return noise.draw(shape, noise.generator(seed, self.source))


def _centred(small: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` with `small` pasted at its centre, cut to fit where larger (AUTOMATIC1111's arithmetic, to its odd
    sizes: the offsets are floor halves of the difference)."""
    out = full.clone()
    spans = []
    for have, want in zip(small.shape[1:], full.shape[1:]):
        offset = (want - have) // 2
        size = have if offset >= 0 else have + 2 * offset
        spans.append((max(offset, 0), max(-offset, 0), size))
    (ty, sy, h), (tx, sx, w) = spans
    out[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return out


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's spherical interpolation of one image's noise (C, H, W) from `low` (t=0) to `high` (t=1): each
    column (the H values at one channel and x) on its own great circle. Where the columns are parallel on average it
    is linear with the weights the other way round, as there (only a variation seed equal to the seed gets there, and
    then both noises are the same)."""
    import torch

    a, b = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)
    dot = (a * b).sum(1)
    if dot.mean() > 0.9995:
        return t * low + (1 - t) * high
    omega = torch.acos(dot.clamp(-1, 1))
    sine = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sine).unsqueeze(1) * low + (torch.sin(t * omega) / sine).unsqueeze(1) * high


def with_seeds(request: Txt2ImgRequest) -> Txt2ImgRequest:
    """The request with its -1 seeds drawn, once: a job's n_iter runs chain from these."""
    return replace(request, seed=draw_seed(request.seed), subseed=draw_seed(request.subseed))
