"""AUTOMATIC1111's Soft inpainting (orchestrator.pipeline.soft_inpainting): its blend, its percentile filter and
composite, the loop against diffusers' components with its blends written out (conftest.a1111_inpainting), and the
script over the API (alwayson_scripts, its infotext pasted back, only masked)."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.soft_inpainting import main as bench_main
from benchmarks.soft_inpainting import per_pixel_filter
from kiln.errors import InputError
from kiln.triton_server import free_port
from orchestrator.pipeline import Img2ImgRequest, SoftInpainting
from orchestrator.pipeline.blend import Blend
from orchestrator.pipeline.soft_inpainting import (
    composite_masks,
    gaussian_kernel,
    latent_blend,
    percentile_filter,
    weight,
)
from orchestrator.server import soft_inpainting as served
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.conftest import a1111_inpainting, encode, soft_blend
from tests.test_blend import AFTER, REPAINT, _run

SOFT = SoftInpainting()


@pytest.fixture(scope="module")
def reference_pipe(sd_checkpoint):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_checkpoint), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


@pytest.mark.parametrize("low, high", [(0.9, 1), (0.25, 0.75), (0, 1), (0.5, 0.5), (0.98, 1)])
def test_the_percentile_filter_is_the_weighted_histogram_filter(low, high):
    """Every pixel, edges and corners included (the window cut by the image), narrow windows widened and moved in."""
    image = np.random.default_rng(3).random((9, 7)).astype(np.float32) * 4
    image[2, 3] = image[2, 4]  # ties
    kernel = gaussian_kernel()
    assert kernel.shape == (5, 5) and kernel[2, 2] == 1 and 0 < kernel[0, 0] < kernel[0, 1]
    np.testing.assert_allclose(percentile_filter(image, kernel, low, high), per_pixel_filter(image, kernel, low, high),
                               rtol=1e-6, atol=1e-6)


def test_the_benchmark_runs_and_its_two_composites_agree(tmp_path):
    """benchmarks/soft_inpainting.py at a small side: every arm runs, the composites are equal (it asserts that)."""
    result = bench_main(["--sides", "64", "--repeats", "1", "--out", str(tmp_path)])
    assert len(result["rows"]) == 4 and all(row["ms"] > 0 for row in result["rows"])
    assert (tmp_path / "soft_inpainting.json").is_file()


def test_the_blend_mixes_the_vectors_and_their_magnitudes():
    """t 0 is the init, 1 the current latents; between, a vector's direction is the linear mix's and its length the
    mix of the two lengths to the power (longer than the linear mix's, which cancels out opposite vectors)."""
    gen = torch.Generator().manual_seed(0)
    init, current = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 6, 6, generator=gen)
    t = torch.rand(1, 1, 6, 6, generator=gen)
    for power in (1.0, 4.0, 17.5):
        settings = replace(SOFT, transition_contrast_boost=power)
        torch.testing.assert_close(latent_blend(settings, init, current, t), soft_blend(init, current, t, power))
        torch.testing.assert_close(latent_blend(settings, init, current, torch.zeros_like(t)), init, atol=1e-4, rtol=0)
        torch.testing.assert_close(latent_blend(settings, init, current, torch.ones_like(t)), current, atol=1e-4,
                                   rtol=0)
    lengths = latent_blend(SOFT, init, current, t).norm(dim=1)
    assert (lengths >= torch.lerp(init, current, t).norm(dim=1) - 1e-5).all()
    assert weight(SOFT, torch.full((1, 1, 2, 2), 0.5), 14.6).max() < weight(SOFT, torch.full((1, 1, 2, 2), 0.5),
                                                                             0.03).min()  # early: the init


@pytest.mark.parametrize("sampler", AFTER + ["DDIM", "PLMS", "UniPC", "LMS"])
def test_a_binary_mask_blends_as_plain_inpainting_at_every_call(sampler):
    """0 and 1 to any power stay 0 and 1: soft inpainting with a mask of only 0s and 1s blends as inpainting does at
    every call (the plumbing: the prediction turned into the clean latents and back for every sampler, epsilon's
    sample spaces, the input for the timestep samplers), before the last blend, which soft inpainting leaves out."""
    plain, _ = _run(sampler, 8, 0.7, final=False)
    soft, init = _run(sampler, 8, 0.7, final=False, soft=SOFT)
    torch.testing.assert_close(soft, plain, atol=2e-4, rtol=0)
    blend = Blend.for_sampler(sampler, REPAINT, init, SOFT)
    assert blend.final(soft) is soft  # no last blend


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM++ 2M", "DDIM", "PLMS"])
def test_the_blend_weight_takes_each_calls_sigma_or_timestep(sampler, monkeypatch):
    """The exponent's sigma at each call is the scheduler's own sigma at that call (its table at the step index the
    call runs at: Heun's second call its own; DPM++ 2M's sample is variance-preserving, its sigma still the
    k-diffusion one), and for AUTOMATIC1111's timestep samplers the timestep the model is given."""
    import orchestrator.pipeline.soft_inpainting as module

    seen, calls = [], []
    monkeypatch.setattr(module, "weight", lambda settings, repaint, sigma: seen.append(sigma) or repaint)

    def check(scheduler, t, x, output, init):
        if sampler in ("DDIM", "PLMS"):
            calls.append(float(t))
            return
        index = scheduler.step_index if scheduler.step_index is not None else len(calls)  # (before its first step)
        calls.append(float(scheduler.sigmas[index]))

    _run(sampler, 6, 1.0, soft=SOFT, check=check)
    assert len(seen) == len(calls) >= 4 and seen == pytest.approx(calls, rel=1e-6)
    assert seen[0] > 3 * seen[-1] > 0  # from high noise down


def test_the_composite_keeps_the_init_image_where_the_latents_did_not_move():
    """Mask 0 (the init image's pixels) where the final latents equal the init latents, 255 deep inside a region
    that moved; mask influence 1 leans on the latent mask (a kept place needs to move further)."""
    init = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    moved = init.clone()
    moved[1, :, 4:12, 4:12] += 3.0
    repaint = torch.zeros(1, 1, 16, 16)
    repaint[..., 2:14, 2:14] = 1
    still, changed = composite_masks(SOFT, repaint, init, moved, 128, 128)
    assert still.size == (128, 128) and still.mode == "L"
    assert np.asarray(still).max() == 0
    inside = np.asarray(changed)
    assert inside[56:72, 56:72].min() >= 254 and inside[:12, :12].max() == 0
    leaning = composite_masks(replace(SOFT, mask_influence=1.0), torch.zeros(1, 1, 16, 16), init, moved, 128, 128)[1]
    assert np.asarray(leaning)[56:72, 56:72].max() < 250  # where the mask keeps, more change is needed


# -- the loop against diffusers' components, and the requests ----------------------------------------------
def _mask_png(soft_edge: bool = True) -> bytes:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (18, 20, 46, 50))
    if soft_edge:
        mask.paste(128, (10, 20, 18, 50))  # a grey band: half repainted
    return encode(mask)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "UniPC"])
def test_soft_inpainting_matches_automatic1111s_blends(local, reference_pipe, init_image_png, sampler):
    """kiln's loop against diffusers' img2img pipeline with soft inpainting's blends written out (the composite
    left out on both sides: overlay false)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, config = reference_pipe
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    settings = SoftInpainting(schedule_bias=1.5, preservation_strength=0.8, transition_contrast_boost=6.0)
    mask = Image.open(io.BytesIO(_mask_png()))
    expected = a1111_inpainting(img2img, sampler, config, Image.open(io.BytesIO(init_image_png)), mask, seed=11,
                                strength=0.7, steps=8, mask_round=False, soft=settings, prompt="a photo of a cat",
                                negative_prompt="blurry", guidance_scale=7.5, height=64, width=64)
    request = Img2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=8, sampler=sampler,
                             cfg_scale=7.5, seed=11, width=64, height=64, init_image=init_image_png,
                             denoising_strength=0.7, mask=_mask_png(), mask_blur=0, mask_round=False,
                             soft_inpainting=settings)
    result = local.img2img(request)
    assert np.abs(result.images.astype(int) - expected.astype(int)).max() <= 2, sampler  # measured: 0, 0, 1
    assert len(result.masks) == 1 and result.masks[0].size == (64, 64)
    plain = local.img2img(replace(request, soft_inpainting=None))
    assert np.abs(result.images.astype(int) - plain.images.astype(int)).max() > 2  # the grey band and the last blend
    if sampler == "UniPC":  # a timestep sampler blends its input only: its own latents move everywhere
        return
    composited = local.img2img(replace(request, overlay=True))
    init = np.asarray(Image.open(io.BytesIO(init_image_png)).convert("RGB").resize((64, 64), Image.LANCZOS))
    far = np.asarray(result.masks[0]) == 0  # where the latents hardly moved: the init image's own pixels
    assert far.any() and (composited.images[0][far] == init[far]).all()


@pytest.mark.parametrize("fields, message", [
    ({"mask": b""}, "soft inpainting blends by a mask"),
    ({"mask_round": True}, "mask_round must be false"),
    ({"soft_inpainting": SoftInpainting(difference_threshold=0)}, "difference_threshold must be a number above 0"),
    ({"soft_inpainting": SoftInpainting(transition_contrast_boost=0)}, "transition_contrast_boost must be a number "
                                                                         "above 0 to 64"),
    ({"soft_inpainting": SoftInpainting(preservation_strength=-1)}, "preservation_strength must be a number from 0,"),
    ({"soft_inpainting": SoftInpainting(mask_influence=float("nan"))}, "mask_influence must be"),
])
def test_what_soft_inpainting_cannot_run_is_named(local, init_image_png, fields, message):
    request = Img2ImgRequest(prompt="a cat", steps=2, seed=1, width=64, height=64, init_image=init_image_png,
                             mask=_mask_png(), mask_round=False, soft_inpainting=SOFT)
    with pytest.raises(InputError, match=message):
        local.img2img(replace(request, **fields))


def test_the_scripts_args_are_automatic1111s():
    """[enabled, the six sliders], the numbers as sent; fewer take the defaults, none is disabled; enabled read for
    its truth; without a mask nothing (its processing_uses_inpainting); txt2img has no such script."""
    args = {"Soft Inpainting": {"args": [True, 2, 0.25, 8, 0.5, 1, 3]}}
    assert served.settings(args, img2img=True, masked=True) == SoftInpainting(2, 0.25, 8, 0.5, 1, 3)
    assert served.settings({"soft inpainting": {"args": [1, 2]}}, True, True) == replace(SOFT, schedule_bias=2)
    assert served.settings(args, img2img=True, masked=False) is None
    for off in ({"soft inpainting": {"args": [False, 2]}}, {"soft inpainting": {"args": []}},
                {"soft inpainting": {}}, {}):
        assert served.settings(off, True, True) is None, off
    assert type(SOFT.schedule_bias) is int and type(SOFT.mask_influence) is int  # its defaults: written as 1, 0
    for scripts, message, img2img in [({"soft inpainting": {"args": [False]}}, "img2img's", False),
                                      ({"soft inpainting": {"args": ["yes"]}}, "enabled, must be true or false", True),
                                      ({"soft inpainting": {"args": [True, "high"]}}, "schedule_bias, must be a number",
                                       True),
                                      ({"soft inpainting": {"args": [True] + [1] * 7}}, "at most 7 values", True),
                                      ({"soft inpainting": {"args": "on"}}, "must be a list", True)]:
        with pytest.raises(InputError, match=message):
            served.settings(scripts, img2img=img2img, masked=True)


def test_an_infotext_fills_the_args_a_request_leaves_out():
    """By place, as AUTOMATIC1111's paste: the request's own args first, the infotext's after them."""
    params = {"Soft inpainting enabled": "True", "Soft inpainting schedule bias": "2",
              "Soft inpainting difference threshold": "0.75"}
    assert served.pasted(params, {}) == {"soft inpainting": {"args": [True, 2, 0.5, 4, 0, 0.75, 2]}}
    assert served.pasted(params, {"Soft Inpainting": {"args": [True, 3]}}) == {
        "Soft Inpainting": {"args": [True, 3, 0.5, 4, 0, 0.75, 2]}}
    assert served.pasted({"Steps": "20"}, {}) is None
    with pytest.raises(InputError, match="is not a number"):
        served.pasted({"Soft inpainting mask influence": "some"}, {})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.slow
def test_soft_inpainting_through_the_api(triton, init_image_png):
    """The always-on script's args, its infotext (pasted back into the same image), the scripts listing, only
    masked (the image outside the crop untouched), and what is refused."""
    api = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port()))
    try:
        with api.client() as client:
            _through(client, init_image_png)
    finally:
        api.stop()


def _through(api_client, init_image_png) -> None:
    body = {"prompt": "a photo of a cat", "steps": 4, "seed": 5, "width": 64, "height": 64, "mask_blur": 4,
            "init_images": [_b64(init_image_png)], "mask": _b64(_mask_png()), "denoising_strength": 0.7,
            "alwayson_scripts": {"soft inpainting": {"args": [True, 1, 0.5, 4, 0, 0.5, 2]}}}
    answer = api_client.post("/sdapi/v1/img2img", json=body)
    assert answer.status_code == 200, answer.text
    infotext = json.loads(answer.json()["info"])["infotexts"][0]
    assert "Denoising strength: 0.7, Soft inpainting enabled: True, Soft inpainting schedule bias: 1, " \
        "Soft inpainting preservation strength: 0.5, Soft inpainting transition contrast boost: 4, " \
        "Soft inpainting mask influence: 0, Soft inpainting difference threshold: 0.5, " \
        "Soft inpainting difference contrast: 2, Mask blur: 4" in infotext  # as its script writes them, in its order
    extra = json.loads(answer.json()["info"])["extra_generation_params"]
    assert extra["Soft inpainting mask influence"] == 0 and type(extra["Soft inpainting mask influence"]) is int
    image = answer.json()["images"][0]
    plain = api_client.post("/sdapi/v1/img2img", json=body | {"alwayson_scripts": {}})
    assert plain.json()["images"][0] != image
    other = api_client.post("/sdapi/v1/img2img", json=body | {"alwayson_scripts": {"soft inpainting": {
        "args": [True, 1, 0.5, 4, 0, 0.75, 2]}}})
    assert other.status_code == 200 and other.json()["images"][0] != image
    other_text = json.loads(other.json()["info"])["infotexts"][0]
    bare = {k: v for k, v in body.items() if k != "alwayson_scripts"}
    for sent in (bare, body | {"alwayson_scripts": {"soft inpainting": {"args": [True]}}}):  # the rest from the text
        pasted = api_client.post("/sdapi/v1/img2img", json=sent | {"infotext": other_text})
        assert pasted.status_code == 200, pasted.text
        assert pasted.json()["images"][0] == other.json()["images"][0]
    assert "soft inpainting" in api_client.get("/sdapi/v1/scripts").json()["img2img"]
    assert [s["args"][0]["label"] for s in api_client.get("/sdapi/v1/script-info").json()
            if s["name"] == "soft inpainting"] == ["Soft inpainting"]
    larger = Image.new("RGB", (96, 80), (30, 120, 200))
    region = Image.new("L", (96, 80), 0)
    region.paste(255, (50, 30, 70, 50))
    masked_body = body | {"init_images": [_b64(encode(larger))], "inpaint_full_res": True,
                          "inpaint_full_res_padding": 4, "mask": _b64(encode(region))}
    only = api_client.post("/sdapi/v1/img2img", json=masked_body)
    assert only.status_code == 200, only.text
    result = np.asarray(Image.open(io.BytesIO(base64.b64decode(only.json()["images"][0]))).convert("RGB"))
    assert result.shape == (80, 96, 3) and (result[:, :20] == (30, 120, 200)).all()  # left of the crop: untouched
    hard = api_client.post("/sdapi/v1/img2img", json=masked_body | {"alwayson_scripts": {}}).json()["images"][0]
    hard = np.asarray(Image.open(io.BytesIO(base64.b64decode(hard))).convert("RGB"))
    assert (hard[:, :20] == result[:, :20]).all() and (hard != result).any()  # the composite: inside the box only
    refused = api_client.post("/sdapi/v1/img2img", json=body | {"alwayson_scripts": {"soft inpainting": {
        "args": [True, 1, 0.5, 4, 0, 0]}}})
    assert refused.status_code == 422 and "difference_threshold must be a number above 0" in refused.text
    unmasked = api_client.post("/sdapi/v1/img2img", json=body | {"mask": None})  # nothing to blend by: nothing
    assert unmasked.status_code == 200 and "Soft inpainting" not in json.loads(unmasked.json()["info"])["infotexts"][0]
    txt = api_client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
                                                     "alwayson_scripts": body["alwayson_scripts"]})
    assert txt.status_code == 422 and "img2img's" in txt.text

