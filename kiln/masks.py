"""AUTOMATIC1111's image operations for img2img and inpainting, in PIL + numpy.

The mask (white = repaint) is read, inverted and blurred as AUTOMATIC1111 reads it; "fill" paints
the masked area with the colours around it; "only masked" inpaints a crop around the mask; the
overlay pastes the init image back outside the blurred mask; resize_mode 1 and 2 shape the init
image before anything else.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from kiln.imaging import ImageLimits, decode_image, encode_png, resized_rgb, unit_range

# What the masked area starts from (AUTOMATIC1111's names), at every denoising strength.
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill", 3: "just resize (latent upscale)"}


Blur = int | tuple[int, int]  # the mask's Gaussian blur: one radius, or (x, y) (AUTOMATIC1111's mask_blur_x/y)


def blur_radius(blur: Blur) -> int | None:
    """The infotext's "Mask blur": the one radius; None for separate x and y radii (AUTOMATIC1111 writes none)."""
    if isinstance(blur, tuple):
        return blur[0] if blur[0] == blur[1] else None
    return blur


def soft_mask(data: bytes, width: int, height: int, blur: Blur, invert: bool) -> Image.Image:
    """The mask as a PIL "L" image, white = repaint: AUTOMATIC1111's invert, then its Gaussian blur (one radius, or
    separate x and y radii).

    A partly transparent mask is read by its alpha channel (opaque = repaint), as AUTOMATIC1111 does.
    """
    rgb = resized_rgb(data, width, height, "mask")  # validates the bytes (format, size limits) first
    raw = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if raw.mode in ("RGBA", "LA", "PA") and raw.getchannel("A").getextrema()[0] < 255:
        mask = raw.getchannel("A")
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    else:
        mask = rgb.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    x, y = blur if isinstance(blur, tuple) else (blur, blur)
    if x > 0 or y > 0:
        mask = mask.filter(ImageFilter.GaussianBlur((x, y)))
    return mask


def inpaint_mask(data: bytes, width: int, height: int, blur: Blur, invert: bool) -> np.ndarray:
    """The mask (1, height, width) the pipeline uses: the soft mask, then diffusers' binarize (1 = repaint)."""
    values = unit_range(soft_mask(data, width, height, blur, invert))
    return np.where(values < 0.5, np.float32(0), np.float32(1))


def crop_region(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) around the mask's True pixels, `padding` wider on each side and then
    widened to the aspect ratio width:height, kept inside the image (AUTOMATIC1111's "only masked" crop); None
    when nothing is masked."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    image_h, image_w = mask.shape
    left, right = max(int(cols.min()) - padding, 0), min(int(cols.max()) + 1 + padding, image_w)
    top, bottom = max(int(rows.min()) - padding, 0), min(int(rows.max()) + 1 + padding, image_h)

    def widen(low: int, high: int, size: int, limit: int) -> tuple[int, int]:
        size = min(size, limit)
        low = max(0, min(low - (size - (high - low)) // 2, limit - size))
        return low, low + size

    box_w, box_h = right - left, bottom - top
    if box_w * height < box_h * width:  # too narrow: widen
        left, right = widen(left, right, math.ceil(box_h * width / height), image_w)
    else:  # too flat: heighten
        top, bottom = widen(top, bottom, math.ceil(box_w * height / width), image_h)
    return left, top, right, bottom


def fill_masked(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """AUTOMATIC1111's "fill": the masked area painted with the colours around it, from wide to narrow blurs.

    The kept pixels (mask 0), blurred with decreasing radii, are layered over each other, each
    layer's alpha being how much kept area its blur reached; the kept pixels themselves go on top.
    """
    keep = Image.fromarray(((1 - mask[0]) * 255).astype(np.uint8), "L")
    kept = image.convert("RGBA")
    kept.putalpha(keep)
    premultiplied = kept.convert("RGBa")  # blur colour weighted by alpha, so the masked area adds nothing
    result = Image.new("RGBA", image.size)
    for radius, layers in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = (premultiplied.filter(ImageFilter.GaussianBlur(radius)) if radius else premultiplied).convert("RGBA")
        for _ in range(layers):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def paste_outside_mask(images: np.ndarray, init_image: bytes, mask: bytes, width: int, height: int, blur: Blur,
                       invert: bool) -> np.ndarray:
    """AUTOMATIC1111's overlay: the init image over each result, opaque where the blurred mask keeps it."""
    original = np.asarray(resized_rgb(init_image, width, height), dtype=np.float32)
    repaint = np.asarray(soft_mask(mask, width, height, blur, invert), dtype=np.float32)[..., None] / np.float32(255)
    blended = images.astype(np.float32) * repaint + original[None] * (1 - repaint)
    return np.round(blended).astype(np.uint8)


def resize_init_image(data: bytes, width: int, height: int, mode: int) -> bytes:
    """AUTOMATIC1111's resize_mode for the init image: 1 crop and resize, 2 resize and fill; 0 and 3 return the
    bytes unchanged (the pipeline's own plain resize)."""
    if mode not in (1, 2):
        return data
    image = decode_image(data, ImageLimits(min_side=1))
    if mode == 1:
        image = ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    else:  # the whole image inside, the borders filled with a blurred stretch of it
        fitted = ImageOps.contain(image, (width, height), Image.Resampling.LANCZOS)
        canvas = image.resize((width, height), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(16))
        canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
        image = canvas
    return encode_png(image)
