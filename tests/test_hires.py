"""AUTOMATIC1111's hires fix: the first pass, its upscale (latent modes, image upscalers), the second pass.

Parity: diffusers has no hires pipeline, so the reference composes diffusers' own: StableDiffusionPipeline to
latents (or to a picture), the upscale AUTOMATIC1111 does, then StableDiffusionImg2ImgPipeline at the larger size
with the seed's fresh generator, running the second pass's steps of its schedule.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from kiln.errors import InputError
from orchestrator.pipeline import ControlNetUnit, HiresFix, Img2ImgRequest, Txt2ImgRequest, make_scheduler
from orchestrator.pipeline.hires import second_pass_steps
from tests.conftest import encode, png_header_only

pytestmark = pytest.mark.slow
BASE = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=4, cfg_scale=7.5, seed=77, width=64, height=64)


@pytest.fixture(scope="module")
def pipes(sd_checkpoint):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    first = StableDiffusionPipeline.from_pretrained(str(sd_checkpoint), safety_checker=None)
    second = StableDiffusionImg2ImgPipeline(**first.components)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    return first, second, dict(first.scheduler.config)


def _reference(pipes, sampler: str, fix: HiresFix, upscale) -> np.ndarray:
    """diffusers' first pass, `upscale` (latents or picture -> the second pass's image argument), diffusers' img2img."""
    first, second, config = pipes
    first.scheduler = make_scheduler(sampler, config)
    picture = upscale.__name__.endswith("picture")
    out = first(BASE["prompt"], negative_prompt=BASE["negative_prompt"], num_inference_steps=BASE["steps"],
                guidance_scale=BASE["cfg_scale"], height=64, width=64,
                generator=torch.Generator().manual_seed(BASE["seed"]), output_type="pil" if picture else "latent")
    total, run = second_pass_steps(fix, BASE["steps"])
    second.scheduler = make_scheduler(fix.sampler or sampler, config)
    image = second(BASE["prompt"], negative_prompt=BASE["negative_prompt"], image=upscale(out.images),
                   num_inference_steps=total, strength=(run + 0.5) / total, guidance_scale=BASE["cfg_scale"],
                   generator=torch.Generator().manual_seed(BASE["seed"]), output_type="np").images
    return (image * 255).round().astype(np.uint8)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras"])
def test_latent_hires_fix_matches_diffusers(local, pipes, sampler):
    """"Latent": the first pass's latents interpolated (bilinear) to twice the size, then the second pass."""
    fix = HiresFix(scale=2, upscaler="Latent", denoising_strength=0.6, steps=3)

    def latents_upscaled(latents):
        return torch.nn.functional.interpolate(latents, size=(latents.shape[2] * 2, latents.shape[3] * 2),
                                               mode="bilinear", antialias=False)

    result = local.txt2img(Txt2ImgRequest(**BASE, sampler=sampler, hires=fix))
    assert result.images.shape == (1, 128, 128, 3)
    assert _max_diff(result.images, _reference(pipes, sampler, fix, latents_upscaled)) <= 2
    assert result.info["hires_upscale"] == 2 and result.info["hires_steps"] == 3 and result.info["width"] == 64


def test_image_upscaler_hires_fix_matches_diffusers(local, pipes):
    """"Lanczos": the first pass decoded, resized with Lanczos, encoded again (the seed's generator samples it)."""
    from PIL import Image

    fix = HiresFix(scale=2, upscaler="Lanczos", denoising_strength=0.5, sampler="Euler")

    def lanczos_picture(images):
        return images[0].resize((128, 128), resample=Image.Resampling.LANCZOS)

    result = local.txt2img(Txt2ImgRequest(**BASE, sampler="Euler a", hires=fix))
    assert _max_diff(result.images, _reference(pipes, "Euler a", fix, lanczos_picture)) <= 2
    assert result.info["hires_sampler"] == "Euler" and result.info["hires_upscaler"] == "Lanczos"


def test_resize_targets_follow_automatic1111(local):
    """hr_resize_x alone keeps the aspect ratio; both scale to cover, then the latents are cropped to them."""
    wide = Txt2ImgRequest(**BASE | {"width": 64, "height": 32, "steps": 2})
    assert local.txt2img(replace(wide, hires=HiresFix(resize_x=128))).images.shape == (1, 64, 128, 3)
    cropped = local.txt2img(replace(wide, hires=HiresFix(resize_x=96, resize_y=64, upscaler="Latent (nearest)")))
    assert cropped.images.shape == (1, 64, 96, 3) and cropped.info["hires_resize"] == "96x64"


def test_the_second_pass_matters_and_progress_counts_both_passes(local):
    """Its prompt, strength and upscaler change the image; progress runs over both passes' steps, in order."""
    request = Txt2ImgRequest(**BASE, sampler="Euler", hires=HiresFix(denoising_strength=0.5))
    seen = []
    plain = local.txt2img(request, progress=lambda step, total, _latents: seen.append((step, total)))
    total, run = second_pass_steps(request.hires, request.steps)
    assert seen == [(i, request.steps + run) for i in range(1, request.steps + run + 1)] and total > run
    for other in (HiresFix(denoising_strength=0.5, prompt="a photo of a dog"), HiresFix(denoising_strength=0.9),
                  HiresFix(denoising_strength=0.5, upscaler="Nearest")):
        assert _max_diff(local.txt2img(replace(request, hires=other)).images, plain.images) > 0, other
    asked = []  # stop_early is asked before each step: stop at the second pass's second step
    stopped = local.txt2img(request, stop_early=lambda: asked.append(1) or len(asked) > request.steps + 1)
    assert stopped.images.shape == (1, 128, 128, 3) and stopped.info["stopped_at_step"] == request.steps + 1


def test_a_given_first_pass_is_redrawn_as_the_pass_it_stands_for(local):
    """firstpass_image (AUTOMATIC1111's Upscale button): the first pass is not run; an image upscaler takes the given
    pixels, so the PNG of a first pass gives exactly the hires fix that ran that pass. Progress counts the second
    pass alone; a batch redraws the one picture with each image's seed (a batch's first passes are encoded each with
    its own generator: it once failed there)."""
    from PIL import Image

    request = Txt2ImgRequest(**BASE, sampler="Euler", hires=HiresFix(upscaler="Lanczos", denoising_strength=0.5,
                                                                      steps=2))
    png = encode(Image.fromarray(local.txt2img(replace(request, hires=None)).images[0]))
    seen = []
    given = local.txt2img(replace(request, hires=replace(request.hires, first_pass=png)),
                          progress=lambda step, total, _latents: seen.append((step, total)))
    assert np.array_equal(given.images, local.txt2img(request).images) and seen == [(1, 2), (2, 2)]
    batch = local.txt2img(replace(request, batch_size=2, hires=replace(request.hires, first_pass=png)))
    assert batch.images.shape == (2, 128, 128, 3) and _max_diff(batch.images[:1], given.images) <= 1
    assert _max_diff(batch.images[0], batch.images[1]) > 0
    whole = local.txt2img(replace(request, batch_size=2))
    assert _max_diff(whole.images[:1], given.images) <= 1 and _max_diff(whole.images[1], batch.images[1]) > 0


def test_a_given_first_pass_in_a_latent_mode_is_its_encoding_upscaled(local, pipes):
    """A latent mode encodes the given first pass (the seed's generator samples it, then draws the second pass's
    noise), interpolates the latents and runs the second pass: diffusers' VAE and img2img, composed."""
    from PIL import Image

    from kiln.imaging import vae_input
    from kiln.paths import SAMPLE_IMAGES

    photo = Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    fix = HiresFix(upscaler="Latent (bicubic)", denoising_strength=0.6, steps=2, first_pass=encode(photo))
    result = local.txt2img(Txt2ImgRequest(**BASE, sampler="Euler", hires=fix))
    first, second, config = pipes
    generator = torch.Generator().manual_seed(BASE["seed"])
    with torch.no_grad():
        posterior = first.vae.encode(torch.from_numpy(vae_input(fix.first_pass, 64, 64)[None])).latent_dist
    latents = posterior.sample(generator) * first.vae.config.scaling_factor
    latents = torch.nn.functional.interpolate(latents, size=(latents.shape[2] * 2, latents.shape[3] * 2),
                                              mode="bicubic")
    total, run = second_pass_steps(fix, BASE["steps"])
    second.scheduler = make_scheduler("Euler", config)
    image = second(BASE["prompt"], negative_prompt=BASE["negative_prompt"], image=latents, num_inference_steps=total,
                   strength=(run + 0.5) / total, guidance_scale=BASE["cfg_scale"], generator=generator,
                   output_type="np").images
    assert _max_diff(result.images, (image * 255).round().astype(np.uint8)) <= 2


@pytest.mark.parametrize("fix, extra, message", [
    (HiresFix(upscaler="ESRGAN_4x"), {}, "hr_upscaler 'ESRGAN_4x' is not an upscaler of this server; valid: Latent"),
    (HiresFix(scale=4), {}, r"hr_scale 4 of a 64x64 image gives 256x256: .* within the built profile \[32, 128\]"),
    (HiresFix(scale=1.3), {}, r"gives 82x82: .*multiples of 8 .*upscaled to 83x83 first"),
    (HiresFix(denoising_strength=0), {}, r"denoising_strength \(of the hires pass\) must be in \(0, 1\]"),
    (HiresFix(sampler="Euler z"), {}, "Sampler not found"),
    (HiresFix(prompt="a <hypernet:x:1>"), {}, "hr_prompt: <hypernet:x:1> is an extra-network tag"),
    (HiresFix(prompt="a <lora:x:1>"), {}, "<lora:x>: no such LoRA"),
    (HiresFix(steps=-1), {}, "hr_second_pass_steps must be a non-negative integer"),
    (HiresFix(first_pass=b"png"), {}, "firstpass_image: not an image this server reads"),
    (HiresFix(first_pass=png_header_only(32, 64)), {},
     r"firstpass_image is 32x64, not the request's width x height \(64x64\)"),
])
def test_bad_hires_requests_are_named(local, fix, extra, message):
    with pytest.raises(InputError, match=message):
        local.txt2img(Txt2ImgRequest(**BASE | extra, hires=fix))


def test_controlnet_units_act_in_both_passes(local, edge_png):
    """sd-webui-controlnet's hr_option "Both": every UNet call of both passes takes the unit's residuals (in process:
    the ControlNet, then the UNet that takes them), on the control image at each pass's size."""
    calls = []

    def counting(graph, inputs):
        calls.append((graph.key, inputs["sample"].shape[-1]))
        return graph(inputs)

    request = Txt2ImgRequest(**BASE, sampler="Euler", controlnet=ControlNetUnit(image=edge_png, weight=0.8),
                             hires=HiresFix(denoising_strength=0.5, steps=2))
    result = local.txt2img(request, unet_call=counting)
    assert result.images.shape == (1, 128, 128, 3)
    keys = {key for key, _ in calls}
    assert keys == {"sd_unet_control"} and sorted({width for _, width in calls}) == [32, 64], calls
    plain = local.txt2img(replace(request, controlnet=None))
    assert _max_diff(result.images, plain.images) > 2


def test_a_units_hr_option_picks_its_passes(local, edge_png):
    """sd-webui-controlnet's hr_option: "Low res only" (1) acts in the first pass alone, "High res only" (2) in the
    hires pass alone, and without the hires fix in none (its disabled_by_hr_option), the image then the plain one."""
    def passes(request) -> dict[int, set[str]]:
        calls: dict[int, set[str]] = {}

        def counting(graph, inputs):
            calls.setdefault(inputs["sample"].shape[-1], set()).add(graph.key)
            return graph(inputs)

        local.txt2img(request, unet_call=counting)
        return calls

    fix = HiresFix(denoising_strength=0.5, steps=2)
    for option, first, second in ((1, "sd_unet_control", "sd_unet"), (2, "sd_unet", "sd_unet_control")):
        unit = ControlNetUnit(image=edge_png, weight=0.8, hr_option=option)
        assert passes(Txt2ImgRequest(**BASE, sampler="Euler", controlnet=unit, hires=fix)) == \
            {32: {first}, 64: {second}}, option
    request = Txt2ImgRequest(**BASE, sampler="Euler", controlnet=ControlNetUnit(image=edge_png, hr_option=2))
    assert passes(request) == {32: {"sd_unet"}}
    assert _max_diff(local.txt2img(request).images, local.txt2img(replace(request, controlnet=None)).images) == 0


@pytest.fixture(scope="module")
def edge_png() -> bytes:
    import io

    from PIL import Image

    edges = Image.new("RGB", (64, 64), "black")
    edges.paste((255, 255, 255), (10, 10, 54, 14))
    edges.paste((255, 255, 255), (30, 14, 34, 54))
    buffer = io.BytesIO()
    edges.save(buffer, "PNG")
    return buffer.getvalue()


def test_img2img_has_no_hires_fix(local):
    with pytest.raises(InputError, match="the hires fix \\(enable_hr\\) is txt2img's"):
        local.img2img(Img2ImgRequest(**BASE, init_image=b"png", hires=HiresFix()))


# -- the SD upscale script ------------------------------------------------------------------------------------------
def test_sd_upscale_tiles_follow_automatic1111_and_combine_back():
    """split_grid's layout (tiles spread evenly, the last flush with the edge), and combine_grid of untouched tiles
    gives the picture back exactly (the blends mix equal pixels)."""
    from PIL import Image

    from orchestrator.pipeline.tiles import combine, split

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))
    grid = split(picture, 64, 64, 16)
    assert [len(row) for row in grid] == [4, 4, 4]  # ceil((200 - 16) / 48), ceil((150 - 16) / 48)
    assert [t.x for t in grid[0]] == [0, 45, 90, 136] and [row[0].y for row in grid] == [0, 43, 86]
    assert np.array_equal(np.asarray(combine(grid, 200, 150, 16)), np.asarray(picture))


def test_sd_upscale_redraws_each_tile_with_its_seed(local):
    """The init image upscaled (Lanczos x2), cut into 64x64 tiles (overlap 16), tile k redrawn by img2img with
    seed + k: the first tile's corner no other tile covers is that img2img's image of that crop."""
    import io

    from PIL import Image

    from orchestrator.pipeline import SDUpscale

    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    init.save(buffer, "PNG")
    request = Img2ImgRequest(prompt="a cat", init_image=buffer.getvalue(), steps=2, seed=40, width=64, height=64,
                             denoising_strength=0.5, sd_upscale=SDUpscale(overlap=16, upscaler="Lanczos", scale=2))
    seen = []
    result = local.img2img(request, progress=lambda step, total, _latents: seen.append((step, total)))
    assert result.images.shape == (1, 128, 128, 3) and result.seeds == [40]
    # 9 tiles of two steps each (AUTOMATIC1111's t_enc + 1 at strength 0.5 of 2 steps)
    assert seen[-1] == (18, 18) and result.info["sd_upscale_upscaler"] == "Lanczos"
    big = init.resize((128, 128), Image.Resampling.LANCZOS)
    crop = io.BytesIO()
    big.crop((0, 0, 64, 64)).save(crop, "PNG")
    first = local.img2img(replace(request, init_image=crop.getvalue(), sd_upscale=None))
    assert np.array_equal(result.images[0, :32, :32], first.images[0, :32, :32])
    with pytest.raises(InputError, match="upscaler 'ESRGAN' is not one of this server's"):
        local.img2img(replace(request, sd_upscale=SDUpscale(upscaler="ESRGAN")))
    with pytest.raises(InputError, match="smaller than a tile"):
        local.img2img(replace(request, sd_upscale=SDUpscale(upscaler="None"), width=96, height=96))
