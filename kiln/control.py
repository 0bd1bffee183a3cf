"""ControlNet preprocessing: the control image as diffusers' control image processor makes it, and the built-in
preprocessors (sd-webui-controlnet's "modules")."""

from __future__ import annotations

import numpy as np
from PIL import Image

from kiln.errors import InputError
from kiln.imaging import resized_rgb, unit_range

CONTROL_MODULES = ("none", "canny")


def control_image(data: bytes, width: int, height: int, module: str = "none", low_threshold: int = 100,
                  high_threshold: int = 200) -> np.ndarray:
    """The ControlNet's input (3, height, width) in [0, 1]: the image resized, then the module's preprocessing."""
    image = resized_rgb(data, width, height, "controlnet image")
    if module == "canny":
        image = canny(image, low_threshold, high_threshold)
    return unit_range(image)


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
