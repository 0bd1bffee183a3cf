"""AUTOMATIC1111's extras, SD.Next's connect-time routes and sd-webui-controlnet's control types and detect, over real
HTTP: uvicorn + the real Triton (the session's tiny repository). Every image is checked against PIL's or kiln's own
result for the same input, so a wrong size, filter or order fails."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from kiln.canny import canny
from kiln.cvimage import resize
from kiln.detect import map_of
from kiln.paths import SAMPLE_IMAGES
from kiln.preprocessors import CONTROL_MODULES
from kiln.triton_server import free_port
from orchestrator.pipeline import Limits
from orchestrator.server.control_units import controlnet_units
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.conftest import encode, png_header_only

pytestmark = pytest.mark.slow
MAX_PIXELS = 1024 * 1024  # this module's service refuses bigger images and results
LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


@pytest.fixture(scope="module")
def api(triton):
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), max_queue=8, workers=4,
                                  limits=Limits(max_steps=500, max_image_pixels=MAX_PIXELS)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(api):
    with api.client() as c:
        yield c


def _photo(size=(40, 24), seed=0) -> Image.Image:
    """Noise with a few hard edges: every resampling filter gives its own pixels on it."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    array[size[1] // 3:, : size[0] // 2] = (250, 30, 30)
    return Image.fromarray(array)


def _b64(image: Image.Image, **kwargs) -> str:
    return base64.b64encode(encode(image, **kwargs)).decode()


def _image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(_image(b64).convert("RGB"))


def _single(client, image: Image.Image, **fields):
    return client.post("/sdapi/v1/extra-single-image", json={"image": _b64(image)} | fields)


# -- extras -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("upscaler,resample", [("Lanczos", LANCZOS), ("Nearest", NEAREST)])
def test_scale_by_is_pils_resize(client, upscaler, resample):
    """Scale 2 of 40x24: the upscaler's own filter to 80x48, already a multiple of 8."""
    photo = _photo()
    response = _single(client, photo, upscaler_1=upscaler, upscaling_resize=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert np.array_equal(_pixels(body["image"]), np.asarray(photo.resize((80, 48), resample)))
    assert body["html_info"] == f"<p>Postprocess upscale by: 2.0, Postprocess upscaler: {upscaler}</p>"
    assert _image(body["image"]).info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: " \
                                                           + upscaler
    # The two filters differ on this image (so each comparison above tells them apart).
    assert not np.array_equal(np.asarray(photo.resize((80, 48), LANCZOS)), np.asarray(photo.resize((80, 48), NEAREST)))


def test_scale_by_rounds_down_to_a_multiple_of_8_with_lanczos(client):
    """AUTOMATIC1111's Upscaler.upscale: the upscaler's resize to int(side * scale), then Lanczos to the multiple of 8
    below: 40x24 by 1.5 -> Nearest to 60x36 -> Lanczos to 56x32."""
    photo = _photo()
    body = _single(client, photo, upscaler_1="Nearest", upscaling_resize=1.5).json()
    expected = photo.resize((60, 36), NEAREST).resize((56, 32), LANCZOS)
    assert np.array_equal(_pixels(body["image"]), np.asarray(expected))


def test_resize_to_with_and_without_crop(client):
    """resize_mode 1: the scale that covers w x h (the larger ratio); with crop, centred on a black w x h canvas."""
    photo = _photo()  # 40x24 -> 64x64: scale max(1.6, 2.667) = 2.667 -> 106x64 -> Lanczos 104x64
    scaled = photo.resize((106, 64), LANCZOS).resize((104, 64), LANCZOS)
    cropped = _single(client, photo, upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=64, upscaling_resize_h=64)
    assert cropped.status_code == 200, cropped.text
    canvas = Image.new("RGB", (64, 64))
    canvas.paste(scaled, (32 - 52, 0))
    assert np.array_equal(_pixels(cropped.json()["image"]), np.asarray(canvas))
    assert cropped.json()["html_info"] == ("<p>Postprocess upscale to: 64x64, Postprocess crop to: 64x64, "
                                           "Postprocess upscaler: Lanczos</p>")
    uncropped = _single(client, photo, upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=64,
                        upscaling_resize_h=64, upscaling_crop=False).json()
    assert np.array_equal(_pixels(uncropped["image"]), np.asarray(scaled))  # AUTOMATIC1111 keeps the cover size


def test_upscaler_2_is_blended_by_its_visibility(client):
    photo = _photo()
    body = _single(client, photo, upscaler_1="Lanczos", upscaler_2="Nearest", extras_upscaler_2_visibility=0.3).json()
    expected = Image.blend(photo.resize((80, 48), LANCZOS), photo.resize((80, 48), NEAREST), 0.3)
    pixels = _pixels(body["image"])
    assert np.array_equal(pixels, np.asarray(expected))
    assert not np.array_equal(pixels, np.asarray(photo.resize((80, 48), LANCZOS)))
    assert "Postprocess upscaler 2: Nearest" in body["html_info"]


def test_upscaler_none_returns_the_image_and_keeps_its_text_chunks(client):
    """AUTOMATIC1111 skips the upscale for "None" (whatever the scale); the PNG keeps the input's `parameters`."""
    photo = _photo()
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a cat\nSteps: 5, Seed: 1")
    body = client.post("/sdapi/v1/extra-single-image",
                       json={"image": _b64(photo, pnginfo=meta), "upscaling_resize": 4}).json()
    result = _image(body["image"])
    assert np.array_equal(np.asarray(result.convert("RGB")), np.asarray(photo))
    assert result.info["parameters"] == "a cat\nSteps: 5, Seed: 1" and body["html_info"] == "<p></p>"


def test_batch_upscales_every_image_in_order(client):
    photos = [_photo(seed=1), _photo((16, 32), seed=2)]
    body = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": _b64(p), "name": f"{i}.png"} for i, p in enumerate(photos)],
        "upscaler_1": "Nearest", "upscaling_resize": 3}).json()
    assert len(body["images"]) == 2
    assert np.array_equal(_pixels(body["images"][0]), np.asarray(photos[0].resize((120, 72), NEAREST)))
    assert np.array_equal(_pixels(body["images"][1]), np.asarray(photos[1].resize((48, 96), NEAREST)))
    assert body["html_info"] == "<p>Postprocess upscale by: 3.0, Postprocess upscaler: Nearest</p>"


@pytest.mark.parametrize("route,fields,status,needle", [
    ("single", {"gfpgan_visibility": 0.5}, 422, "gfpgan_visibility"),
    ("single", {"codeformer_visibility": 1}, 422, "codeformer_visibility"),
    ("single", {"upscaler_1": "R-ESRGAN 4x+"}, 422, "upscaler_1 'R-ESRGAN 4x+' is not an upscaler of this server; "
                                                    "valid: None, Lanczos, Nearest, 4x-tiny"),
    ("single", {"upscaler_1": "Lanczos", "upscaler_2": "SwinIR_4x", "extras_upscaler_2_visibility": 0.5}, 422,
     "upscaler_2 'SwinIR_4x'"),
    ("single", {"upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5}, 422, "upscaler_1 is \"None\""),
    ("single", {"upscaler_1": "Lanczos", "upscaling_resize": 9}, 422, "upscaling_resize"),
    ("single", {"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 2048, "upscaling_resize_h": 2048},
     422, "upscaling_resize_w/upscaling_resize_h: upscaling the 40x24 image by 85.3333 resizes it to 3413x2048"),
    ("single", {"upscaler_1": "Lanczos", "upscaling_resize": 8, "image": _b64(_photo((160, 160)))}, 422,
     "image: upscaling_resize: upscaling the 160x160 image by 8 resizes it to 1280x1280 = 1638400 pixels, over the "
     "limit of 1048576"),
    ("single", {"upscaler_1": "Lanczos", "image": "not base64!"}, 422, "image: invalid base64"),
    ("single", {"upscaler_1": "Lanczos", "image": base64.b64encode(b"GIF89a-corrupt").decode()}, 422,
     "image: not an image"),
    ("single", {"image": base64.b64encode(png_header_only(1100, 1000)).decode()}, 413,
     "image: image header declares 1100x1000"),
    ("batch", {"imageList": [{"data": _b64(_photo()), "name": "a.png"}, {"data": "%%%", "name": "b.png"}]}, 422,
     "imageList[1].data (b.png): invalid base64"),
    ("batch", {"imageList": [{"data": _b64(_photo()), "name": "a.png"}] * 17}, 413,
     "imageList: 17 images; at most 16"),
])
def test_extras_refusals_name_the_field_and_the_server_keeps_serving(client, route, fields, status, needle):
    if route == "single":
        response = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(_photo())} | fields)
    else:
        response = client.post("/sdapi/v1/extra-batch-images", json={"upscaler_1": "Lanczos"} | fields)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"], response.text
    assert "Traceback" not in response.text
    assert _single(client, _photo(), upscaler_1="Lanczos").status_code == 200


def test_upscalers_list_what_extras_run(client):
    upscalers = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest", "4x-tiny"]  # the repository's network
    assert all(u.keys() == {"name", "model_name", "model_path", "model_url", "scale"} for u in upscalers)


def test_extras_run_off_the_event_loop(client, api):
    """While a batch of large upscales runs (seconds of CPU work), other requests are answered at once: were the work
    on the event loop, one of them would wait for the whole batch."""
    batch = {"imageList": [{"data": _b64(_photo((128, 128), seed=i)), "name": f"{i}.png"} for i in range(12)],
             "upscaler_1": "Lanczos", "upscaling_resize": 8}
    latencies = []
    with api.client() as other, ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        future = pool.submit(other.post, "/sdapi/v1/extra-batch-images", json=batch)
        while not future.done():
            sent = time.monotonic()
            assert client.get("/health/live").status_code == 200
            latencies.append(time.monotonic() - sent)
            time.sleep(0.02)
        total = time.monotonic() - started
        response = future.result()
    assert response.status_code == 200 and len(response.json()["images"]) == 12
    # (the answer, 21 MB of JSON, is made off the loop too and sent in pieces: orchestrator.server.answers)
    assert response.headers["content-length"] == str(len(response.content))
    assert "transfer-encoding" not in response.headers
    assert total > 1.0 and len(latencies) >= 10 and max(latencies) < 0.3 * total, (total, max(latencies))


# -- SD.Next ------------------------------------------------------------------------------------------------------
def test_sdnext_version_status_and_platform(client):
    version = client.get("/sdapi/v1/version").json()
    assert version["app"] == "kiln" and version["version"]
    if "hash" in version:  # a git checkout (the url only with an origin remote)
        assert len(version["hash"]) >= 7 and len(version["updated"]) == 10
    status = client.get("/sdapi/v1/status").json()
    assert {"status", "task", "timestamp", "id", "job", "jobs", "total", "step", "steps", "queued", "uptime",
            "elapsed", "eta", "progress"} <= status.keys()
    assert status["status"] == "idle" and status["queued"] == 0 and status["uptime"] >= 0
    platform = client.get("/sdapi/v1/platform").json()
    assert {"arch", "cpu", "system", "release", "python", "locale", "cores", "isa"} <= platform.keys()
    assert platform["kiln"] == version["version"] and platform["fastapi"] and platform["tritonclient"]
    assert platform["triton"]  # the session's Triton answers its version


def test_sdnext_status_follows_a_running_job(api):
    txt = {"prompt": "a cat", "steps": 400, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler"}
    with api.client() as c, ThreadPoolExecutor(1) as pool:
        future = pool.submit(c.post, "/sdapi/v1/txt2img", json=txt)
        deadline, seen = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            status = c.get("/sdapi/v1/status").json()
            if status["status"] == "running" and status["step"] >= 2:
                seen = status
                break
            time.sleep(0.05)
        c.post("/sdapi/v1/interrupt")
        assert future.result(timeout=60).status_code == 200
    assert seen is not None, "the job never showed in /sdapi/v1/status"
    assert seen["task"] == "txt2img" and seen["steps"] == 400 and seen["jobs"] == 1 and seen["running"] == 1
    assert 0 <= seen["progress"] < 1 and seen["id"] and seen["timestamp"] and seen["elapsed"] > 0


# -- sd-webui-controlnet ------------------------------------------------------------------------------------------
def test_control_types_group_the_modules_and_the_builds_controlnets(client):
    """One type per tag of kiln's modules, as the extension tags them, sorted; each with "none" and its modules (by
    label, in the extension's order: priority, then label, both descending; the first is the default), and the models
    whose name holds the type's (or its alias: sketch for Scribble, blur for Tile)."""
    models = client.get("/controlnet/model_list").json()["model_list"]
    types = client.get("/controlnet/control_types").json()["control_types"]
    assert list(types) == ["All", "Blur", "Canny", "Inpaint", "InstructP2P", "Lineart", "MLSD", "Recolor", "Scribble",
                           "Shuffle", "Sketch", "T2I-Adapter", "Tile"]
    invert, lineart = "invert (from white bg & black line)", "lineart_standard (from white bg & black line)"
    assert types["All"] == {"module_list": ["none", "tile_resample", "recolor_luminance", lineart, "inpaint_only",
                                            "canny", invert, "threshold", "t2ia_color_grid", "shuffle", "scribble_xdog",
                                            "recolor_intensity", "inpaint_global_harmonious", "blur_gaussian"],
                            "model_list": ["None", *models], "default_option": "none", "default_model": "None"}
    assert any(m.startswith("controlnet [") for m in types["All"]["model_list"])
    # No ControlNet of this build has "canny" in its name, so the type holds "None" only, as sd-webui-controlnet's.
    assert types["Canny"] == {"module_list": ["none", "canny", invert], "model_list": ["None"],
                              "default_option": "canny", "default_model": "None"}
    scribble = next(m for m in models if m.startswith("scribble ["))
    assert types["Scribble"] == {"module_list": ["none", invert, "scribble_xdog"], "model_list": ["None", scribble],
                                 "default_option": invert, "default_model": scribble}
    assert types["Sketch"]["module_list"] == ["none", invert, "scribble_xdog"]
    assert types["Sketch"]["model_list"] == ["None"]  # "scribble" is not one of Sketch's words
    assert types["Lineart"] == {"module_list": ["none", lineart, invert], "model_list": ["None"],
                                "default_option": lineart, "default_model": "None"}
    for tile in ("Tile", "Blur"):
        assert types[tile]["module_list"] == ["none", "tile_resample", "blur_gaussian"]
        assert types[tile]["default_option"] == "tile_resample"
    assert types["Recolor"]["module_list"] == ["none", "recolor_luminance", "recolor_intensity"]
    assert types["MLSD"]["module_list"] == ["none", invert]
    assert types["T2I-Adapter"]["module_list"] == ["none", "t2ia_color_grid"]
    assert types["Shuffle"]["module_list"] == ["none", "shuffle"] and types["Shuffle"]["default_option"] == "shuffle"
    assert types["Inpaint"] == {"module_list": ["none", "inpaint_only", "inpaint_global_harmonious"],
                                "model_list": ["None"], "default_option": "inpaint_only", "default_model": "None"}
    # instruct-pix2pix ControlNets take the image itself: "none" alone, and the default (ip2p in a model's name too)
    assert types["InstructP2P"] == {"module_list": ["none"], "model_list": ["None"], "default_option": "none",
                                    "default_model": "None"}


def test_detect_is_kilns_canny_at_the_processor_resolution(client):
    """sd-webui-controlnet's resize_image_with_pad, then canny: the short side at the resolution (OpenCV's cubic to
    enlarge, area to shrink: kiln.cvimage), the bottom and right edges repeated out to multiples of 64 (canny sees
    them), the map cut back."""
    def padded_canny(pixels: np.ndarray, low: int, high: int) -> np.ndarray:
        height, width = pixels.shape[:2]
        padded = np.pad(pixels, ((0, -height % 64), (0, -width % 64), (0, 0)), mode="edge")
        return np.asarray(canny(Image.fromarray(padded), low, high))[:height, :width]

    photo = _photo((96, 64), seed=3)
    same = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [
        _b64(photo)], "controlnet_processor_res": 64, "controlnet_threshold_a": 50, "controlnet_threshold_b": 150})
    assert same.status_code == 200, same.text
    assert same.json()["info"] == "Success"
    edges = _pixels(same.json()["images"][0])
    assert np.array_equal(edges, padded_canny(np.asarray(photo), 50, 150)) and edges.max() == 255
    assert not np.array_equal(edges, np.asarray(canny(photo, 50, 150)))  # the padding shows on the right edge
    # The defaults (-1): resolution 512 on the short side, thresholds 100 and 200.
    scaled = client.post("/controlnet/detect", json={"controlnet_module": "Canny",
                                                     "controlnet_input_images": [_b64(photo), _b64(photo)]}).json()
    enlarged = resize(np.asarray(photo), 768, 512, "cubic")
    expected = padded_canny(enlarged, 100, 200)
    assert not np.array_equal(expected, padded_canny(enlarged, 50, 150))
    assert len(scaled["images"]) == 2 and all(np.array_equal(_pixels(i), expected) for i in scaled["images"])
    large = _photo((128, 96), seed=4)
    shrunk = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [
        _b64(large)], "controlnet_processor_res": 72}).json()
    assert np.array_equal(_pixels(shrunk["images"][0]), padded_canny(resize(np.asarray(large), 96, 72, "area"), 100,
                                                                      200))
    plain = client.post("/controlnet/detect", json={"controlnet_module": "none", "controlnet_input_images": [
        _b64(photo)]}).json()
    assert np.array_equal(_pixels(plain["images"][0]), np.asarray(photo))
    # invert: the negative at the image's own size; the resolution and thresholds are ignored, as the extension's
    inverted = client.post("/controlnet/detect", json={"controlnet_module": "invert", "controlnet_input_images": [
        _b64(photo)], "controlnet_processor_res": 4096, "controlnet_threshold_a": 300}).json()
    assert np.array_equal(_pixels(inverted["images"][0]), 255 - np.asarray(photo))


@pytest.mark.parametrize("fields,status,needle", [
    ({"controlnet_module": "openpose"}, 422,
     "controlnet_module 'openpose' is unknown; valid: none, tile_resample, recolor_luminance, lineart_standard, "
     "inpaint_only, canny"),
    ({"controlnet_input_images": []}, 422, "controlnet_input_images: no image"),
    ({"controlnet_threshold_a": 300}, 422, "controlnet_threshold_a must be 0 to 255 (or -1: 100), canny's Low "
                                           "Threshold; got 300"),
    ({"controlnet_threshold_a": 20.5}, 422, "controlnet_threshold_a must be an integer (canny's Low Threshold)"),
    ({"controlnet_threshold_a": 200, "controlnet_threshold_b": 100}, 422,
     "canny thresholds must satisfy 0 <= controlnet_threshold_a < controlnet_threshold_b <= 255, got 200, 100"),
    ({"controlnet_module": "threshold", "controlnet_threshold_a": 256}, 422,
     "controlnet_threshold_a must be 0 to 255 (or -1: 127), threshold's Binarization Threshold; got 256"),
    ({"controlnet_processor_res": 4096}, 422, "controlnet_processor_res must be 64 to 2048"),
    ({"controlnet_processor_res": 2048}, 422, "controlnet_processor_res 2048 makes the 48x32"),
    ({"controlnet_masks": ["x"]}, 422, "controlnet_masks"),
    ({"controlnet_input_images": ["%%%"]}, 422, "controlnet_input_images[0]: invalid base64"),
])
def test_detect_refusals_name_the_field(client, fields, status, needle):
    body = {"controlnet_module": "canny", "controlnet_input_images": [_b64(_photo((48, 32)))]} | fields
    response = client.post("/controlnet/detect", json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"], response.text


def test_module_list_detect_and_units_take_every_module(client):
    """/controlnet/module_list: names (labels with alias_names) and each one's sliders; /controlnet/detect and the
    units run any module, by name or label, with its sliders."""
    listed = client.get("/controlnet/module_list").json()
    assert listed["module_list"] == list(CONTROL_MODULES)
    assert listed["module_detail"]["canny"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 0, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 0, "max": 255, "step": 1}]
    assert listed["module_detail"]["invert"] == {"model_free": False, "sliders": []}
    assert [s["name"] for s in listed["module_detail"]["tile_resample"]["sliders"]] == ["Down Sampling Rate"]
    aliases = client.get("/controlnet/module_list", params={"alias_names": True}).json()
    assert "lineart_standard (from white bg & black line)" in aliases["module_list"]
    assert set(aliases["module_detail"]) == set(aliases["module_list"])
    photo = Image.open(SAMPLE_IMAGES / "coffee.png").convert("RGB").resize((96, 64))
    response = client.post("/controlnet/detect", json={
        "controlnet_module": "scribble_xdog", "controlnet_input_images": [_b64(photo)], "controlnet_processor_res": 64,
        "controlnet_threshold_a": 20})
    assert response.status_code == 200, response.text
    made = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(made, np.asarray(map_of(photo, "scribble_xdog", 64, 20, -1, 1 << 20)))
    args = [{"image": _b64(photo), "module": "lineart_standard (from white bg & black line)", "processor_res": 64,
             "resize_mode": "Just Resize"},
            {"image": _b64(photo), "module": "recolor_intensity", "threshold_a": 0.5, "threshold_b": 99}]
    lineart, recolor = controlnet_units({"controlnet": {"args": args}}, 1 << 20, 64, 64)
    assert (lineart.module, lineart.preprocessor, lineart.threshold_a) == ("lineart_standard", "none", -1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(lineart.image)).convert("RGB")),
                          np.asarray(map_of(photo, "lineart_standard", 64, -1, -1, 1 << 20)))
    assert (recolor.threshold_a, recolor.threshold_b) == (0.5, -1)  # recolor has one slider: b is ignored
    assert Image.open(io.BytesIO(recolor.image)).size == (96, 64)  # its own size: no resolution


def test_an_inpaint_unit_takes_img2img_image_and_mask_and_shows_its_map(client):
    """sd-webui-controlnet's inpainting through the API: in img2img inpainting an inpaint unit without an image takes
    the init image and the request's mask (its detected map: the image, alpha 128 where masked), and inpaint_only
    runs as inpaint_global_harmonious there, as the extension's fallback; in txt2img inpaint_only outpaints (a
    photo Resize-and-Filled: the image is the photo's pixels away from the filled bands, its map the bands at alpha
    128); txt2img refuses a unit without an image; /controlnet/detect shows an inpaint module's mask, and wants one
    per image."""
    photo, mask = _photo((64, 64), seed=5), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 8, 48, 40))
    body = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 4, "sampler_name": "Euler",
            "init_images": [_b64(photo)], "mask": _b64(mask), "mask_blur": 0, "denoising_strength": 0.75,
            "inpaint_full_res": False}  # (the whole picture: "only masked" would crop the unit's image too)
    answers = [client.post("/sdapi/v1/img2img", json=body | {"alwayson_scripts": {"controlnet": {"args": [
        {"module": module, "weight": 1.5}]}}}) for module in ("inpaint_global_harmonious", "inpaint_only")]
    assert all(answer.status_code == 200 for answer in answers), answers[0].text
    harmonious, only = (answer.json() for answer in answers)
    assert harmonious["images"] == only["images"] and len(harmonious["images"]) == 2  # the image, the unit's map
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(harmonious["images"][1]))))
    assert shown.shape == (64, 64, 4) and np.array_equal(shown[..., :3], np.asarray(photo))
    assert np.array_equal(shown[..., 3], np.where(np.asarray(mask) > 127, 128, 255))
    assert "Module: inpaint," in json.loads(harmonious["info"])["infotexts"][0]
    txt2img = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64}
    wide = _photo((64, 32), seed=6)  # filled into 64x64: bands of 16 above and below, masked
    outpainted = client.post("/sdapi/v1/txt2img", json=txt2img | {"alwayson_scripts": {"controlnet": {"args": [
        {"module": "inpaint_only", "image": _b64(wide), "resize_mode": "Resize and Fill"}]}}})
    assert outpainted.status_code == 200, outpainted.text
    image, shown = (np.asarray(_image(b64)) for b64 in outpainted.json()["images"])
    assert np.array_equal(image[16 + 6:48 - 6], np.asarray(wide)[6:-6])  # pasted back (the blur reaches 6 pixels)
    assert (shown[:16, :, 3] == 128).all() and (shown[16:48, :, 3] == 255).all()
    narrow = client.post("/sdapi/v1/txt2img", json=txt2img | {  # the extension's setting: a 3-pixel paste-back blur
        "override_settings": {"control_net_inpaint_blur_sigma": 3}, "alwayson_scripts": {"controlnet": {"args": [
            {"module": "inpaint_only", "image": _b64(wide), "resize_mode": "Resize and Fill"}]}}})
    assert narrow.status_code == 200, narrow.text
    closer = np.asarray(_image(narrow.json()["images"][0]))
    assert np.array_equal(closer[16 + 2:48 - 2], np.asarray(wide)[2:-2])
    assert not np.array_equal(image[16 + 2:48 - 2], np.asarray(wide)[2:-2])
    zero = client.post("/sdapi/v1/txt2img", json=txt2img | {"override_settings": {"control_net_inpaint_blur_sigma": 0}})
    assert zero.status_code == 422 and "blur_sigma must be a whole number in [1, 64]" in zero.text, zero.text
    idle = client.post("/sdapi/v1/txt2img", json=txt2img | {"override_settings": {"control_net_inpaint_blur_sigma": 5}})
    assert idle.status_code == 422 and "acts on inpaint_only ControlNet units" in idle.text, idle.text
    refused = client.post("/sdapi/v1/txt2img", json=txt2img | {"alwayson_scripts": {"controlnet": {"args": [
        {"module": "canny"}]}}})
    assert refused.status_code == 422 and "args[0] is enabled but has no image" in refused.json()["detail"]
    detect = {"controlnet_module": "inpaint_global_harmonious", "controlnet_input_images": [_b64(photo)]}
    shown = client.post("/controlnet/detect", json=detect | {"controlnet_masks": [_b64(mask)]})
    assert shown.status_code == 200, shown.text
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(shown.json()["images"][0]))))
    assert np.array_equal(pixels[..., 3], 255 - np.asarray(mask) // 2)
    refused = client.post("/controlnet/detect", json=detect)
    assert refused.status_code == 422 and "one mask per image; got 1 images and 0 masks" in refused.text


def test_img2img_color_correction_as_a_setting_and_in_the_loopback(client):
    """AUTOMATIC1111's img2img_color_correction: each image's colours matched to the init image's
    (kiln.color_correction, checked against its libraries in test_color_correction); the Loopback script's loops all
    match the request's init image. txt2img has no init image: turning it on there is a 422, a stored option is not."""
    from kiln.color_correction import color_target, correct
    from kiln.schemas import Img2ImgBody
    from orchestrator.server.loopback import Loopback, loop_cell

    photo = _photo((64, 64), seed=9)
    body = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 4, "denoising_strength": 0.7,
            "init_images": [_b64(photo)]}
    on = {"override_settings": {"img2img_color_correction": True}}
    plain, fixed = (client.post("/sdapi/v1/img2img", json=body | extra) for extra in ({}, on))
    assert plain.status_code == fixed.status_code == 200, fixed.text
    generated, corrected = (np.asarray(_image(answer.json()["images"][0])) for answer in (plain, fixed))
    assert np.array_equal(corrected, correct(generated, color_target(np.asarray(photo))))
    assert not np.array_equal(corrected, generated)
    txt2img = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64}
    refused = client.post("/sdapi/v1/txt2img", json=txt2img | on)
    assert refused.status_code == 422 and "img2img_color_correction acts on img2img's images" in refused.text
    off = {"override_settings": {"img2img_color_correction": False}}
    assert client.post("/sdapi/v1/txt2img", json=txt2img | off).status_code == 200
    loops = {"script_name": "loopback", "script_args": [2, 0.5, "Linear", "None"]}
    looped = [client.post("/sdapi/v1/img2img", json=body | loops | extra) for extra in ({}, on)]
    assert all(answer.status_code == 200 for answer in looped), looped[1].text
    first, first_fixed = (np.asarray(_image(answer.json()["images"][1])) for answer in looped)
    assert np.array_equal(first_fixed, correct(first, color_target(np.asarray(photo))))
    sent = Img2ImgBody(**body | loops | on)  # loop 2's cell: loop 1's image in, the request's init image to match
    cell = loop_cell(sent, Loopback(2, 0.7, 0.5, "Linear"), 0, 1, ["bG9vcA=="])
    assert cell.init_images == ["bG9vcA=="] and cell.color_target == sent.init_images[0]
    assert client.post("/sdapi/v1/options", json={"img2img_color_correction": True}).status_code == 200
    try:
        assert client.post("/sdapi/v1/txt2img", json=txt2img).status_code == 200
        stored = client.post("/sdapi/v1/img2img", json=body)
        assert stored.json()["images"][0] == fixed.json()["images"][0]
    finally:
        client.post("/sdapi/v1/options", json={"img2img_color_correction": False})
