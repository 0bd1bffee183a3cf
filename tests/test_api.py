"""The API service over real HTTP: uvicorn + the real Triton serving a tiny SD pipeline and the ViT.

Every test talks to a running service (started by fixtures) with httpx; nothing is mocked.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from kiln.infotext import parse_infotext
from kiln.triton_server import free_port
from orchestrator.metrics import read_metric
from orchestrator.pipeline import Limits, Pipeline, Txt2ImgRequest
from orchestrator.security import SecurityOptions
from orchestrator.server.service import BackgroundAPI as LiveAPI
from orchestrator.server.settings import Settings
from tests.conftest import decode, encode, png_header_only, start_triton

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def styles_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("styles") / "styles.csv"
    path.write_text('name,prompt,negative_prompt\n"painterly","oil painting of {prompt}, thick brush","photo, blurry"\n'
                    'detailed,"highly detailed, 8k",\n')
    return path


@pytest.fixture(scope="module")
def outputs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def api(triton, styles_file, outputs_dir):
    live = LiveAPI(Settings(triton_url=triton.grpc_url, port=free_port(), max_queue=8, workers=8,
                            limits=Limits(max_steps=500), styles_file=styles_file, outputs_dir=outputs_dir))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(api):
    with api.client() as c:
        yield c


def _png(color=(200, 80, 40), size=(64, 64), mode="RGB") -> bytes:
    image = Image.new("RGB", size, color)
    image.paste((20, 160, 220), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return encode(image.convert(mode) if mode != "RGB" else image)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


TXT = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 5, "sampler_name": "Euler a",
       "cfg_scale": 7.5, "seed": 1234, "width": 64, "height": 64}


def _safe(response: httpx.Response) -> None:
    """No traceback or memory address in an error body."""
    text = response.text
    assert "Traceback" not in text and " at 0x" not in text and 'File "' not in text, text


# -- AUTOMATIC1111 routes ------------------------------------------------------------------------------
def test_txt2img_matches_the_library_and_carries_parameters(client, triton):
    response = client.post("/sdapi/v1/txt2img", json=TXT | {"n_iter": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234  # n_iter chains seeds as AUTOMATIC1111
    assert len(body["images"]) == 2 and body["parameters"]["prompt"] == TXT["prompt"]
    pixels, meta = decode(body["images"][0])
    expected = Pipeline.from_triton(triton.grpc_url).txt2img(Txt2ImgRequest(
        prompt=TXT["prompt"], negative_prompt="blurry", steps=5, sampler="Euler a", cfg_scale=7.5, seed=1234,
        width=64, height=64)).images[0]
    assert np.array_equal(pixels, expected)
    parsed = parse_infotext(meta["parameters"])
    assert parsed["Prompt"] == TXT["prompt"] and parsed["Negative prompt"] == "blurry"
    assert parsed["Steps"] == "5" and parsed["Sampler"] == "Euler a" and parsed["Seed"] == "1234"
    assert parsed["Size"] == "64x64" and parsed["Model"]
    # png-info reads it back.
    read = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + body["images"][1]}).json()
    assert read["parameters"]["Seed"] == "1235" and read["info"].startswith(TXT["prompt"])


def test_scheduler_field_and_aliases(client):
    karras = client.post("/sdapi/v1/txt2img",
                         json=TXT | {"steps": 3, "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    direct = client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 3, "sampler_name": "DPM++ 2M Karras"})
    alias = client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 3, "sampler_name": "k_dpmpp_2m_ka"})
    assert karras.status_code == direct.status_code == alias.status_code == 200
    assert karras.json()["images"][0] == direct.json()["images"][0] == alias.json()["images"][0]
    assert json.loads(karras.json()["info"])["sampler_name"] == "DPM++ 2M Karras"
    # AUTOMATIC1111 1.9+: Automatic (or no scheduler) is each sampler's own schedule, Karras for DPM++ 2M
    automatic = client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 3, "sampler_name": "DPM++ 2M"})
    assert automatic.json()["images"][0] == karras.json()["images"][0]
    uniform = client.post("/sdapi/v1/txt2img",
                          json=TXT | {"steps": 3, "sampler_name": "DPM++ 2M", "scheduler": "Uniform"})
    assert json.loads(uniform.json()["info"])["sampler_name"] == "DPM++ 2M"
    assert uniform.json()["images"][0] != karras.json()["images"][0]
    for sampler, scheduler, runs in (("DPM++ 2M SDE", None, "DPM++ 2M SDE Exponential"),
                                     ("DPM++ 2M SDE", "Karras", "DPM++ 2M SDE Karras"),
                                     ("DPM++ SDE", "Automatic", "DPM++ SDE Karras"), ("Euler", None, "Euler"),
                                     (None, None, "Euler"),  # AUTOMATIC1111's API default (sampler_index's)
                                     # any k-diffusion sampler on any schedule type; the name's type wins
                                     ("Euler a", "Beta", "Euler a Beta"), ("k_lms Exponential", "Karras",
                                                                           "LMS Exponential"),
                                     # AUTOMATIC1111's timestep samplers run their own steps whatever the type
                                     ("DDIM", "Karras", "DDIM"), ("UniPC", "Exponential", "UniPC"),
                                     # "Uniform" in the name wins over Automatic's Karras
                                     ("DPM++ 2M Uniform", None, "DPM++ 2M"),
                                     # AUTOMATIC1111 1.10's others, by label, name or alias, and in the name
                                     ("Euler", "SGM Uniform", "Euler SGM Uniform"),
                                     ("Euler a", "sgm_uniform", "Euler a SGM Uniform"),
                                     ("LMS", "SGMUniform", "LMS SGM Uniform"),
                                     ("DPM++ 2M Align Your Steps", "Karras", "DPM++ 2M Align Your Steps"),
                                     ("DPM++ 2M SDE", "kl_optimal", "DPM++ 2M SDE KL Optimal"),
                                     ("Heun", "Simple", "Heun Simple"), ("Euler", "DDIM", "Euler DDIM")):
        response = client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 2, "sampler_name": sampler,
                                                                 "scheduler": scheduler})
        assert response.status_code == 200 and json.loads(response.json()["info"])["sampler_name"] == runs
    ancestral = [client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 3, "sampler_name": "Euler a"} | fields).json()
                 for fields in ({"scheduler": "Karras"}, {"sampler_name": "Euler a Karras"}, {})]
    assert ancestral[0]["images"][0] == ancestral[1]["images"][0] != ancestral[2]["images"][0]
    assert parse_infotext(json.loads(ancestral[0]["info"])["infotexts"][0])["Sampler"] == "Euler a Karras"


def test_variation_seeds(client):
    """subseed_strength 1 is the subseed's own noise; 0.5 is neither image (AUTOMATIC1111's slerp).

    A deterministic sampler: an ancestral one would still draw its per-step noise from the seed.
    """
    def image(**change):
        response = client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 3, "sampler_name": "Euler"} | change)
        assert response.status_code == 200, response.text
        return decode(response.json()["images"][0])[0].astype(int), json.loads(response.json()["info"])

    base, _ = image(seed=1)
    other, _ = image(seed=77)
    full, info = image(seed=1, subseed=77, subseed_strength=1.0)
    half, _ = image(seed=1, subseed=77, subseed_strength=0.5)
    assert np.abs(full - other).max() <= 1 and info["subseed"] == 77 and info["seed"] == 1
    assert np.abs(half - base).max() > 8 and np.abs(half - other).max() > 8


def test_img2img_inpainting_and_controlnet(client):
    init = _b64(_png())
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    plain = client.post("/sdapi/v1/img2img", json=TXT | {"init_images": [init], "denoising_strength": 0.6})
    masked = client.post("/sdapi/v1/img2img", json=TXT | {"init_images": [init], "mask": _b64(encode(mask)),
                                                          "denoising_strength": 0.8, "mask_blur": 2})
    cropped = client.post("/sdapi/v1/img2img", json=TXT | {"init_images": [_b64(_png(size=(96, 48)))],
                                                           "resize_mode": 1})
    control = client.post("/sdapi/v1/txt2img", json=TXT | {"alwayson_scripts": {"controlnet": {"args": [
        {"enabled": True, "image": init, "module": "canny", "weight": 0.8, "threshold_a": 50, "threshold_b": 150},
        {"enabled": False, "image": init}]}}})
    two = client.post("/sdapi/v1/txt2img", json=TXT | {"alwayson_scripts": {"controlnet": {"args": [
        {"enabled": True, "image": init, "module": "canny", "weight": 0.8},
        {"enabled": True, "image": init, "weight": 0.4, "guidance_start": 0.5}]}}})
    for response in (plain, masked, cropped, control, two):
        assert response.status_code == 200, response.text
    assert json.loads(masked.json()["info"])["infotexts"][0].count("Mask blur: 2") == 1
    assert "ControlNet 0" in json.loads(control.json()["info"])["infotexts"][0]
    infotext = json.loads(two.json()["info"])["infotexts"][0]
    assert "ControlNet 0" in infotext and "ControlNet 1: \"Module: none, Model: controlnet [" in infotext
    assert ", Weight: 0.4" in infotext
    assert two.json()["images"][0] != control.json()["images"][0]
    # Several ControlNet models: sd-webui-controlnet's list, and a unit picking one by its title or name.
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert [m.split(" [")[0] for m in models] == ["controlnet", "scribble"] and len(models[1]) == len("scribble [") + 9
    assert client.get("/controlnet/module_list").json()["module_list"][:5] == [
        "none", "tile_resample", "recolor_luminance", "lineart_standard", "inpaint_only"]  # tests/test_preprocessors.py
    unit = {"enabled": True, "image": init, "module": "canny", "weight": 0.8, "threshold_a": 50, "threshold_b": 150}
    scribble = client.post("/sdapi/v1/txt2img", json=TXT | {"alwayson_scripts": {"controlnet": {"args": [
        unit | {"model": models[1]}]}}})
    by_name = client.post("/sdapi/v1/txt2img", json=TXT | {"alwayson_scripts": {"controlnet": {"args": [
        unit | {"model": "scribble"}]}}})
    assert scribble.status_code == by_name.status_code == 200, scribble.text
    assert scribble.json()["images"] == by_name.json()["images"] != control.json()["images"]
    assert f"Model: {models[1]}" in json.loads(scribble.json()["info"])["infotexts"][0]
    unknown = client.post("/sdapi/v1/txt2img", json=TXT | {"alwayson_scripts": {"controlnet": {"args": [
        unit | {"model": "control_v11f1p_sd15_depth [cfd03158]"}]}}})
    assert unknown.status_code == 422 and "unknown ControlNet model" in unknown.text and "scribble [" in unknown.text
    five = client.post("/sdapi/v1/txt2img", json=TXT | {"alwayson_scripts": {"controlnet": {"args": [
        {"enabled": True, "image": init}] * 5}}})
    assert five.status_code == 422 and "at most 4" in five.text


def test_inpainting_fill_modes_only_masked_and_the_overlay(client):
    """AUTOMATIC1111's inpainting: the four fills differ inside the mask, the init image comes back untouched
    outside it, and "only masked" (its default) keeps the init image's own size."""
    rng = np.random.default_rng(3)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 40, 40))
    inside = np.zeros((64, 64), bool)
    inside[16:40, 16:40] = True
    body = TXT | {"init_images": [_b64(encode(init))], "mask": _b64(encode(mask)), "mask_blur": 0,
                  "denoising_strength": 0.6, "steps": 4, "inpaint_full_res": False}
    images = {}
    for fill in (0, 1, 2, 3):
        response = client.post("/sdapi/v1/img2img", json=body | {"inpainting_fill": fill})
        assert response.status_code == 200, response.text
        images[fill] = decode(response.json()["images"][0])[0]
        assert np.array_equal(images[fill][~inside], np.asarray(init)[~inside])  # the overlay: kept means kept
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 3)):
        assert np.abs(images[a][inside].astype(int) - images[b][inside].astype(int)).max() > 8, (a, b)
    bad = client.post("/sdapi/v1/img2img", json=body | {"inpainting_fill": 4})
    assert bad.status_code == 422 and "inpainting_fill" in bad.text

    # AUTOMATIC1111's defaults (fill, only masked): a 96x48 init image is inpainted through a 64x64 crop
    # around the mask and comes back at 96x48, unchanged outside the mask.
    wide = Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8))
    wide_mask = Image.new("L", (96, 48), 0)
    wide_mask.paste(255, (60, 10, 76, 26))
    response = client.post("/sdapi/v1/img2img", json=TXT | {"init_images": [_b64(encode(wide))], "steps": 4,
                                                            "mask": _b64(encode(wide_mask)), "mask_blur": 0,
                                                            "inpaint_full_res_padding": 4})
    assert response.status_code == 200, response.text
    out = decode(response.json()["images"][0])[0]
    assert out.shape == (48, 96, 3)
    keep = np.asarray(wide_mask) == 0
    assert np.array_equal(out[keep], np.asarray(wide)[keep])
    assert np.abs(out[~keep].astype(int) - np.asarray(wide)[~keep].astype(int)).max() > 8  # repainted


def test_the_mask_follows_resize_mode(client):
    """AUTOMATIC1111 shapes the mask by resize_mode as it shapes the init image (after the blur): with "crop and
    resize" a mask over the strip the crop cuts off masks nothing, and the init image comes back as cropped; a plain
    resize keeps the strip and repaints it."""
    from kiln.masks import resize_init_image

    rng = np.random.default_rng(5)
    wide = encode(Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)))
    strip = Image.new("L", (96, 48), 0)
    strip.paste(255, (0, 0, 14, 48))  # blurred, still inside the 24 columns a crop to 64x64 (of 128x64) leaves out
    body = TXT | {"init_images": [_b64(wide)], "mask": _b64(encode(strip)), "mask_blur": 2, "steps": 4,
                  "denoising_strength": 0.9, "inpaint_full_res": False}
    cropped = client.post("/sdapi/v1/img2img", json=body | {"resize_mode": 1})
    assert cropped.status_code == 200, cropped.text
    expected = np.asarray(Image.open(io.BytesIO(resize_init_image(wide, 64, 64, 1))).convert("RGB"))
    assert np.array_equal(decode(cropped.json()["images"][0])[0], expected)
    stretched = client.post("/sdapi/v1/img2img", json=body | {"resize_mode": 0})
    out = decode(stretched.json()["images"][0])[0].astype(int)
    plain = np.asarray(Image.open(io.BytesIO(wide)).resize((64, 64), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(out[:, :6] - plain[:, :6]).max() > 8 and np.array_equal(out[:, 16:], plain[:, 16:])


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "LA", "RGBA"])
def test_init_images_in_any_mode(client, mode):
    image = Image.new("RGB", (64, 64), (30, 120, 200))
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        data = encode(converted)
    else:
        data = encode(image.convert(mode), "TIFF" if mode == "CMYK" else "PNG")
    response = client.post("/sdapi/v1/img2img", json=TXT | {"steps": 2, "init_images": [_b64(data)]})
    assert response.status_code == 200, response.text


BAD = [
    ({"width": 65}, 422, "width"),
    ({"width": 4096}, 422, "width"),
    ({"steps": 0}, 422, "steps"),
    ({"steps": 10000}, 422, "steps"),
    ({"batch_size": 100}, 422, "batch_size"),
    ({"n_iter": 100}, 422, "n_iter"),
    ({"seed": 2**32}, 422, "seed"),
    ({"subseed_strength": 2}, 422, "subseed_strength"),
    ({"sampler_name": "Euler z"}, 404, "Sampler not found"),
    ({"scheduler": "Karras Exponential"}, 422, "scheduler 'Karras Exponential' is not supported; valid: Automatic"),
    ({"scheduler": "KL Optimal", "sampler_name": "Heun"}, 404, "KL Optimal ends above sigma 0"),
    ({"scheduler": "DDIM", "steps": 30}, 422, "the DDIM schedule type runs 31 steps for 30"),
    ({"sampler_name": "LCM", "scheduler": "Karras"}, 404, "LCM Karras: LCM runs its own timesteps"),
    ({"sampler_name": "DPM++ 2M Karras Beta"}, 404, "DPM++ 2M Karras runs its own schedule"),
    ({"sampler_name": "Heun", "override_settings": {"always_discard_next_to_last_sigma": True}}, 422,
     "always_discard_next_to_last_sigma: kiln cannot discard Heun's next-to-last sigma"),
    ({"override_settings": {"always_discard_next_to_last_sigma": "yes"}}, 422,
     "override_settings.always_discard_next_to_last_sigma must be true or false"),
    ({"sampler_name": "LCM", "override_settings": {"sgm_noise_multiplier": True}}, 422,
     "sgm_noise_multiplier: kiln's LCM starts from diffusers' noise"),
    ({"prompt": "cat " * 10000}, 413, "prompt"),
    ({"prompt": "a cat <lora:watercolor:0.8>"}, 422, "<lora:watercolor>: no such LoRA (the server has no LoRA folder"),
    ({"prompt": "a cat <hypernet:ink:1>"}, 422, "prompt: <hypernet:ink:1> is an extra-network tag (hypernet)"),
    ({"negative_prompt": "blurry AND dark"}, 422, "negative_prompt: AND (composable diffusion)"),
    ({"prompt": "a [cat:dog]"}, 422, "prompt: [cat:dog] is not valid prompt editing or alternation"),
    ({"s_churn": 0.5}, 422, "s_churn 0.5: the Euler a sampler has no churn"),
    ({"s_noise": 1.003, "sampler_name": "DDIM"}, 422, "s_noise 1.003: the DDIM sampler has no churn"),
    ({"s_min_uncond": -1}, 422, "s_min_uncond"),
    ({"override_settings": {"eta_ancestral": "0.5"}}, 422, "override_settings.eta_ancestral must be a number"),
    ({"override_settings": {"eta_ancestral": 2}}, 422, "eta_ancestral must be"),
    ({"refiner_checkpoint": "sdxl_refiner", "refiner_switch_at": 0.8}, 422, "refiner_checkpoint"),
    ({"initial_noise_multiplier": 0.9}, 422, "initial_noise_multiplier scales img2img's noise"),
    ({"alwayson_scripts": {"controlnet": {"args": [{"image": _b64(_png()), "control_mode": "Prompt first"}]}}}, 422,
     "control_mode 'Prompt first' is not one of sd-webui-controlnet's"),
    ({"alwayson_scripts": {"controlnet": {"args": [{"image": _b64(_png()), "control_mode": [2]}]}}}, 422,
     "control_mode [2] is not one of"),
    ({"alwayson_scripts": {"controlnet": {"args": [{"image": _b64(_png()), "resize_mode": "Fill"}]}}},
     422, "resize_mode 'Fill' is not one of sd-webui-controlnet's"),
    ({"alwayson_scripts": {"controlnet": {"args": [{"image": _b64(_png()), "module": "canny",
                                                    "processor_res": 4096}]}}}, 422,
     "processor_res must be 64 to 2048"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, 422, "hr_upscaler 'R-ESRGAN 4x+' is not an upscaler"),
    ({"enable_hr": True, "hr_scale": 3}, 422, "hr_scale 3 of a 64x64 image gives 192x192"),
    ({"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}, 422, "hr_checkpoint_name"),
    ({"firstphase_width": 32}, 422, "firstphase_width"),
    ({"override_settings": {"sd_model_checkpoint": "other.safetensors"}}, 422, "sd_model_checkpoint"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 9}}, 422, "CLIP_stop_at_last_layers) must be 1 to 5"),
    ({"override_settings": {"live_preview_content": "Combined"}}, 422,
     "override_settings.live_preview_content 'Combined' is not supported"),
    ({"override_settings": {"samples_format": "gif"}}, 422, "samples_format must be one of png, jpg, jpeg, webp"),
    ({"override_settings": {"outdir_samples": "/tmp"}}, 422, "override_settings.outdir_samples is not a setting"),
    ({"override_settings": {"pad_cond_uncond": "yes"}}, 422, "override_settings.pad_cond_uncond must be true or false"),
    ({"override_settings": {"eta_noise_seed_delta": -1}}, 422, "eta_noise_seed_delta (ENSD) must be between 0 and"),
    ({"override_settings": {"use_old_scheduling": 1}}, 422, "override_settings.use_old_scheduling must be true or"),
    ({"override_settings": {"auto_backcompat": True}}, 422, "auto_backcompat True is not supported by this server"),
    ({"override_settings": {"eta_noise_seed_delta": "31337"}}, 422, "eta_noise_seed_delta (ENSD) must be between"),
    ({"seed_resize_from_w": 5000, "seed_resize_from_h": 5000}, 422, "seed_resize_from 5000x5000 is more than"),
    ({"seed_resize_from_w": 1, "seed_resize_from_h": 64}, 422, "seed_resize_from must be (width, height), each at"),
    ({"seed_resize_from_h": 64}, 422, "Resize seed from takes both"),
    ({"alwayson_scripts": {"adetailer": {"args": []}}}, 422, "adetailer"),
    ({"alwayson_scripts": {"Seed": {"args": [-1, False, -1, 0, 0, 0]}}}, 422, "seed -1 is not the request's 1234"),
]


def test_prompt_beyond_the_chunk_cap_is_an_input_error(client):
    response = client.post("/sdapi/v1/txt2img", json=TXT | {"prompt": "cat, " * 400})
    assert response.status_code == 422 and "prompt" in response.json()["detail"].lower()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(client, literal):
    raw = json.dumps(TXT | {"cfg_scale": 1.0}).replace('"cfg_scale": 1.0', f'"cfg_scale": {literal}')
    response = client.post("/sdapi/v1/txt2img", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "cfg_scale" in response.json()["detail"]


BAD_IMAGES = [
    ({"init_images": ["not base64!"]}, 422, "invalid base64"),
    ({"init_images": ["http://169.254.169.254/latest/meta-data"]}, 422, "not fetched"),
    ({"init_images": [_b64(b"GIF89a-corrupt")]}, 422, "init_images[0]"),
    ({"init_images": [_b64(png_header_only(30000, 30000))]}, 413, "refused before decoding"),
    ({"init_images": [_b64(_png())], "denoising_strength": 1.5}, 422, "denoising_strength"),
    ({"init_images": [_b64(_png())], "mask": _b64(_png(size=(8, 8)))[:-3]}, 422, "mask"),
    ({"init_images": []}, 422, "init_images"),
    ({"init_images": [_b64(_png())], "mask": _b64(_png()), "resize_mode": 3}, 422,
     "resize_mode 3 (latent upscale) with a mask is not supported"),
    ({"init_images": [_b64(_png(size=(512, 64)))], "resize_mode": 3}, 422, "its own size, 512x64"),
    ({"init_images": [_b64(_png())], "latent_mask": _b64(_png())}, 422, "latent_mask"),
    ({"init_images": [_b64(_png())], "mask": _b64(_png()), "mask_blur_x": 2, "mask_blur_y": 99}, 422,
     "mask_blur_y must be between 0 and 64, got 99"),
]


REFUSED = [("txt2img", *case) for case in BAD] + [("img2img", *case) for case in BAD_IMAGES]


@pytest.mark.parametrize("route,change,status,needle", REFUSED,
                         ids=[f"{r}-{list(c)[0]}-{i}" for i, (r, c, _, _) in enumerate(REFUSED)])
def test_bad_requests_name_the_problem(client, route, change, status, needle):
    response = client.post(f"/sdapi/v1/{route}", json=TXT | change)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"]
    _safe(response)


def test_progress_polling_and_interrupt(api):
    """An AUTOMATIC1111 client: start txt2img, poll progress while it runs, interrupt; partial images come back."""
    with api.client() as c, ThreadPoolExecutor(1) as pool:
        c.post("/sdapi/v1/options", json={"show_progress_every_n_steps": -1})
        future = pool.submit(c.post, "/sdapi/v1/txt2img", json=TXT | {"steps": 400, "n_iter": 3})
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            progress = c.get("/sdapi/v1/progress").json()
            if progress["state"]["sampling_step"] >= 2:
                seen.append(progress)
                break
            time.sleep(0.05)
        assert seen, "no progress reported"
        state = seen[0]["state"]
        assert state["sampling_steps"] == 400 and state["job_count"] == 3 and 0 < seen[0]["progress"] < 1
        assert seen[0]["current_image"] is not None  # a live preview (every step, as set above)
        assert c.post("/sdapi/v1/interrupt").status_code == 200
        response = future.result(timeout=60)
        c.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 10})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and len(response.json()["images"]) == 1  # the other iterations never ran
    idle = api.client().get("/sdapi/v1/progress").json()
    assert idle["state"]["job_count"] == 0


def test_skip_ends_the_current_iteration_only(api):
    with api.client() as c, ThreadPoolExecutor(1) as pool:
        future = pool.submit(c.post, "/sdapi/v1/txt2img", json=TXT | {"steps": 60, "n_iter": 2})
        deadline = time.monotonic() + 60
        while c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        c.post("/sdapi/v1/skip")
        response = future.result(timeout=120)
    assert response.status_code == 200 and len(response.json()["images"]) == 2


def test_schedule_settings_from_a_request_and_from_the_options(client):
    """AUTOMATIC1111's Settings sigma_min, sigma_max and rho: a request's override_settings move its schedule (and the
    infotext says so) or, with a schedule that has no such thing, are a 422 naming it; the server's options apply
    where the schedule takes them, and leave the others alone, as there."""
    karras = TXT | {"steps": 3, "sampler_name": "DPM++ 2M"}  # Automatic: Karras
    plain = client.post("/sdapi/v1/txt2img", json=karras).json()
    moved = client.post("/sdapi/v1/txt2img", json=karras | {"override_settings": {"sigma_max": 8, "rho": 3}})
    assert moved.status_code == 200, moved.text
    fields = parse_infotext(json.loads(moved.json()["info"])["infotexts"][0])
    assert (fields["Schedule max sigma"], fields["Schedule rho"]) == ("8.0", "3.0")
    assert "Schedule min sigma" not in fields
    assert _pixels(moved.json()["images"][0]) != _pixels(plain["images"][0])
    refused = client.post("/sdapi/v1/txt2img", json=TXT | {"override_settings": {"rho": 3}})  # Euler a: Uniform
    assert refused.status_code == 422 and "rho: the Euler a sampler's schedule (Uniform) has no rho" in refused.text
    assert client.post("/sdapi/v1/options", json={"sigma_min": -1.0}).status_code == 422
    assert client.post("/sdapi/v1/options", json={"rho": 3.0}).status_code == 200
    try:
        uniform = client.post("/sdapi/v1/txt2img", json=TXT).json()
        assert "Schedule rho" not in uniform["info"]  # not taken by Euler a's schedule, and not failed either
        from_options = client.post("/sdapi/v1/txt2img", json=karras | {"override_settings": {"sigma_max": 8.0}})
        assert from_options.json()["images"][0] == moved.json()["images"][0]
    finally:
        client.post("/sdapi/v1/options", json={"rho": 0.0})


def test_eta_moves_euler_a_as_automatic1111s(client):
    """AUTOMATIC1111's eta for Euler a (k-diffusion's, 1 by default): 0 adds no ancestral noise, which is Euler's
    image; the request's eta, override_settings' eta_ancestral and the server's option give it, and the infotext
    writes it where it is not 1; DPM++ SDE and DPM++ 2M SDE take it too, DDIM has its own."""
    ancestral = TXT | {"steps": 3, "sampler_name": "Euler a"}
    runs = {eta: client.post("/sdapi/v1/txt2img", json=ancestral | {"eta": eta}).json() for eta in (1, 0, 0.5)}
    default = client.post("/sdapi/v1/txt2img", json=ancestral).json()
    euler = client.post("/sdapi/v1/txt2img", json=ancestral | {"sampler_name": "Euler"}).json()
    assert runs[1]["images"][0] == default["images"][0]
    image = {eta: np.asarray(Image.open(io.BytesIO(base64.b64decode(run["images"][0]))), np.int16)
             for eta, run in [*runs.items(), ("euler", euler)]}
    assert np.abs(image[0] - image["euler"]).max() <= 1  # Euler's step, to rounding
    assert np.abs(image[0.5] - image[0]).max() > 2 and np.abs(image[0.5] - image[1]).max() > 2
    written = {eta: parse_infotext(json.loads(run["info"])["infotexts"][0]).get("Eta") for eta, run in runs.items()}
    assert written == {1: None, 0: "0.0", 0.5: "0.5"}
    overridden = client.post("/sdapi/v1/txt2img", json=ancestral | {"override_settings": {"eta_ancestral": 0.5}})
    assert overridden.json()["images"][0] == runs[0.5]["images"][0]
    try:
        assert client.post("/sdapi/v1/options", json={"eta_ancestral": 1.5}).status_code == 422
        assert client.post("/sdapi/v1/options", json={"eta_ancestral": 0.5}).status_code == 200
        assert client.post("/sdapi/v1/txt2img", json=ancestral).json()["images"][0] == runs[0.5]["images"][0]
        for sde in ("DPM++ SDE", "DPM++ 2M SDE"):
            response = client.post("/sdapi/v1/txt2img", json=ancestral | {"sampler_name": sde})
            assert parse_infotext(json.loads(response.json()["info"])["infotexts"][0])["Eta"] == "0.5"
        ddim = client.post("/sdapi/v1/txt2img", json=ancestral | {"sampler_name": "DDIM"})  # its own eta, eta_ddim
        assert ddim.status_code == 200 and "Eta" not in json.loads(ddim.json()["info"])["infotexts"][0]
    finally:
        client.post("/sdapi/v1/options", json={"eta_ancestral": 1.0})


def test_the_sde_samplers_brownian_noise_and_the_discard_and_sgm_options(client):
    """DPM++ 2M SDE Heun and DPM++ 3M SDE by name and by alias (1.6's too), on AUTOMATIC1111's Automatic schedule for
    them (Exponential); an SDE sampler's image is its seed's whichever batch it is in (each image's own Brownian tree);
    always_discard_next_to_last_sigma from override_settings and the options, written as "Discard penultimate sigma"
    where it changes the sigmas (not for DPM++ 3M SDE, which discards already), and pasted back; sgm_noise_multiplier
    likewise ("SGM noise multiplier")."""
    body = TXT | {"steps": 4, "seed": 40}

    def run(**fields) -> tuple[str, dict]:
        response = client.post("/sdapi/v1/txt2img", json=body | fields)
        assert response.status_code == 200, response.text
        return response.json()["images"][0], parse_infotext(json.loads(response.json()["info"])["infotexts"][0])

    heun, written = run(sampler_name="DPM++ 2M SDE Heun")
    assert written["Sampler"] == "DPM++ 2M SDE Heun Exponential"
    assert run(sampler_name="k_dpmpp_2m_sde_heun", scheduler="Exponential")[0] == heun
    three, written = run(sampler_name="DPM++ 3M SDE")
    assert written["Sampler"] == "DPM++ 3M SDE Exponential" and _pixels(three) != _pixels(heun)
    assert run(sampler_name="k_dpmpp_3m_sde")[0] == run(sampler_name="k_dpmpp_3m_sde_exp")[0] == three  # 1.6's too
    for name in ("DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"):
        batch = client.post("/sdapi/v1/txt2img", json=body | {"sampler_name": name, "batch_size": 2}).json()
        assert batch["images"][1] == run(sampler_name=name, seed=41)[0], name
    plain = run(sampler_name="Euler")[0]
    discarded, written = run(sampler_name="Euler", override_settings={"always_discard_next_to_last_sigma": True})
    assert _pixels(discarded) != _pixels(plain) and written["Discard penultimate sigma"] == "True"
    text = json.loads(client.post("/sdapi/v1/txt2img", json=body | {
        "sampler_name": "Euler", "override_settings": {"always_discard_next_to_last_sigma": True}}).json()["info"])
    assert client.post("/sdapi/v1/txt2img", json={"infotext": text["infotexts"][0]}).json()["images"][0] == discarded
    same, written = run(sampler_name="DPM++ 3M SDE", override_settings={"always_discard_next_to_last_sigma": True})
    assert _pixels(same) == _pixels(three) and "Discard penultimate sigma" not in written
    try:
        assert client.post("/sdapi/v1/options", json={"always_discard_next_to_last_sigma": True}).status_code == 200
        assert run(sampler_name="Euler")[0] == discarded
        assert client.post("/sdapi/v1/txt2img", json=body | {"sampler_name": "Heun"}).status_code == 422
    finally:
        client.post("/sdapi/v1/options", json={"always_discard_next_to_last_sigma": False})
    assert run(sampler_name="Euler")[0] == plain
    # sgm_noise_multiplier: Euler starts at noise x sqrt(1 + sigma_max^2); the multistep samplers start there already
    sgm = {"override_settings": {"sgm_noise_multiplier": True}}
    multiplied, written = run(sampler_name="Euler", **sgm)
    assert _pixels(multiplied) != _pixels(plain) and written["SGM noise multiplier"] == "True"
    pasted = client.post("/sdapi/v1/txt2img", json={"infotext": json.loads(client.post(
        "/sdapi/v1/txt2img", json=body | {"sampler_name": "Euler"} | sgm).json()["info"])["infotexts"][0]})
    assert pasted.json()["images"][0] == multiplied
    multistep, written = run(sampler_name="DPM++ 2M SDE", **sgm)
    assert _pixels(multistep) == _pixels(run(sampler_name="DPM++ 2M SDE")[0])
    assert written["SGM noise multiplier"] == "True"
    ddim, written = run(sampler_name="DDIM", **sgm)
    assert _pixels(ddim) == _pixels(run(sampler_name="DDIM")[0]) and "SGM noise multiplier" not in written


def test_the_planned_samplers_dpm2_dpm2_a_dpmpp_2s_a_restart_and_dpm_fast(client):
    """AUTOMATIC1111's DPM2, DPM2 a, DPM++ 2S a and Restart by name and alias (1.6's Karras ones too), on their
    Automatic schedule (Karras), and DPM fast (uniform) with its eta; DPM2 a at eta 0 is DPM2 (no noise, the same
    midpoints); the ancestral ones take eta and s_noise (written back), each image's noise its own generator's; DPM2
    has no s_noise without churn, refused by name; Restart restarts from 20 steps on, in the hires pass too."""
    body = TXT | {"steps": 4, "seed": 50}

    def run(**fields) -> tuple[str, dict]:
        response = client.post("/sdapi/v1/txt2img", json=body | fields)
        assert response.status_code == 200, response.text
        return response.json()["images"][0], parse_infotext(json.loads(response.json()["info"])["infotexts"][0])

    images = {}
    for name, alias in (("DPM2", "k_dpm_2_ka"), ("DPM2 a", "k_dpm_2_a_ka"), ("DPM++ 2S a", "k_dpmpp_2s_a_ka"),
                        ("Restart", "restart")):
        images[name], written = run(sampler_name=name)
        assert written["Sampler"] == f"{name} Karras"
        assert run(sampler_name=alias)[0] == run(sampler_name=name, scheduler="Karras")[0] == images[name]
    assert len({_pixels(image) for image in images.values()}) == 4
    fast, written = run(sampler_name="DPM fast")  # its Automatic: uniform
    assert written["Sampler"] == "DPM fast" and run(sampler_name="k_dpm_fast")[0] == fast
    assert _pixels(run(sampler_name="DPM fast", eta=0.5)[0]) != _pixels(fast)
    for strength, status in ((0.2, 422), (0.5, 200)):  # one step left: from its start's sigma to the same one
        redrawn = client.post("/sdapi/v1/img2img", json=body | {"sampler_name": "DPM fast", "init_images": [
            _b64(_png())], "denoising_strength": strength})
        assert redrawn.status_code == status and (status == 200 or "DPM fast runs none" in redrawn.text), strength
    restarted, written = run(sampler_name="Restart", steps=20, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=20,
                             denoising_strength=1.0)
    assert written["Sampler"] == "Restart Karras" and written["Hires steps"] == "20"
    assert run(sampler_name="k_dpm_2", scheduler="Uniform")[0] != images["DPM2"]
    calm, written = run(sampler_name="DPM2 a", eta=0.0)
    assert _pixels(calm) == _pixels(images["DPM2"]) and written["Eta"] == "0.0"
    for name in ("DPM2 a", "DPM++ 2S a"):
        quieter, written = run(sampler_name=name, s_noise=0.5)
        assert _pixels(quieter) != _pixels(images[name]) and written["Sigma noise"] == "0.5"
        batch = client.post("/sdapi/v1/txt2img", json=body | {"sampler_name": name, "batch_size": 2}).json()
        assert batch["images"][1] == run(sampler_name=name, seed=51)[0], name
    refused = client.post("/sdapi/v1/txt2img", json=body | {"sampler_name": "DPM2", "s_noise": 0.5})
    assert refused.status_code == 422 and "the DPM2 Karras sampler has no churn" in refused.text


def test_ddim_cfgpp_guides_at_any_scale(client):
    """AUTOMATIC1111 1.10's DDIM CFG++ by name and alias: guided at cfg_scale 1 too (its scale divided by 12.5), so
    the negative prompt changes its image where DDIM's at 1 runs the prompt alone; as the hires pass's sampler after
    another's first pass, both passes guided; inpainting."""
    body = TXT | {"steps": 6, "seed": 60, "cfg_scale": 1}

    def run(**fields) -> tuple[str, dict]:
        response = client.post("/sdapi/v1/txt2img", json=body | fields)
        assert response.status_code == 200, response.text
        return response.json()["images"][0], parse_infotext(json.loads(response.json()["info"])["infotexts"][0])

    plus, written = run(sampler_name="DDIM CFG++")
    assert written["Sampler"] == "DDIM CFG++" and run(sampler_name="ddim_cfgpp")[0] == plus
    assert _pixels(run(sampler_name="DDIM CFG++", negative_prompt="a dog")[0]) != _pixels(plus)
    ddim = run(sampler_name="DDIM")[0]
    assert _pixels(run(sampler_name="DDIM", negative_prompt="a dog")[0]) == _pixels(ddim) != _pixels(plus)
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 4, "denoising_strength": 0.6,
             "sampler_name": "Euler", "hr_sampler_name": "DDIM CFG++"}
    second, written = run(**hires)
    assert written["Hires sampler"] == "DDIM CFG++"
    assert _pixels(run(**hires, negative_prompt="a dog")[0]) != _pixels(second)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = client.post("/sdapi/v1/img2img", json=body | {
        "sampler_name": "DDIM CFG++", "init_images": [_b64(_png())], "mask": _b64(encode(mask)), "mask_blur": 0,
        "denoising_strength": 0.8})
    assert inpainted.status_code == 200, inpainted.text
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(inpainted.json()["images"][0]))).convert("RGB"))
    assert (pixels[:8, :8] == (200, 80, 40)).all()  # the kept corner is the init image's (the overlay)


def test_a_controlnet_units_hr_option(client):
    """sd-webui-controlnet's hr_option by label, number or enum name (its HiResFixOption.from_value): the unit acts
    in the passes it names, written as "Hr Option" in the unit's infotext where not Both; another value is a 422
    naming the field."""
    body = TXT | {"steps": 3, "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6}

    def run(option) -> tuple[int, str, str]:
        response = client.post("/sdapi/v1/txt2img", json=body | {"alwayson_scripts": {"controlnet": {"args": [
            {"image": _b64(_png()), "weight": 0.9, "hr_option": option}]}}})
        text = json.loads(response.json()["info"])["infotexts"][0] if response.status_code == 200 else response.text
        return response.status_code, response.json().get("images", [""])[0], text

    status, low, written = run("Low res only")
    assert status == 200 and 'Control Mode: Balanced, Hr Option: Low res only"' in written
    assert run(1)[1] == run("HiResFixOption.LOW_RES_ONLY")[1] == low
    both = run("Both")
    assert "Hr Option" not in both[2] and _pixels(both[1]) != _pixels(low) != _pixels(run("High res only")[1])
    status, _, text = run("Sometimes")
    assert status == 422 and "hr_option" in text


def _pixels(b64: str) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(b64))).tobytes()


def test_listing_endpoints(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    names = {s["name"] for s in samplers}
    assert {"Euler", "Euler a", "Heun", "DDIM", "DDPM", "PLMS", "LMS", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE",
            "DPM++ 2M SDE", "UniPC", "LCM"} <= names
    options = {s["name"]: s["options"] for s in samplers}  # AUTOMATIC1111 1.10's, as its API lists them
    assert options["Euler"] == {} and options["Euler a"] == {"uses_ensd": "True"} == options["DPM adaptive"]
    assert options["DPM2 a"] == {"scheduler": "karras", "discard_next_to_last_sigma": "True", "uses_ensd": "True",
                                 "second_order": "True"}
    assert options["DPM++ 2M SDE Heun"] == {"scheduler": "exponential", "brownian_noise": "True", "solver_type": "heun"}
    assert options["DPM++ 3M SDE"] == {"scheduler": "exponential", "discard_next_to_last_sigma": "True",
                                       "brownian_noise": "True"}
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [(s["name"], s["label"]) for s in schedulers] == [  # AUTOMATIC1111 1.10's, in its order
        ("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"), ("exponential", "Exponential"),
        ("polyexponential", "Polyexponential"), ("sgm_uniform", "SGM Uniform"), ("kl_optimal", "KL Optimal"),
        ("align_your_steps", "Align Your Steps"), ("simple", "Simple"), ("normal", "Normal"), ("ddim", "DDIM"),
        ("beta", "Beta")]
    assert {s["name"]: (s["default_rho"], s["aliases"]) for s in schedulers if s["default_rho"] != -1 or s["aliases"]} \
        == {"karras": (7.0, None), "polyexponential": (1.0, None), "sgm_uniform": (-1, ["SGMUniform"])}
    models = client.get("/sdapi/v1/sd-models").json()
    assert len(models) == 1 and models[0]["model_name"] == "tiny" and len(models[0]["hash"]) == 10
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == models[0]["title"]
    assert options["randn_source"] == "CPU"  # kiln's default: diffusers' noise
    try:  # the options this changes are the module's server's: put back whatever fails (else every test after fails)
        assert client.post("/sdapi/v1/options", json={"eta_ddim": 0.5}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["eta_ddim"] == 0.5
        assert client.post("/sdapi/v1/options", json={"eta_ddim": "lots"}).status_code == 422
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 422
        client.post("/sdapi/v1/options", json={"eta_ddim": 0.0})
        assert client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 31337}).status_code == 200
        ensd = client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 1, "sampler_name": "Euler a"}).json()
        assert "ENSD: 31337" in json.loads(ensd["info"])["infotexts"][0]
        assert client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 0}).status_code == 200
        assert client.post("/sdapi/v1/options", json={"randn_source": "NV"}).status_code == 200
        nv = client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 1}).json()
        assert "RNG: NV" in json.loads(nv["info"])["infotexts"][0]
    finally:
        restored = client.post("/sdapi/v1/options", json={"eta_ddim": 0.0, "eta_noise_seed_delta": 0,
                                                          "randn_source": "CPU"})
    assert restored.status_code == 200
    # out of range, stored, they would fail every request after them
    for key, value, message in (("randn_source", "XPU", "one of GPU, CPU, NV"),
                                ("eta_noise_seed_delta", -1, "in [0, 2^32 - 1]")):
        refused = client.post("/sdapi/v1/options", json={key: value})
        assert refused.status_code == 422 and message in refused.text, refused.text
    # A setting kiln does not act on is refused, not stored and ignored; one that already holds is fine.
    refused = client.post("/sdapi/v1/options", json={"live_preview_content": "Combined"})
    assert refused.status_code == 422 and "live_preview_content 'Combined' is not supported" in refused.text
    assert client.post("/sdapi/v1/options", json={"outdir_samples": "/tmp"}).status_code == 422
    assert client.get("/sdapi/v1/options").json()["live_preview_content"] == "Prompt"
    assert client.post("/sdapi/v1/options", json=client.get("/sdapi/v1/options").json()).status_code == 200
    held = TXT | {"steps": 1, "override_settings": {"CLIP_stop_at_last_layers": 1, "samples_format": "png"}}
    assert client.post("/sdapi/v1/txt2img", json=held).status_code == 200
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["listen"] is False
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "/sdapi/v1/txt2img" in client.get("/openapi.json").json()["paths"]


def test_clip_skip_from_options_and_override_settings(client):
    """CLIP_stop_at_last_layers is applied (the text encoder serves every layer): 2 changes the image and the
    infotext says so, an override applies to its request only, and a layer the encoder lacks is refused."""
    def generate(**extra) -> tuple[bytes, str]:
        response = client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 2, "seed": 9} | extra)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        return image.tobytes(), image.info["parameters"]

    last, text = generate()
    skipped, skipped_text = generate(override_settings={"CLIP_stop_at_last_layers": 2})
    assert skipped != last and "Clip skip: 2" in skipped_text and "Clip skip" not in text
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1  # the override was one request's
    try:
        assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
        assert generate()[0] == skipped
        too_deep = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 6})
        assert too_deep.status_code == 422 and "must be 1 to 5" in too_deep.text
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    assert generate()[0] == last


def test_pad_conds_from_override_settings_options_and_the_infotext(client):
    """A long prompt and a short negative prompt: AUTOMATIC1111's default runs them in UNet calls of their own; its
    pad_cond_uncond ("Pad conds") and pad_cond_uncond_v0 ("Pad conds v0", first where both are on) pad them, another
    image, which the infotext names and gives back when pasted."""
    def generate(**extra) -> tuple[bytes, str]:
        response = client.post("/sdapi/v1/txt2img", json=TXT | {"prompt": "a photo of a cat, " * 15, "steps": 2,
                                                                 "seed": 9} | extra)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        return image.tobytes(), image.info["parameters"]

    plain, text = generate()
    padded, padded_text = generate(override_settings={"pad_cond_uncond": True})
    v0, v0_text = generate(override_settings={"pad_cond_uncond": True, "pad_cond_uncond_v0": True})
    assert len({plain, padded, v0}) == 3 and "Pad conds" not in text
    assert ", Pad conds: True" in padded_text and ", Pad conds v0: True" in v0_text and "Pad conds:" not in v0_text
    assert generate(infotext=padded_text)[0] == padded and generate(infotext=v0_text)[0] == v0
    try:
        assert client.post("/sdapi/v1/options", json={"pad_cond_uncond": True}).status_code == 200
        assert generate()[0] == padded
        assert generate(override_settings={"pad_cond_uncond": False})[0] == plain
    finally:
        client.post("/sdapi/v1/options", json={"pad_cond_uncond": False})
    bad = client.post("/sdapi/v1/options", json={"pad_cond_uncond_v0": 1})
    assert bad.status_code == 422 and "option pad_cond_uncond_v0 must be a bool" in bad.text


def test_save_images_writes_the_outputs_folder(client, outputs_dir):
    """save_images: each image of the job as a PNG with its infotext under outputs/txt2img-images/<date>/ (numbered on
    from the folder's highest) and their grid under txt2img-grids, img2img's under img2img-images;
    do_not_save_samples and the default write nothing, do_not_save_grid no grid."""
    body = TXT | {"steps": 1, "seed": 30, "batch_size": 2}
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    assert not list(outputs_dir.rglob("*.png"))
    saved = client.post("/sdapi/v1/txt2img", json=body | {"save_images": True})
    assert saved.status_code == 200, saved.text
    days = list((outputs_dir / "txt2img-images").iterdir())
    assert len(days) == 1 and sorted(p.name for p in days[0].iterdir()) == ["00000-30.png", "00001-31.png"]
    written = Image.open(days[0] / "00001-31.png")
    # the answer has their grid first, as AUTOMATIC1111's API answers a request that saves (return_grid)
    grid, first, second = (decode(b64)[0] for b64 in saved.json()["images"])
    assert np.array_equal(np.asarray(written.convert("RGB")), second)
    assert np.array_equal(grid, np.concatenate([first, second], axis=1))  # 1 row, 2 columns
    info = json.loads(saved.json()["info"])
    assert info["index_of_first_image"] == 1 and len(info["infotexts"]) == 3 and "Seed: 30" in info["infotexts"][0]
    assert "Seed: 31" in written.info["parameters"]
    client.post("/sdapi/v1/txt2img", json=body | {"save_images": True, "batch_size": 1, "seed": 40})
    assert (days[0] / "00002-40.png").is_file()
    client.post("/sdapi/v1/txt2img", json=body | {"save_images": True, "do_not_save_samples": True})
    assert len(list(days[0].iterdir())) == 3
    grids = list((outputs_dir / "txt2img-grids").rglob("*.png"))  # the two-image job's grid: 1 row, 2 columns
    assert [p.name for p in grids] == ["grid-0000.png"] and Image.open(grids[0]).size == (128, 64)
    gridless = client.post("/sdapi/v1/txt2img", json=body | {"save_images": True, "do_not_save_grid": True})
    assert len(list((outputs_dir / "txt2img-grids").rglob("*.png"))) == 1 and len(gridless.json()["images"]) == 2
    unreturned = body | {"save_images": True, "override_settings": {"return_grid": False}}
    assert len(client.post("/sdapi/v1/txt2img", json=unreturned).json()["images"]) == 2  # (saved, not returned)
    assert len(list((outputs_dir / "txt2img-grids").rglob("*.png"))) == 2
    client.post("/sdapi/v1/img2img", json=body | {"save_images": True, "init_images": [_b64(_png())], "batch_size": 1})
    assert [p.name for p in (outputs_dir / "img2img-images").rglob("*.png")] == ["00000-30.png"]
    assert len(list(days[0].iterdir())) == 7  # the grid-less job's two images, the unreturned grid's job's two


def test_separate_mask_blurs(client):
    """mask_blur_x/mask_blur_y blur the mask by their own radii (AUTOMATIC1111); mask_blur, where sent, sets both."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = TXT | {"steps": 2, "seed": 3, "init_images": [_b64(_png())], "mask": _b64(encode(mask)),
                  "inpaint_full_res": False, "denoising_strength": 0.8}

    def pixels(**blur) -> np.ndarray:
        response = client.post("/sdapi/v1/img2img", json=body | blur)
        assert response.status_code == 200, response.text
        return decode(response.json()["images"][0])[0]

    across, down = pixels(mask_blur_x=8, mask_blur_y=0), pixels(mask_blur_x=0, mask_blur_y=8)
    assert not np.array_equal(across, down)
    assert np.array_equal(pixels(mask_blur_x=8, mask_blur_y=8), pixels(mask_blur=8))
    assert np.array_equal(pixels(mask_blur=0, mask_blur_x=8), pixels(mask_blur=0))  # mask_blur sets both


def test_initial_noise_multiplier_scales_img2img_noise(client):
    """AUTOMATIC1111's initial_noise_multiplier: img2img's (and inpainting's) noise scaled; 1 is the plain image, 0.8
    another one, named in the infotext; outside [0, 2] refused."""
    body = TXT | {"steps": 3, "seed": 12, "init_images": [_b64(_png())], "denoising_strength": 0.7}

    def run(**extra) -> httpx.Response:
        return client.post("/sdapi/v1/img2img", json=body | extra)

    plain, one, scaled = run(), run(initial_noise_multiplier=1.0), run(initial_noise_multiplier=0.8)
    assert plain.json()["images"] == one.json()["images"] != scaled.json()["images"]
    image = Image.open(io.BytesIO(base64.b64decode(scaled.json()["images"][0])))
    assert "Noise multiplier: 0.8" in image.info["parameters"]
    refused = run(initial_noise_multiplier=3)
    assert refused.status_code == 422 and "initial_noise_multiplier must be in [0, 2]" in refused.text


def test_styles_from_the_styles_file(client, styles_file):
    """AUTOMATIC1111's styles.csv: listed, applied in the order named ({prompt} wraps, others append), the same image
    as the expanded prompt sent as it is; an unknown style is refused, and an edited file is read again."""
    assert client.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "painterly", "prompt": "oil painting of {prompt}, thick brush", "negative_prompt": "photo, blurry"},
        {"name": "detailed", "prompt": "highly detailed, 8k", "negative_prompt": ""}]
    body = TXT | {"steps": 2, "seed": 8, "prompt": "a cat", "negative_prompt": "dark"}
    styled = client.post("/sdapi/v1/txt2img", json=body | {"styles": ["painterly", "detailed"]})
    assert styled.status_code == 200, styled.text
    expanded = "oil painting of a cat, thick brush, highly detailed, 8k"
    info = json.loads(styled.json()["info"])
    assert info["all_prompts"] == [expanded] and info["all_negative_prompts"] == ["dark, photo, blurry"]
    assert info["styles"] == ["painterly", "detailed"] and info["prompt"] == "a cat"
    plain = client.post("/sdapi/v1/txt2img", json=body | {"prompt": expanded, "negative_prompt": "dark, photo, blurry"})
    assert styled.json()["images"] == plain.json()["images"]
    unknown = client.post("/sdapi/v1/txt2img", json=body | {"styles": ["noir"]})
    assert unknown.status_code == 422 and "styles: 'noir' is not a style" in unknown.text
    assert "painterly" in unknown.text
    original = styles_file.read_text()
    try:
        styles_file.write_text(original + "noir,black and white,\n")
        assert [s["name"] for s in client.get("/sdapi/v1/prompt-styles").json()] == ["painterly", "detailed", "noir"]
        assert client.post("/sdapi/v1/txt2img", json=body | {"styles": ["noir"]}).status_code == 200
    finally:
        styles_file.write_text(original)


def test_prompt_comments_and_the_hires_prompts_styles(client):
    """AUTOMATIC1111 1.8+'s prompt comments (enable_prompt_comments, on by default): from # to the line's end is not
    run, an extra-network tag there included; off, the # is text. Styles apply to hr_prompt too (its setup_prompts)."""
    body = TXT | {"steps": 2, "seed": 8, "prompt": "a cat"}
    plain = client.post("/sdapi/v1/txt2img", json=body).json()
    commented = client.post("/sdapi/v1/txt2img", json=body | {"prompt": "# a study\na cat # <lora:nope:1> at night"})
    assert commented.status_code == 200, commented.text
    assert _pixels(commented.json()["images"][0]) == _pixels(plain["images"][0])
    info = json.loads(commented.json()["info"])
    assert info["all_prompts"] == ["\na cat \n"] and info["prompt"] == "# a study\na cat # <lora:nope:1> at night"
    as_text = client.post("/sdapi/v1/txt2img", json=body | {"prompt": "a cat # at night",
                                                            "override_settings": {"enable_prompt_comments": False}})
    assert as_text.status_code == 200 and _pixels(as_text.json()["images"][0]) != _pixels(plain["images"][0])
    assert client.get("/sdapi/v1/options").json()["enable_prompt_comments"] is True
    hires = body | {"negative_prompt": "", "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2,
                    "denoising_strength": 0.6, "hr_prompt": "a dog # on a mat"}
    styled = client.post("/sdapi/v1/txt2img", json=hires | {"styles": ["painterly"]})
    assert styled.status_code == 200, styled.text
    expanded = hires | {"prompt": "oil painting of a cat, thick brush", "negative_prompt": "photo, blurry",
                        "hr_prompt": "oil painting of a dog \n"}  # the comment ends its line, the style's end too
    same = client.post("/sdapi/v1/txt2img", json=expanded).json()
    assert _pixels(styled.json()["images"][0]) == _pixels(same["images"][0])
    unstyled = client.post("/sdapi/v1/txt2img", json=expanded | {"hr_prompt": "a dog"}).json()
    assert _pixels(styled.json()["images"][0]) != _pixels(unstyled["images"][0])  # the style reached the 2nd pass


def test_override_settings_restore_afterwards_false_keeps_them(client):
    """AUTOMATIC1111's override_settings_restore_afterwards false: the request's settings stay the server's after it
    answered (as POST /sdapi/v1/options sets them); a refused request leaves them as they were."""
    assert client.get("/sdapi/v1/options").json()["eta_ancestral"] == 1.0
    body = TXT | {"steps": 2, "override_settings": {"eta_ancestral": 0.5}}
    try:
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
        assert client.get("/sdapi/v1/options").json()["eta_ancestral"] == 1.0  # restored afterwards, the default
        kept = client.post("/sdapi/v1/txt2img", json=body | {"override_settings_restore_afterwards": False})
        assert kept.status_code == 200 and client.get("/sdapi/v1/options").json()["eta_ancestral"] == 0.5
        same = client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 2})  # the next request runs with it
        assert _pixels(same.json()["images"][0]) == _pixels(kept.json()["images"][0])
        refused = client.post("/sdapi/v1/txt2img", json=body | {"steps": 0, "override_settings_restore_afterwards":
                                                                False, "override_settings": {"eta_ancestral": 0.2}})
        assert refused.status_code == 422 and client.get("/sdapi/v1/options").json()["eta_ancestral"] == 0.5
    finally:
        client.post("/sdapi/v1/options", json={"eta_ancestral": 1.0})


def test_the_web_uis_own_payload_runs_as_its_fields(client):
    """A payload as AUTOMATIC1111's web UI makes it, its built-in always-on scripts holding the fields' own values:
    accepted, the image the fields alone give."""
    body = TXT | {"steps": 2, "scheduler": "Automatic"}
    builtin = {"Seed": {"args": [1234, False, -1, 0, 0, 0]}, "Sampler": {"args": [2, "Euler a", "Automatic"]},
               "Refiner": {"args": [False, "", 0.8]}, "Comments": {"args": []}, "Extra options": {"args": []}}
    replayed = client.post("/sdapi/v1/txt2img", json=body | {"alwayson_scripts": builtin})
    assert replayed.status_code == 200, replayed.text
    assert _pixels(replayed.json()["images"][0]) == _pixels(client.post("/sdapi/v1/txt2img", json=body).json()[
        "images"][0])


def test_sd_upscale_script(client):
    """AUTOMATIC1111's SD upscale: script_name + script_args [_, overlap, upscaler (index or name), scale_factor]."""
    body = TXT | {"steps": 2, "init_images": [_b64(_png())], "denoising_strength": 0.4, "script_name": "SD upscale",
                  "script_args": [None, 16, 1, 2]}
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    image, info = decode(response.json()["images"][0])
    assert image.shape == (128, 128, 3) and "SD upscale upscaler: Lanczos" in info["parameters"]
    for change, words in (({"script_args": [None, 16, 7, 2]}, "upscaler index 7"),
                          ({"script_name": "ultimate sd upscale"}, "not one of this server's img2img scripts"),
                          ({"script_args": [None, 16, "Lanczos", 9]}, "scale_factor must be in [1, 4]")):
        refused = client.post("/sdapi/v1/img2img", json=body | change)
        assert refused.status_code == 422 and words in refused.text, refused.text


def test_hires_fix_through_the_api(client):
    """enable_hr: AUTOMATIC1111's fields give a picture of the hires size, its infotext and info name the pass; the
    second pass's sampler by name and scheduler, its prompt and its checkpoint (the served one) are honoured."""
    body = TXT | {"steps": 2, "seed": 4, "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2,
                  "denoising_strength": 0.6, "hr_sampler_name": "DPM++ 2M", "hr_scheduler": "Karras",
                  "hr_prompt": "a photo of a dog, at night", "hr_checkpoint_name": "Use same checkpoint"}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert image.size == (128, 128)
    fields = parse_infotext(image.info["parameters"])
    assert fields["Size"] == "64x64" and fields["Hires upscale"] == "2.0" and fields["Hires steps"] == "2"
    assert fields["Hires upscaler"] == "Latent" and fields["Hires sampler"] == "DPM++ 2M Karras"
    assert fields["Hires prompt"] == "a photo of a dog, at night" and fields["Denoising strength"] == "0.6"
    info = json.loads(response.json()["info"])
    assert info["extra_generation_params"]["Hires upscale"] == 2.0 and info["width"] == 64
    plain = client.post("/sdapi/v1/txt2img", json=body | {"enable_hr": False}).json()
    assert Image.open(io.BytesIO(base64.b64decode(plain["images"][0]))).size == (64, 64)
    # the pre-1.0 fields: the first pass's size, the hires target hr_scale of it (AUTOMATIC1111 1.x); width and
    # height unused (its info and infotext give the size generated, parameters echo the request)
    old = client.post("/sdapi/v1/txt2img", json=body | {"firstphase_width": 48, "firstphase_height": 32,
                                                        "width": 512, "height": 512})
    assert old.status_code == 200, old.text
    image = Image.open(io.BytesIO(base64.b64decode(old.json()["images"][0])))
    assert image.size == (96, 64) and parse_infotext(image.info["parameters"])["Size"] == "48x32"
    info = json.loads(old.json()["info"])
    assert (info["width"], info["height"], old.json()["parameters"]["width"]) == (48, 32, 512)
    for route, fields, words in (("txt2img", {"firstphase_height": 32}, "takes both"),
                                 ("img2img", {"firstphase_width": 48, "firstphase_height": 32, "init_images": [
                                     _b64(_png(size=(64, 64)))]}, "img2img has no first pass")):
        refused = client.post(f"/sdapi/v1/{route}", json=TXT | fields)
        assert refused.status_code == 422 and words in refused.text, refused.text


def test_controlnet_units_detected_maps_follow_the_images(client):
    """sd-webui-controlnet appends each unit's detected map (its preprocessor's output) after the images, unless
    control_net_no_detectmap (an option or an override) says not to."""
    from kiln.control import control_image

    photo = _png(size=(64, 64))
    body = TXT | {"steps": 2, "batch_size": 2, "alwayson_scripts": {"controlnet": {"args": [
        {"image": _b64(photo), "module": "canny", "threshold_a": 50, "threshold_b": 150, "pixel_perfect": True}]}}}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert len(images) == 3 and len(json.loads(response.json()["info"])["infotexts"]) == 2
    # pixel perfect: the photo's map at its own size, the generation's (tests/test_control_units.py: other sizes)
    expected = np.round(control_image(photo, 64, 64, "canny", 50, 150).transpose(1, 2, 0) * 255).astype(np.uint8)
    assert np.array_equal(decode(images[2])[0], expected)
    off = body | {"override_settings": {"control_net_no_detectmap": True}}
    assert len(client.post("/sdapi/v1/txt2img", json=off).json()["images"]) == 2
    unit = body["alwayson_scripts"]["controlnet"]["args"][0] | {"save_detected_map": False}  # the unit's own say
    assert len(client.post("/sdapi/v1/txt2img", json=body | {"alwayson_scripts": {"controlnet": {"args": [unit]}}})
               .json()["images"]) == 2
    try:
        assert client.post("/sdapi/v1/options", json={"control_net_no_detectmap": True}).status_code == 200
        assert len(client.post("/sdapi/v1/txt2img", json=body).json()["images"]) == 2
    finally:
        client.post("/sdapi/v1/options", json={"control_net_no_detectmap": False})


def test_a_shuffle_unit_with_a_random_seed_is_drawn_from_the_seed_it_reports(client):
    """seed -1 is drawn before the units' maps are made, so a shuffle unit's map is the one that seed makes: sending the
    reported seed back gives the same map and the same image."""
    from kiln.control import control_image
    from kiln.detect import map_of
    from kiln.preprocessors import numpy_seed

    photo = _png(size=(96, 64))
    body = TXT | {"steps": 2, "seed": -1, "alwayson_scripts": {"controlnet": {"args": [
        {"image": _b64(photo), "module": "shuffle", "resize_mode": "Just Resize"}]}}}
    first = client.post("/sdapi/v1/txt2img", json=body)
    assert first.status_code == 200, first.text
    seed = json.loads(first.json()["info"])["seed"]
    assert seed != -1 and "Module: shuffle" in json.loads(first.json()["info"])["infotexts"][0]
    again = client.post("/sdapi/v1/txt2img", json=body | {"seed": seed}).json()["images"]
    assert again == first.json()["images"]
    # the detected map that follows the image: that seed's shuffle of the photo (at 512), fitted to the generation
    shuffled = map_of(Image.open(io.BytesIO(photo)), "shuffle", 512, -1, -1, 1 << 24, seed=numpy_seed(seed))
    fitted = control_image(encode(shuffled), 64, 64, fit=0)
    assert np.array_equal(decode(again[1])[0], np.round(fitted.transpose(1, 2, 0) * 255).astype(np.uint8))


def test_controlnet_resize_modes_shape_the_control_image(client):
    """sd-webui-controlnet's resize modes on a wide control image: Crop and Resize (its default) keeps the aspect,
    Just Resize stretches, Resize and Fill pads; the three give different images, and the default is Crop and
    Resize."""
    wide = _b64(_png(size=(128, 48)))

    def image(**unit) -> bytes:  # the pixels (the PNG's infotext names the unit's settings)
        body = TXT | {"steps": 2, "seed": 5, "alwayson_scripts": {"controlnet": {"args": [{"image": wide} | unit]}}}
        response = client.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        return Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).tobytes()

    crop, stretch = image(resize_mode="Crop and Resize"), image(resize_mode="Just Resize")
    assert crop != stretch, "crop vs stretch"
    fill = image(resize_mode="Resize and Fill")
    assert fill not in (crop, stretch) and image(resize_mode=2) == fill, "fill"
    assert image(resize_mode=1) == crop, "1 vs Crop and Resize"
    assert image() == crop, "default vs Crop and Resize"
    assert image(control_mode="Balanced", processor_res=512, pixel_perfect=False) == crop  # the defaults clients send


def test_include_init_images_echoes_them_in_parameters(client):
    init = _b64(_png())
    body = TXT | {"steps": 1, "init_images": [init], "denoising_strength": 0.5}
    plain = client.post("/sdapi/v1/img2img", json=body).json()["parameters"]
    echoed = client.post("/sdapi/v1/img2img", json=body | {"include_init_images": True}).json()["parameters"]
    assert "init_images" not in plain and echoed["init_images"] == [init] and echoed["mask"] is None


def test_automatic1111_clients_defaults_are_accepted(client):
    """What sdwebuiapi and AUTOMATIC1111's own UI send by default for the fields kiln refuses otherwise."""
    defaults = {"s_churn": 0, "s_tmin": 0, "s_tmax": 0, "s_noise": 1, "s_min_uncond": 0, "refiner_checkpoint": None,
                "refiner_switch_at": None, "initial_noise_multiplier": None, "save_images": False}
    assert client.post("/sdapi/v1/txt2img", json=TXT | defaults | {"steps": 1}).status_code == 200
    init = {"init_images": [base64.b64encode(encode(Image.new("RGB", (64, 64), (90, 120, 200)))).decode()]}
    img2img = client.post("/sdapi/v1/img2img", json=TXT | defaults | init | {"steps": 1, "image_cfg_scale": 1.5})
    assert img2img.status_code == 200, img2img.text
    # txt2img has no image_cfg_scale (img2img's field): sent there it is a field this server does not have
    wrong = client.post("/sdapi/v1/txt2img", json=TXT | defaults | {"steps": 1, "image_cfg_scale": 1.5})
    assert wrong.status_code == 422 and "image_cfg_scale: not a field this server has" in wrong.text, wrong.text


BUILT_IN = ["seed", "sampler", "refiner", "comments", "extra options", "hypertile"]


def test_the_routes_automatic1111_clients_call_on_connect_answer_in_its_shapes(client):
    """What kiln has, in AUTOMATIC1111's shapes; an empty list where it has none, never an invented entry."""
    for name in ("loras", "hypernetworks", "face-restorers", "realesrgan-models",
                 "extensions"):  # no LoRA folder for this service
        response = client.get(f"/sdapi/v1/{name}")
        assert response.status_code == 200 and response.json() == [], name
    assert [v["model_name"] for v in client.get("/sdapi/v1/sd-vae").json()] == ["anime-vae.safetensors"]
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos", "Nearest", "4x-tiny"]
    assert [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()] == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)"]
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert client.get("/sdapi/v1/scripts").json() == {
        "txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot", "controlnet", *BUILT_IN],
        "img2img": ["sd upscale", "prompt matrix", "prompts from file or textbox", "x/y/z plot", "loopback",
                    "poor man's outpainting", "outpainting mk2", "controlnet", "soft inpainting", *BUILT_IN]}
    info = client.get("/sdapi/v1/script-info").json()
    assert {(s["name"], s["is_alwayson"], s["is_img2img"]) for s in info} == {
        ("sd upscale", False, True), ("x/y/z plot", False, False), ("x/y/z plot", False, True),
        ("prompt matrix", False, False), ("prompt matrix", False, True), ("loopback", False, True),
        ("poor man's outpainting", False, True), ("outpainting mk2", False, True),
        ("prompts from file or textbox", False, False), ("prompts from file or textbox", False, True),
        ("controlnet", True, False), ("controlnet", True, True), ("soft inpainting", True, True),
        *((name, True, img2img) for name in BUILT_IN for img2img in (False, True))}
    sampler = next(s for s in info if s["name"] == "sampler")  # the built-in ones' args as their UI declares them
    assert [a["label"] for a in sampler["args"]] == ["Sampling steps", "Sampling method", "Schedule type"]
    assert "Euler a" in sampler["args"][1]["choices"] and "Karras" in sampler["args"][2]["choices"]
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    assert len(xyz["args"]) == 16 and xyz["args"][0]["choices"][:5] == ["Nothing", "Seed", "Var. seed",
                                                                       "Var. strength", "Steps"]
    memory = client.get("/sdapi/v1/memory").json()
    assert memory["ram"]["total"] >= memory["ram"]["used"] > 0 and "error" in memory["cuda"]
    for name in ("refresh-checkpoints", "refresh-vae", "refresh-loras"):
        assert client.post(f"/sdapi/v1/{name}").status_code == 200
    assert client.get("/controlnet/version").json() == {"version": 2}
    asked = client.post("/sdapi/v1/interrogate", json={"image": _b64(_png()), "model": "deepdanbooru"})
    assert asked.status_code == 422 and "interrogate model 'deepdanbooru': this server has no" in asked.text
    assert "/v1/classify" in asked.text
    unreadable = client.post("/sdapi/v1/interrogate", json={"image": "bm90IGFuIGltYWdl"})
    assert unreadable.status_code in (400, 422) and "image" in unreadable.text and "interrogate" not in unreadable.text
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 4}


def test_force_task_id_names_the_task_and_an_unknown_task_is_not_another(client):
    forced = f"task(kiln-{time.time_ns()})"
    assert client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 1, "force_task_id": forced}).status_code == 200
    progress = client.get("/sdapi/v1/progress", params={"id_task": forced})
    assert progress.status_code == 200 and progress.json()["state"]["job"] == f"task({forced})"
    again = client.post("/sdapi/v1/txt2img", json=TXT | {"steps": 1, "force_task_id": forced})
    assert again.status_code == 422 and "already has" in again.text
    unknown = client.get("/sdapi/v1/progress", params={"id_task": "task(never-submitted)"})
    assert unknown.status_code == 404 and "unknown task" in unknown.text


def test_sdnext_integer_sampler_index_is_the_position_in_the_samplers_list(client):
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    body = TXT | {"steps": 2, "sampler_index": names.index("DDIM")}
    body.pop("sampler_name", None)
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["sampler_name"] == "DDIM"
    refused = client.post("/sdapi/v1/txt2img", json=body | {"sampler_index": len(names)})
    assert refused.status_code == 404 and "index" in refused.text


def test_health_and_metrics(client):
    assert client.get("/health/live").json() == {"status": "live"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and all(ready.json()["models"].values())
    assert ready.json()["checkpoints"] == ["default"]
    text = client.get("/metrics").text
    for name in ("kiln_queue_depth", "kiln_unet_batch_rows_bucket", "kiln_step_seconds_bucket",
                 'kiln_requests_total{endpoint="/sdapi/v1/txt2img",outcome="200"}'):
        assert name in text


# -- step-level batching --------------------------------------------------------------------------
MIXED = [
    TXT | {"steps": 8, "sampler_name": "Euler a", "cfg_scale": 7, "seed": 11},
    TXT | {"prompt": "a [dog|cat] [on grass:in snow:0.5]", "negative_prompt": "", "steps": 5,  # per-step prompts
           "sampler_name": "DPM++ 2M Karras", "cfg_scale": 4, "seed": 12},
    TXT | {"prompt": "a bird", "steps": 6, "sampler_name": "DDIM", "cfg_scale": 1, "seed": 13, "batch_size": 2},
    TXT | {"prompt": "a tree " * 20, "steps": 7, "sampler_name": "DPM++ SDE Karras", "cfg_scale": 3, "seed": 14},
    TXT | {"steps": 4, "sampler_name": "UniPC", "seed": 15, "width": 96},  # another shape: its own batch
]


def _solo(triton, body) -> np.ndarray:
    request = Txt2ImgRequest(prompt=body["prompt"], negative_prompt=body["negative_prompt"], steps=body["steps"],
                             sampler=body["sampler_name"], cfg_scale=body["cfg_scale"], seed=body["seed"],
                             width=body["width"], height=body["height"], batch_size=body.get("batch_size", 1))
    return Pipeline.from_triton(triton.grpc_url).txt2img(request).images


def _metric(text: str, name: str) -> float:
    value = read_metric(text, name)
    assert value is not None, f"{name} not in metrics"
    return value


def test_step_batching_merges_requests_and_matches_solo_runs(api, triton):
    """Different samplers, step counts, CFG scales, seeds, prompt lengths, prompt editing in one batch: identical to
    solo runs."""
    with api.client() as c:
        before = c.get("/metrics").text
        with ThreadPoolExecutor(len(MIXED)) as pool:
            responses = list(pool.map(lambda b: c.post("/sdapi/v1/txt2img", json=b), MIXED))
        after = c.get("/metrics").text
    for body, response in zip(MIXED, responses):
        assert response.status_code == 200, response.text
        images = np.stack([decode(i)[0] for i in response.json()["images"]])
        solo = _solo(triton, body)
        diff = np.abs(images.astype(int) - solo).max()
        assert np.array_equal(images, solo), f"{body['sampler_name']}: max diff {diff}"
    calls = _metric(after, "kiln_unet_batch_rows_count") - _metric(before, "kiln_unet_batch_rows_count")
    rows = _metric(after, "kiln_unet_batch_rows_sum") - _metric(before, "kiln_unet_batch_rows_sum")
    steps = sum(b["steps"] for b in MIXED)
    assert calls < steps, f"{calls} Triton UNet calls for {steps} steps: nothing was merged"
    assert rows / calls > 2.0


def test_no_global_lock_classification_runs_during_generation(api):
    with api.client() as c, ThreadPoolExecutor(1) as pool:
        future = pool.submit(c.post, "/sdapi/v1/txt2img", json=TXT | {"steps": 300})
        deadline = time.monotonic() + 60
        while c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        classified = c.post("/v1/classify", json={"images": [_b64(_png())], "top_k": 3})
        still_running = c.get("/sdapi/v1/progress").json()["state"]["sampling_step"]
        c.post("/sdapi/v1/interrupt")
        future.result(timeout=60)
    assert classified.status_code == 200 and len(classified.json()["results"][0]["top"]) == 3
    assert 0 < still_running < 300  # answered while the UNet loop was still going


# -- task API -------------------------------------------------------------------------------------
def _wait_task(c, task_id, timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = c.get(f"/v1/tasks/{task_id}").json()
        if state["status"] in ("done", "failed", "cancelled"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish")


def test_tasks_status_websocket_and_cancel(api, monkeypatch):
    import threading

    from websockets.sync.client import connect

    from orchestrator.server.routes import tasks

    made, real = [], tasks.preview_png  # the previews' threads: never the engine's worker that ran the step
    monkeypatch.setattr(tasks, "preview_png", lambda *args: made.append(threading.current_thread().name) or real(*args))
    with api.client() as c:
        accepted = c.post("/v1/tasks/txt2img", json=TXT | {"steps": 12})
        assert accepted.status_code == 202 and accepted.headers["location"] == f"/v1/tasks/{accepted.json()['id']}"
        task = accepted.json()["id"]
        events = []
        with connect(f"ws://127.0.0.1:{api.settings.port}/v1/tasks/{task}/events?preview_every=4") as ws:
            while True:
                event = json.loads(ws.recv(timeout=60))
                events.append(event)
                if event["event"] in ("done", "failed", "cancelled"):
                    break
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "done" and "progress" in kinds and kinds.count("done") == 1
        with connect(f"ws://127.0.0.1:{api.settings.port}/v1/tasks/{task}/events") as ws:  # watched once done
            watched = [json.loads(ws.recv(timeout=5)), json.loads(ws.recv(timeout=5))]
            assert [e["event"] for e in watched] == ["state", "done"] and watched[1]["task_id"] == task
        assert any("preview" in e for e in events if e["event"] == "progress")
        assert made and all(name.startswith("AnyIO worker thread") for name in made), made  # (not a job's worker)
        state = _wait_task(c, task)
        assert state["status"] == "done" and state["progress"] == 1.0 and len(state["result"]["images"]) == 1

        # DELETE cancels that task only.
        long = c.post("/v1/tasks/txt2img", json=TXT | {"steps": 400}).json()["id"]
        other = c.post("/v1/tasks/txt2img", json=TXT | {"steps": 30, "seed": 99}).json()["id"]
        while c.get(f"/v1/tasks/{long}").json()["step"] < 1:
            time.sleep(0.05)
        assert c.delete(f"/v1/tasks/{long}").status_code == 200
        assert _wait_task(c, long)["status"] == "cancelled"
        assert _wait_task(c, other)["status"] == "done"
        assert c.delete(f"/v1/tasks/{long}").status_code == 409
        assert c.get("/v1/tasks/nope").status_code == 404

        # Interrupt (AUTOMATIC1111's) keeps what is done: the image at the step it was at, the task done.
        running = c.post("/v1/tasks/txt2img", json=TXT | {"steps": 400}).json()["id"]
        while c.get(f"/v1/tasks/{running}").json()["step"] < 1:
            time.sleep(0.05)
        assert c.post(f"/v1/tasks/{running}/interrupt").status_code == 200
        state = _wait_task(c, running)
        assert state["status"] == "done" and state["interrupted"] and len(state["result"]["images"]) == 1
        assert c.post(f"/v1/tasks/{running}/interrupt").status_code == 409  # finished
        # Skip ends the running image (its run of n_iter) and goes on with the next, which runs whole.
        skipped = c.post("/v1/tasks/txt2img", json=TXT | {"steps": 60, "n_iter": 2}).json()["id"]
        steps = {0: 0, 1: 0}
        with connect(f"ws://127.0.0.1:{api.settings.port}/v1/tasks/{skipped}/events") as ws:
            while (event := json.loads(ws.recv(timeout=60)))["event"] not in ("done", "failed", "cancelled"):
                if event["event"] == "progress":
                    steps[event["iteration"]] = max(steps[event["iteration"]], event["step"])
                    if event["iteration"] == 0 and event["step"] == 1:
                        assert c.post(f"/v1/tasks/{skipped}/skip").status_code == 200
        state = _wait_task(c, skipped)
        assert state["status"] == "done" and len(state["result"]["images"]) == 2 and not state["interrupted"]
        assert steps[0] < 60 and steps[1] == 60, steps
        assert c.post(f"/v1/tasks/{skipped}/skip").status_code == 409  # not running


def test_a_tasks_socket_gets_its_final_event_though_the_status_came_first():
    """A job's status turns finished before its final event is handed over (Job.finish; a shared queue's mirror reads
    the status from Redis, the event comes by pub/sub, or never where the connection was away): the socket waits a
    moment for the event, then makes it from the status, and never for a job still running. The order cannot be
    produced on demand, so here the status is set as a mirror sets it, with no event."""
    import asyncio

    from orchestrator.jobs import Job, Status
    from orchestrator.server.routes.tasks import next_event

    async def watch() -> None:
        events: asyncio.Queue = asyncio.Queue()
        lost = Job(kind="txt2img", request=None, status=Status.DONE)  # its event lost
        started = time.monotonic()
        assert await next_event(events, lost, wait_s=0.05) == {"event": "done", "progress": 1.0, "task_id": lost.id}
        assert time.monotonic() - started >= 0.1  # a whole wait after it was seen finished
        late = Job(kind="txt2img", request=None, status=Status.FAILED)  # its own event, after the status
        asyncio.get_running_loop().call_later(0.07, events.put_nowait, {"event": "failed", "error": "its own"})
        assert (await next_event(events, late, wait_s=0.05))["error"] == "its own"
        running = Job(kind="txt2img", request=None, status=Status.RUNNING)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(next_event(events, running, wait_s=0.01), 0.2)

    asyncio.run(watch())


# -- ViT ------------------------------------------------------------------------------------------
def test_classify_is_503_once_triton_no_longer_serves_the_vit(vit_repo, tmp_path, monkeypatch):
    """Whether Triton serves vit_classify is asked at most once a second while it does (routes.vit.served; here
    never again, to reach the path): a model unloaded meanwhile fails the request's images, and the API asks again and
    answers 503, not 200 with an error per image."""
    from dataclasses import replace

    from kiln.triton_client import RECONNECT_WAIT_S, TritonClient
    from kiln.triton_server import TritonOptions, TritonServer
    from orchestrator.server.routes import vit

    monkeypatch.setattr(vit, "READY_FOR_S", 3600.0)
    options = TritonOptions.on_free_ports(vit_repo, tmp_path / "triton.log", exit_timeout_s=5)
    body = {"images": [_b64(_png())], "top_k": 2}
    with TritonServer(replace(options, load_models=tuple(sorted(p.name for p in vit_repo.iterdir())))) as server:
        api = LiveAPI(Settings(triton_url=server.grpc_url, port=free_port()))
        try:
            with api.client() as c:
                assert c.post("/v1/classify", json=body).status_code == 200
                control = TritonClient(server.grpc_url)
                control.unload_model("vit_classify")
                control.close()
                gone = c.post("/v1/classify", json=body)
                assert gone.status_code == 503 and gone.headers["retry-after"] == "5", gone.text
                assert "not being served" in gone.json()["detail"]
                assert c.post("/v1/embed", json={"images": body["images"]}).status_code == 200  # (its own model)
                server.stop()  # Triton gone while its answer is still taken as served: the images reach none
                started = time.monotonic()
                down = c.post("/v1/embed", json={"images": body["images"] * 64})
                assert down.status_code == 503 and "not being served" in down.json()["detail"], down.text
                # the first wave of 8 waited for Triton to come back, and the readiness call: ~2 waits; each wave of 8
                # waiting in turn was 9 waits (27 s)
                waited = time.monotonic() - started
                assert waited < 5 * RECONNECT_WAIT_S, waited
        finally:
            api.stop()


def test_classify_and_embed_base64_and_multipart(client):
    photo = (PROJECT / "assets" / "images").glob("*.jpg")
    photo = next(photo).read_bytes()
    classified = client.post("/v1/classify", json={"images": [_b64(photo), _b64(b"corrupt"), _b64(photo)], "top_k": 2})
    assert classified.status_code == 200
    results = classified.json()["results"]
    assert len(results[0]["top"]) == 2 and "error" in results[1] and results[2]["top"] == results[0]["top"]
    uploaded = client.post("/v1/classify", files=[("files", ("a.jpg", photo, "image/jpeg"))], data={"top_k": "2"})
    assert uploaded.status_code == 200 and uploaded.json()["results"][0]["top"] == results[0]["top"]
    embedded = client.post("/v1/embed", json={"images": [_b64(photo)], "layer": 5, "tokens": True}).json()["results"][0]
    assert len(embedded["embedding"]) == 64 and embedded["tokens_shape"] == [197, 64] and embedded["layer"] == 5
    assert client.post("/v1/classify", json={"images": []}).status_code == 422
    assert client.post("/v1/classify", json={"images": ["%%%"]}).status_code == 422
    assert client.post("/v1/embed", json={"images": [_b64(photo)], "layer": 40}).status_code == 422


# -- queue, disconnects, timeouts -------------------------------------------------------------------
def test_overfull_queue_is_429_and_nothing_accepted_is_lost(triton):
    live = LiveAPI(Settings(triton_url=triton.grpc_url, port=free_port(), max_queue=2, workers=1))
    try:
        with live.client() as c:
            accepted, refused = [], []
            for seed in range(8):
                response = c.post("/v1/tasks/txt2img", json=TXT | {"steps": 40, "seed": seed})
                (accepted if response.status_code == 202 else refused).append(response)
            assert refused and all(r.status_code == 429 for r in refused)
            assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
            assert len(accepted) == 3  # one running + two waiting
            c.delete(f"/v1/tasks/{accepted[-1].json()['id']}")
            states = [_wait_task(c, r.json()["id"]) for r in accepted]
            assert [s["status"] for s in states] == ["done", "done", "cancelled"]
    finally:
        live.stop()


def test_disconnect_and_timeout_cancel_the_work(triton):
    live = LiveAPI(Settings(triton_url=triton.grpc_url, port=free_port(), request_timeout_s=1.0,
                            limits=Limits(max_steps=500)))
    try:
        with live.client() as c:
            timed_out = c.post("/sdapi/v1/txt2img", json=TXT | {"steps": 500})
            assert timed_out.status_code == 504 and "cancelled" in timed_out.json()["detail"]
        live.settings.request_timeout_s = 600
        with live.client(timeout=1.0) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/sdapi/v1/txt2img", json=TXT | {"steps": 500})
        with live.client() as c:
            deadline = time.monotonic() + 10
            while _metric(c.get("/metrics").text, "kiln_running_jobs") > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            metrics = c.get("/metrics").text
        assert _metric(metrics, "kiln_running_jobs") == 0  # stopped long before 500 steps
        assert 'outcome="499"' in metrics and 'outcome="504"' in metrics
    finally:
        live.stop()


# -- security -------------------------------------------------------------------------------------
def test_auth_rate_limit_and_cors(triton):
    security = SecurityOptions(credentials=(("alice", "s3cret"),), api_keys=("key-123",), rate_limit_per_minute=3)
    live = LiveAPI(Settings(triton_url=triton.grpc_url, port=free_port(), security=security,
                            cors_origins=("https://app.example",)))
    try:
        with live.client() as c:
            refused = c.get("/sdapi/v1/samplers")
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
            assert c.get("/sdapi/v1/samplers", auth=("alice", "wrong")).status_code == 401
            assert c.get("/sdapi/v1/samplers", auth=("alice", "s3cret")).status_code == 200
            assert c.get("/sdapi/v1/samplers", headers={"X-API-Key": "key-123"}).status_code == 200
            assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer key-123"}).status_code == 200
            assert c.get("/health/live").status_code == 200  # probes stay open
            flags = c.get("/sdapi/v1/cmd-flags", auth=("alice", "s3cret")).text
            assert "s3cret" not in flags and "key-123" not in flags
            statuses = [c.post("/sdapi/v1/interrupt", headers={"X-API-Key": "key-123"}).status_code for _ in range(5)]
            assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
            limited = c.post("/sdapi/v1/interrupt", headers={"X-API-Key": "key-123"})
            assert int(limited.headers["retry-after"]) >= 1
            assert c.post("/sdapi/v1/interrupt", auth=("alice", "s3cret")).status_code == 200  # a separate bucket
            cors = c.options("/sdapi/v1/samplers", headers={"Origin": "https://app.example",
                                                            "Access-Control-Request-Method": "GET"})
            assert cors.headers.get("access-control-allow-origin") == "https://app.example"
            evil = c.get("/health/live", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in evil.headers
    finally:
        live.stop()


def test_cors_is_closed_by_default(client):
    response = client.get("/health/live", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers


def test_listening_off_loopback_without_auth_is_refused():
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", "--listen", "0.0.0.0"],
                            capture_output=True, text=True, cwd=PROJECT, timeout=60)
    assert result.returncode == 2 and "without authentication" in result.stderr and "Traceback" not in result.stderr


# -- the CLI through the API --------------------------------------------------------------------------
def test_generate_command_through_the_api(api, tmp_path, kiln):
    out = tmp_path / "cat.png"
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "generate", "a photo of a cat", "--steps", "3",
                             "--seed", "7", "--width", "64", "--height", "64", "--api", api.url, "--out", str(out)],
                            capture_output=True, text=True, cwd=PROJECT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "seed 7" in result.stdout and "Seed: 7" in Image.open(out).info["parameters"]
    code, _, err = kiln("generate", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--tiling", "--vae",
                        "anime-vae.safetensors", "--api", api.url)
    assert code == 2 and "tiling with another VAE" in err, err  # both reached the server, which names the clash
    code, _, err = kiln("generate", "a photo of a cat, " * 15, "--steps", "1", "--width", "64", "--height", "64",
                        "--pad-conds", "empty_chunks", "--api", api.url, "--out", tmp_path / "long.png")
    assert code == 0 and "Pad conds: True" in Image.open(tmp_path / "long.png").info["parameters"], err
    code, _, err = kiln("generate", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--subseed", "3",
                        "--subseed-strength", "0.4", "--seed-resize-from", "48x48", "--ensd", "31337", "--rng", "NV",
                        "--api", api.url, "--out", tmp_path / "seeds.png")
    assert code == 0 and "Variation seed: 3, Variation seed strength: 0.4, Seed resize from: 48x48, ENSD: 31337, " \
        "RNG: NV" in Image.open(tmp_path / "seeds.png").info["parameters"], err
    code, _, err = kiln("generate", "x", "--width", "65", "--api", api.url)  # the server's verdict
    assert code == 2 and "width must be a multiple" in err and "Traceback" not in err
    code, _, err = kiln("generate", "x", "--cfg-scale", "nan", "--api", api.url)  # refused before sending
    assert code == 2 and "--api: cfg_scale" in err and "Traceback" not in err
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    code, _, err = kiln("generate", "x", "--init-image", tmp_path / "mask.png", "--mask", tmp_path / "mask.png",
                        "--api", api.url)
    assert code == 2 and "pass --overlay" in err  # the API always pastes back: never silently


# -- fuzzing --------------------------------------------------------------------------------------
def test_openapi_fuzz_finds_no_server_errors(triton, tmp_path):
    """schemathesis generates requests from the OpenAPI schema; no answer may be a 5xx.

    The service under fuzz caps steps and images low so that the valid generations it finds stay quick.
    """
    live = LiveAPI(Settings(triton_url=triton.grpc_url, port=free_port(),
                            limits=Limits(max_steps=3, max_n_iter=2, max_images=2)))
    st = Path(sys.executable).parent / "st"
    try:
        result = subprocess.run([str(st), "run", f"{live.url}/openapi.json", "--checks", "not_a_server_error",
                                 "--max-examples", "20", "--seed", "1",
                                 "--request-timeout", "60", "--exclude-path", "/sdapi/v1/interrupt",
                                 "--exclude-path", "/sdapi/v1/skip", "--warnings", "off"],
                                capture_output=True, text=True, timeout=400, cwd=tmp_path,  # its cache goes there
                                env=os.environ | {"NO_COLOR": "1"})
    finally:
        live.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


# -- lifecycle (these restart things: keep them last) ----------------------------------------------------
def test_sigterm_drains_in_flight_requests(triton):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", "--triton-url", triton.grpc_url,
                                "--port", str(port)], cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/health/live", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None, "service did not start"
                time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(1) as pool:
            future = pool.submit(c.post, "/sdapi/v1/txt2img", json=TXT | {"steps": 50})
            while c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            response = future.result(timeout=120)
        assert response.status_code == 200 and len(response.json()["images"]) == 1
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read()
    assert "Traceback" not in output, output


def test_triton_restart_gives_503_then_recovers(model_repo, lora_dir, triton):
    live = LiveAPI(Settings(triton_url=triton.grpc_url, port=free_port()))
    ports = dict(grpc=triton.options.grpc_port, http=triton.options.http_port, metrics=triton.options.metrics_port)
    try:
        with live.client() as c:
            assert c.post("/sdapi/v1/txt2img", json=TXT | {"steps": 2}).status_code == 200
            triton.stop()
            down = c.post("/sdapi/v1/txt2img", json=TXT | {"steps": 2})
            assert down.status_code == 503 and down.headers.get("retry-after"), down.text
            _safe(down)
            assert c.get("/health/ready").status_code == 503
            assert c.get("/health/live").status_code == 200
            restarted = start_triton(model_repo, triton.log_path, lora_dir, **ports)
            triton._process, triton._log_file = restarted._process, restarted._log_file  # the fixture stops it
            deadline = time.monotonic() + 30  # recovery is eventual: the gRPC endpoint may lag HTTP's readiness
            while c.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "the service did not see Triton again"
                time.sleep(0.2)
            assert c.post("/sdapi/v1/txt2img", json=TXT | {"steps": 2}).status_code == 200
    finally:
        live.stop()
