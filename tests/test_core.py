"""kiln's core, torch-free: the build -> serve contract, infotext, AUTOMATIC1111's image operations, the wire dtypes,
samplers and validation (fast: no model runs here)."""

from __future__ import annotations

import io
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageOps

from kiln import contract
from kiln.contract import SDContract, ServedControlNet
from kiln.errors import ConfigError, InputError, NotFoundError, TooLargeError
from kiln.imaging import encode_png, header_size, to_uint8
from kiln.infotext import parameters_text, parse_infotext, read_png_info
from kiln.masks import crop_region, inpaint_mask, resize_init_image
from kiln.triton_client import wire_dtype
from orchestrator.pipeline import (
    ControlNetUnit,
    HiresFix,
    Img2ImgRequest,
    Limits,
    Txt2ImgRequest,
    check_job,
    check_request,
)
from orchestrator.pipeline.sampling import (
    SAMPLERS,
    UnknownSampler,
    check_sampler,
    img2img_start,
    make_scheduler,
    schedule,
    split_schedule,
)
from tests.conftest import encode, png_header_only

CONTRACT = SDContract(
    scheduler_config={"beta_schedule": "scaled_linear", "num_train_timesteps": 1000}, vae_scale_factor=2,
    latent_channels=4, unet_in_channels=4, scaling_factor=0.18215, min_size=32, max_size=128, size_multiple=8,
    model_name="tiny", model_sha256="ab" * 32, controlnets=(
        ServedControlNet("canny", "sd_controlnet", "sd_controlnet_unet", "cd" * 32),
        ServedControlNet("depth", "sd_controlnet_2", "", "")), unet_max_batch=16)


def test_the_contract_round_trips_through_config_parameters():
    params = CONTRACT.to_parameters()
    assert all(isinstance(v, str) for v in params.values()) and params["unet_max_batch"] == "16"
    # The parameter wins over the config's max_batch_size (0 for a native OpenVINO sd_unet); older builds lack it.
    assert SDContract.from_parameters(params, 0) == CONTRACT
    older = {k: v for k, v in params.items() if k != "unet_max_batch"}
    assert SDContract.from_parameters(older, 8) == replace(CONTRACT, unet_max_batch=8)
    assert CONTRACT.title == "tiny [abababab" + "ab]" and CONTRACT.model_hash == "ab" * 5
    with pytest.raises(ConfigError, match="rebuild the repository"):
        SDContract.from_parameters({k: v for k, v in params.items() if k != "latent_channels"}, 16)


def test_controlnets_are_picked_by_name_or_title():
    assert CONTRACT.controlnet(None).name == CONTRACT.controlnet("None").name == "canny"
    assert CONTRACT.controlnet("canny [cdcdcdcd]").name == "canny" and CONTRACT.controlnet("depth").name == "depth"
    assert CONTRACT.controlnet("depth [0123abcd]").name == "depth"  # a title whose hash moved on
    assert CONTRACT.controlnet("depth").component == "controlnet_2"
    with pytest.raises(InputError, match=r"unknown ControlNet model 'seg'; this build serves: "
                                         r"canny \[cdcdcdcd\], depth"):
        CONTRACT.controlnet("seg")
    with pytest.raises(InputError, match="this build has no ControlNet"):
        replace(CONTRACT, controlnets=()).controlnet(None)


def test_model_names_have_one_home():
    assert contract.sd_model("unet") == contract.SD_UNET
    assert [contract.controlnet_component(i) for i in range(3)] == ["controlnet", "controlnet_2", "controlnet_3"]
    assert [contract.controlnet_ensemble(i) for i in range(2)] == ["sd_controlnet_unet", "sd_controlnet_unet_2"]


def test_infotext_is_written_and_read_back_as_automatic1111_does():
    info = {"prompt": "a cat, studio", "negative_prompt": "blurry", "steps": 20, "sampler": "Euler a",
            "cfg_scale": 7.0, "seed": 42, "width": 512, "height": 768, "model_hash": "abcdef0123", "model": "sd15",
            "denoising_strength": 0.6, "mask_blur": 4, "inpainting_mask_invert": False, "inpainting_fill": 1,
            "controlnet": ['"Module: canny, Model: canny [cdcdcdcd], Weight: 1.0"']}
    text = parameters_text(info)
    assert text.splitlines()[0] == "a cat, studio" and text.splitlines()[1] == "Negative prompt: blurry"
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a cat, studio" and parsed["Negative prompt"] == "blurry"
    assert (parsed["Steps"], parsed["Sampler"], parsed["Seed"], parsed["Size-1"], parsed["Size-2"]) == \
        ("20", "Euler a", "42", "512", "768")
    assert parsed["Masked content"] == "original" and parsed["Mask mode"] == "Inpaint masked"
    assert parsed["ControlNet 0"] == "Module: canny, Model: canny [cdcdcdcd], Weight: 1.0"
    png = encode_png(np.zeros((8, 8, 3), np.uint8), {"parameters": text})
    assert read_png_info(png)["parameters"]["Seed"] == "42"
    with pytest.raises(InputError, match="cannot read its metadata"):
        read_png_info(b"\x89PNG\r\n\x1a\n broken")
    assert parse_infotext("") == {}


def test_image_headers_are_checked_before_decoding():
    assert header_size(encode(Image.new("RGB", (30, 20)))) == (30, 20)
    with pytest.raises(TooLargeError, match="refused before decoding"):
        header_size(png_header_only(5000, 5000), "init_images[0]", max_pixels=1000 * 1000)
    with pytest.raises(TooLargeError, match="too many pixels"):
        header_size(png_header_only(30000, 30000))
    with pytest.raises(InputError, match="mask: not an image"):
        header_size(b"GIF89a-corrupt", "mask")


def test_decoder_output_is_rounded_as_diffusers_rounds_it():
    decoded = np.array([-1.5, -1.0, 0.0, 0.999, 1.2], np.float32).reshape(1, 1, 1, 5).repeat(3, axis=1)
    assert to_uint8(decoded)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_resize_modes_shape_the_init_image():
    wide = encode(Image.new("RGB", (96, 48), (10, 200, 30)))
    assert resize_init_image(wide, 64, 64, 0) is wide and resize_init_image(wide, 64, 64, 3) is wide
    for mode in (1, 2):
        assert Image.open(io.BytesIO(resize_init_image(wide, 64, 64, mode))).size == (64, 64)


def test_control_images_fit_as_sd_webui_controlnet_fits_them():
    """Its inner fit (Crop and Resize): scaled by the larger ratio, rounded half to even, the middle cut out; its
    outer fit (Resize and Fill): scaled by the smaller, centred on the median colour of the four edges; Just Resize
    stretches. A photo is enlarged by cubic and shrunk by area (its high_quality_resize)."""
    from kiln.controlmaps import fit_map
    from kiln.cvimage import resize

    pixels = np.random.default_rng(2).integers(0, 256, (48, 128, 3), dtype=np.uint8)
    pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1] = (10, 20, 30), (10, 20, 30), (10, 20, 30), (200, 0, 0)
    crop = fit_map(pixels, 64, 64, 1)
    assert np.array_equal(crop, resize(pixels, 171, 64, "cubic")[:, 53:117])  # 128 x 4/3 = 170.67
    fill = fit_map(pixels, 64, 64, 2)
    assert np.array_equal(fill[20:44], resize(pixels, 64, 24, "area"))
    assert (fill[:20] == (10, 20, 30)).all() and (fill[44:] == (10, 20, 30)).all()  # the edges' median colour
    assert np.array_equal(fit_map(pixels, 64, 64, 0), resize(pixels, 64, 64, "area"))  # fewer pixels: area
    assert np.array_equal(fit_map(pixels, 32, 12, 1), resize(pixels, 32, 12, "area"))  # a quarter: whole blocks


@pytest.mark.parametrize("size", [(100, 47), (41, 100)])
def test_resize_modes_take_automatic1111s_steps(size):
    """AUTOMATIC1111's resize_image: "crop and resize" resizes the whole image to cover the frame (the other side by
    floor division) and cuts the middle out, not a centred crop of the source resized (ImageOps.fit); "resize and
    fill" centres the image resized to fit and fills each border by stretching the edge row (or column) across it."""
    from kiln.masks import shaped
    y, x = np.mgrid[0:size[1], 0:size[0]]
    image = Image.fromarray(np.stack([x * 255 // size[0], y * 255 // size[1], (x * y) % 256], -1).astype(np.uint8))
    wide = size[0] > size[1]
    lines = (lambda a: a) if wide else (lambda a: a.transpose(1, 0, 2))  # rows for a wide image, columns for a tall

    cover = (size[0] * 64 // size[1], 64) if wide else (64, size[1] * 64 // size[0])
    resized = lines(np.asarray(image.resize(cover, Image.Resampling.LANCZOS)))
    start = len(resized[0]) // 2 - 32
    cut = lines(np.asarray(shaped(image, 64, 64, 1)))
    assert np.array_equal(cut, resized[:, start:start + 64])
    assert not np.array_equal(cut, lines(np.asarray(ImageOps.fit(image, (64, 64), Image.Resampling.LANCZOS))))

    fit_size = (64, size[1] * 64 // size[0]) if wide else (size[0] * 64 // size[1], 64)
    fit = lines(np.asarray(image.resize(fit_size, Image.Resampling.LANCZOS)))
    filled = lines(np.asarray(shaped(image, 64, 64, 2)))
    top = 32 - len(fit) // 2
    assert np.array_equal(filled[top:top + len(fit)], fit)
    for band, edge in ((filled[:top], 0), (filled[top + len(fit):], len(fit) - 1)):
        assert len(band) and (band == band[0]).all(), "each line of a band is the same stretched edge"
        distance = np.abs(fit.astype(int) - band[0]).mean(axis=(1, 2))
        assert distance.argmin() == edge, "the band is the fitted image's edge line"


def test_wire_dtypes():
    assert wire_dtype(np.zeros(1, np.float32)) == "FP32" and wire_dtype(np.zeros(1, np.int64)) == "INT64"
    assert wire_dtype(np.array([b"x"], dtype=object)) == "BYTES" and wire_dtype(np.zeros(1, bool)) == "BOOL"


def test_validation_names_the_field_with_one_set_of_limits():
    ok = Txt2ImgRequest(prompt="a cat", width=64, height=64)
    check_request(ok, CONTRACT)
    cases = [(replace(ok, width=60), InputError, "width must be a multiple of 8"),
             (replace(ok, steps=151), InputError, "steps must be between 1 and 150"),
             (replace(ok, batch_size=9), InputError, "batch_size must be between 1 and 8"),
             (replace(ok, prompt="x" * 20000), TooLargeError, "prompt of 20000 characters"),
             (replace(ok, sampler="Euler z"), UnknownSampler, "Sampler not found"),
             (replace(ok, seed=True), InputError, "seed must be"),
             (replace(ok, controlnet=(ControlNetUnit(image=b"x"),) * 5), InputError, "at most 4 per request"),
             (replace(ok, controlnet=ControlNetUnit(image=b"x", model="seg")), InputError, "unknown ControlNet"),
             (Img2ImgRequest(prompt="a cat", width=64, height=64), InputError, "init_image is empty"),
             (Img2ImgRequest(prompt="a cat", width=64, height=64, init_image=b"x", inpainting_fill=7), InputError,
              "inpainting_fill must be one of"),
             (Img2ImgRequest(prompt="a cat", width=64, height=64, init_image=b"x", mask_round=0), InputError,
              "mask_round must be true or false, got 0"),
             (replace(ok, eta_ancestral=1.5), InputError, r"eta_ancestral must be in \[0, 1\], got 1.5"),
             (replace(ok, hires=HiresFix(sampler="DPM++ SDE"), eta_ancestral=-0.1), InputError,
              r"eta_ancestral must be in \[0, 1\], got -0.1"),
             (replace(ok, intermediates=("highres-fix",)), InputError, "a step this request does not run"),
             (replace(ok, hires=HiresFix(), intermediates=("face-restoration",)), InputError, "must be a tuple of"),
             (replace(ok, intermediates=["highres-fix"]), InputError, "must be a tuple")]
    for request, kind, message in cases:
        with pytest.raises(kind, match=message):
            check_request(request, CONTRACT)
    assert issubclass(UnknownSampler, NotFoundError)  # the API's 404
    check_request(replace(ok, hires=HiresFix(), intermediates=("highres-fix",)), CONTRACT)
    check_request(replace(ok, steps=400), CONTRACT, Limits(max_steps=500))
    check_request(replace(ok, cfg_scale=np.float32(7.5), eta=np.float64(0.5)), CONTRACT)  # numpy numbers are numbers
    for sampler in ("Euler a Karras", "DPM++ SDE", "DPM++ 2M SDE Exponential", "DDIM", "Euler"):  # or no noise
        check_request(replace(ok, sampler=sampler, eta_ancestral=0.5), CONTRACT)
    with pytest.raises(InputError, match="batch_size x n_iter = 18 images exceeds the limit of 16"):
        check_job(replace(ok, batch_size=2), 9)
    nine = replace(CONTRACT, unet_in_channels=9)
    check_request(ok, nine)  # all of the image masked (AUTOMATIC1111's txt2img_image_conditioning)
    with pytest.raises(InputError, match="txt2img's is all masked whatever it is"):
        check_request(replace(ok, inpainting_mask_weight=0.5), nine)
    with pytest.raises(InputError, match="has no such UNet"):
        check_request(replace(ok, inpainting_mask_weight=0.5, hires=HiresFix()), CONTRACT)
    check_request(replace(ok, inpainting_mask_weight=0.5, hires=HiresFix()), nine)


def test_transparent_mask_is_read_by_its_alpha():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent: keep
    rgba.paste((0, 0, 0, 255), (0, 0, 32, 64))  # opaque left half: repaint
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    mask = inpaint_mask(buffer.getvalue(), 64, 64, blur=0, invert=False)
    assert mask[0, 10, 5] == 1 and mask[0, 10, 60] == 0


def test_sampler_names_ignore_the_checkpoints_own_scheduler_options():
    scheduler = make_scheduler("Euler", {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                         "use_karras_sigmas": True, "_class_name": "EulerDiscreteScheduler"})
    assert type(scheduler).__name__ == "EulerDiscreteScheduler" and not scheduler.config.use_karras_sigmas
    karras = make_scheduler("DPM++ 2M Karras", {"beta_schedule": "scaled_linear"})
    assert type(karras).__name__ == "DPMSolverMultistepScheduler" and karras.config.use_karras_sigmas


SD15_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                 "timestep_spacing": "leading", "_class_name": "PNDMScheduler"}  # SD 1.5's own scheduler config


AYS = {"sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],  # NVIDIA's, 10 steps
       "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]}


def _k_diffusion_sigmas(alphas_cumprod, steps: int, kind: str | None, family: str = "sd1"):
    """k-diffusion's, as AUTOMATIC1111 1.10 samples: get_sigmas (t evenly from 999 to 0, log sigma interpolated),
    get_sigmas_karras (rho 7), get_sigmas_exponential (and polyexponential at its rho 1) or beta_scheduler over the
    model's whole sigma range, or its modules/sd_schedulers.py's others, then a final 0 (KL Optimal: none)."""
    import torch

    table = ((1 - alphas_cumprod) / alphas_cumprod).double() ** 0.5
    log_sigmas = table.log()
    low, high = log_sigmas[0], log_sigmas[-1]
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)

    def at(t):  # t_to_sigma: log sigma linear between whole timesteps
        below, fraction = t.floor().long(), t - t.floor()
        return ((1 - fraction) * log_sigmas[below] + fraction * log_sigmas[t.ceil().long()]).exp()

    if kind == "KL Optimal":  # evenly in arctan(sigma), ending at the lowest sigma
        i = torch.arange(steps + 1, dtype=torch.float64) / steps
        return torch.tan(i * low.exp().atan() + (1 - i) * high.exp().atan())
    if kind == "SGM Uniform":
        sigmas = at(torch.linspace(len(table) - 1, 0, steps + 1, dtype=torch.float64)[:-1])
    elif kind == "Simple":
        sigmas = torch.stack([table[-(1 + int(x * len(table) / steps))] for x in range(steps)])
    elif kind == "DDIM":
        sigmas = table[1::len(table) // steps].flip(0)
    elif kind == "Align Your Steps":
        published = torch.tensor(AYS[family], dtype=torch.float64)
        sigmas = published if steps == len(published) else torch.tensor(np.exp(np.interp(
            np.linspace(0, 1, steps), np.linspace(0, 1, 11), np.log(published.flip(0).numpy())))).flip(0)
    elif kind == "Karras":
        sigmas = ((high / 7).exp() + ramp * ((low / 7).exp() - (high / 7).exp())) ** 7
    elif kind in ("Exponential", "Polyexponential"):
        sigmas = (high + ramp * (low - high)).exp()
    elif kind == "Beta":  # "Beta Sampling is All You Need" (alpha = beta = 0.6, AUTOMATIC1111's defaults)
        from scipy import stats

        ppf = torch.as_tensor(stats.beta.ppf(1 - ramp.numpy(), 0.6, 0.6), dtype=torch.float64)
        sigmas = low.exp() + ppf * (high.exp() - low.exp())
    else:  # Automatic and Uniform, and Normal (the same timesteps)
        sigmas = at(torch.linspace(len(log_sigmas) - 1, 0, steps, dtype=torch.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "Heun", "LMS", "DPM++ SDE", "DPM++ SDE Karras",
                                     "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "DPM++ 2M SDE Exponential",
                                     # AUTOMATIC1111 1.9+: any k-diffusion sampler on any schedule type
                                     "Euler Karras", "Euler a Karras", "Euler a Exponential", "Heun Exponential",
                                     "LMS Karras", "DPM++ 2M Exponential", "DPM++ SDE Exponential", "Euler Beta",
                                     "Euler a Beta", "DPM++ 2M Beta", "DPM++ 2M SDE Beta"])
@pytest.mark.parametrize("steps", [7, 20])
def test_k_diffusion_samplers_run_automatic1111s_sigmas_whatever_the_checkpoints_spacing(sampler, steps):
    """AUTOMATIC1111's Automatic/Uniform schedule is k-diffusion's (t evenly from 999 to 0); SD 1.5's own config says
    "leading", which started at sigma 11.0 instead of 14.6 at 20 steps (and squeezed DPM++ SDE's Karras range). Its
    other schedule types span the model's whole sigma range too (Euler a borrows Euler's: diffusers' has no switch)."""
    import torch

    scheduler, timesteps = schedule(sampler, SD15_SCHEDULE, steps, seed=0)
    ran = torch.unique_consecutive(torch.as_tensor(scheduler.sigmas).double())  # Heun and SDE list each twice
    expected = _k_diffusion_sigmas(scheduler.alphas_cumprod, steps, split_schedule(sampler)[1])
    assert ran.shape == expected.shape and torch.allclose(ran, expected, rtol=1e-4, atol=1e-6)
    assert len(timesteps) == steps * scheduler.order - (scheduler.order - 1)


@pytest.mark.parametrize("sampler, steps", [
    ("Euler SGM Uniform", 7), ("Euler a SGM Uniform", 20), ("DPM++ 2M SDE SGM Uniform", 20), ("Heun Normal", 7),
    ("LMS Normal", 20), ("DPM++ SDE Simple", 7), ("Euler Simple", 20), ("Euler DDIM", 20), ("DPM++ 2M DDIM", 25),
    ("Euler Align Your Steps", 7), ("Euler a Align Your Steps", 11), ("Heun Align Your Steps", 30),
    ("Euler Polyexponential", 20), ("Heun Polyexponential", 7), ("Euler KL Optimal", 7), ("Euler a KL Optimal", 20),
    ("LMS KL Optimal", 20), ("DPM++ 2M KL Optimal", 20), ("DPM++ 2M SDE KL Optimal", 7)])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_automatic1111s_other_schedule_types_are_its_sigmas(sampler, steps, family):
    """AUTOMATIC1111 1.10's schedule types that diffusers has no switch for: kiln's sigmas (orchestrator.pipeline.
    sigmas), in the scheduler diffusers steps with (its second-order samplers list each twice). KL Optimal ends at
    the model's lowest sigma, not at 0; Align Your Steps takes SDXL's published sigmas for SDXL."""
    import torch

    scheduler, timesteps = schedule(sampler, SD15_SCHEDULE, steps, seed=0, family=family)
    ran = torch.unique_consecutive(torch.as_tensor(scheduler.sigmas).double())
    expected = _k_diffusion_sigmas(scheduler.alphas_cumprod, steps, split_schedule(sampler)[1], family)
    assert ran.shape == expected.shape and torch.allclose(ran, expected, rtol=1e-4, atol=1e-6), (ran, expected)
    assert len(timesteps) == steps * scheduler.order - (scheduler.order - 1)
    if sampler in ("Euler KL Optimal", "LMS KL Optimal"):
        # A model whose every prediction is the clean image 0 (epsilon = sample / sigma): on the exact path sample /
        # sigma stays constant, which Euler and LMS keep, so the image ends at the last sigma's share of the start,
        # not at 0: the noise AUTOMATIC1111's KL Optimal leaves in.
        latents = torch.ones(1, 4, 2, 2)
        for i, t in enumerate(timesteps):
            scheduler.scale_model_input(latents, t)  # LMS warns without it (the model's input is not used here)
            latents = scheduler.step(latents / scheduler.sigmas[i], t, latents).prev_sample
        assert torch.allclose(latents, torch.full_like(latents, float(expected[-1] / expected[0])), rtol=1e-3)
        assert 0.02 < float(expected[-1]) < 0.03


@pytest.mark.parametrize("sampler, settings", [
    ("Euler Karras", (0.1, 10.0, 0.0)), ("DPM++ 2M Karras", (0.3, 12.0, 3.0)), ("Euler a Karras", (0.5, 0.0, 9.0)),
    ("Heun Exponential", (0.2, 5.0, 0.0)), ("Euler a Polyexponential", (0.0, 0.0, 2.0)),
    ("LMS SGM Uniform", (0.5, 8.0, 0.0)), ("Euler Normal", (0.0, 6.0, 0.0)), ("Euler KL Optimal", (0.05, 0.0, 0.0)),
    ("DPM++ SDE Beta", (0.1, 7.0, 0.0))])
def test_automatic1111s_schedule_settings_move_the_range_and_the_curve(sampler, settings):
    """AUTOMATIC1111's Settings sigma_min, sigma_max (0: the model's) and rho (0: the type's own: Karras 7,
    Polyexponential 1), as its get_sigmas hands them to the schedule type's function."""
    import torch
    from scipy import stats

    from orchestrator.pipeline.sampling import schedule_kind

    steps = 9
    scheduler, _ = schedule(sampler, SD15_SCHEDULE, steps, seed=0, settings=settings)
    ran = torch.unique_consecutive(torch.as_tensor(scheduler.sigmas).double())
    table = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).double() ** 0.5
    low, high = settings[0] or float(table[0]), settings[1] or float(table[-1])
    kind, ramp = schedule_kind(sampler), torch.linspace(0, 1, steps, dtype=torch.float64)
    log_sigmas = table.log()

    def at(t):
        return torch.tensor(np.exp(np.interp(t, np.arange(1000), log_sigmas.numpy())))

    def to_t(sigma):
        return float(np.interp(np.log(sigma), log_sigmas.numpy(), np.arange(1000)))

    if kind == "Karras":
        rho = settings[2] or 7.0
        expected = (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
    elif kind == "Exponential":
        expected = torch.linspace(np.log(high), np.log(low), steps, dtype=torch.float64).exp()
    elif kind == "Polyexponential":
        expected = ((1 - ramp) ** settings[2] * (np.log(high) - np.log(low)) + np.log(low)).exp()
    elif kind == "SGM Uniform":
        expected = at(np.linspace(to_t(high), to_t(low), steps + 1)[:-1])
    elif kind == "Normal":
        expected = at(np.linspace(to_t(high), to_t(low), steps))
    elif kind == "Beta":
        expected = low + torch.tensor(stats.beta.ppf(1 - ramp.numpy(), 0.6, 0.6)) * (high - low)
    else:  # KL Optimal: ends at sigma_min
        i = torch.arange(steps + 1, dtype=torch.float64) / steps
        expected = torch.tan(i * np.arctan(low) + (1 - i) * np.arctan(high))[:-1]
    expected = torch.cat([expected, torch.tensor([low if kind == "KL Optimal" else 0.0], dtype=torch.float64)])
    assert torch.allclose(ran, expected, rtol=1e-4, atol=1e-6), (ran, expected)
    plain = torch.unique_consecutive(torch.as_tensor(schedule(sampler, SD15_SCHEDULE, steps, seed=0)[0].sigmas))
    assert not torch.allclose(ran.float(), plain.float(), rtol=1e-3)  # the settings changed the schedule


@pytest.mark.parametrize("sampler, settings, message", [
    ("Euler", (0.5, 0.0, 0.0), r"sigma_min / sigma_max: the Euler sampler's schedule \(Uniform\) spans no range"),
    ("Euler Simple", (0.0, 0.0, 3.0), r"rho: the Euler Simple sampler's schedule \(Simple\) has no rho"),
    ("DDIM", (0.0, 9.0, 0.0), "spans no range"), ("Euler Exponential", (0.0, 0.0, 2.0), "has no rho"),
    ("Euler Karras", (-1.0, 0.0, 0.0), "sigma_min must be a number, 0 or more"),
    ("Euler Karras", (0.0, 0.0, "7"), "rho must be a number")])
def test_schedule_settings_where_they_change_nothing_are_refused(sampler, settings, message):
    from orchestrator.pipeline.sampling import schedule_kind
    from orchestrator.pipeline.sigmas import check_settings

    with pytest.raises(InputError, match=message):
        check_settings(schedule_kind(sampler), settings, sampler)


@pytest.mark.parametrize("steps", [2, 5, 20])
def test_unipc_is_automatic1111s_by_its_default_settings(steps):
    """AUTOMATIC1111's UniPC (the UniPC authors' code under its settings' defaults: variant bh1, order 3, lower order
    final, skip type time_uniform): the model at timesteps 999 (1 - k / steps), rounded, and the last step to
    timestep 0's noise level, where the image keeps that little noise, not to 0. A model whose every prediction is
    the clean image 0 shows it: on that exact path the sample shrinks with the noise level, so the image ends at the
    last noise level's share of the first."""
    import torch

    scheduler, timesteps = schedule("UniPC", SD15_SCHEDULE, steps, seed=0)
    config = scheduler.config
    assert (config.solver_type, config.solver_order, config.lower_order_final, config.predict_x0) == \
        ("bh1", 3, True, True)
    assert timesteps.tolist() == [round(999 * (1 - k / steps)) for k in range(steps)]
    vp = scheduler.sigmas.double() / (1 + scheduler.sigmas.double() ** 2) ** 0.5  # sqrt(1 - alpha_bar) at each step
    assert float(vp[-1]) == pytest.approx(0.00085 ** 0.5, rel=1e-3)  # timestep 0's: beta_start
    latents = torch.ones(1, 4, 2, 2)
    for i, t in enumerate(timesteps):
        latents = scheduler.step(latents / vp[i].float(), t, latents).prev_sample
    assert torch.allclose(latents, torch.full_like(latents, float(vp[-1] / vp[0])), rtol=1e-3)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["", " Karras"])
def test_euler_a_takes_k_diffusions_eta(prediction, kind):
    """AUTOMATIC1111's eta for Euler a (k-diffusion's sample_euler_ancestral, written out here): at 1 diffusers' own
    step, number for number; at 0 no ancestral noise, which is Euler's step; between, the noise scaled by eta and the
    deterministic part stepping to the rest of the next sigma. Every eta draws the same noise, so the generator's
    later numbers do not depend on it."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler

    config = SD15_SCHEDULE | {"prediction_type": prediction}
    ours, timesteps = schedule(f"Euler a{kind}", config, 6, seed=0)
    euler, _ = schedule(f"Euler{kind}", config, 6, seed=0)
    theirs = EulerAncestralDiscreteScheduler.from_config(ours.config)
    theirs.sigmas, theirs.timesteps = ours.sigmas.clone(), ours.timesteps.clone()  # diffusers' class, kiln's sigmas
    sample, output = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)), torch.randn(2, 4, 3, 3)

    def steps(scheduler, **kwargs) -> tuple[list, float]:
        generator, x, out = torch.Generator().manual_seed(5), sample.clone(), []
        for t in timesteps:
            scheduler.scale_model_input(x, t)  # the model's input, as a pipeline asks for it before each step
            x = scheduler.step(output, t, x, generator=generator, **kwargs).prev_sample
            out.append(x)
        return out, float(torch.randn(1, generator=generator))

    expected, after = steps(theirs)
    assert [torch.equal(a, b) for a, b in zip(steps(ours)[0], expected)] == [True] * 6
    ours._step_index = euler._step_index = None  # run again from the first step
    for eta in (0.0, 0.5):
        got, later = steps(ours, eta_ancestral=eta)
        assert later == after
        generator, x = torch.Generator().manual_seed(5), sample.clone()
        for i, (sigma, to) in enumerate(zip(ours.sigmas[:-1].double(), ours.sigmas[1:].double())):
            scaled = x.double() / (sigma**2 + 1) ** 0.5
            denoised = x.double() - sigma * output if prediction == "epsilon" else \
                output * (-sigma / (sigma**2 + 1) ** 0.5) + scaled / (sigma**2 + 1) ** 0.5
            up = min(float(to), eta * float((to**2 * (sigma**2 - to**2) / sigma**2) ** 0.5))
            down = (to**2 - up**2) ** 0.5
            x = (x.double() + (x.double() - denoised) / sigma * (down - sigma) +
                 torch.randn(x.shape, generator=generator).double() * up).float()
            assert torch.allclose(got[i], x, atol=1e-4), (eta, i)
        if eta == 0:
            plain = steps(euler)[0]
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, plain))  # Euler's step
        ours._step_index = euler._step_index = None
    assert not torch.allclose(steps(ours, eta_ancestral=0.5)[0][-2], expected[-2], atol=1e-2)  # eta moved it


def _k_diffusion_sde(sigmas: list, x, eps, eta: float, tree, order: int, heun: bool) -> list:
    """k-diffusion's sample_dpmpp_2m_sde (midpoint or heun, order 2) and sample_dpmpp_3m_sde (order 3), written out on
    their own variables (x / alpha), for a model that predicts `eps` at every step: x after each step."""
    import math

    import torch

    out, old, h_1, h_2 = [], [], None, None
    for s, to in zip(sigmas[:-1], sigmas[1:]):
        denoised = x - s * eps
        h = math.log(s / to) if to else None
        if to == 0:
            x = denoised
        else:
            h_eta = h * (1 + eta)
            x = to / s * math.exp(-eta * h) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if order == 3 and h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - old[-1]) / r0, (old[-1] - old[-2]) / r1
                d1, d2 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1), (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                d = (denoised - old[-1]) * (h / h_1)
                x = x + (phi_2 * d if heun else -0.5 * math.expm1(-h_eta) * d)
            if eta:
                x = x + tree(torch.tensor(s), torch.tensor(to)).double() * to * math.sqrt(-math.expm1(-2 * eta * h))
        old, h_1, h_2 = old + [denoised], h, h_1
        out.append(x)
    return out


@pytest.mark.parametrize("name", ["DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM++ 2M SDE KL Optimal",
                                  "DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun Exponential", "DPM++ 3M SDE",
                                  "DPM++ 3M SDE Karras", "DPM++ 3M SDE KL Optimal"])
def test_dpmpp_2m_and_3m_sde_are_k_diffusions_with_its_eta_and_brownian_noise(name):
    """AUTOMATIC1111's DPM++ 2M SDE (midpoint, Heun) and 3M SDE: k-diffusion's samplers (written out above), their
    noise from a Brownian tree seeded by the image's seed as AUTOMATIC1111 seeds it (times s_noise), at eta 1, 0 and
    between, 6 and 8 steps (3M's third-order steps from the third on). At eta 1 the 2M ones are diffusers' own step
    given that noise, number for number, and at eta 0 2M SDE is DPM++ 2M's. KL Optimal ends above sigma 0, so its
    last step is a multistep one with noise too."""
    import math

    import torch
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    heun, order = "Heun" in name or "3M" in name, 3 if "3M" in name else 2
    sample, eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)), torch.randn(2, 4, 3, 3) * 0.3

    def steps(scheduler, noises=None, **kwargs) -> list:
        generator, x, out = torch.Generator().manual_seed(5), sample.clone(), []
        scheduler._step_index, scheduler.lower_order_nums, scheduler.noise_sampler = None, 0, None
        scheduler.model_outputs = [None] * scheduler.config.solver_order
        for i, t in enumerate(scheduler.timesteps):
            noise = None if noises is None else noises[i]
            x = scheduler.step(eps, t, x, generator=generator, variance_noise=noise, **kwargs).prev_sample
            out.append(x)
        return out

    for steps_asked in (6, 8):
        ours, timesteps = schedule(name, SD15_SCHEDULE, steps_asked, seed=11)
        assert len(timesteps) == steps_asked and ours.noise_sampler_seed == 11
        sigmas = [float(s) for s in ours.sigmas]
        alpha = [1 / math.sqrt(s**2 + 1) for s in sigmas]
        tree = BrownianTreeNoiseSampler(sample, min(s for s in sigmas if s > 0), max(sigmas), 11)
        for eta, s_noise in ((1.0, 1.0), (0.0, 1.0), (0.4, 1.0), (1.0, 0.5), (0.4, 0.5)):  # and s_noise's scale
            got = steps(ours, eta_ancestral=eta, s_noise=s_noise)
            expected = _k_diffusion_sde(sigmas, sample.double() / alpha[0], eps.double(), eta,
                                        lambda a, b, tree=tree, scale=s_noise: tree(a, b) * scale, order, heun)
            for i, (a, b) in enumerate(zip(got, expected)):
                assert torch.allclose(a.double(), b * alpha[i + 1], atol=1e-4), (steps_asked, eta, s_noise, i)
        if order == 2:  # diffusers' own step, given the tree's noise (none into sigma 0)
            theirs = DPMSolverMultistepScheduler.from_config(ours.config)
            theirs.set_timesteps(steps_asked)
            theirs.sigmas, theirs.timesteps = ours.sigmas.clone(), ours.timesteps.clone()
            noises = [tree(torch.tensor(s), torch.tensor(to)) if to else torch.zeros_like(sample)
                      for s, to in zip(sigmas[:-1], sigmas[1:])]
            assert all(torch.equal(a, b) for a, b in zip(steps(ours), steps(theirs, noises)))
        if name == "DPM++ 2M SDE":
            plain, _ = schedule("DPM++ 2M", SD15_SCHEDULE, steps_asked, seed=0)
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(steps(ours, eta_ancestral=0.0), steps(plain)))
    assert not torch.allclose(steps(ours, eta_ancestral=0.4)[-2], steps(ours)[-2], atol=1e-2)  # eta moved it


def test_the_sdes_brownian_noise_is_each_images_own():
    """AUTOMATIC1111 seeds the SDE samplers' Brownian tree with each image's seed (one tree an image), so that an
    image is the same whichever batch it is in: the second image of a batch seeded [7, 8] is seed 8's alone, for
    DPM++ SDE, 2M SDE and 3M SDE. Another seed gives other noise."""
    import torch

    latents = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4)) * 0.3
    for name in ("DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"):
        def run(seeds, rows: slice, name=name):
            scheduler, timesteps = schedule(name, SD15_SCHEDULE, 5, seed=seeds)
            x = latents[rows] * scheduler.init_noise_sigma
            for t in timesteps:
                x = scheduler.step(eps[rows], t, scheduler.scale_model_input(x, t)
                                   if name == "DPM++ SDE" else x).prev_sample
            return x

        both = run([7, 8], slice(0, 2))
        assert torch.allclose(both[1:], run([8], slice(1, 2)), atol=1e-6), name
        assert torch.allclose(both[:1], run(7, slice(0, 1)), atol=1e-6), name  # a seed alone: the same tree
        assert not torch.allclose(both[1:], run([9], slice(1, 2)), atol=1e-3), name


def test_the_brownian_steps_run_a_window_ahead_stop_with_their_run_and_raise_its_faults(tmp_path):
    """The noise computed ahead in a thread: a tree that cannot be made (no sigma above 0 to span) fails the step that
    waits for it, naming it, instead of hanging it; a query other than the run's next is refused, as are seeds that
    are not the batch's; benchmarks/brownian.py runs its five arms, whose tree noise agrees exactly (checked inside),
    and writes its JSON."""
    import gc
    import time

    import torch

    from benchmarks.brownian import main
    from orchestrator.pipeline.ancestral import BrownianSteps

    high, low = torch.tensor(14.6), torch.tensor(3.0)
    broken = BrownianSteps(torch.zeros(2, 4, 3, 3), torch.tensor([0.0, 0.0]), [1, 2], [(high, low)])
    with pytest.raises(RuntimeError, match="the Brownian tree's noise failed"):
        broken(high, low)
    steps = BrownianSteps(torch.zeros(2, 4, 3, 3), torch.tensor([14.6, 3.0, 0.0]), [1, 2], [(high, low)])
    with pytest.raises(RuntimeError, match=r"asked for \(3, 14.6\), not the run's next query"):
        steps(low, high)
    assert steps(high, low).shape == (2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="not the run's next query"):
        steps(high, low)  # asked once only
    with pytest.raises(ValueError, match="3 seeds for a batch of 2 images"):
        BrownianSteps(torch.zeros(2, 4, 3, 3), torch.tensor([14.6, 3.0, 0.0]), [1, 2, 3], [])
    # at most `window` values ahead of the steps; a run dropped mid-way (cancelled) stops its thread
    sigmas = torch.linspace(14.6, 0.1, 12)
    steps = BrownianSteps(torch.zeros(1, 4, 8, 8), sigmas, [5], list(zip(sigmas[:-1], sigmas[1:])), window=2)
    ahead = steps._ahead
    steps(sigmas[0], sigmas[1])
    time.sleep(0.5)
    assert len(ahead.values) == 2 and not ahead.done
    del steps
    gc.collect()
    with ahead.ready:
        assert ahead.ready.wait_for(lambda: ahead.done, timeout=5) and len(ahead.values) == 2
    result = main(["--steps", "3", "--repeats", "1", "--wait", "1", "--out", str(tmp_path)])
    assert [(row["batch"], row["arm"]) for row in result["rows"]] == [(batch, arm) for batch in (1, 4) for arm in (
        "DPM++ 2M SDE, generator noise", "DPM++ 2M SDE, tree asked at each step", "DPM++ 2M SDE, tree computed ahead",
        "DPM++ SDE, tree asked at each call (diffusers')", "DPM++ SDE, tree computed ahead")]
    assert all(row["ms_per_call"] >= 1 for row in result["rows"]) and (tmp_path / "brownian.json").exists()


def test_the_sgm_noise_multiplier_starts_k_diffusion_samplers_at_sqrt_one_plus_sigma_max_squared():
    """AUTOMATIC1111's sgm_noise_multiplier: a txt2img pass's noise times sqrt(1 + sigma_max^2) where its k-diffusion
    samplers start at noise x sigma_max (kiln's sigma-space schedulers: their init_noise_sigma); the multistep ones,
    stepping the variance-preserving sample from unit noise, start there already; the timestep samplers as they are;
    kiln's LCM and DDPM refuse it."""
    import math

    from orchestrator.pipeline.sampling import check_sgm, initial_noise_scale

    for name in ("Euler", "Euler a Karras", "Heun", "DPM++ SDE Karras", "LMS Exponential"):
        scheduler, _ = schedule(name, SD15_SCHEDULE, 10, seed=0)
        sigma_max = float(scheduler.sigmas[0])
        assert initial_noise_scale(name, scheduler, False) == pytest.approx(sigma_max, rel=1e-6), name
        assert initial_noise_scale(name, scheduler, True) == pytest.approx(math.sqrt(1 + sigma_max**2), rel=1e-6)
        assert check_sgm(name, True) and not check_sgm(name, False)
    for name in ("DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE", "DDIM", "UniPC"):
        scheduler, _ = schedule(name, SD15_SCHEDULE, 10, seed=0)
        assert initial_noise_scale(name, scheduler, True) == initial_noise_scale(name, scheduler, False) == \
            float(scheduler.init_noise_sigma), name
    assert not check_sgm("DDIM", True) and not check_sgm("PLMS", True)
    for name in ("LCM", "DDPM"):
        with pytest.raises(InputError, match=f"sgm_noise_multiplier: kiln's {name} starts from diffusers' noise"):
            check_sgm(name, True)


def test_dpmpp_3m_sde_and_the_discard_option_leave_out_the_next_to_last_sigma():
    """AUTOMATIC1111's discard_next_to_last_sigma (DPM++ 3M SDE's own; always_discard_next_to_last_sigma for the
    other k-diffusion samplers): the sigmas of one step more, the last above 0 left out, img2img starting on them as
    there. Samplers that discard already, the timestep samplers and a second-order sampler are not changed by the
    option; the second-order one is refused."""
    import torch

    from orchestrator.pipeline.sampling import check_discard
    from orchestrator.pipeline.sigmas import schedule_sigmas

    table = SD15_SCHEDULE
    alphas = schedule("Euler", table, 5, seed=0)[0].alphas_cumprod
    full = schedule_sigmas("Exponential", 21, alphas)  # 3M SDE's Automatic schedule, one step more
    ours, timesteps = schedule("DPM++ 3M SDE Exponential", table, 20, seed=0)
    assert np.allclose(ours.sigmas.numpy(), np.concatenate([full[:-2], full[-1:]]), rtol=1e-5)
    assert len(timesteps) == 20 and ours.num_inference_steps == 20
    for name in ("Euler", "Euler a Karras", "DPM++ 2M", "LMS", "DPM++ 2M SDE Exponential"):
        plain = schedule(name, table, 21, seed=0)[0]
        kept, timesteps = schedule(name, table, 20, seed=0, discard=True)
        assert torch.equal(kept.sigmas, torch.cat([plain.sigmas[:-2], plain.sigmas[-1:]])), name
        assert torch.equal(timesteps, plain.timesteps[:-1]), name
        _, start = schedule(name, table, 20, seed=0, start=5, discard=True)
        assert torch.equal(start, plain.timesteps[5:-1]), name
        assert check_discard(name, True) and not check_discard(name, False)
    for name in ("DPM++ 3M SDE", "DDIM", "PLMS", "UniPC"):
        assert not check_discard(name, True), name
    assert torch.equal(schedule("DDIM", table, 20, seed=0, discard=True)[1], schedule("DDIM", table, 20, seed=0)[1])
    for name in ("Heun", "DPM++ SDE Karras"):
        with pytest.raises(InputError, match=re.escape(f"cannot discard {name}'s next-to-last sigma")):
            check_discard(name, True)
    for name in ("LCM", "DDPM"):
        with pytest.raises(InputError, match=f"kiln's {name} runs diffusers' timesteps"):
            check_discard(name, True)
    with pytest.raises(InputError, match="ask for one step fewer"):  # the DDIM type runs 30 steps for 29 + 1
        schedule("Euler DDIM", table, 29, seed=0, discard=True)


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ SDE Karras"])
def test_dpmpp_sde_takes_k_diffusions_eta(name):
    """AUTOMATIC1111's eta for DPM++ SDE (k-diffusion's sample_dpmpp_sde, r = 1/2, written out here, its noise from
    the same seeded Brownian tree): at 1 diffusers' two calls a step themselves; at 0 and between, both half-steps'
    noise scaled by eta and their deterministic parts stepping to the rest, the last step Euler's."""
    import math

    import torch
    from diffusers import DPMSolverSDEScheduler
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    ours, timesteps = schedule(name, SD15_SCHEDULE, 5, seed=3)
    theirs = DPMSolverSDEScheduler.from_config(ours.config, noise_sampler_seed=3)
    theirs.set_timesteps(5)
    assert torch.equal(theirs.sigmas, ours.sigmas) and torch.equal(theirs.timesteps, timesteps)
    sample, eps = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 14, torch.randn(1, 4, 3, 3)

    def steps(scheduler, **kwargs) -> list:
        scheduler._step_index, scheduler.noise_sampler, scheduler.sample = None, None, None
        x, out = sample.clone(), []
        for t in timesteps:
            scheduler.scale_model_input(x, t)
            x = scheduler.step(eps, t, x, **kwargs).prev_sample
            out.append(x)
        return out

    expected = steps(theirs)
    assert all(torch.equal(a, b) for a, b in zip(steps(ours), expected))
    base = [float(s) for s in torch.unique_consecutive(ours.sigmas)]  # k-diffusion's sigmas, each once

    def ancestral(low, high, eta):
        up = min(high, eta * math.sqrt(high**2 * (low**2 - high**2) / low**2))
        return math.sqrt(high**2 - up**2), up

    for eta in (0.0, 0.4):
        got = steps(ours, eta_ancestral=eta)
        tree = BrownianTreeNoiseSampler(sample, min(s for s in base if s > 0), max(base), ours.noise_sampler_seed)
        x, reference = sample.double(), []
        for s, to in zip(base[:-1], base[1:]):
            denoised = x - s * eps.double()
            if to == 0:
                x = denoised
            else:
                mid = math.sqrt(s * to)
                # the tree asked where k-diffusion asks it: sigma_fn(t), sigma_fn(t + h / 2), sigma_fn(t_next)
                t, t_next = torch.tensor(s).log().neg(), torch.tensor(to).log().neg()
                at, half, end = t.neg().exp(), (t + (t_next - t) * 0.5).neg().exp(), t_next.neg().exp()
                down, up = ancestral(s, mid, eta)
                halfway = down / s * x + (1 - down / s) * denoised + tree(at, half) * up
                down, up = ancestral(s, to, eta)
                x = down / s * x + (1 - down / s) * (halfway - mid * eps.double()) + tree(at, end) * up
            reference.append(x)
        ends = [got[i] for i in range(1, len(got) - 1, 2)] + [got[-1]]  # after each step's second call, and the last
        assert all(torch.allclose(a.double(), b, atol=1e-4) for a, b in zip(ends, reference)), eta
    assert not torch.allclose(steps(ours, eta_ancestral=0.4)[-3], expected[-3], atol=1e-2)  # eta moved it


def test_a_schedule_range_upside_down_is_refused_naming_the_models():
    for settings, message in [((5.0, 2.0, 0.0), "sigma_min 5 must be below sigma_max 2 "),
                              ((20.0, 0.0, 0.0), r"sigma_min 20 must be below sigma_max 14.61 \(0 is the model's: "
                                                 r"0.02917 and 14.61\)")]:
        with pytest.raises(InputError, match=message):
            schedule("Euler Karras", SD15_SCHEDULE, 5, seed=0, settings=settings)


def test_schedule_types_that_cannot_run_as_asked_are_refused_by_name():
    """AUTOMATIC1111's DDIM type runs another step count than asked where 1000 // steps does not stride 999 evenly
    (31 for 30; 20, 25, 27, 37, 40 and 50 run as asked): a 422 naming the nearest counts that run. KL Optimal on a
    second-order sampler: diffusers' last step there assumes a final sigma of 0."""
    with pytest.raises(InputError, match=r"runs 31 steps for 30 .* use 27 or 37"):
        schedule("Euler DDIM", SD15_SCHEDULE, 30, seed=0)
    assert len(schedule("Euler DDIM", SD15_SCHEDULE, 50, seed=0)[1]) == 50
    for name in ("Heun KL Optimal", "DPM++ SDE KL Optimal"):
        with pytest.raises(UnknownSampler, match=re.escape(f"{name}: KL Optimal ends above sigma 0")):
            check_sampler(name)


@pytest.mark.parametrize("sampler, steps, strength, start", [
    ("Euler a", 20, 0.75, 4),  # AUTOMATIC1111: t_enc 15, 16 steps from sigmas[4] (diffusers: 15 from 5)
    ("DPM++ 2M Karras", 10, 0.5, 4), ("Euler a Karras", 7, 0.3, 4),
    ("Euler", 20, 1.0, 0), ("Heun", 8, 0.999, 0), ("Euler", 20, 0.01, 19),  # the lowest sigma's step
    ("Euler", 20, 0.0, 20),  # none: the init image through the VAE
    ("DDIM", 20, 0.75, 4), ("PLMS", 20, 0.01, 19),  # the same t_enc, to their own start (test_compvis.py)
    ("UniPC", 10, 0.5, 5), ("DDPM", 20, 0.01, 20),  # diffusers' int(steps x strength)
])
def test_img2img_starts_where_automatic1111_does(sampler, steps, strength, start):
    assert img2img_start(sampler, steps, strength) == start


@pytest.mark.parametrize("start", [0, 30])
def test_the_inpainting_blend_takes_each_calls_sigma_where_timesteps_repeat(start):
    """DPM++ 2M Karras at 50 steps rounds two of its timesteps to one value (steps 47 and 48). The inpainting blend
    predicts the init latents at each call's own sigma (orchestrator.pipeline.blend.coefficients): by step index,
    which schedule() sets from step 0 on as from an img2img start, not by looking the value up (the first of the
    two)."""
    import torch

    from orchestrator.pipeline.blend import coefficients

    scheduler, timesteps = schedule("DPM++ 2M Karras", SD15_SCHEDULE, 50, seed=1, start=start)
    assert len(set(timesteps.tolist())) < len(timesteps)  # the case this guards: a repeated timestep
    latents = torch.full((1, 4, 2, 2), 0.5)
    for index, t in enumerate(timesteps):
        sigma = float(scheduler.sigmas[start + index])
        alpha = (1 + sigma ** 2) ** -0.5  # the variance-preserving form of x0 + sigma eps
        assert coefficients(scheduler, t) == pytest.approx((alpha, sigma * alpha)), (start + index, sigma)
        latents = scheduler.step(torch.zeros_like(latents), t, latents).prev_sample


def test_schedule_types_only_where_they_run():
    """A sampler with a schedule of its own, or whose diffusers scheduler has none of that type, is not found, and
    the message says why; the names in SAMPLERS stay as they are."""
    assert check_sampler("DPM++ 2M Karras") is SAMPLERS["DPM++ 2M Karras"]
    assert split_schedule("Euler a Karras") == ("Euler a", "Karras") and split_schedule("Euler") == ("Euler", None)
    assert split_schedule("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    assert check_sampler("Euler Karras").overrides == SAMPLERS["Euler"].overrides | {"use_karras_sigmas": True}
    for name, reason in [("DPM++ 2M Karras Exponential", "runs its own schedule"),
                         ("DDIM Karras", "DDIM runs its own timesteps"), ("LCM Beta", "LCM runs its own timesteps"),
                         ("UniPC Exponential", "UniPC runs its own timesteps"),
                         ("Euler Turbo", "valid samplers")]:
        with pytest.raises(UnknownSampler, match=reason):
            check_sampler(name)


def test_only_masked_crop_region_follows_automatic1111():
    mask = np.zeros((100, 200), bool)
    mask[40:50, 90:110] = True  # 20 wide, 10 high
    assert crop_region(np.zeros((8, 8), bool), 4, 64, 64) is None
    left, top, right, bottom = crop_region(mask, 5, 64, 64)  # padded to 30 x 20, then squared to 30 x 30
    assert (right - left, bottom - top) == (30, 30) and left == 85 and top <= 35 and bottom >= 55
    left, top, right, bottom = crop_region(mask, 0, 128, 32)  # 4:1 -> 40 x 10, centred on the mask
    assert (right - left, bottom - top) == (40, 10) and (left, top) == (80, 40)
    left, top, right, bottom = crop_region(mask, 80, 64, 64)  # wider than the image allows: clamped inside
    assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
    # 21 x 10 for 64 x 48: 15.75 high wanted, grown by 5 (rounded down, as there; not to 16), 2 above and 3 below
    mask[40:50, 110] = True
    assert crop_region(mask, 0, 64, 48) == (90, 38, 111, 53)


def test_only_masked_crops_and_pastes_back_as_automatic1111():
    """The crop (and its mask) goes to width x height as "resize and fill" (resize_image(2), as there: the box's
    aspect is only near the request's) and the result comes back into the box as "crop and resize"
    (resize_image(1), its apply_overlay); outside the mask the init image stays. `generate` here stands for the
    whole-picture generation of the crop (tested on its own elsewhere): it returns a known image."""
    from kiln.masks import shaped
    from orchestrator.pipeline import GenerationResult
    from orchestrator.pipeline.inpaint import only_masked

    rng = np.random.default_rng(5)
    original = Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8))
    mask = Image.new("L", (120, 80), 0)
    mask.paste(255, (40, 30, 61, 40))  # 21 x 10: grown to 21 x 15 for 64 x 48 (1.4, not 1.33)
    generated = rng.integers(0, 256, (1, 48, 64, 3), dtype=np.uint8)
    uncorrected = rng.integers(0, 256, (1, 48, 64, 3), dtype=np.uint8)  # (an image kept from before a step)
    inner = []

    def generate(request):
        inner.append(request)
        return GenerationResult(images=generated, seeds=[1], before={"color-correction": uncorrected,
                                                                     "overlay": generated})

    result = only_masked(generate, Img2ImgRequest(prompt="x", width=64, height=48, init_image=encode(original),
                                                  mask=encode(mask), mask_blur=0, inpaint_full_res=True,
                                                  overlay=True, intermediates=("color-correction", "mask", "overlay")))
    assert inner[0].intermediates == ("color-correction", "overlay")  # (the mask: the whole picture's, made here)
    box = (40, 28, 61, 43)
    assert result.info["inpaint_region"] == list(box)
    crop = np.asarray(Image.open(io.BytesIO(inner[0].init_image)))
    assert np.array_equal(crop, np.asarray(shaped(original.crop(box), 64, 48, 2)))
    assert not np.array_equal(crop, np.asarray(original.crop(box).resize((64, 48), Image.Resampling.LANCZOS)))
    masked = np.asarray(mask) > 0
    back = np.asarray(original).copy()
    back[28:43, 40:61] = np.asarray(shaped(Image.fromarray(generated[0]), 21, 15, 1))
    # AUTOMATIC1111's mask_for_overlay and the image before the overlay (for the mask pictures): the box's all of it
    assert np.array_equal(result.before["mask"][0], np.asarray(mask))
    assert np.array_equal(result.before["overlay"][0], back)
    assert np.array_equal(result.images[0][masked], back[masked])
    assert np.array_equal(result.images[0][~masked], np.asarray(original)[~masked])
    # the images kept from before a step go back into the box as the images do
    back[28:43, 40:61] = np.asarray(shaped(Image.fromarray(uncorrected[0]), 21, 15, 1))
    kept = result.before["color-correction"][0]
    assert np.array_equal(kept[masked], back[masked]) and np.array_equal(kept[~masked], np.asarray(original)[~masked])


def _their_expand_crop_region(box, width, height, image_width, image_height):
    """AUTOMATIC1111's masking.expand_crop_region, written out."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        diff = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = y1 - diff // 2, y2 + diff - diff // 2
        if y2 >= image_height:
            y1, y2 = y1 - (y2 - image_height), y2 - (y2 - image_height)
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, image_height)
    else:
        diff = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = x1 - diff // 2, x2 + diff - diff // 2
        if x2 >= image_width:
            x1, x2 = x1 - (x2 - image_width), x2 - (x2 - image_width)
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, image_width)
    return x1, y1, x2, y2


def test_only_masked_crop_region_is_automatic1111s_on_random_masks():
    rng = np.random.default_rng(3)
    for _ in range(300):
        image_h, image_w = (int(v) for v in rng.integers(8, 120, 2))
        mask = np.zeros((image_h, image_w), bool)
        top, left = int(rng.integers(0, image_h)), int(rng.integers(0, image_w))
        mask[top:top + int(rng.integers(1, 40)), left:left + int(rng.integers(1, 40))] = True
        padding, width, height = int(rng.integers(0, 20)), int(rng.choice([64, 96, 512])), int(rng.choice([48, 64]))
        rows, cols = np.nonzero(mask)
        box = (max(int(cols.min()) - padding, 0), max(int(rows.min()) - padding, 0),
               min(int(cols.max()) + 1 + padding, image_w), min(int(rows.max()) + 1 + padding, image_h))
        assert crop_region(mask, padding, width, height) == _their_expand_crop_region(box, width, height, image_w,
                                                                                     image_h)


def test_openvino_telemetry_is_off_in_our_processes():
    """import openvino would fork a sender process (it deadlocked inside Triton's stubs); kiln turns it off."""
    import subprocess
    import sys

    code = ("import kiln, openvino, nncf; from openvino.tools.ovc import telemetry_utils; "
            "from nncf.telemetry import wrapper; "
            "print(telemetry_utils.tm.__name__, type(wrapper.telemetry).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["openvino.tools.ovc.telemetry_stub", "MagicMock"]


def test_runtimes_told_no_thread_count_take_the_processes_share(tmp_path, monkeypatch):
    """kiln.machine.threads: OMP_NUM_THREADS where set (how processes share a machine), else every core this process
    may run on; a session told 0 threads (a build's default) takes it, one told a count takes that."""
    import onnx
    from onnx import TensorProto, helper

    from kiln import machine
    from kiln.runtime import Session, SessionOptions

    for unset in (None, "", "0", "-2", "many"):  # (not a count: every core)
        if unset is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert machine.threads() == machine.cores() >= 1
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert machine.threads() == 3
    for told, threads in ((0, 3), (1, 1)):
        session = Session(SessionOptions("onnxruntime", tmp_path / "m.onnx", threads=told))
        assert session._ort.get_session_options().intra_op_num_threads == threads
        assert session.run({"x": np.ones(1, np.float32)}, ["y"])["y"] == 1
