"""Upscaler networks (ESRGAN family, read by spandrel) for AUTOMATIC1111's upscalers: built and checked against
PyTorch, served by Triton, run as AUTOMATIC1111 runs them (native-scale passes until the size is covered, Lanczos to
the multiple of 8) in the extras, the hires fix and the SD upscale script; listed by GET /sdapi/v1/upscalers.

The session repository serves "4x-tiny" (conftest.upscaler_file: a seeded random ESRGAN x4).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from build.upscaler import load_upscaler
from kiln.errors import InputError, WeightsError
from kiln.upscale import UpscaleOptions, plan, upscale, upscale_with
from orchestrator.pipeline import HiresFix, Pipeline, Txt2ImgRequest
from orchestrator.pipeline.components import NetworkUpscaler

NAME = "4x-tiny"
PHOTO = Image.fromarray(np.random.default_rng(3).integers(0, 255, (20, 24, 3), dtype=np.uint8))


def _torch_pass(upscaler_file, image: Image.Image) -> Image.Image:
    """One pass as AUTOMATIC1111's upscale_pil_patch runs it, in PyTorch."""
    model = load_upscaler(upscaler_file).model
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255)
    with torch.inference_mode():
        out = model(pixels).clamp(0, 1)[0].numpy().transpose(1, 2, 0)
    return Image.fromarray((out * 255).round().astype(np.uint8))


def test_the_build_checks_and_serves_it(model_repo, upscaler_file):
    from build import report
    from kiln.model_config import read_parameters

    entry = report.read_report(model_repo)["upscalers"][NAME]
    assert entry["architecture"] == "ESRGAN" and entry["scale"] == 4 and entry["parity"]["cosine"] > 0.99999
    params, max_batch = read_parameters(model_repo / "upscaler_4x_tiny" / "config.pbtxt")
    assert params["upscaler_name"] == NAME and params["scale"] == "4" and max_batch == 4


def test_files_that_are_no_upscaler_are_refused(tmp_path, extra_vae):
    with pytest.raises(WeightsError, match="not an upscaler spandrel knows"):
        load_upscaler(extra_vae)  # a VAE's tensors
    (tmp_path / "old.pt").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"a \.safetensors or \.pth file"):
        load_upscaler(tmp_path / "old.pt")


def test_a_pass_and_the_extras_upscale_match_pytorch(local, upscaler_file):
    network = local.components.upscalers[NAME]
    assert isinstance(network, NetworkUpscaler) and network.scale == 4
    once = network(PHOTO)
    assert once.size == (96, 80)
    reference = np.asarray(_torch_pass(upscaler_file, PHOTO), dtype=int)
    assert np.abs(np.asarray(once, dtype=int) - reference).max() <= 1
    # x2 with a x4 network: one pass covers 48x40, then Lanczos down to it (AUTOMATIC1111's Upscaler.upscale)
    options = UpscaleOptions(upscaling_resize=2, upscaler_1=NAME)
    result, info = upscale(PHOTO, options, 1 << 24, local.components.upscalers)
    expected = _torch_pass(upscaler_file, PHOTO).resize((48, 40), resample=Image.Resampling.LANCZOS)
    assert result.size == (48, 40) and np.abs(np.asarray(result, int) - np.asarray(expected, int)).max() <= 1
    assert f"Postprocess upscaler: {NAME}" in info
    # x8: two passes (4, then 16 times the side), Lanczos down to 8x
    eight = upscale_with(PHOTO, NAME, plan(24, 20, UpscaleOptions(upscaling_resize=8, upscaler_1=NAME), 1 << 24),
                         local.components.upscalers)
    assert eight.size == (192, 160)
    with pytest.raises(InputError, match=f"upscaler_1 'nope' is not an upscaler of this server; valid: None, "
                                         f"Lanczos, Nearest, {NAME}"):
        upscale(PHOTO, UpscaleOptions(upscaler_1="nope"), 1 << 24, local.components.upscalers)
    small = NetworkUpscaler(NAME, 4, network.run, max_pixels=1000)
    with pytest.raises(InputError, match="over the limit of 1000"):
        small(PHOTO)


@pytest.mark.slow
def test_the_hires_fix_and_sd_upscale_run_it_through_triton_as_in_process(triton, local):
    from orchestrator.pipeline import Img2ImgRequest, SDUpscale
    from orchestrator.pipeline.components.triton import triton_components

    served = Pipeline(triton_components(triton.grpc_url))
    base = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=3, seed=5, width=64, height=64)
    try:
        assert served.contract.upscaler_names == (NAME,)
        fix = HiresFix(scale=1.5, upscaler=NAME, steps=2, denoising_strength=0.5)
        request = Txt2ImgRequest(**base, hires=fix)
        networked = served.txt2img(request).images
        assert np.array_equal(networked, local.txt2img(request).images)
        lanczos = local.txt2img(Txt2ImgRequest(**base, hires=HiresFix(scale=1.5, upscaler="Lanczos", steps=2,
                                                                       denoising_strength=0.5))).images
        assert not np.array_equal(networked, lanczos)
        init = io.BytesIO()
        PHOTO.resize((64, 64)).save(init, format="PNG")
        tiles = Img2ImgRequest(**base, init_image=init.getvalue(), denoising_strength=0.3,
                               sd_upscale=SDUpscale(overlap=16, upscaler=NAME, scale=1.5))
        assert np.array_equal(served.img2img(tiles).images, local.img2img(tiles).images)
        with pytest.raises(InputError, match=f"hr_upscaler 'nope' is not an upscaler of this server; valid: .*{NAME}"):
            served.txt2img(Txt2ImgRequest(**base, hires=HiresFix(upscaler="nope")))
    finally:
        served.close()


@pytest.mark.slow
def test_the_api_lists_it_and_the_extras_run_it(triton, upscaler_file):
    from kiln.triton_server import free_port
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port()))
    buffer = io.BytesIO()
    PHOTO.save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    try:
        with live.client() as client:
            listed = client.get("/sdapi/v1/upscalers").json()
            assert listed[3] == {"name": NAME, "model_name": "ESRGAN", "model_path": "triton://upscaler_4x_tiny",
                                 "model_url": None, "scale": 4.0}
            response = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": NAME,
                                                                         "upscaling_resize": 2})
            assert response.status_code == 200, response.text
            got = Image.open(io.BytesIO(base64.b64decode(response.json()["image"])))
            expected = _torch_pass(upscaler_file, PHOTO).resize((48, 40), resample=Image.Resampling.LANCZOS)
            assert np.abs(np.asarray(got.convert("RGB"), int) - np.asarray(expected, int)).max() <= 1
            unknown = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "4x-nope"})
            assert unknown.status_code == 422 and NAME in unknown.text
            square = io.BytesIO()
            PHOTO.resize((64, 64)).save(square, format="PNG")
            body = {"prompt": "a cat", "steps": 2, "seed": 1, "width": 64, "height": 64, "denoising_strength": 0.3,
                    "init_images": [base64.b64encode(square.getvalue()).decode()], "script_name": "sd upscale",
                    "script_args": [None, 16, 3, 1.5]}
            script = client.post("/sdapi/v1/img2img", json=body)  # upscaler 3: the first network after the built-ins
            assert script.status_code == 200, script.text
            assert json.loads(script.json()["info"])["width"] == 64
    finally:
        live.stop()
