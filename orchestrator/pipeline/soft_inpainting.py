"""AUTOMATIC1111's Soft inpainting (its built-in always-on script, extensions-builtin/soft-inpainting), as it runs it.

With it on, the mask's grey levels count: the mask stays soft (mask_round off), and
- at every model call, where inpainting would mix the init latents in linearly (orchestrator.pipeline.blend), they
  are blended by `latent_blend` instead: the vectors mixed linearly, then given a magnitude between the two
  vectors' (their powers mixed by the same weight, `transition_contrast_boost` the power: contrast kept where a
  linear mix would fade it). The weight of the new latents is the latent mask raised to sigma ** schedule_bias x
  preservation_strength (`weight`): near 1 the mask barely matters, so grey areas follow the init latents strongly
  early (high sigma) and let go late. The sigma is the call's (the k-diffusion samplers'); its timestep samplers
  (DDIM, PLMS, UniPC) pass their timestep (0 to 999) as that sigma, and so does kiln for them;
- the last blend after the last step is skipped;
- the decoded image is composited with the init image by how much each place changed (`composite_masks`): the
  per-pixel distance between the final and the init latents, filtered (a weighted 90-100th percentile mean, then a
  weighted 25-75th percentile mean over a 5x5 Gaussian), divided by difference_threshold (scaled by the mask as
  mask_influence says), turned into an opacity by a sigmoid of difference_contrast's sharpness, resized to the
  image and blurred. The composite replaces the overlay that pastes the init image back outside the mask.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from kiln.errors import InputError
from orchestrator.pipeline.requests import Img2ImgRequest, SoftInpainting

if TYPE_CHECKING:
    import torch
    from PIL import Image

# The settings' names in AUTOMATIC1111's script (its args, in order, after `enabled`) and in its infotext
ARGS = ("schedule_bias", "preservation_strength", "transition_contrast_boost", "mask_influence",
        "difference_threshold", "difference_contrast")
LABELS = {"schedule_bias": "Soft inpainting schedule bias",
          "preservation_strength": "Soft inpainting preservation strength",
          "transition_contrast_boost": "Soft inpainting transition contrast boost",
          "mask_influence": "Soft inpainting mask influence",
          "difference_threshold": "Soft inpainting difference threshold",
          "difference_contrast": "Soft inpainting difference contrast"}
ENABLED_LABEL = "Soft inpainting enabled"
# What each setting may be, (lowest, highest, lowest excluded): what computes (its API checks nothing; its UI's
# sliders stop sooner): no negative exponent of a mask that holds 0, no power of 0 or so high that the magnitudes
# overflow float64, a mask influence that keeps the threshold positive, and no threshold of 0 (it divides by it)
RANGES = {"schedule_bias": (0, math.inf, False), "preservation_strength": (0, math.inf, False),
          "transition_contrast_boost": (0, 64, True), "mask_influence": (0, 1, False),
          "difference_threshold": (0, math.inf, True), "difference_contrast": (0, math.inf, False)}


def check(request: Img2ImgRequest) -> None:
    """Soft inpainting needs a mask, kept soft; its settings inside their ranges."""
    settings = request.soft_inpainting
    if settings is None:
        return
    if not request.inpainting:
        raise InputError("soft inpainting blends by a mask: send a mask (AUTOMATIC1111 ignores it without one)")
    if request.mask_round:
        raise InputError("soft inpainting keeps the mask soft: mask_round must be false (AUTOMATIC1111's script "
                         "sets it so)")
    for name, (low, high, open_low) in RANGES.items():
        value = getattr(settings, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or value > high or value < low or (open_low and value == low):
            side = f"above {low}" if open_low else f"from {low}"
            raise InputError(f"soft inpainting: {name} must be a number {side}"
                             f"{'' if high == math.inf else f' to {high}'}, got {value!r}")


def weight(settings: SoftInpainting, repaint: torch.Tensor, sigma: float) -> torch.Tensor:
    """The new latents' weight at this call: the latent mask (1 repaints) to the power sigma ** schedule_bias x
    preservation_strength (AUTOMATIC1111's get_modified_nmask)."""
    import torch

    return torch.pow(repaint, sigma ** settings.schedule_bias * settings.preservation_strength)


def latent_blend(settings: SoftInpainting, init: torch.Tensor, current: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """init and current mixed by t (rows or 1, 1, h, w; 1 = current), each latent vector (across channels) then
    scaled to the mix of the two vectors' magnitudes raised to transition_contrast_boost (in float64, as there:
    large powers)."""

    power = settings.transition_contrast_boost
    mixed = init * (1 - t) + current * t
    magnitude = lengths(mixed).double() + 0.00001
    t64 = t.double()
    wanted = (lengths(init).double().pow(power) * (1 - t64) + lengths(current).double().pow(power) * t64) \
        .pow(1 / power)
    return mixed * (wanted / magnitude).to(mixed.dtype)


def lengths(latents: torch.Tensor) -> torch.Tensor:
    """Each latent vector's length (across channels; the channel axis kept): torch's vector_norm over that axis,
    written out (40 times faster on a CPU for a 4-channel latent, and within an ulp; benchmarks/soft_inpainting.py)."""
    return latents.square().sum(dim=1, keepdim=True).sqrt()


def gaussian_kernel(stddev: float = 1.5, radius: int = 2) -> np.ndarray:
    """A (2 radius + 1)^2 Gaussian, 1 at its centre, shifted and rescaled to reach 0 one pixel past `radius`."""
    def gaussian(square: np.ndarray) -> np.ndarray:
        return np.exp(-square / (stddev * stddev))

    zero = gaussian(np.float64((radius + 1.0) ** 2))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    square = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return np.maximum(0.0, (gaussian(square) - zero) / (1 - zero))


def percentile_filter(image: np.ndarray, kernel: np.ndarray, low: float, high: float,
                      min_width: float = 1.0) -> np.ndarray:
    """AUTOMATIC1111's weighted_histogram_filter, all pixels at once: at each pixel, the neighbours the kernel
    covers (inside the image) sorted by value and stacked by their kernel weights; the mean of the values in the
    stack's [low, high] fraction (at least min_width of weight wide, moved inside the stack), each weighted by how
    much of it lies in that window."""
    radius_y, radius_x = kernel.shape[0] // 2, kernel.shape[1] // 2
    height, width = image.shape
    values = np.pad(image.astype(np.float64), ((radius_y, radius_y), (radius_x, radius_x)))
    inside = np.pad(np.ones(image.shape), ((radius_y, radius_y), (radius_x, radius_x)))
    stacked = np.stack([values[dy:dy + height, dx:dx + width] for dy in range(kernel.shape[0])
                        for dx in range(kernel.shape[1])], axis=-1)
    weights = np.stack([inside[dy:dy + height, dx:dx + width] * kernel[dy, dx] for dy in range(kernel.shape[0])
                        for dx in range(kernel.shape[1])], axis=-1)  # 0 outside the image: no part of the stack
    order = np.argsort(stacked, axis=-1, kind="stable")
    stacked, weights = np.take_along_axis(stacked, order, -1), np.take_along_axis(weights, order, -1)
    top = np.cumsum(weights, axis=-1)
    bottom, total = top - weights, top[..., -1:]
    start, end = total * low, total * high
    narrow = end - start < min_width
    centre = (start + end) / 2
    start, end = np.where(narrow, centre - min_width / 2, start), np.where(narrow, centre + min_width / 2, end)
    past = narrow & (end > total)
    start, end = np.where(past, total - min_width, start), np.where(past, total, end)
    before = narrow & (start < 0)
    start, end = np.where(before, 0.0, start), np.where(before, min_width, end)
    overlap = np.clip(np.minimum(end, top) - np.maximum(start, bottom), 0, None)
    weight_sum = overlap.sum(axis=-1)
    mean = (stacked * overlap).sum(axis=-1) / np.where(weight_sum == 0, 1, weight_sum)
    return np.where(weight_sum == 0, 0, mean).astype(image.dtype)


def smootherstep(x: np.ndarray) -> np.ndarray:
    return x * x * x * (x * (6 * x - 15) + 10)


def composite_masks(settings: SoftInpainting, repaint: torch.Tensor, init: torch.Tensor, latents: torch.Tensor,
                    width: int, height: int) -> list[Image.Image]:
    """Each image's composite mask ("L", width x height; 255 = the generated pixels, 0 = the init image's), from
    how far its final latents moved from the init latents (AUTOMATIC1111's apply_adaptive_masks)."""
    import torch
    from PIL import Image, ImageFilter

    from kiln.masks import shaped

    scalar = 1 - torch.clamp(repaint[:, 0].float(), 0, 1) ** (settings.preservation_strength / 2)
    scalar = 0.5 * (1 - settings.mask_influence) + scalar * settings.mask_influence
    scalar = (scalar / (1.00001 - scalar)).numpy()
    distances = lengths(latents - init)[:, 0].float().numpy()
    kernel = gaussian_kernel()
    masks = []
    for index, distance in enumerate(distances):
        filtered = percentile_filter(percentile_filter(distance, kernel, 0.9, 1), kernel, 0.25, 0.75)
        half = settings.difference_threshold * scalar[index if len(scalar) > index else 0]  # 50% opacity there
        kept = smootherstep(1 / (1 + (filtered / half) ** settings.difference_contrast))
        small = Image.fromarray((255.0 * (1 - kept)).astype(np.uint8), "L")
        masks.append(shaped(small, width, height, 2).filter(ImageFilter.GaussianBlur(radius=4)))
    return masks
