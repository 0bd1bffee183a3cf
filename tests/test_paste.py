"""AUTOMATIC1111's `infotext` request field: a response's infotext sent back alone gives the same image; the
request's own fields win over it; its settings go to override_settings; what kiln would not apply is refused."""

from __future__ import annotations

import json

import pytest

from kiln import schemas
from kiln.errors import InputError
from orchestrator.server.paste import apply_infotext

TEXT = ("a photo of a cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, Schedule type: Karras, CFG scale: 6.5, "
        "Seed: 42, Size: 64x96, Model hash: abc, Clip skip: 2, VAE: anime-vae.safetensors, Lora hashes: \"x: 1\", "
        "Version: v1.10.1")


def test_fields_the_request_leaves_unset_come_from_the_infotext():
    body = apply_infotext(schemas.Txt2ImgBody(infotext=TEXT, seed=7, override_settings={"sd_vae": "Automatic"}))
    assert (body.prompt, body.negative_prompt, body.steps, body.sampler_name, body.scheduler) == \
        ("a photo of a cat", "blurry", 3, "Euler", "Karras")
    assert (body.cfg_scale, body.width, body.height, body.seed) == (6.5, 64, 96, 7)  # its own seed wins
    # no RNG: AUTOMATIC1111's default source, GPU
    assert body.override_settings == {"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 2, "randn_source": "GPU"}
    assert body.infotext is None and not body.enable_hr
    hires = apply_infotext(schemas.Txt2ImgBody(infotext="a cat\nSteps: 2, Denoising strength: 0.4, Hires upscale: "
                                                        "1.5, Hires steps: 1, Hires upscaler: Latent"))
    assert hires.enable_hr and (hires.hr_scale, hires.hr_second_pass_steps, hires.denoising_strength) == (1.5, 1, 0.4)
    masked = apply_infotext(schemas.Img2ImgBody(infotext="a dog\nSteps: 2, Mask blur: 6, Mask mode: Inpaint not "
                                                         "masked, Masked content: latent noise, Inpaint area: Only "
                                                         "masked, Masked area padding: 16"))
    assert (masked.mask_blur, masked.inpainting_mask_invert, masked.inpainting_fill, masked.inpaint_full_res,
            masked.inpaint_full_res_padding) == (6, 1, 2, True, 16)
    weighted = apply_infotext(schemas.Img2ImgBody(infotext="a dog\nSteps: 2, Denoising strength: 0.5, Conditional "
                                                           "mask weight: 0.5, Extra noise: 0.2"))
    assert weighted.override_settings == {"inpainting_mask_weight": 0.5, "img2img_extra_noise": 0.2,
                                          "randn_source": "GPU"}  # AUTOMATIC1111's settings


def test_seed_and_sampler_options_come_from_the_infotext():
    """AUTOMATIC1111's names: Seed resize from (a WxH, as Size), ENSD, Eta DDIM and Eta (settings), the churn and
    NGMS."""
    body = apply_infotext(schemas.Txt2ImgBody(infotext="a cat\nSteps: 2, Seed resize from: 48x32, ENSD: 31337, "
                                                       "Eta DDIM: 0.3, Eta: 0.6, Sigma churn: 0.4, Sigma tmin: 0.1, "
                                                       "Sigma tmax: 9.5, Sigma noise: 1.01, NGMS: 0.5, Old prompt "
                                                       "editing timelines: True, Schedule max sigma: 9.5, Schedule "
                                                       "rho: 5"))
    assert (body.seed_resize_from_w, body.seed_resize_from_h) == (48, 32)
    assert body.override_settings == {"eta_noise_seed_delta": 31337, "eta_ddim": 0.3, "eta_ancestral": 0.6,
                                      "use_old_scheduling": True, "randn_source": "GPU", "sigma_max": 9.5, "rho": 5.0}
    assert (body.s_churn, body.s_tmin, body.s_tmax, body.s_noise, body.s_min_uncond) == (0.4, 0.1, 9.5, 1.01, 0.5)


@pytest.mark.parametrize("text, override, source", [
    ("a cat\nSteps: 2, RNG: NV", {}, "NV"),
    ("a cat\nSteps: 2, RNG: CPU", {}, "CPU"),
    ("a cat\nSteps: 2", {}, "GPU"),  # AUTOMATIC1111 writes no RNG for its default
    ("a cat\nSteps: 2, RNG: NV", {"randn_source": "CPU"}, "CPU"),  # the request's own setting wins
])
def test_the_random_number_source_comes_from_the_infotext(text, override, source):
    body = apply_infotext(schemas.Txt2ImgBody(infotext=text, override_settings=override))
    assert body.override_settings["randn_source"] == source


@pytest.mark.parametrize("text, message", [
    ("a cat\nSteps: 2, ControlNet 0: \"Module: canny\"", "ControlNet 0"),
    ("a cat\nSteps: many", "Steps 'many' is not a number"),
    ("a cat\nSteps: 2, Emphasis: No norm", "Emphasis 'No norm'"),
    ("a cat\nSteps: 2, Mask blur: 4", "Mask blur"),  # img2img's, sent to txt2img
])
def test_what_kiln_would_not_apply_is_refused(text, message):
    with pytest.raises(InputError, match=message):
        apply_infotext(schemas.Txt2ImgBody(infotext=text))


BODY = {"prompt": "a photo of a (cat:1.2)", "negative_prompt": "blurry", "steps": 3, "seed": 11, "width": 64,
        "height": 96, "sampler_name": "Euler", "cfg_scale": 6.0, "subseed": 3, "subseed_strength": 0.3,
        "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "anime-vae.safetensors"}}


@pytest.mark.slow
@pytest.mark.parametrize("body, written", [
    (BODY, "Variation seed: 3, Variation seed strength: 0.3, RNG: CPU"),
    # the seed options and the sampler's own: each written where it ran, and read back
    (BODY | {"sampler_name": "Euler a", "seed_resize_from_w": 48, "seed_resize_from_h": 64, "s_min_uncond": 5.0,
             "override_settings": {"eta_noise_seed_delta": 31337}},
     "Seed resize from: 48x64, ENSD: 31337, RNG: CPU, NGMS: 5.0"),
    (BODY | {"s_churn": 0.5, "s_tmin": 0.2, "s_noise": 1.05}, "Sigma churn: 0.5, Sigma tmin: 0.2, Sigma noise: 1.05"),
    (BODY | {"sampler_name": "DDIM", "override_settings": {"eta_ddim": 0.4}}, "Eta DDIM: 0.4"),
    (BODY | {"sampler_name": "Euler a", "eta": 0.5}, "Eta: 0.5"),  # k-diffusion's eta
    (BODY | {"prompt": "a [cat:dog:1.0]", "override_settings": {"use_old_scheduling": True}},
     "Old prompt editing timelines: True"),
    # AUTOMATIC1111's random number sources: kiln's CPU named, NV named, its default GPU (no RNG) read back as GPU
    (BODY | {"sampler_name": "Euler a", "override_settings": {"randn_source": "NV", "eta_noise_seed_delta": 31337}},
     "ENSD: 31337, RNG: NV"),
    (BODY | {"sampler_name": "Euler a", "override_settings": {"randn_source": "GPU"}}, "Seed: 11, Size: 64x96"),
    # AUTOMATIC1111's schedule types and settings
    (BODY | {"sampler_name": "Euler", "scheduler": "SGM Uniform", "override_settings": {"sigma_min": 0.5,
                                                                                        "sigma_max": 8.0}},
     "Sampler: Euler SGM Uniform, "),
    (BODY | {"sampler_name": "DPM++ 2M", "override_settings": {"rho": 3}}, "Schedule rho: 3.0"),  # a float there
], ids=["variation", "seeds", "churn", "ddim", "eta", "old timelines", "nv", "gpu", "sgm uniform", "rho"])
def test_a_responses_infotext_sent_back_alone_gives_the_same_image(triton, body, written):
    from kiln.triton_server import free_port
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port()))
    try:
        with live.client() as client:
            first = client.post("/sdapi/v1/txt2img", json=body).json()
            infotext = json.loads(first["info"])["infotexts"][0]
            assert written in infotext, infotext
            settings = json.dumps(body.get("override_settings", {}))
            assert ("Schedule min sigma: 0.5, Schedule max sigma: 8.0" in infotext) == ("sigma_min" in settings)
            assert ("RNG:" in infotext) == ("GPU" not in json.dumps(body))
            again = client.post("/sdapi/v1/txt2img", json={"infotext": infotext})
            assert again.status_code == 200, again.text
            assert again.json()["images"][0] == first["images"][0]
            other = client.post("/sdapi/v1/txt2img", json={"infotext": infotext, "seed": 12})
            assert other.json()["images"][0] != first["images"][0]  # the request's own seed wins
    finally:
        live.stop()


def test_sampler_names_and_schedule_types_for_both_passes():
    """AUTOMATIC1111 1.9+ takes a schedule type off the sampler's name on arrival (it wins over `scheduler`), and its
    hires pass uses the first pass's sampler and type unless hr_sampler_name / hr_scheduler say otherwise."""
    from orchestrator.server.sampler_names import hires_fix_sampler, sampler_name

    def body(**fields) -> schemas.Txt2ImgBody:
        return schemas.Txt2ImgBody(prompt="x", **fields)

    assert sampler_name(body()) == "Euler"  # AUTOMATIC1111's API default
    assert sampler_name(body(sampler_name="k_euler_a Karras", scheduler="Beta")) == "Euler a Karras"
    assert sampler_name(body(sampler_name="DPM++ 2M", scheduler="Automatic")) == "DPM++ 2M Karras"
    assert sampler_name(body(sampler_name="DPM++ 2M Uniform", scheduler="Karras")) == "DPM++ 2M"
    assert sampler_name(body(sampler_name="DDIM", scheduler="Karras")) == "DDIM"  # its own timesteps, as there
    # AUTOMATIC1111's name for PLMS, which its infotext carries; SD.Next's PNDM (kiln's name before) an alias of it
    assert sampler_name(body(sampler_name="PNDM")) == sampler_name(body(sampler_name="plms")) == "PLMS"
    assert hires_fix_sampler(body(sampler_name="Euler a Karras", hr_scheduler="Exponential")) == "Euler a Exponential"
    assert hires_fix_sampler(body(sampler_name="DPM++ 2M Karras", hr_sampler_name="Euler")) == "Euler Karras"
    assert hires_fix_sampler(body(sampler_name="DPM++ 2M", hr_sampler_name="Euler")) == "Euler"  # Automatic: its own
    assert hires_fix_sampler(body(sampler_name="DPM++ 2M", hr_scheduler="Uniform")) == "DPM++ 2M"
    # schedule types of several words, in the name (kiln's infotext writes them so) or as scheduler
    assert sampler_name(body(sampler_name="k_euler SGM Uniform", scheduler="Karras")) == "Euler SGM Uniform"
    assert sampler_name(body(sampler_name="Euler a", scheduler="align_your_steps")) == "Euler a Align Your Steps"
    assert hires_fix_sampler(body(sampler_name="Euler a KL Optimal", hr_sampler_name="LMS")) == "LMS KL Optimal"
