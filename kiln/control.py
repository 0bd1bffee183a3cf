"""ControlNet preprocessing: the control image as diffusers' control image processor makes it, the built-in
preprocessors (sd-webui-controlnet's "modules", kiln.preprocessors) run on it, or a unit's map fitted as the
extension fits it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from kiln.controlmaps import colour_count, fit_map, is_binary, otsu_binarize
from kiln.errors import InputError
from kiln.imaging import ImageLimits, decode_image, unit_range
from kiln.preprocessors import preprocessor


def control_image(data: bytes, width: int, height: int, module: str = "none", threshold_a: float = -1,
                  threshold_b: float = -1, fit: int | None = None, seed: int | None = None) -> np.ndarray:
    """The ControlNet's input (3, height, width) in [0, 1]: the image resized, then the module run on it with its
    sliders (-1: their defaults; a module that changes the size, tile_resample, is resized back); or, with `fit`
    (sd-webui-controlnet's resize mode), the image is the unit's map already and is fitted as the extension fits it
    (kiln.controlmaps.fit_map). A random module (shuffle) draws from numpy `seed` (Preprocessor.run)."""
    try:
        image = decode_image(data, ImageLimits(min_side=1))
    except InputError as exc:
        raise InputError(f"controlnet image: {exc}") from None
    if fit is not None:
        return unit_range(Image.fromarray(fit_map(np.asarray(image), width, height, fit)))
    image = resize_control(image, (width, height))
    if module != "none":
        pre = preprocessor(module)
        a, b = pre.slider_values(threshold_a, threshold_b, ("threshold_a", "threshold_b"), f"controlnet {module}: ")
        image = resize_control(Image.fromarray(pre.run(np.asarray(image.convert("RGB")), a, b, seed)), (width, height))
    return unit_range(image)


def resize_control(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A control image at `size` (width, height) for kiln's own units (`kiln generate`, library callers: diffusers'
    resize, Lanczos); a binary map (two colours, one under 16, one over 240: an edge map) stays binary: the channels'
    mean thresholded where Otsu's method puts it. The API's units are fitted as sd-webui-controlnet fits them
    instead (kiln.controlmaps)."""
    if image.size == size:
        return image
    resized = image.resize(size, Image.Resampling.LANCZOS)
    pixels = np.asarray(image)
    if not is_binary(pixels, colour_count(pixels)):
        return resized
    gray = np.asarray(resized, dtype=np.float32)
    gray = (gray.mean(axis=2) if gray.ndim == 3 else gray).clip(0, 255).astype(np.uint8)
    binary = otsu_binarize(gray)
    return Image.fromarray(np.repeat(binary[..., None], 3, axis=2) if pixels.ndim == 3 else binary)

