"""Preprocessing: parity with timm's own eval transform, every image mode, EXIF, and bad bytes."""

from __future__ import annotations

import re

import numpy as np
import pytest
import timm.data
from PIL import Image

from build.parity import psnr
from build.vit.transform import eval_transform
from kiln.errors import InputError
from kiln.imaging import EvalTransform, ImageLimits, decode_image, preprocess, to_rgb
from kiln.runtime import ByteScale
from tests.conftest import encode, png_header_only


@pytest.fixture(scope="module")
def transform(vit_model) -> EvalTransform:
    return eval_transform(vit_model)


@pytest.fixture(scope="module")
def timm_transform(vit_model):
    return timm.data.create_transform(**timm.data.resolve_data_config(model=vit_model), is_training=False)


def test_transform_is_resolved_from_timm(transform, vit_model):
    config = timm.data.resolve_data_config(model=vit_model)
    assert transform.crop == tuple(config["input_size"][1:])
    assert transform.mean == tuple(config["mean"]) and transform.std == tuple(config["std"])
    assert transform.interpolation == config["interpolation"]
    assert transform.resize == 248  # floor(224 / crop_pct 0.9), as timm computes it
    assert EvalTransform.from_json(transform.to_json()) == transform


def test_parity_with_timm_on_shipped_images(sample_images, transform, timm_transform):
    assert len(sample_images) >= 5
    for path in sample_images:
        rgb = decode_image(path.read_bytes())
        ours = transform(rgb)
        theirs = timm_transform(rgb).numpy()
        assert ours.shape == theirs.shape == (3, 224, 224)
        assert np.abs(ours - theirs).max() <= 1e-5, path.name


def test_uint8_pixels_scale_to_the_transforms_floats_bit_for_bit(sample_images, transform):
    """The Python-backend vit's `pixels` (uint8, resized and cropped) scaled by kiln.runtime.ByteScale, by the
    transform's own normalize, are the very floats of the eval transform: a quarter of the bytes, nothing lost."""
    scale = ByteScale(transform.mean, transform.std)
    for path in sample_images:
        data = path.read_bytes()
        raw, floats = preprocess(data, transform, scaled=False), preprocess(data, transform)
        assert raw.dtype == np.uint8 and raw.shape == floats.shape == (3, 224, 224)
        np.testing.assert_array_equal(transform.normalize(raw), floats)
        np.testing.assert_array_equal(scale.numpy(raw[None])[0], floats)
    assert ByteScale.parse(ByteScale.dump({"pixel_values": scale})) == {"pixel_values": scale}


@pytest.mark.parametrize("size", [(16, 16), (17, 300), (1000, 37), (249, 248), (248, 248)])
def test_parity_with_timm_on_odd_sizes(size, transform, timm_transform):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    assert np.abs(transform(image) - timm_transform(image).numpy()).max() <= 1e-5


def test_every_mode_converts_to_rgb(sample_images):
    base = Image.open(sample_images[0]).convert("RGB").resize((64, 48))
    gray = base.convert("L")
    modes = {
        "L": gray,
        "LA": base.convert("LA"),
        "P": base.convert("P"),
        "RGBA": base.convert("RGBA"),
        "CMYK": base.convert("CMYK"),
        "I;16": Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257),
    }
    for mode, image in modes.items():
        assert image.mode == mode
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        decoded = decode_image(encode(image, fmt))
        assert decoded.mode == "RGB" and decoded.size == (64, 48), mode
    # 16-bit grey is rescaled, not clipped: a 16-bit copy of the 8-bit image decodes to the 8-bit image.
    sixteen = decode_image(encode(modes["I;16"]))
    assert np.array_equal(np.asarray(sixteen)[..., 0], np.asarray(gray))


def test_transparency_is_composited_over_white():
    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert np.asarray(to_rgb(transparent)).min() == 255
    half = Image.new("LA", (32, 32), (0, 128))
    assert abs(int(np.asarray(to_rgb(half))[0, 0, 0]) - 127) <= 1


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (80, 40), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 40, 40))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(wide, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (40, 80)
    top = np.asarray(decoded)[5, 20]
    assert top[2] > 200 and top[0] < 60  # the blue half is on top after rotating 90 degrees clockwise


@pytest.mark.parametrize("data, message", [
    (b"", "0 bytes"),
    (b"not an image at all", "no format"),
    (png_header_only(20000, 20000), "refused before decoding"),
    (png_header_only(9000, 9000), "refused before decoding"),
    (encode(Image.new("RGB", (1, 1))), "too small"),
])
def test_bad_bytes_raise_input_error(data, message):
    with pytest.raises(InputError, match=message) as info:
        decode_image(data)
    assert not re.search(r"0x[0-9a-fA-F]{6,}", str(info.value))  # no memory address leaks into a message


def test_truncated_jpeg_is_an_input_error(sample_images):
    data = sample_images[0].read_bytes()
    with pytest.raises(InputError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 3])


def test_limits_are_configurable():
    image = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(InputError, match="over the limit"):
        decode_image(image, ImageLimits(max_pixels=5000))
    assert preprocess(image, EvalTransform(248, (224, 224), "bicubic", (0.5,) * 3, (0.5,) * 3)).shape == (3, 224, 224)


def _photo(sample_images, size: tuple[int, int], exif: bytes = b"") -> bytes:
    """A sample photo resized to `size` and saved as JPEG: large enough for libjpeg's reduced decoding."""
    photo = Image.open(next(p for p in sample_images if p.suffix == ".jpg")).convert("RGB")
    return encode(photo.resize(size, Image.Resampling.BICUBIC), "JPEG", quality=92, exif=exif)


def _psnr01(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two preprocessed images on the 0..1 scale (ViT-B/16 normalises with std 0.5)."""
    return psnr(a * 0.5, b * 0.5, peak=1.0)


@pytest.mark.parametrize("size", [(1200, 900), (1600, 1201), (4032, 2268)])
def test_jpeg_draft_decodes_a_large_jpeg_reduced_and_close(sample_images, transform, size):
    """1200x900 decodes at 1/2 (1/4 would leave 225 < 248 rows); 1600x1201 at 1/4, its last row a partial pixel that
    the resize must not stretch over the rest (it cost 17 dB before the draft's box was used); 4032x2268 at 1/8."""
    data = _photo(sample_images, size)
    assert decode_image(data, draft=transform.resized_size).size == transform.resized_size(*size)
    exact, drafted = preprocess(data, transform), preprocess(data, transform, jpeg_draft=True)
    assert exact.shape == drafted.shape == (3, 224, 224)
    assert not np.array_equal(exact, drafted) and _psnr01(exact, drafted) > 42  # close, not equal


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_draft_keeps_exif_orientation(sample_images, transform, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # 3: upside down; 6 and 8: turned a quarter, so width and height swap
    data = _photo(sample_images, (1201, 800), exif.tobytes())
    upright = decode_image(data).size
    assert decode_image(data, draft=transform.resized_size).size == transform.resized_size(*upright)
    assert _psnr01(preprocess(data, transform), preprocess(data, transform, jpeg_draft=True)) > 42


def test_jpeg_draft_leaves_other_images_as_they_were(sample_images, transform):
    small = _photo(sample_images, (480, 400))  # under twice the target on its short side: decoded in full
    png = encode(Image.open(next(p for p in sample_images if p.suffix == ".jpg")).convert("RGB").resize((1200, 900)))
    for data in (small, png):
        np.testing.assert_array_equal(preprocess(data, transform), preprocess(data, transform, jpeg_draft=True))
