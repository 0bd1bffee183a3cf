"""ControlNet preprocessing: the control image as diffusers' control image processor makes it, and the built-in
preprocessors (sd-webui-controlnet's "modules")."""

from __future__ import annotations

import numpy as np
from PIL import Image

from kiln.errors import InputError
from kiln.imaging import ImageLimits, decode_image, unit_range

CONTROL_MODULES = ("none", "canny")


def control_image(data: bytes, width: int, height: int, module: str = "none", low_threshold: int = 100,
                  high_threshold: int = 200) -> np.ndarray:
    """The ControlNet's input (3, height, width) in [0, 1]: the image resized, then the module's preprocessing."""
    try:
        image = decode_image(data, ImageLimits(min_side=1))
    except InputError as exc:
        raise InputError(f"controlnet image: {exc}") from None
    image = resize_control(image, (width, height))
    if module == "canny":
        image = canny(image, low_threshold, high_threshold)
    return unit_range(image)


def resize_control(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A control image at `size` (width, height) with Lanczos; a binary map (two colours, one under 16, one over
    240: an edge map) stays binary, as sd-webui-controlnet's high_quality_resize keeps it: the channels' mean
    thresholded where Otsu's method puts it. (The extension also thins one-pixel edges after the threshold; kiln
    does not.)"""
    if image.size == size:
        return image
    resized = image.resize(size, Image.Resampling.LANCZOS)
    pixels = np.asarray(image)
    packed = pixels.astype(np.uint32) if pixels.ndim == 2 else np.zeros(pixels.shape[:2], np.uint32)
    for channel in range(pixels.shape[2] if pixels.ndim == 3 else 0):  # one number per colour: a fast unique
        packed = (packed << 8) | pixels[..., channel]
    if len(np.unique(packed)) != 2 or pixels.min() >= 16 or pixels.max() <= 240:
        return resized
    gray = np.asarray(resized, dtype=np.float32)
    gray = (gray.mean(axis=2) if gray.ndim == 3 else gray).clip(0, 255).astype(np.uint8)
    binary = np.where(gray > otsu_threshold(gray), 255, 0).astype(np.uint8)
    return Image.fromarray(np.repeat(binary[..., None], 3, axis=2) if pixels.ndim == 3 else binary)


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t that maximizes the variance between the classes <= t and > t."""
    counts = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    below = np.cumsum(counts)
    total_below = np.cumsum(counts * np.arange(256))
    above = below[-1] - below
    with np.errstate(divide="ignore", invalid="ignore"):
        between = below * above * (total_below / below - (total_below[-1] - total_below) / above) ** 2
    return int(np.argmax(np.nan_to_num(between, nan=-1.0)))


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """Canny edges (white on black, 3 channels) of an RGB image; thresholds on 0-255 intensities.

    scikit-image's Canny (Gaussian sigma 1, L2 gradient); OpenCV's, which sd-webui-controlnet uses,
    takes the L1 gradient, so edge maps differ slightly at the same thresholds.
    """
    try:
        from skimage.feature import canny as skimage_canny
    except ImportError:  # the serving install (make setup-serve) leaves scikit-image out: 140 MB with scipy
        raise InputError("ControlNet module 'canny' needs scikit-image, which this install lacks: `pip install "
                         "scikit-image`, or send an edge map with module 'none'") from None

    gray = np.asarray(image.convert("L"), dtype=np.float64)
    edges = skimage_canny(gray, sigma=1.0, low_threshold=low, high_threshold=high)
    return Image.fromarray(np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=2))
