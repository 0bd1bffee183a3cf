"""AUTOMATIC1111's img2img_extra_noise ("Extra noise"): img2img's start, inpainting's and the hires fix's second pass
get the same noise again times it, in k-diffusion's terms x + (sigma + extra) noise (its sample_img2img), and for its
timestep samplers x sqrt(a) + noise sqrt(1 - a) + extra noise sqrt(a); the setting, its infotext, its paste and its
X/Y/Z axis through the API."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.errors import InputError
from kiln.triton_server import free_port
from orchestrator.pipeline import HiresFix, Img2ImgRequest, Txt2ImgRequest
from orchestrator.pipeline.inpaint import noised
from orchestrator.pipeline.sampling import img2img_start, schedule
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.conftest import encode
from tests.test_compvis import SD15


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM", "UniPC", "LMS"])
def test_the_extra_noise_is_scaled_as_the_clean_latents_are(sampler):
    """noised(extra) - noised(0) = extra x noise x the scale of the clean latents at the start: 1 in sigma space (so
    x + (sigma + extra) noise), 1 / sqrt(sigma^2 + 1) on diffusers' variance-preserving sample of a k-diffusion
    sampler (the same start, scaled), sqrt(alpha_cumprod) at the start's timestep for the timestep samplers."""
    scheduler, timesteps = schedule(sampler, SD15, 10, 3, img2img_start(sampler, 10, 0.6))
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    extra = noised(scheduler, timesteps, x, noise, 0.3) - noised(scheduler, timesteps, x, noise, 0.0)
    if sampler == "DDIM":  # AUTOMATIC1111's own DDIM: its ladder's entry above the first call
        scale = float(scheduler.alphas_cumprod[scheduler.noise_timestep]) ** 0.5
    elif sampler == "UniPC":
        scale = float(scheduler.alphas_cumprod[int(timesteps[0])]) ** 0.5
    else:
        sigma = float(scheduler.sigmas[scheduler.begin_index])
        scale = 1.0 if scheduler.init_noise_sigma > 1 else (sigma ** 2 + 1) ** -0.5
    assert 0.05 < scale <= 1
    torch.testing.assert_close(extra, 0.3 * noise * scale, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_extra_noise_in_process(local, init_image_png):
    """img2img and inpainting start noisier; txt2img without the hires fix has no img2img start to take it (refused,
    never ignored), with it the second pass does; the infotext says it where it was taken. The conditional mask
    weight is refused likewise on a 4-channel UNet (it weighs a 9-channel inpainting UNet's masked image)."""
    base = Img2ImgRequest(prompt="a cat", steps=4, seed=3, width=64, height=64, init_image=init_image_png,
                          denoising_strength=0.6)
    plain, extra = local.img2img(base), local.img2img(replace(base, extra_noise=0.4))
    assert np.abs(plain.images.astype(int) - extra.images.astype(int)).max() > 2
    assert extra.info["extra_noise"] == 0.4 and "extra_noise" not in plain.info
    mask = encode(Image.new("L", (64, 64), 255))
    assert np.abs(local.img2img(replace(base, mask=mask)).images.astype(int)
                  - local.img2img(replace(base, mask=mask, extra_noise=0.4)).images.astype(int)).max() > 2
    txt = Txt2ImgRequest(prompt="a cat", steps=3, seed=3, width=64, height=64)
    with pytest.raises(InputError, match="extra_noise .* txt2img without the hires fix has neither"):
        local.txt2img(replace(txt, extra_noise=0.4))
    with pytest.raises(InputError, match="inpainting_mask_weight .* has no such UNet"):
        local.img2img(replace(base, mask=mask, inpainting_mask_weight=0.5))
    hires = replace(txt, hires=HiresFix(scale=1.5, upscaler="Latent", steps=2, denoising_strength=0.6))
    second = local.txt2img(replace(hires, extra_noise=0.4))
    assert np.abs(second.images.astype(int) - local.txt2img(hires).images.astype(int)).max() > 2
    assert second.info["extra_noise"] == 0.4


@pytest.mark.slow
def test_extra_noise_through_the_api(triton, init_image_png):
    """override_settings.img2img_extra_noise: written as Extra noise, pasted back into the same image; the options'
    range; the X/Y/Z axis. A request's override where it cannot act is a 422 (txt2img without the hires fix; the
    conditional mask weight on a 4-channel UNet); the server's option acts where it can, as AUTOMATIC1111's."""
    api = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port()))
    body = {"prompt": "a cat", "steps": 4, "seed": 9, "width": 64, "height": 64, "denoising_strength": 0.6,
            "init_images": [base64.b64encode(init_image_png).decode()]}
    try:
        with api.client() as client:
            sent = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {"img2img_extra_noise": 0.25}})
            assert sent.status_code == 200, sent.text
            infotext = json.loads(sent.json()["info"])["infotexts"][0]
            assert "Extra noise: 0.25" in infotext
            pasted = client.post("/sdapi/v1/img2img", json=body | {"infotext": infotext})
            assert pasted.json()["images"][0] == sent.json()["images"][0]
            assert client.post("/sdapi/v1/img2img", json=body).json()["images"][0] != sent.json()["images"][0]
            refused = client.post("/sdapi/v1/options", json={"img2img_extra_noise": 150})
            assert refused.status_code == 422 and "img2img_extra_noise must be in [0, 100]" in refused.text
            plot = client.post("/sdapi/v1/img2img", json=body | {"script_name": "x/y/z plot",
                                                                 "script_args": ["Extra noise", "0, 0.5", None, 0, "",
                                                                                 None, 0, "", None, True, True]})
            assert plot.status_code == 200, plot.text
            texts = json.loads(plot.json()["info"])["infotexts"]  # the grid's (the first cell's), then each cell's
            assert len(texts) == 3 and "Extra noise: 0.5" in texts[2] and "Extra noise" not in texts[1]
            txt2img = {"prompt": "a cat", "steps": 2, "seed": 9, "width": 64, "height": 64}
            plain = client.post("/sdapi/v1/txt2img", json=txt2img).json()["images"][0]
            refused = client.post("/sdapi/v1/txt2img", json=txt2img | {"override_settings": {
                "img2img_extra_noise": 0.25}})
            assert refused.status_code == 422 and "txt2img without the hires fix has neither" in refused.text
            weighted = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {
                "inpainting_mask_weight": 0.5}})
            assert weighted.status_code == 422 and "inpainting_mask_weight" in weighted.text
            assert client.post("/sdapi/v1/options", json={"img2img_extra_noise": 0.25,
                                                          "inpainting_mask_weight": 0.5}).status_code == 200
            assert client.post("/sdapi/v1/txt2img", json=txt2img).json()["images"][0] == plain
            optioned = client.post("/sdapi/v1/img2img", json=body)
            assert optioned.status_code == 200 and optioned.json()["images"][0] == sent.json()["images"][0]
    finally:
        api.stop()
