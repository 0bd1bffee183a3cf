"""What soft inpainting's composite costs an image: the difference mask (the distance between the final and the init
latents, filtered twice by the weighted histogram filter over a 5x5 Gaussian, thresholded, resized and blurred),
computed pixel by pixel in Python as AUTOMATIC1111's script computes it, against kiln's, all pixels at once in numpy
(orchestrator.pipeline.soft_inpainting.composite_masks); and the per-call blend (latent_blend: magnitudes in float64)
against the linear blend it replaces, at CFG's two rows. At 512, 768 and 1024 pixels a side (latents of 64, 96 and
128), random latents, one thread.

    python -m benchmarks.soft_inpainting [--sides 512 768 1024] [--repeats 3] [--out benchmarks/results]

Prints a table, writes soft_inpainting.json in --out; each ratio is against the pixel-by-pixel arm (or the linear
blend) measured in the same run, and the two composite arms' masks are checked to be equal.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def per_pixel_filter(image: np.ndarray, kernel: np.ndarray, low: float, high: float,
                     min_width: float = 1.0) -> np.ndarray:
    """The weighted histogram filter pixel by pixel, as its description reads: the window's neighbours inside the
    image sorted by value, stacked by weight; the overlap-weighted mean of the stack's [low, high] part (a window
    narrower than min_width widened about its centre and moved inside the stack)."""
    out = np.zeros_like(image)
    radius = kernel.shape[0] // 2
    for y, x in np.ndindex(image.shape):
        items = sorted(((float(image[yy, xx]), float(kernel[yy - y + radius, xx - x + radius]))
                        for yy in range(max(0, y - radius), min(image.shape[0], y + radius + 1))
                        for xx in range(max(0, x - radius), min(image.shape[1], x + radius + 1))),
                       key=lambda item: item[0])
        total = sum(w for _, w in items)
        start, end = total * low, total * high
        if end - start < min_width:
            centre = (start + end) / 2
            start, end = centre - min_width / 2, centre + min_width / 2
            if end > total:
                start, end = total - min_width, total
            if start < 0:
                start, end = 0, min_width
        num = den = below = 0.0
        for value, w in items:
            overlap = min(end, below + w) - max(start, below)
            if overlap > 0:
                num, den = num + value * overlap, den + overlap
            below += w
        out[y, x] = num / den if den else 0
    return out


def _composite(side: int, per_pixel: bool) -> tuple[float, np.ndarray]:
    """Seconds for one image's composite mask, and the mask."""
    import torch

    import orchestrator.pipeline.soft_inpainting as soft
    from orchestrator.pipeline import SoftInpainting

    latent = side // 8
    generator = torch.Generator().manual_seed(side)
    init = torch.randn(1, 4, latent, latent, generator=generator)
    final = init + torch.randn(1, 4, latent, latent, generator=generator) * torch.linspace(0, 2, latent)
    repaint = torch.rand(1, 1, latent, latent, generator=generator)
    vectorised = soft.percentile_filter
    if per_pixel:
        soft.percentile_filter = per_pixel_filter
    try:
        start = time.perf_counter()
        mask = soft.composite_masks(SoftInpainting(), repaint, init, final, side, side)[0]
        return time.perf_counter() - start, np.asarray(mask)
    finally:
        soft.percentile_filter = vectorised


def _blend(side: int, soft_blend: bool, calls: int = 20) -> float:
    """Seconds a call for the blend of CFG's guided prediction (one image's) with the init latents."""
    import torch

    from orchestrator.pipeline import SoftInpainting
    from orchestrator.pipeline.soft_inpainting import latent_blend, weight

    latent = side // 8
    generator = torch.Generator().manual_seed(side)
    init, current = (torch.randn(1, 4, latent, latent, generator=generator) for _ in range(2))
    repaint = torch.rand(1, 1, latent, latent, generator=generator)
    settings = SoftInpainting()
    start = time.perf_counter()
    for _ in range(calls):
        if soft_blend:
            latent_blend(settings, init, current, weight(settings, repaint, 3.0))
        else:
            current * repaint + init * (1 - repaint)
    return (time.perf_counter() - start) / calls


ARMS = ("composite, pixel by pixel (AUTOMATIC1111's way)", "composite, all pixels at once (kiln's)",
        "per-call blend, linear (plain inpainting)", "per-call blend, soft (magnitudes in float64)")


def _arms(side: int) -> dict[str, float]:
    """Seconds for each arm at `side`, once; the two composites' masks are checked equal."""
    seconds, masks = {}, {}
    for arm in ARMS:
        if arm.startswith("composite"):
            seconds[arm], masks[arm] = _composite(side, per_pixel="pixel by pixel" in arm)
        else:
            seconds[arm] = _blend(side, soft_blend="soft" in arm)
    gap = int(np.abs(masks[ARMS[0]].astype(int) - masks[ARMS[1]].astype(int)).max())
    assert gap == 0, f"the two composites differ by {gap} levels at {side}"
    return seconds


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.load import by_size

    return by_size(argv, __doc__, ARMS, _arms, lambda index: 0 if index < 2 else 2,
                   "soft_inpainting", RESULTS, repeats=3)


if __name__ == "__main__":
    main()
