"""AUTOMATIC1111's Outpainting mk2 script: the new border painted with noise matched to the image (its spectrum and
colour histograms), then inpainted from it, one side at a time, each pass growing the image the one before made."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from kiln import schemas
from kiln.color_correction import match_histograms
from kiln.contract import SDContract
from kiln.errors import InputError
from kiln.outpaint_noise import matched_noise
from kiln.triton_server import free_port
from orchestrator.pipeline.validate import Limits
from orchestrator.server.outpainting_mk2 import Mk2, cell, check, grow, parse, pass_sizes, paste
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.test_outpainting import png
from tests.test_xyz import pixels

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "images"
CONTRACT = SDContract(scheduler_config={}, vae_scale_factor=2, latent_channels=4, unet_in_channels=4,
                      scaling_factor=0.18, min_size=32, max_size=128, size_multiple=8)


def photo(width: int, height: int) -> np.ndarray:
    return np.asarray(Image.open(ASSETS / "chelsea.jpg").convert("RGB").resize((width, height), Image.LANCZOS))


def test_the_float_histogram_match_is_scikit_images():
    """The float path of match_histograms (the noise's), value for value what scikit-image 0.21 makes, ties too
    (tests/golden/cv/match_histograms_float.npz, made by scripts/make_color_golden.py)."""
    golden = np.load(Path(__file__).resolve().parent / "golden" / "cv" / "match_histograms_float.npz")
    assert np.array_equal(match_histograms(golden["source"], golden["reference"]), golden["matched"])


def test_the_matched_noise_keeps_the_image_and_takes_its_colours():
    canvas = np.zeros((64, 96, 3))
    canvas[:, :64] = photo(64, 64) / 255.0
    mask = np.zeros((64, 96))
    mask[:, 64:] = 1.0
    noised = matched_noise(canvas, mask)
    assert noised.dtype == np.float64 and noised.shape == canvas.shape and np.isfinite(noised).all()
    assert np.array_equal(noised[:, :64], canvas[:, :64])  # the known pixels, exactly
    border, known = noised[:, 64:].reshape(-1, 3), canvas[:, :64].reshape(-1, 3)
    # histogram matched per channel: the border's quantiles are the known pixels' (not black, not grey noise)
    for channel in range(3):
        quantiles = np.linspace(0.05, 0.95, 10)
        assert np.abs(np.quantile(border[:, channel], quantiles) -
                      np.quantile(known[:, channel], quantiles)).max() < 0.03
    assert np.array_equal(matched_noise(canvas, mask), noised)  # seeded as there: the same noise every time
    detailed = matched_noise(canvas, mask, noise_q=0.2, color_variation=0.9)
    assert np.abs(detailed[:, 64:] - noised[:, 64:]).mean() > 0.05
    black = matched_noise(np.zeros((32, 32, 3)), np.pad(np.zeros((16, 32)), ((0, 16), (0, 0)), constant_values=1))
    assert np.isfinite(black).all()  # AUTOMATIC1111 divides by the known part's maximum: NaN where it is black


def test_a_pass_grows_one_side_with_automatic1111s_masks():
    """The right side grown by 64 of a 64x64 image, generated 96 wide: the canvas, its generated part at the grown
    side's end, the mask less the blur and the latent mask less twice it (PIL's rectangles: far corner included)."""
    image = photo(64, 64)
    mk2 = Mk2(pixels=64, mask_blur=4, directions=("right",), noise_q=1.0, color_variation=0.05)
    grown = grow(image, "right", 64, (96, 64), mk2)
    assert grown.noised.shape == (64, 128, 3) and grown.size == (128, 64) and grown.box == (32, 0, 128, 64)
    assert np.array_equal(grown.noised[:, :61], image[:, :61])  # the blur's margin of the image is noised too, as there
    assert grown.mask.shape == grown.latent_mask.shape == (64, 96)
    # canvas columns 0..60 kept (128 - 64 - 4), i.e. the part's 0..28; the latent mask's 0..24 (96 - 64 - 8)
    assert (grown.mask[:, :29] == 0).all() and (grown.mask[:, 29:] == 255).all()
    assert (grown.latent_mask[:, :25] == 0).all() and (grown.latent_mask[:, 25:] == 255).all()
    generated = np.full((64, 96, 3), 7, np.uint8)
    pasted = paste(grown, generated)
    assert pasted.shape == (64, 128, 3) and (pasted[:, 32:] == 7).all()
    assert np.array_equal(pasted[:, :32], image[:, :32])
    up = grow(image[:40], "up", 24, (64, 64), mk2)  # the canvas rounds up to 64; the mask's far side: the image's end
    assert up.noised.shape == (64, 64, 3) and up.box == (0, 0, 64, 64) and up.size == (64, 64)
    assert (up.mask[:28] == 255).all() and (up.mask[28:] == 0).all()  # kept from 24 + 4 to the end
    # a blur wider than the part inverts the latent mask's rectangle: nothing kept (AUTOMATIC1111's PIL raises)
    assert (grow(image, "right", 64, (64, 64), Mk2(64, 8, ("right",), 1.0, 0.05)).latent_mask == 255).all()


def test_the_passes_sizes_and_seeds():
    mk2 = Mk2(pixels=128, mask_blur=8, directions=("left", "right", "up", "down"), noise_q=1.0, color_variation=0.05)
    assert pass_sizes(512, 512, mk2, (512, 512)) == [("left", 128, 512, 512), ("right", 128, 512, 512),
                                                     ("up", 128, 768, 512), ("down", 128, 768, 512)]
    assert pass_sizes(500, 300, mk2, (512, 512)) == [("left", 134, 512, 320), ("right", 134, 512, 320),
                                                     ("up", 138, 768, 432), ("down", 138, 768, 512)]  # 438: to 8s
    body = schemas.Img2ImgBody(init_images=["x"], seed=40, subseed=7, script_name="outpainting mk2")
    grown = grow(photo(64, 64), "left", 32, (96, 64), mk2)
    one = cell(body, grown, mk2, 2)
    assert (one.seed, one.subseed, one.width, one.height, one.mask_blur) == (42, 9, 96, 64, 32)
    assert (one.inpainting_fill, one.batch_size, one.n_iter, one.script_name) == (1, 1, 1, None)


def body(args, **fields) -> schemas.Img2ImgBody:
    init = base64.b64encode(png(Image.fromarray(photo(64, 64)))).decode()
    return schemas.Img2ImgBody(init_images=[init], script_name="outpainting mk2", script_args=args,
                               **({"width": 128, "height": 128} | fields))


@pytest.mark.parametrize(("args", "fields", "message"), [
    ([None, 4], {}, "pixels must be a whole number from 8 to 256"),
    ([None, 32, 65], {}, "mask_blur must be a whole number from 0 to 64"),
    ([None, 32, 4, ["sideways"]], {}, "direction must be a list of some of left, right, up, down"),
    ([None, 32, 4, ["up"], 5], {}, "noise_q must be a number from 0 to 4"),
    ([None, 32, 4, ["up"], 1, True], {}, "color_variation must be a number from 0 to 1"),
    ([None, 32, 4, ["up"], 1, 0.1, 0], {}, "takes at most 6 values"),
    ([None, 32], {"latent_mask": "eA=="}, "latent_mask: outpainting mk2 makes its own masks"),
])
def test_what_cannot_run_is_named(args, fields, message):
    with pytest.raises(InputError, match=message):
        parse(body(args, **fields))


@pytest.mark.parametrize(("args", "fields", "message"), [
    ([None, 32, 20], {}, "blurs its passes' masks by four times it, over this server's limit of 64"),
    ([None, 32], {"n_iter": 20}, "n_iter must be between 1 and 16"),
    ([None, 32], {"batch_size": 4, "n_iter": 5}, "20 images exceeds the limit of 16"),
    ([None, 64, 4, ["left", "right", "up"]], {}, r"growing up generates 192x128 \(width x height\), outside the"),
    ([None, 96, 4, ["right"]], {"width": 64}, "the pass growing right grows the image by 132 pixels but generates 64 "
                                              "of them .* need 140: raise width or lower pixels"),
])
def test_what_the_passes_cannot_make_is_named_before_any_runs(args, fields, message):
    """Every pass's size is known from the init image's: checked before the first pass runs (a 60x64 image here)."""
    served = SimpleNamespace(limits=Limits(), contract=CONTRACT)
    request = body(args, **fields)
    with pytest.raises(InputError, match=message):
        check(request, parse(request), photo(60, 64), served)
    narrower = body([None, 36, 4, ["left", "right"]], width=96)  # 60 + 66 = 126 wide, 96 of it generated: fine
    assert check(narrower, parse(narrower), photo(60, 64), served) == [("left", 66, 96, 64), ("right", 66, 96, 64)]
    wider = body([None, 36, 4, ["left", "right"]])  # 126 wide: 120 of it generated (the build's multiple of 8)
    assert check(wider, parse(wider), photo(60, 64), served) == [("left", 66, 120, 64), ("right", 66, 128, 64)]


@pytest.mark.slow
def test_the_outpainting_through_the_api(triton, tmp_path):
    """Two images (batch_size 2), each grown right then down: a grid and the two, each the passes a client could
    run itself (the cells posted one by one make the same image), seeds 11 and 12."""
    api = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), outputs_dir=tmp_path / "outputs"))
    request = body([None, 32, 2, ["right", "down"]], prompt="a photo of a cat", steps=5, seed=11,
                   denoising_strength=0.75, batch_size=2, save_images=True)
    init = photo(64, 64)
    try:
        with api.client() as client:
            answer = client.post("/sdapi/v1/img2img", json=request.model_dump(exclude_defaults=True))
            assert answer.status_code == 200, answer.text
            images, info = [pixels(b64) for b64 in answer.json()["images"]], json.loads(answer.json()["info"])
            assert [image.shape for image in images] == [(128, 256, 3), (128, 128, 3), (128, 128, 3)]  # grid first
            assert info["outpainting_mk2"]["passes"] == ["right", "down"] and info["all_seeds"] == [11, 12]
            assert info["outpainting_mk2"]["size"] == [128, 128]
            assert (info["width"], info["height"]) == (128, 128)  # the last pass's (the first generated 128x64)
            assert np.abs(images[1][:40, :40].astype(int) - init[:40, :40]).max() <= 1  # far from the border: kept
            assert np.abs(images[1].astype(int) - images[2].astype(int)).max() > 20  # seed + 1
            mk2 = parse(request)
            image = init
            for side, amount, width, height in pass_sizes(64, 64, mk2, (128, 128)):  # image 1 by hand, pass by pass
                grown = grow(image, side, amount, (width, height), mk2)
                alone = client.post("/sdapi/v1/img2img", json=cell(request, grown, mk2, 0).model_dump(
                    exclude_defaults=True))
                assert alone.status_code == 200, alone.text
                image = paste(grown, pixels(alone.json()["images"][0]))
            assert np.abs(image.astype(int) - images[1].astype(int)).max() <= 2
            saved = client.get("/v1/outputs").json()["items"]
            assert len([i for i in saved if i["kind"] == "img2img-images"]) == 2  # the images, not their passes
            # /sdapi/v1/progress shows the passes and its interrupt, sent during the first ones, ends the script
            # there: both images grown right only (their grid first)
            long = request.model_dump(exclude_defaults=True) | {"steps": 150, "save_images": False}
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(client.post, "/sdapi/v1/img2img", json=long)
                deadline = time.monotonic() + 60
                while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1 and \
                        time.monotonic() < deadline:
                    time.sleep(0.05)
                assert client.post("/sdapi/v1/interrupt").status_code == 200
                stopped = future.result(timeout=120)
            assert stopped.status_code == 200, stopped.text
            info = json.loads(stopped.json()["info"])
            assert [pixels(b64).shape for b64 in stopped.json()["images"]] == [(64, 256, 3)] + [(64, 128, 3)] * 2
            assert info["outpainting_mk2"]["interrupted"] == 2
            listed = {s["name"]: s for s in client.get("/sdapi/v1/script-info").json()}
            assert [a["label"] for a in listed["outpainting mk2"]["args"]][1:3] == ["Pixels to expand", "Mask blur"]
            assert "outpainting mk2" in client.get("/sdapi/v1/scripts").json()["img2img"]
            refused = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "script_name": "Outpainting mk2"})
            assert refused.status_code == 422 and "is an img2img script" in refused.text
            refused = client.post("/sdapi/v1/img2img", json=request.model_dump(exclude_defaults=True) |
                                  {"script_args": [None, 32, 2, ["right"], 9]})
            assert refused.status_code == 422 and "noise_q must be a number from 0 to 4" in refused.text
    finally:
        api.stop()


def test_the_benchmark_runs(tmp_path):
    """benchmarks/outpaint_noise.py at a small side: both arms timed, the table written."""
    from benchmarks.outpaint_noise import ARMS
    from benchmarks.outpaint_noise import main as bench_main

    rows = bench_main(["--sides", "32", "--repeats", "1", "--out", str(tmp_path)])["rows"]
    assert [row["arm"] for row in rows] == list(ARMS) and all(row["ms"] > 0 for row in rows)
    assert (tmp_path / "outpaint_noise.json").exists()
