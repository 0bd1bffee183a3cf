"""AUTOMATIC1111's image operations for img2img and inpainting, in PIL + numpy.

The mask (white = repaint) is read, inverted and blurred as AUTOMATIC1111 reads it; "fill" paints
the masked area with the colours around it; "only masked" inpaints a crop around the mask; the
overlay pastes the init image back outside the blurred mask; resize_mode 1 and 2 shape the init
image (and the mask) before anything else, in AUTOMATIC1111's steps.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from kiln.errors import InputError
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


def soft_mask(data: bytes, width: int, height: int, blur: Blur, invert: bool, resize_mode: int = 0,
              binarize: bool = True) -> Image.Image:
    """The mask as a PIL "L" image of width x height, white = repaint, made as AUTOMATIC1111 makes it, at the mask's
    own size: read (a partly transparent mask by its alpha channel, opaque above 128 = repaint unless not
    `binarize`, its mask_round: its create_binary_mask), inverted, blurred (gaussian_blur); then shaped to width x
    height by `resize_mode` as the init image is (resize_init_image; 0 and 3 a plain Lanczos resize)."""
    try:
        rgb = decode_image(data, ImageLimits(min_side=1))  # validates the bytes (format, size limits) first
    except InputError as exc:
        raise InputError(f"mask: {exc}") from None
    raw = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if raw.mode in ("RGBA", "LA", "PA") and raw.getchannel("A").getextrema()[0] < 255:
        mask = raw.getchannel("A")
        mask = mask.point(lambda v: 255 if v > 128 else 0) if binarize else mask
    else:
        mask = rgb.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    mask = gaussian_blur(mask, *(blur if isinstance(blur, tuple) else (blur, blur)))
    return shaped(mask, width, height, resize_mode)


def given_mask(data: bytes, what: str = "latent_mask") -> Image.Image:
    """A mask taken as it is (AUTOMATIC1111's latent_mask: no alpha, blur, inversion or resize), as a PIL "L" image,
    white = repaint."""
    try:
        return decode_image(data, ImageLimits(min_side=1)).convert("L")
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


def gaussian_blur(mask: Image.Image, x: int, y: int) -> Image.Image:
    """AUTOMATIC1111's mask blur: OpenCV's GaussianBlur along x, then along y, each over 2 int(2.5 r + 0.5) + 1
    pixels with sigma r, the edges mirrored without repeating the edge pixel (BORDER_REFLECT_101), in OpenCV's 8-bit
    fixed point (opencv_kernel): the same pixels as OpenCV's."""
    values = np.asarray(mask, dtype=np.int32)  # at most 255 x 256 before the shift
    for axis, radius in ((1, x), (0, y)):
        if radius <= 0:
            continue
        kernel = opencv_kernel(radius)
        half = len(kernel) // 2
        rows = values if axis == 1 else values.T  # filter along the last axis
        padded = np.pad(rows, ((0, 0), (half, half)), mode="reflect")
        total = np.zeros_like(rows)
        for i, weight in enumerate(kernel.tolist()):
            if weight:
                total += weight * padded[:, i:i + rows.shape[1]]
        rows = (total + 128) >> 8
        values = rows if axis == 1 else rows.T
    return Image.fromarray(values.astype(np.uint8), "L") if (x > 0 or y > 0) else mask


def opencv_kernel(radius: int) -> np.ndarray:
    """OpenCV's 8-bit Gaussian kernel for sigma `radius` over 2 int(2.5 r + 0.5) + 1 taps, in 256ths: the exact
    weights scaled by 256 and rounded from the outermost tap inwards, each carrying the rounding error of the one
    before; the centre takes what makes the sum 256 (measured against opencv-python 5.1's GaussianBlur: equal)."""
    taps = 2 * int(2.5 * radius + 0.5) + 1
    centre = taps // 2
    exact = np.exp(-((np.arange(taps) - centre) ** 2) / (2.0 * radius * radius))
    exact *= 256 / exact.sum()
    kernel = np.zeros(taps, np.int64)
    carried = 0.0
    for i in range(centre):
        wanted = exact[i] + carried
        kernel[i] = kernel[taps - 1 - i] = int(np.floor(wanted + 0.5))
        carried = wanted - kernel[i]
    kernel[centre] = 256 - 2 * kernel[:centre].sum()
    return kernel


def inpaint_mask(data: bytes, width: int, height: int, blur: Blur, invert: bool) -> np.ndarray:
    """The soft mask rounded (1, height, width), 1 = repaint: what a 9-channel inpainting UNet takes."""
    return rounded(soft_mask(data, width, height, blur, invert))


def rounded(soft: Image.Image, rounding: bool = True) -> np.ndarray:
    """The soft mask rounded to 0 and 1 (1, height, width): AUTOMATIC1111's inpainting conditioning rounds it, as
    diffusers binarizes it (on 8-bit values the two agree); without `rounding` (its mask_round false) it stays soft,
    0 to 1."""
    values = unit_range(soft)
    return np.where(values < 0.5, np.float32(0), np.float32(1)) if rounding else values


def latent_mask(soft: Image.Image, width: int, height: int, rounding: bool = True) -> np.ndarray:
    """AUTOMATIC1111's latent mask (1, height, width), 1 = repaint: the soft mask resized to the latents' size by
    PIL's default (bicubic) filter, then rounded unless not `rounding`, its mask_round (orchestrator.pipeline.blend)."""
    small = soft.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    values = np.asarray(small, dtype=np.float32)[None, ..., 0] / np.float32(255)
    return np.around(values) if rounding else values


def crop_region(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) around the mask's True pixels, `padding` wider on each side, then grown
    towards the aspect ratio width:height and kept inside the image, as AUTOMATIC1111's "only masked" crop
    (masking.get_crop_region_v2 and expand_crop_region): the growth is the float shortfall rounded down, split with
    the odd pixel after; None when nothing is masked."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    image_h, image_w = mask.shape
    left, right = max(int(cols.min()) - padding, 0), min(int(cols.max()) + 1 + padding, image_w)
    top, bottom = max(int(rows.min()) - padding, 0), min(int(rows.max()) + 1 + padding, image_h)

    def grown(low: int, high: int, by: int, limit: int) -> tuple[int, int]:
        low, high = low - by // 2, high + by - by // 2
        if high >= limit:  # past the far edge: moved back inside
            low, high = low - (high - limit), limit
        if low < 0:  # past the near edge: moved forward, then cut at the far edge
            low, high = 0, high - low
        return low, min(high, limit)

    ratio = width / height  # in floats, as there (the shortfall's rounding follows them)
    if (right - left) / (bottom - top) > ratio:  # too flat: taller
        top, bottom = grown(top, bottom, int((right - left) / ratio - (bottom - top)), image_h)
    else:  # too narrow: wider
        left, right = grown(left, right, int((bottom - top) * ratio - (right - left)), image_w)
    return left, top, right, bottom


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """AUTOMATIC1111's "fill": the masked area painted with the colours around it, from wide to narrow blurs.

    The kept pixels (the soft mask's complement as their alpha), blurred with decreasing radii, are layered over
    each other, each layer's alpha being how much kept area its blur reached; the kept pixels themselves go on top.
    """
    kept = image.convert("RGBA")
    kept.putalpha(ImageOps.invert(mask))
    premultiplied = kept.convert("RGBa")  # blur colour weighted by alpha, so the masked area adds nothing
    result = Image.new("RGBA", image.size)
    for radius, layers in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = (premultiplied.filter(ImageFilter.GaussianBlur(radius)) if radius else premultiplied).convert("RGBA")
        for _ in range(layers):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def paste_outside_mask(images: np.ndarray, init_image: bytes, soft: Image.Image) -> np.ndarray:
    """AUTOMATIC1111's overlay for the whole picture: the init image over each result, opaque where the soft mask
    (soft_mask, at the images' size) keeps it, with the mask doubled first (its mask_for_overlay: a pixel blurred
    half-way in or further repaints whole)."""
    overlay = init_overlay(resized_rgb(init_image, soft.width, soft.height), doubled(soft))
    return np.stack([np.asarray(under_overlay(Image.fromarray(image), overlay)) for image in images])


def doubled(soft: Image.Image) -> Image.Image:
    """AUTOMATIC1111's mask_for_overlay for the whole picture: the soft mask doubled (a pixel blurred half-way in or
    further is repainted whole)."""
    return Image.fromarray(np.clip(np.asarray(soft, dtype=np.float32) * 2, 0, 255).astype(np.uint8), "L")


def init_overlay(init: Image.Image, mask: Image.Image) -> Image.Image:
    """AUTOMATIC1111's overlay image: the init image with the inverted mask as its alpha, made as it makes it (pasted
    premultiplied onto a transparent canvas, then unpremultiplied: the same rounding)."""
    masked = Image.new("RGBa", init.size)
    masked.paste(init.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    return masked.convert("RGBA")


def under_overlay(image: Image.Image, overlay: Image.Image) -> Image.Image:
    """`image` (RGB, or RGBA with transparency where nothing was pasted) with `overlay` composited over it, as
    AUTOMATIC1111's apply_overlay: RGB."""
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


def resize_init_image(data: bytes, width: int, height: int, mode: int) -> bytes:
    """AUTOMATIC1111's resize_mode for the init image: 1 crop and resize, 2 resize and fill; 0 and 3 return the
    bytes unchanged (the pipeline's own plain resize)."""
    if mode not in (1, 2):
        return data
    return encode_png(shaped(decode_image(data, ImageLimits(min_side=1)), width, height, mode))


def shaped(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """`image` at width x height by resize_mode, in AUTOMATIC1111's steps (modules/images.py resize_image): any mode
    but 1 and 2 a plain Lanczos resize; 1 (crop and resize) the whole image resized until it covers the frame (the
    other side by floor division), centred, the rest cut off; 2 (resize and fill) resized until it fits, centred, and
    each empty border filled by stretching the resized image's edge row or column across it."""
    if image.size == (width, height):
        return image
    if mode not in (1, 2):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio, source = width / height, image.width / image.height
    full_width = ratio > source if mode == 1 else ratio < source  # the side that takes the frame's full length
    size = (width, image.height * width // image.width) if full_width else (image.width * height // image.height,
                                                                                height)
    resized = image.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    top, left = height // 2 - size[1] // 2, width // 2 - size[0] // 2
    canvas.paste(resized, (left, top))
    if mode == 2 and ratio < source and top > 0:  # bands above and below: the first and the last row stretched
        canvas.paste(resized.resize((width, top), box=(0, 0, width, 0)), (0, 0))
        canvas.paste(resized.resize((width, top), box=(0, size[1], width, size[1])), (0, top + size[1]))
    elif mode == 2 and ratio > source and left > 0:  # bands left and right: the first and the last column stretched
        canvas.paste(resized.resize((left, height), box=(0, 0, 0, height)), (0, 0))
        canvas.paste(resized.resize((left, height), box=(size[0], 0, size[0], height)), (left + size[0], 0))
    return canvas
