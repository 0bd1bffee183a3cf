"""AUTOMATIC1111's samples_format (png, jpg, jpeg, webp), jpeg_quality, webp_lossless and grid_format: the answers'
images (txt2img, img2img, scripts, extras, ControlNet's detect, /progress) and the saved files encoded as it encodes
them, a JPEG's or WebP's infotext in EXIF's UserComment (piexif's "unicode" layout), read back by /png-info."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from kiln.errors import InputError
from kiln.imaging import EXIF_IFD, PNG, USER_COMMENT, ImageFormat, user_comment
from kiln.infotext import read_png_info
from orchestrator.server.a1111 import updated_options
from orchestrator.server.options import check_image_settings, default_options

TEXT = 'a "cat", café\nNegative prompt: dog\nSteps: 2, Sampler: Euler a, Seed: 7, Size: 64x64'


def picture(seed: int = 0, side: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize(("name", "pil"), [("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_a_jpeg_or_webp_carries_the_infotext_in_exif_as_automatic1111_writes_it(name, pil):
    data = ImageFormat(name).encode(picture(), {"parameters": TEXT, "postprocessing": "kept in PNG only"})
    image = opened(data)
    assert image.format == pil and image.mode == "RGB" and image.size == (48, 48)
    raw = image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]  # piexif's UserComment.dump(text, encoding="unicode")
    assert raw == b"UNICODE\0" + TEXT.encode("utf-16-be")
    info = read_png_info(data)
    assert info["info"] == TEXT and info["parameters"]["Seed"] == "7"
    assert info["parameters"]["Prompt"] == 'a "cat", café'


def test_the_encoding_settings_are_honoured():
    image = picture(1, 96)
    assert np.array_equal(np.asarray(opened(ImageFormat("webp", lossless=True).encode(image))), image)
    assert not np.array_equal(np.asarray(opened(ImageFormat("webp").encode(image))), image)
    small, large = (len(ImageFormat("jpg", quality=q).encode(image)) for q in (10, 95))
    assert small < large / 2
    rgba = np.dstack([image, np.full(image.shape[:2], 128, np.uint8)])  # a ControlNet inpaint map's alpha
    assert opened(ImageFormat("jpg").encode(rgba)).mode == "RGB" and opened(PNG.encode(rgba)).mode == "RGBA"
    png = PNG.encode(image, {"parameters": TEXT})
    assert opened(png).format == "PNG" and read_png_info(png)["info"] == TEXT


def test_what_a_format_cannot_hold_is_handled():
    """A JPEG's EXIF holds 64 KB: a long ASCII infotext goes in ASCII, a long other one is left out (the answer's info
    has it), never a failed encode; a WebP side over 16,383 pixels is refused naming the setting."""
    image = picture(3, 32)
    long_ascii, long_other = "a, " * 15000, "é" * 40000
    assert read_png_info(ImageFormat("jpg").encode(image, {"parameters": long_ascii}))["info"] == long_ascii
    assert read_png_info(ImageFormat("jpg").encode(image, {"parameters": long_other}))["info"] == ""
    assert read_png_info(ImageFormat("webp").encode(image, {"parameters": long_other}))["info"] == long_other
    with pytest.raises(InputError, match="samples_format 'webp': a 16400x8 image is over WebP's 16383 pixels"):
        ImageFormat("webp").encode(np.zeros((8, 16400, 3), np.uint8))


def test_a_user_comment_is_read_by_its_character_code():
    def comment(raw: bytes) -> str:
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = raw
        buffer = io.BytesIO()
        Image.fromarray(picture()).save(buffer, format="JPEG", exif=exif)
        return user_comment(opened(buffer.getvalue()))

    assert comment(b"ASCII\0\0\0Steps: 2") == "Steps: 2"
    assert comment(b"UNICODE\0" + "Steps: 2".encode("utf-16-be")) == "Steps: 2"
    assert comment(b"Steps: 3") == "Steps: 3"  # no character code: the bytes as UTF-8, as AUTOMATIC1111 falls back
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = 7  # another type under the tag (a file from elsewhere): no infotext
    buffer = io.BytesIO()
    Image.fromarray(picture()).save(buffer, format="JPEG", exif=exif)
    assert read_png_info(buffer.getvalue())["info"] == ""
    assert read_png_info(PNG.encode(picture()))["info"] == ""


@pytest.mark.parametrize(("update", "message"), [
    ({"samples_format": "gif"}, "option samples_format must be one of png, jpg, jpeg, webp, got 'gif'"),
    ({"grid_format": "bmp"}, "option grid_format must be one of png, jpg, jpeg, webp, got 'bmp'"),
    ({"jpeg_quality": 0}, "option jpeg_quality must be in [1, 100], got 0"),
    ({"jpeg_quality": 80.5}, "option jpeg_quality must be a int"),
    ({"webp_lossless": "yes"}, "option webp_lossless must be a bool"),
])
def test_an_encoding_setting_out_of_range_is_refused(update, message):
    with pytest.raises(InputError) as caught:
        updated_options(default_options(), update, None)
    assert message in str(caught.value)
    with pytest.raises(InputError, match=next(iter(update))):
        check_image_settings(update)


def test_the_settings_are_taken_in_any_case():
    assert updated_options(default_options(), {"samples_format": "JPG", "jpeg_quality": 100}, None) == \
        {"samples_format": "JPG", "jpeg_quality": 100}
    check_image_settings({"samples_format": "WebP", "webp_lossless": True, "grid_format": "jpeg"})


@pytest.fixture(scope="module")
def api(own_api):
    return own_api


SMALL = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 2, "seed": 7, "save_images": False}


def images_of(answer) -> list[Image.Image]:
    assert answer.status_code == 200, answer.text
    return [opened(base64.b64decode(b64)) for b64 in answer.json()["images"]]


@pytest.mark.slow
def test_samples_format_encodes_the_answers_and_the_saved_files(api):
    with api.client() as client:
        try:
            png = images_of(client.post("/sdapi/v1/txt2img", json=SMALL))[0]
            assert png.format == "PNG"
            assert client.post("/sdapi/v1/options", json={"samples_format": "webp", "webp_lossless": True}).is_success
            answer = client.post("/sdapi/v1/txt2img", json=SMALL)
            webp = images_of(answer)[0]
            assert webp.format == "WEBP" and np.array_equal(np.asarray(webp), np.asarray(png))  # lossless: the same
            read = client.post("/sdapi/v1/png-info", json={"image": answer.json()["images"][0]}).json()
            assert read["info"] == json.loads(answer.json()["info"])["infotexts"][0] == png.info["parameters"]
            assert read["parameters"]["Seed"] == "7"

            # a script's answer (cells.answer), img2img, the extras tab
            matrix = SMALL | {"prompt": "a cat|red", "script_name": "prompt matrix",
                              "script_args": [False, False, "positive", "comma", 0]}
            assert {image.format for image in images_of(client.post("/sdapi/v1/txt2img", json=matrix))} == {"WEBP"}
            init = base64.b64encode(PNG.encode(picture(2, 64))).decode()
            assert images_of(client.post("/sdapi/v1/img2img", json=SMALL | {"init_images": [init]}))[0].format == "WEBP"
            extras = client.post("/sdapi/v1/extra-single-image", json={"image": init, "upscaler_1": "Lanczos",
                                                                       "upscaling_resize": 2})
            assert extras.status_code == 200, extras.text
            assert opened(base64.b64decode(extras.json()["image"])).format == "WEBP"

            # the saved files: the server's samples_format and grid_format, a request's override_settings over them
            # (for its files only: AUTOMATIC1111 encodes its answer after restoring them)
            assert client.post("/sdapi/v1/options", json={"samples_format": "jpg", "jpeg_quality": 90,
                                                          "grid_format": "webp"}).is_success
            saved = SMALL | {"save_images": True, "batch_size": 2}
            assert {image.format for image in images_of(client.post("/sdapi/v1/txt2img", json=saved))} == {"JPEG"}
            overridden = saved | {"seed": 8, "override_settings": {"samples_format": "png"}}
            assert {image.format for image in images_of(client.post("/sdapi/v1/txt2img", json=overridden))} == \
                {"JPEG"}
            files = sorted(path.name for path in api.outputs.rglob("*.*"))
            assert [name.split("-", 1)[1] for name in files if not name.startswith("grid")] == \
                ["7.jpg", "8.jpg", "8.png", "9.png"]
            assert [name for name in files if name.startswith("grid")] == ["grid-0000.webp", "grid-0001.webp"]
            jpg = next(api.outputs.rglob("*-7.jpg"))
            assert read_png_info(jpg.read_bytes())["parameters"]["Seed"] == "7"
            listed = {item["path"].rsplit("/", 1)[1]: item for item in client.get("/v1/outputs").json()["items"]}
            assert sorted(listed) == files and listed[jpg.name]["fields"]["Seed"] == "7"  # the gallery reads EXIF
            served = client.get(listed[jpg.name]["url"])
            assert served.headers["content-type"] == "image/jpeg" and served.content == jpg.read_bytes()

            refused = client.post("/sdapi/v1/txt2img", json=SMALL | {"override_settings": {"samples_format": "tiff"}})
            assert refused.status_code == 422 and "samples_format" in refused.text
            refused = client.post("/sdapi/v1/options", json={"jpeg_quality": 101})
            assert refused.status_code == 422 and "jpeg_quality" in refused.text
            assert client.get("/sdapi/v1/options").json()["jpeg_quality"] == 90  # a refused change changes nothing

            # override_settings that stay as the server's (restore_afterwards false) encode the request's own answer,
            # as AUTOMATIC1111 encodes it once they are set: a generation's and a script's
            stay = {"override_settings_restore_afterwards": False}
            kept = SMALL | stay | {"override_settings": {"samples_format": "webp"}}
            assert images_of(client.post("/sdapi/v1/txt2img", json=kept))[0].format == "WEBP"
            assert client.get("/sdapi/v1/options").json()["samples_format"] == "webp"
            kept = matrix | stay | {"override_settings": {"samples_format": "jpg"}}
            assert {image.format for image in images_of(client.post("/sdapi/v1/txt2img", json=kept))} == {"JPEG"}
            assert client.get("/sdapi/v1/options").json()["samples_format"] == "jpg"
        finally:
            client.post("/sdapi/v1/options", json={"samples_format": "png", "grid_format": "png"})
