"""Image decoding and the ViT eval transform, in PIL + numpy (no torch), for the preprocess model.

The transform's parameters are resolved from timm's own eval transform for the model at build time
(`EvalTransform.from_timm`) and stored in the preprocess model's config; nothing here retypes
them. The numeric path copies what torchvision does for PIL input (resize with PIL's bicubic,
centre crop with the same rounding, divide by 255 in float32, subtract mean, divide by std), so it
matches timm's transform to float32 rounding (checked in tests/test_imaging.py).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from build.errors import InputError

# PIL's names for resampling filters, as torchvision's InterpolationMode values spell them.
_RESAMPLE = {
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
    interpolation: str  # a key of _RESAMPLE
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_timm(cls, model) -> "EvalTransform":
        """Resolve from timm's own eval transform for `model` (its pretrained_cfg)."""
        import timm.data
        from torchvision import transforms as T

        config = timm.data.resolve_data_config(model=model)
        pipeline = timm.data.create_transform(**config, is_training=False)
        resize = crop = interpolation = mean = std = None
        for step in pipeline.transforms:
            if isinstance(step, T.Resize):
                if not isinstance(step.size, int) and len(step.size) != 1:
                    raise ValueError(f"unsupported Resize size {step.size!r}: only short-side resizing is implemented")
                resize = step.size if isinstance(step.size, int) else step.size[0]
                interpolation = step.interpolation.value
            elif isinstance(step, T.CenterCrop):
                crop = tuple(int(v) for v in step.size)
            elif isinstance(step, T.Normalize):
                mean = tuple(float(v) for v in step.mean)
                std = tuple(float(v) for v in step.std)
            elif type(step).__name__ not in ("MaybeToTensor", "ToTensor"):
                raise ValueError(f"unsupported step {step!r} in timm's eval transform")
        if None in (resize, crop, interpolation, mean, std):
            raise ValueError(f"timm's eval transform {pipeline} lacks resize, crop or normalize")
        if interpolation not in _RESAMPLE:
            raise ValueError(f"unsupported interpolation {interpolation!r}")
        return cls(resize=resize, crop=crop, interpolation=interpolation, mean=mean, std=std)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EvalTransform":
        data = json.loads(text)
        return cls(resize=int(data["resize"]), crop=tuple(data["crop"]), interpolation=data["interpolation"],
                   mean=tuple(data["mean"]), std=tuple(data["std"]))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 array (3, crop_h, crop_w)."""
        width, height = image.size
        # torchvision's Resize(int) on PIL input: short side -> resize, long side -> int(resize * long / short).
        if width <= height:
            new_w, new_h = self.resize, int(self.resize * height / width)
        else:
            new_w, new_h = int(self.resize * width / height), self.resize
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), _RESAMPLE[self.interpolation])
        crop_h, crop_w = self.crop
        if new_w < crop_w or new_h < crop_h:
            raise InputError(f"image of {new_w}x{new_h} after resizing is smaller than the {crop_w}x{crop_h} crop")
        # torchvision's center_crop rounding.
        top = int(round((new_h - crop_h) / 2.0))
        left = int(round((new_w - crop_w) / 2.0))
        image = image.crop((left, top, left + crop_w, top + crop_h))
        array = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Encoded image bytes (any format PIL reads, any mode) -> an upright RGB image.

    Raises InputError naming the problem for empty, corrupt, oversized (by header, before decoding)
    or too small images.
    """
    if not data:
        raise InputError("empty image: the request carried 0 bytes")
    if len(data) > limits.max_bytes:
        raise InputError(f"image of {len(data)} bytes exceeds the {limits.max_bytes}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header only
            if width * height > limits.max_pixels:
                raise InputError(
                    f"image header declares {width}x{height} = {width * height} pixels, "
                    f"over the limit of {limits.max_pixels}; refused before decoding")
            if min(width, height) < limits.min_side:
                raise InputError(f"image of {width}x{height} is too small: each side must be at least {limits.min_side} pixels")
            image.load()
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


def preprocess(data: bytes, transform: EvalTransform, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Encoded image bytes -> the model's float32 input (3, H, W)."""
    return transform(decode_image(data, limits))
