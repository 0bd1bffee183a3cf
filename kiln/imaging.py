"""Image decoding, resizing and encoding, and the ViT eval transform, in PIL + numpy (no torch).

The transform's parameters are resolved from timm's own eval transform for the model at build time
(`build.vit.transform.eval_transform`) and stored in the preprocess model's config; nothing here
retypes them. The numeric path copies what torchvision does for PIL input (resize with PIL's bicubic,
centre crop with the same rounding, divide by 255 in float32, subtract mean, divide by std), so it
matches timm's transform to float32 rounding (checked in tests/test_imaging.py).
"""

from __future__ import annotations

import io
import json
import threading
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kiln.errors import InputError, TooLargeError

_OPEN_LOCK = threading.Lock()

# PIL's names for resampling filters, as torchvision's InterpolationMode values spell them.
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class ImageLimits:
    """What the preprocess model accepts; anything else is an error for that request only."""

    max_pixels: int = 50_000_000  # checked on the header, before any pixel is decoded (decompression bombs)
    min_side: int = 16  # smaller images carry no usable content at 224x224
    max_bytes: int = 64 * 1024 * 1024  # encoded size


@dataclass(frozen=True)
class EvalTransform:
    """Resize the short side, centre-crop, scale to [0, 1], normalise: timm's eval transform."""

    resize: int  # short side after resizing
    crop: tuple[int, int]  # (height, width) of the centre crop
    interpolation: str  # a key of RESAMPLE
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EvalTransform:
        data = json.loads(text)
        return cls(resize=int(data["resize"]), crop=tuple(data["crop"]), interpolation=data["interpolation"],
                   mean=tuple(data["mean"]), std=tuple(data["std"]))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize: torchvision's Resize(int) on PIL input takes the short side to `resize`
        and the long side to int(resize * long / short)."""
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 array (3, crop_h, crop_w)."""
        return self.normalize(self.pixels(image))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> the resized, cropped uint8 array (3, crop_h, crop_w): the model's input before scaling, a
        quarter of its bytes on the wire (normalize gives the same floats as __call__)."""
        width, height = image.size
        new_w, new_h = self.resized_size(width, height)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), RESAMPLE[self.interpolation])
        crop_h, crop_w = self.crop
        if new_w < crop_w or new_h < crop_h:
            raise InputError(f"image of {new_w}x{new_h} after resizing is smaller than the {crop_w}x{crop_h} crop")
        # torchvision's center_crop rounding.
        top = int(round((new_h - crop_h) / 2.0))
        left = int(round((new_w - crop_w) / 2.0))
        image = image.crop((left, top, left + crop_w, top + crop_h))
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (..., 3, H, W) -> float32: / 255, minus the mean, over the std, per channel."""
        return normalize_pixels(pixels, self.mean, self.std)


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(),
                 draft: Callable[[int, int], tuple[int, int]] | None = None, resample: str = "bicubic") -> Image.Image:
    """Encoded image bytes (any format PIL reads, any mode) -> an upright RGB image.

    `draft`, for JPEGs only: given the header's (width, height), the size the caller resizes to. libjpeg then decodes
    at 1/2, 1/4 or 1/8 scale (in the DCT, a fraction of the work) while both sides stay at least that size, and the
    reduced image is resized to it (`resample`, a key of RESAMPLE) over the area it covers: a side that the scale
    does not divide ends in a partial pixel, which resizing the whole image would stretch over the rest. The pixels
    are close to, not equal to, decoding in full and resizing (kiln bench preprocess measures both).

    Raises InputError naming the problem for empty, corrupt, oversized (by header, before decoding)
    or too small images.
    """
    if not data:
        raise InputError("empty image: the request carried 0 bytes")
    if len(data) > limits.max_bytes:
        raise InputError(f"image of {len(data)} bytes exceeds the {limits.max_bytes}-byte limit")
    try:
        # catch_warnings swaps the process's filter list, so two threads inside it at once can leave one's filter
        # behind: the header parse it guards takes microseconds and runs under a lock; the decode runs outside it.
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size  # from the header only
        if width * height > limits.max_pixels:
            raise InputError(
                f"image header declares {width}x{height} = {width * height} pixels, "
                f"over the limit of {limits.max_pixels}; refused before decoding")
        if min(width, height) < limits.min_side:
            raise InputError(f"image of {width}x{height} is too small: each side must be at least "
                             f"{limits.min_side} pixels")
        target = draft(width, height) if draft is not None else None
        reduced = image.draft(None, target) if target else None  # JPEG only: other formats return None
        image.load()  # PIL decodes without the GIL: threads decode side by side (vit_preprocess's pool)
        if reduced and image.size != (width, height):
            # In the stored orientation, as the box is: the EXIF rotation below turns the target with the image.
            image = image.resize(target, RESAMPLE[resample], box=reduced[1])
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"cannot decode image: {len(data)} bytes in no format this server reads "
                         "(JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own guard fires inside Image.open for headers beyond ~89 M pixels.
        raise InputError(f"image header declares too many pixels ({exc}); refused before decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited over white; 16/32-bit greyscale is rescaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((array >> 8).astype(np.uint8), mode="L").convert("RGB")
    if mode == "I":
        array = np.asarray(image, dtype=np.int64)
        top = 65535 if array.max(initial=0) > 255 else 255
        return Image.fromarray((np.clip(array, 0, top) * 255 // top).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        scaled = np.zeros_like(array) if hi <= lo else (array - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.nan_to_num(scaled).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, LAB, HSV, 1


def resized_rgb(data: bytes, width: int, height: int, what: str = "image") -> Image.Image:
    """Decode (any format/mode, EXIF, alpha over white) and resize to width x height with Lanczos, as
    diffusers' VaeImageProcessor does (AUTOMATIC1111's "just resize")."""
    try:
        image = decode_image(data, ImageLimits(min_side=1))
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def unit_range(image: Image.Image) -> np.ndarray:
    """uint8 image -> float32 (channels, H, W) in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(array.transpose(2, 0, 1) if array.ndim == 3 else array[None])


def vae_input(data: bytes, width: int, height: int, what: str = "init image") -> np.ndarray:
    """Encoded image -> the VAE encoder's input (3, height, width) in [-1, 1]."""
    return np.float32(2.0) * unit_range(resized_rgb(data, width, height, what)) - np.float32(1.0)


def preprocess(data: bytes, transform: EvalTransform, limits: ImageLimits = ImageLimits(),
               jpeg_draft: bool = False, scaled: bool = True) -> np.ndarray:
    """Encoded image bytes -> the model's float32 input (3, H, W), or with `scaled` False its uint8 pixels before
    scaling (EvalTransform.pixels); `jpeg_draft`: a JPEG at least twice the resize target decodes reduced and resizes
    from that (decode_image's `draft`)."""
    image = decode_image(data, limits, transform.resized_size, transform.interpolation) if jpeg_draft else \
        decode_image(data, limits)
    return transform(image) if scaled else transform.pixels(image)


def preprocess_or_message(data: bytes, transform: EvalTransform, limits: ImageLimits = ImageLimits(),
                          jpeg_draft: bool = False, scaled: bool = True) -> np.ndarray | str:
    """preprocess, or the message that fails this image's request alone (a Triton model's batch goes on)."""
    try:
        return preprocess(data, transform, limits, jpeg_draft, scaled)
    except InputError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises fails this request only
        return f"cannot process image ({type(exc).__name__})"


def normalize_pixels(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 pixels (..., 3, H, W) -> float32 (pixels / 255 - mean) / std per channel, the eval transform's scaling
    in its order of operations (the same floats, bit for bit)."""
    shape = (3, 1, 1)
    array = pixels.astype(np.float32)  # then in place: one buffer (a 256-image batch is 154 MB of float32)
    array /= np.float32(255.0)
    array -= np.asarray(mean, np.float32).reshape(shape)
    array /= np.asarray(std, np.float32).reshape(shape)
    return array


def header_size(data: bytes, what: str = "image", max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the header alone: unreadable is an InputError, more than `max_pixels` a TooLargeError,
    both before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise TooLargeError(f"{what}: image header declares too many pixels; refused before decoding") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"{what}: not an image this server reads (JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    if max_pixels is not None and width * height > max_pixels:
        raise TooLargeError(f"{what}: image header declares {width}x{height} = {width * height} pixels, over the "
                            f"limit of {max_pixels}; refused before decoding")
    return width, height


def encode_png(image: Image.Image | np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes of a PIL image or a uint8 array (H, W, 3), with optional text chunks (AUTOMATIC1111's "parameters")."""
    from PIL import PngImagePlugin

    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    meta = None
    if text:
        meta = PngImagePlugin.PngInfo()
        for key, value in text.items():
            meta.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()


# AUTOMATIC1111's samples_format (and grid_format) values -> PIL's formats
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD and its UserComment tag
UNICODE_COMMENT = b"UNICODE\0"  # EXIF's character code for UTF-16 (big-endian, as piexif writes it)
ASCII_COMMENT = b"ASCII\0\0\0"
WEBP_MAX_SIDE = 16383  # libwebp's limit


@dataclass(frozen=True)
class ImageFormat:
    """How AUTOMATIC1111 encodes its images (samples_format, jpeg_quality, webp_lossless): PNG with the infotext in a
    "parameters" text chunk; JPEG or WebP with it in EXIF's UserComment, as its encode_pil_to_base64 and save_image
    write them (piexif's "unicode": the UNICODE code, then UTF-16BE)."""

    name: str = "png"  # a key of IMAGE_FORMATS, as the setting spells it (the saved file's extension)
    quality: int = 80  # JPEG's and lossy WebP's
    lossless: bool = False  # WebP's

    def encode(self, image: Image.Image | np.ndarray, text: dict[str, str] | None = None) -> bytes:
        """The image's bytes. A JPEG's EXIF holds at most 64 KB: an infotext too long for it in UTF-16 (over ~32,000
        characters) is written in ASCII where it is ASCII, and left out where neither fits (the answer's info still
        has it). A WebP side over 16,383 pixels is refused, naming the setting."""
        if self.name == "png":
            return encode_png(image, text)
        if isinstance(image, np.ndarray):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        pil, comment = IMAGE_FORMATS[self.name], (text or {}).get("parameters", "")
        if pil == "WEBP" and max(image.size) > WEBP_MAX_SIDE:
            raise InputError(f"samples_format {self.name!r}: a {image.size[0]}x{image.size[1]} image is over WebP's "
                             f"{WEBP_MAX_SIDE} pixels a side; use png or jpg for it")
        image = image.convert("RGB")  # (JPEG has no alpha; AUTOMATIC1111's answers are RGB)
        comments = [UNICODE_COMMENT + comment.encode("utf-16-be")]
        comments += [ASCII_COMMENT + comment.encode("ascii")] if comment.isascii() else []
        options = {"lossless": self.lossless} if pil == "WEBP" else {}
        for raw in [*comments, None]:
            exif = Image.Exif()
            if raw is not None:
                exif.get_ifd(EXIF_IFD)[USER_COMMENT] = raw
            buffer = io.BytesIO()
            try:
                image.save(buffer, format=pil, exif=exif, quality=self.quality, **options)
            except ValueError as exc:  # Pillow's "EXIF data is too long" (JPEG's 64 KB APP1 segment)
                if "EXIF" not in str(exc) or raw is None:
                    raise
                continue
            return buffer.getvalue()
        raise AssertionError("unreachable: the last try has no comment")


PNG = ImageFormat()  # AUTOMATIC1111's default samples_format


def user_comment(image: Image.Image) -> str:
    """The text of an image's EXIF UserComment ("" where it has none), read as AUTOMATIC1111 reads its JPEG and WebP
    infotexts (piexif's UserComment.load: by its character code; without a known one, the bytes as UTF-8)."""
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT, b"")
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):  # a file from elsewhere with another type under the tag: no infotext
        return ""
    codes = {UNICODE_COMMENT: "utf-16-be", ASCII_COMMENT: "ascii", b"JIS\0\0\0\0\0": "shift_jis"}
    if raw[:8] in codes:
        return raw[8:].decode(codes[raw[:8]], errors="ignore")
    return raw.decode("utf8", errors="ignore")


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """VAE decoder output in [-1, 1] (N, 3, H, W) -> (N, H, W, 3) uint8, rounded as diffusers rounds it."""
    scaled = np.clip(decoded / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1)
    return np.round(scaled * np.float32(255)).astype(np.uint8)
