"""AUTOMATIC1111's img2img colour correction (its img2img_color_correction setting) in numpy: each generated image's
Lab histograms matched to the init image's, then the matched colours given the generated image's luminosity.

It runs, as AUTOMATIC1111 1.10 runs it (modules/processing.py apply_color_correction):
    cv2.cvtColor(image, COLOR_RGB2LAB) -> skimage.exposure.match_histograms(..., target, channel_axis=2)
    -> cv2.cvtColor(..., COLOR_LAB2RGB) -> blendmodes.blendLayers(matched, image, BlendType.LUMINOSITY)
with OpenCV's 8-bit Lab (kiln.cvlab), scikit-image 0.21's histogram matching on uint8 (values truncated) and
blendmodes 2022's luminosity blend, the versions AUTOMATIC1111 pins. Pixel for pixel AUTOMATIC1111's output: tests
compare it with what those libraries make (tests/golden/cv/color_correction.npz; scripts/make_color_golden.py).
"""

from __future__ import annotations

import numpy as np

from kiln.cvlab import lab_to_rgb, rgb_to_lab

__all__ = ["color_target", "correct", "luminosity_blend", "match_histograms"]


def color_target(image: np.ndarray) -> np.ndarray:
    """What the images are corrected towards: the init image (uint8 (H, W, 3) RGB) in OpenCV's 8-bit Lab
    (AUTOMATIC1111's setup_color_correction)."""
    return rgb_to_lab(np.asarray(image, np.uint8))


def correct(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    """One generated image (uint8 (H, W, 3) RGB) corrected towards `target` (color_target's; any size)."""
    matched = lab_to_rgb(match_histograms(rgb_to_lab(image), target))
    return luminosity_blend(matched, image)


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """skimage.exposure.match_histograms(image, reference, channel_axis=-1) as scikit-image 0.21 runs it: each
    channel's values mapped through the reference's cumulative histogram (linear between its quantiles). uint8 images
    come back truncated to uint8 (counted by value, its fast path); float images as float64 (counted by unique
    value)."""
    matched = np.empty_like(image)
    for channel in range(image.shape[-1]):
        source, template = image[..., channel].reshape(-1), reference[..., channel].reshape(-1)
        if image.dtype == np.uint8:
            counts, inverse = np.bincount(source), source
            values = np.nonzero(template_counts := np.bincount(template))[0]
            template_counts = template_counts[values]
        else:
            _, inverse, counts = np.unique(source, return_inverse=True, return_counts=True)
            values, template_counts = np.unique(template, return_counts=True)
        quantiles = np.cumsum(counts) / source.size
        template_quantiles = np.cumsum(template_counts) / template.size
        matched[..., channel] = np.interp(quantiles, template_quantiles, values)[inverse].reshape(image.shape[:-1])
    return matched


def luminosity_blend(background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """blendmodes' blendLayers(background, foreground, BlendType.LUMINOSITY) for opaque uint8 RGB images: the
    background's colours shifted to the foreground's luminosity (0.299 R + 0.587 G + 0.114 B, on 0-1 values), brought
    back inside 0-1 towards the luminosity (below 0 first, then above 1 by the maximum before that), truncated to
    uint8. The same float64 operations as there, in place, each clip only where it acts."""
    colours = background.astype(np.float64)
    colours /= 255
    colours += (_luminosity(foreground / 255) - _luminosity(colours))[..., None]
    light = _luminosity(colours)
    lowest, highest = colours.min(axis=-1), colours.max(axis=-1)
    low = lowest < 0
    if low.any():
        value, bound = light[low][:, None], lowest[low][:, None]
        colours[low] = value + ((colours[low] - value) * value) / (value - bound)
    high = highest > 1
    if high.any():
        value, bound = light[high][:, None], highest[high][:, None]
        colours[high] = value + ((colours[high] - value) * (1 - value)) / (bound - value)
    np.clip(colours, 0, 1, out=colours)
    colours *= 255
    return colours.astype(np.uint8)


def _luminosity(colours: np.ndarray) -> np.ndarray:
    return (colours[..., 0] * 0.299) + (colours[..., 1] * 0.587) + (colours[..., 2] * 0.114)
