"""AUTOMATIC1111's Loopback script: img2img run again on its own image, the denoising strength moving to a final one
along a curve; n_iter chains side by side through the step batcher."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest

from kiln import schemas
from kiln.errors import InputError
from kiln.infotext import read_png_info
from kiln.triton_server import free_port
from orchestrator.server.loopback import parse
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.test_xyz import pixels


def body(args, **fields) -> schemas.Img2ImgBody:
    return schemas.Img2ImgBody(init_images=["x"], script_name="loopback", script_args=args, **fields)


def test_the_strength_follows_automatic1111s_curves():
    """calculate_denoising_strength: the first loop the request's, the last the final one, the curve of k / (n - 1)
    between."""
    linear = parse(body([5, 0.2], denoising_strength=0.6))
    assert [round(linear.strength(k), 6) for k in range(5)] == [0.6, 0.5, 0.4, 0.3, 0.2]
    aggressive, lazy = (parse(body([3, 1.0, curve], denoising_strength=0.5)) for curve in ("Aggressive", "lazy"))
    assert aggressive.strength(1) == pytest.approx(0.5 + 0.5 * math.sin(math.pi / 4))
    assert lazy.strength(1) == pytest.approx(0.5 + 0.5 * (1 - math.cos(math.pi / 4))) and lazy.curve == "Lazy"
    assert parse(body([1, 0.1], denoising_strength=0.3)).strength(0) == 0.3  # one loop: the request's
    defaults = parse(body([]))  # AUTOMATIC1111's UI defaults, and img2img's 0.75
    assert (defaults.loops, defaults.first, defaults.final, defaults.curve) == (4, 0.75, 0.5, "Linear")


@pytest.mark.parametrize(("args", "fields", "message"), [
    ([0], {}, "loops must be a whole number from 1 to 32"),
    ([2.5], {}, "loops must be a whole number"),
    ([4, 1.5], {}, r"final_denoising_strength must be within \[0, 1\]"),
    ([4, 0.5, "Steep"], {}, "denoising_curve must be Aggressive, Linear or Lazy"),
    ([4, 0.5, "Linear", "CLIP"], {}, "append_interrogation 'CLIP' is not supported by this server"),
    ([4, 0.5, "Linear", "None", 1], {}, "at most 4 values"),
    ([4], {"batch_size": 2}, "batch_size: loopback runs one image per loop"),
])
def test_what_cannot_run_is_named(args, fields, message):
    with pytest.raises(InputError, match=message):
        parse(body(args, **fields))


@pytest.mark.slow
def test_the_loops_through_the_api(triton, init_image_png, tmp_path):
    api = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), outputs_dir=tmp_path / "outputs"))
    init = base64.b64encode(init_image_png).decode()
    request = {"prompt": "a photo of a cat", "init_images": [init], "width": 64, "height": 64, "seed": 7, "steps": 10,
               "denoising_strength": 0.6, "save_images": True, "script_name": "loopback",
               "script_args": [3, 0.3, "Linear", "None"]}
    try:
        with api.client() as client:
            answer = client.post("/sdapi/v1/img2img", json=request)
            assert answer.status_code == 200, answer.text
            images, info = answer.json()["images"], json.loads(answer.json()["info"])
            assert len(images) == 1 + 3  # the grid of the loops in one row, then each loop's image
            assert info["all_seeds"] == [7, 8, 9]
            assert pixels(images[0]).shape == (64, 3 * 64, 3)
            assert np.array_equal(pixels(images[0])[:, 64:128], pixels(images[2]))
            texts = [read_png_info(base64.b64decode(image))["parameters"] for image in images[1:]]
            assert [float(t["Denoising strength"]) for t in texts] == pytest.approx([0.6, 0.45, 0.3])
            assert all(t["Final denoising strength"] == "0.3" and t["Denoising curve"] == "Linear" for t in texts)
            assert info["extra_generation_params"]["Denoising curve"] == "Linear"
            # loop 2 is img2img of loop 1's image at its seed and strength (batching changes no pixel beyond rounding)
            alone = client.post("/sdapi/v1/img2img", json={
                "prompt": "a photo of a cat", "init_images": [images[1]], "width": 64, "height": 64, "seed": 8,
                "steps": 10, "denoising_strength": 0.6 + (0.3 - 0.6) * 0.5})
            assert np.abs(pixels(images[2]).astype(int) - pixels(alone.json()["images"][0])).max() <= 2
            saved = client.get("/v1/outputs").json()["items"]
            assert len([i for i in saved if i["kind"] == "img2img-images"]) == 3
            assert [i["path"].split("/")[-1] for i in saved if i["kind"] == "img2img-grids"] == ["grid-0000.png"]

            chains = client.post("/sdapi/v1/img2img", json=request | {"n_iter": 2, "save_images": False})
            assert chains.status_code == 200, chains.text
            chained = json.loads(chains.json()["info"])
            assert len(chains.json()["images"]) == 1 + 2 and chained["all_seeds"] == [9, 12]  # each chain's last
            assert np.abs(pixels(chains.json()["images"][1]).astype(int) - pixels(images[3])).max() <= 2

            assert "loopback" in client.get("/sdapi/v1/scripts").json()["img2img"]
            assert "loopback" not in client.get("/sdapi/v1/scripts").json()["txt2img"]
            refused = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "script_name": "loopback"})
            assert refused.status_code == 422 and "is an img2img script" in refused.text
            refused = client.post("/sdapi/v1/img2img", json=request | {"batch_size": 2})
            assert refused.status_code == 422 and "one image per loop" in refused.text
            refused = client.post("/sdapi/v1/img2img", json=request | {"n_iter": 17})
            assert refused.status_code == 422 and "n_iter must be between 1 and 16, got 17" in refused.text
    finally:
        api.stop()
