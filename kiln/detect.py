"""sd-webui-controlnet's preprocessing on kiln's preprocessors (kiln.preprocessors), for /controlnet/detect and the
API's ControlNet units (made at the processor resolution, then fitted, as there): the map a module makes of an image.
"none" is the image itself; modules without a resolution run at the image's own size; the others run on the image
as sd-webui-controlnet's resize_image_with_pad prepares it: resized so that its short side is the resolution (aspect
kept; OpenCV's cubic filter to enlarge, area to shrink, kiln.cvimage), and for most its bottom and right edges
repeated out to multiples of 64, the map of that cut back to the resized image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from kiln.cvimage import resize
from kiln.errors import InputError
from kiln.imaging import ImageLimits, decode_image
from kiln.preprocessors import RESOLUTION, preprocessor

RESOLUTION_RANGE = (int(RESOLUTION.minimum), int(RESOLUTION.maximum))  # sd-webui-controlnet's resolution slider
DEFAULT_RESOLUTION = int(RESOLUTION.value)


def pixel_perfect_resolution(width: int, height: int, target_width: int, target_height: int, mode: int) -> int:
    """sd-webui-controlnet's "pixel perfect" processor resolution: the one at which a width x height image's map
    comes out at the generation's scale once fitted by the resize mode. The short side times the larger of the two
    ratios (the smaller for 2, resize and fill), rounded half to even (at least 1)."""
    ratio = (min if mode == 2 else max)(target_height / height, target_width / width)
    return max(1, round(ratio * min(width, height)))


def processor_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The short side at `resolution`, the long one scaled with it and rounded (half to even, as numpy rounds)."""
    k = resolution / min(width, height)
    return max(1, round(width * k)), max(1, round(height * k))


def shortest_edge_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """annotator/color's cv2_resize_shortest_edge: the short side at `resolution`, the other scaled by its own ratio
    and rounded (Python's round)."""
    if height < width:
        return int(round(width / height * resolution)), resolution
    return resolution, int(round(height / width * resolution))


def processor_resolution(value: int, name: str) -> int:
    """A processor resolution as a client sends it: -1 is sd-webui-controlnet's default (512); anything outside its
    slider's range, which it would not run as sent, is refused naming the field `name`."""
    if value == -1:
        return DEFAULT_RESOLUTION
    if not RESOLUTION_RANGE[0] <= value <= RESOLUTION_RANGE[1]:
        raise InputError(f"{name} must be {RESOLUTION_RANGE[0]} to {RESOLUTION_RANGE[1]} (or -1: "
                         f"{DEFAULT_RESOLUTION}), got {value}")
    return value


def decode_source(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """An encoded image a preprocessor is to read (upright, RGB), its errors naming `what`."""
    try:
        return decode_image(data, ImageLimits(max_pixels=max_pixels, min_side=1))
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


def detect_map(data: bytes, module: str, resolution: int, a: float, b: float, max_pixels: int,
               what: str = "image") -> Image.Image:
    """The module's map of an encoded image (RGB); a map over `max_pixels` is refused before it is made. A random
    module (shuffle) draws afresh each call, as the extension's detect route does."""
    name = preprocessor(module).name
    return map_of(decode_source(data, max_pixels, what), name, resolution, a, b, max_pixels, what)


def inpaint_display(data: bytes, mask: bytes, max_pixels: int, what: str = "image",
                    mask_what: str = "mask") -> np.ndarray:
    """An inpaint module's map as /controlnet/detect shows it (the extension's visualize_inpaint_mask): the image
    (RGBA) with the mask's first channel as alpha, 255 - mask // 2 (kept: opaque; masked: half transparent)."""
    image, alpha = decode_source(data, max_pixels, what), decode_source(mask, max_pixels, mask_what)
    if alpha.size != image.size:
        raise InputError(f"{mask_what} is {alpha.width}x{alpha.height}; it must be {what}'s size, "
                         f"{image.width}x{image.height}")
    return mask_shown(np.asarray(image), np.asarray(alpha)[..., 0])


def mask_shown(colours: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The extension's visualize_inpaint_mask: uint8 colours (h, w, 3) with alpha 255 - mask // 2 (h, w, 4)."""
    return np.concatenate([colours, 255 - mask[..., None] // 2], axis=2)


def map_of(image: Image.Image, module: str, resolution: int, a: float, b: float, max_pixels: int,
           what: str = "image", seed: int | None = None) -> Image.Image:
    """The module's map of a decoded image (detect_map's second half), with its sliders' values `a` and `b` (as
    Preprocessor.slider_values gives them); a random module draws from numpy `seed` (Preprocessor.run)."""
    if module == "none":
        return image
    pre = preprocessor(module)
    pixels = np.asarray(image.convert("RGB"))
    if pre.sizing == "own":  # the extension's modules without a resolution: the image's own size
        return Image.fromarray(pre.run(pixels, a, b, seed))
    if pre.sizing == "shortest":  # annotator/color's own resize: area, even to enlarge
        size, interpolation = shortest_edge_size(image.width, image.height, resolution), "area"
    else:
        size = processor_size(image.width, image.height, resolution)
        interpolation = "cubic" if resolution > min(image.width, image.height) else "area"
    if size[0] * size[1] > max_pixels:
        raise InputError(f"controlnet_processor_res {resolution} makes the {image.width}x{image.height} {what} "
                         f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels, over the limit of {max_pixels}")
    pixels = resize(pixels, *size, interpolation)
    if pre.sizing in ("resize", "shortest"):
        return Image.fromarray(pre.run(pixels, a, b, seed))
    padded = np.pad(pixels, ((0, -size[1] % 64), (0, -size[0] % 64), (0, 0)), mode="edge")
    return Image.fromarray(np.ascontiguousarray(pre.run(padded, a, b, seed)[:size[1], :size[0]]))
