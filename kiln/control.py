"""ControlNet preprocessing: the control image as diffusers' control image processor makes it, the built-in
preprocessors (sd-webui-controlnet's "modules", kiln.preprocessors) run on it, or a unit's map fitted as the
extension fits it."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from kiln.controlmaps import colour_count, fit_map, is_binary, otsu_binarize
from kiln.errors import InputError
from kiln.imaging import ImageLimits, decode_image, unit_range
from kiln.preprocessors import preprocessor


def control_image(data: bytes, width: int, height: int, module: str = "none", threshold_a: float = -1,
                  threshold_b: float = -1, fit: int | None = None, seed: int | None = None,
                  mask: bytes = b"", inpaint: bool = False) -> np.ndarray:
    """The ControlNet's input (3, height, width) in [0, 1]: the image resized, then the module run on it with its
    sliders (-1: their defaults; a module that changes the size, tile_resample, is resized back); or, with `fit`
    (sd-webui-controlnet's resize mode), the image is the unit's map already and is fitted as the extension fits it
    (kiln.controlmaps.fit_map). A random module (shuffle) draws from numpy `seed` (Preprocessor.run). With an inpaint
    unit's `mask` (white: inpaint; its image's size), the image and the mask are fitted together (`fit`, or just
    resize) and the masked pixels are -1 (inpaint_hint); an `inpaint` unit's map without a mask too (none masked, but
    Resize and Fill's border, as the extension's)."""
    if mask or (inpaint and fit is not None):
        return inpaint_hint(fitted_map(data, width, height, 0 if fit is None else fit, mask, inpaint=True))
    image = _decoded(data, "controlnet image")
    if fit is not None:
        return unit_range(Image.fromarray(fit_map(np.asarray(image), width, height, fit)))
    image = resize_control(image, (width, height))
    if module != "none":
        pre = preprocessor(module)
        a, b = pre.slider_values(threshold_a, threshold_b, ("threshold_a", "threshold_b"), f"controlnet {module}: ")
        image = resize_control(Image.fromarray(pre.run(np.asarray(image.convert("RGB")), a, b, seed)), (width, height))
    return unit_range(image)


@lru_cache(maxsize=4)
def fitted_map(data: bytes, width: int, height: int, fit: int, mask: bytes = b"", inpaint: bool = False) -> np.ndarray:
    """A unit's map fitted to width x height by its resize mode (uint8 (height, width, 3)); with its mask, or for an
    `inpaint` unit without one (none masked, as the extension's), a fourth channel, 0 or 255 (the mask's first
    channel, as the extension reads it; fit_map binarizes it and masks Resize and Fill's border).

    Read-only, and cached: an inpaint_only unit's map is its ControlNet's input, its restore's latents and its
    paste-back's colours in each pass (decoding and fitting it once, not three times, saves 56 ms a pass at
    1024x1024)."""
    pixels = np.asarray(_decoded(data, "controlnet image"))
    if mask or inpaint:
        alpha = np.asarray(_decoded(mask, "controlnet mask"))[..., 0] if mask else np.zeros(pixels.shape[:2], np.uint8)
        if alpha.shape != pixels.shape[:2]:
            raise InputError(f"controlnet mask is {alpha.shape[1]}x{alpha.shape[0]}; it must be its image's size, "
                             f"{pixels.shape[1]}x{pixels.shape[0]}")
        pixels = np.concatenate([pixels, alpha[..., None]], axis=2)
    fitted = fit_map(pixels, width, height, fit)
    fitted.flags.writeable = False
    return fitted


def inpaint_hint(pixels: np.ndarray) -> np.ndarray:
    """sd-webui-controlnet's ControlNet inpaint protocol (hook.py) on a fitted map with its mask (h, w, 4 uint8): the
    colours in [0, 1] (3, h, w), -1 where the mask is over one half: c (1 - m) - m, as diffusers' recipe for
    control_v11p_sd15_inpaint makes it."""
    masked = pixels[..., 3].astype(np.float32) / np.float32(255) > 0.5
    return np.where(masked[None], np.float32(-1), unit_range(Image.fromarray(pixels[..., :3])))


def _decoded(data: bytes, what: str) -> Image.Image:
    try:
        return decode_image(data, ImageLimits(min_side=1))
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


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

