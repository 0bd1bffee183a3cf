"""The denoising loop matches diffusers' own pipelines (tiny seeded weights, fp32), in process and through Triton.

Parity with diffusers runs on the in-process components (the repository's ONNX Runtime sessions,
seconds each); a smaller set goes through the real Triton and must give the very same images,
which proves the transport (ensembles, per-row scalars, batching, error mapping).
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from build.sd import SDBuildOptions, build_sd
from build.sd.weights import write_sd_checkpoint
from kiln.control import control_image
from kiln.errors import InputError, KilnError
from kiln.imaging import vae_input
from kiln.infotext import parameters_text
from kiln.masks import inpaint_mask
from kiln.paths import SAMPLE_IMAGES
from kiln.triton_server import free_port
from orchestrator.pipeline import (
    Cancelled,
    ControlNetUnit,
    HiresFix,
    Img2ImgRequest,
    Pipeline,
    Txt2ImgRequest,
    make_scheduler,
)
from tests.conftest import IMAGES, a1111_inpainting, diffusers_strength, latent_keep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_pipe(sd_checkpoint):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_checkpoint), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)  # the checkpoint's own config: each sampler starts from it


def _as_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)  # diffusers' own numpy_to_pil rounding


def _diffusers_image(reference, sampler: str, prompt: str, negative: str, steps: int, cfg: float, seed: int,
                     size=(64, 64)) -> np.ndarray:
    pipe, checkpoint_scheduler_config = reference
    pipe.scheduler = make_scheduler(sampler, checkpoint_scheduler_config, seed=seed)  # DPM++ SDE's noise: seeded
    return _as_uint8(pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg,
                          height=size[0], width=size[1], generator=torch.Generator().manual_seed(seed),
                          output_type="np").images)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def mask_png() -> bytes:
    """White (repaint) rectangle in the middle of a black (keep) 64x64 mask."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 20, 48, 52))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    return buffer.getvalue()


# -- parity with diffusers, in process ---------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "DDIM", "Heun", "LMS", "UniPC", "DPM++ SDE"])
def test_txt2img_matches_diffusers(local, reference_pipe, sampler):
    result = local.txt2img(Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=6,
                                          sampler=sampler, cfg_scale=7.5, seed=1234, width=64, height=64))
    expected = _diffusers_image(reference_pipe, sampler, "a photo of a cat", "blurry", 6, 7.5, 1234)
    assert result.images.shape == (1, 64, 64, 3) and result.images.dtype == np.uint8
    assert _max_diff(result.images, expected) <= 2, sampler
    assert result.seeds == [1234] and result.info["sampler"] == sampler


def _a1111_sigmas(kind: str, steps: int, alphas_cumprod) -> list[float]:
    """AUTOMATIC1111 1.10's sigmas of three of its schedule types (modules/sd_schedulers.py), written out."""
    table = np.sqrt((1 - alphas_cumprod.double().numpy()) / alphas_cumprod.double().numpy())
    if kind == "SGM Uniform":
        t = np.linspace(999, 0, steps + 1)[:-1]
        return [*np.exp(np.interp(t, np.arange(1000), np.log(table))), 0.0]
    if kind == "KL Optimal":
        i = np.arange(steps + 1) / steps
        return list(np.tan(i * np.arctan(table[0]) + (1 - i) * np.arctan(table[-1])))
    published = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]  # Align Your Steps
    return [*np.exp(np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, 11), np.log(published[::-1])))[::-1], 0.0]


@pytest.mark.parametrize("kind", ["SGM Uniform", "KL Optimal", "Align Your Steps"])
def test_schedule_types_match_diffusers_euler_on_automatic1111s_sigmas(local, reference_pipe, kind):
    """kiln's "Euler <type>" against diffusers' own pipeline and Euler scheduler handed AUTOMATIC1111's sigmas for
    that type (its `sigmas` argument): the schedule and its stepping, end to end."""
    from diffusers import EulerDiscreteScheduler

    pipe, config = reference_pipe
    pipe.scheduler = EulerDiscreteScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    sigmas = _a1111_sigmas(kind, 6, pipe.scheduler.alphas_cumprod)
    expected = _as_uint8(pipe("a photo of a cat", negative_prompt="blurry", sigmas=sigmas, guidance_scale=7.5,
                              height=64, width=64, generator=torch.Generator().manual_seed(1234),
                              output_type="np").images)
    result = local.txt2img(Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=6,
                                          sampler=f"Euler {kind}", cfg_scale=7.5, seed=1234, width=64, height=64))
    assert _max_diff(result.images, expected) <= 2, kind
    plain = local.txt2img(Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=6,
                                         sampler="Euler", cfg_scale=7.5, seed=1234, width=64, height=64))
    assert _max_diff(plain.images, expected) > 2  # another schedule: another image


def test_cfg_one_has_no_negative_branch_and_non_square_sizes(local, reference_pipe):
    calls = []

    def counting(graph, inputs):
        calls.append(len(inputs["sample"]))
        return graph(inputs)

    result = local.txt2img(Txt2ImgRequest(prompt="a cat", steps=3, sampler="Euler", cfg_scale=1.0, seed=7, width=96,
                                          height=64), unet_call=counting)
    assert calls == [1, 1, 1]  # batch of one: no unconditional half at scale 1
    expected = _diffusers_image(reference_pipe, "Euler", "a cat", "", 3, 1.0, 7, size=(64, 96))
    assert _max_diff(result.images, expected) <= 2


def test_emphasis_of_one_is_the_plain_prompt_and_other_weights_change_the_image(local):
    """AUTOMATIC1111's emphasis: "(cat:1.0)" is "cat" exactly; (cat:1.4) and [cat] move the image; BREAK too."""
    def image(prompt: str) -> np.ndarray:
        return local.txt2img(Txt2ImgRequest(prompt=prompt, negative_prompt="blurry", steps=3, seed=3, width=64,
                                            height=64)).images

    plain = image("a photo of a cat")
    assert np.array_equal(image("a photo of a (cat:1.0)"), plain)
    for other in ("a photo of a (cat:1.4)", "a photo of a [cat]", "a photo of BREAK a cat"):
        assert _max_diff(image(other), plain) > 0, other


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip_matches_diffusers(local, reference_pipe, clip_skip):
    """AUTOMATIC1111's CLIP_stop_at_last_layers N is diffusers' clip_skip N - 1 (the two count differently).
    AUTOMATIC1111 skips layers for the negative prompt too, diffusers' pipeline only for the prompt; so both
    embeddings are made here the way diffusers' encode_prompt makes them with clip_skip (the hidden state
    clip_skip + 1 from the end, through the final layer norm). Its own code path reaches the norm through
    `text_model`, which transformers 5 removed."""
    pipe, config = reference_pipe
    pipe.scheduler = make_scheduler("Euler", config)

    def embed(text: str) -> torch.Tensor:
        ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip - 1 + 1)]
        return getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(hidden)

    with torch.inference_mode():
        positive, negative = embed("a photo of a cat"), embed("blurry")
    expected = _as_uint8(pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=4,
                              guidance_scale=7.5, height=64, width=64, generator=torch.Generator().manual_seed(5),
                              output_type="np").images)
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=4, sampler="Euler",
                             cfg_scale=7.5, seed=5, width=64, height=64, clip_skip=clip_skip)
    result = local.txt2img(request)
    assert _max_diff(result.images, expected) <= 2
    assert _max_diff(result.images, local.txt2img(replace(request, clip_skip=1)).images) > 2  # it matters
    assert result.info["clip_skip"] == clip_skip


def test_euler_churn_matches_diffusers(local, reference_pipe):
    """s_churn/s_tmin/s_tmax/s_noise reach diffusers' EulerDiscreteScheduler.step (k-diffusion's sample_euler, which
    AUTOMATIC1111 runs); diffusers' pipeline never passes them, so its scheduler's step gets them bound here."""
    import functools

    pipe, config = reference_pipe
    churn = dict(s_churn=0.8, s_tmin=0.5, s_tmax=10.0, s_noise=1.003)
    pipe.scheduler = make_scheduler("Euler", config)
    pipe.scheduler.step = functools.partial(pipe.scheduler.step, **churn)
    expected = _as_uint8(pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5,
                              height=64, width=64, generator=torch.Generator().manual_seed(6), output_type="np").images)
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=5, sampler="Euler",
                             cfg_scale=7.5, seed=6, width=64, height=64, **churn)
    result = local.txt2img(request)
    assert _max_diff(result.images, expected) <= 2
    assert _max_diff(result.images, local.txt2img(replace(request, s_churn=0.0)).images) > 2  # it matters
    with pytest.raises(InputError, match=r"s_churn 0.8: the Euler a sampler has no churn \(samplers that take it: "
                                         r"Euler\)"):
        local.txt2img(replace(request, sampler="Euler a"))
    with pytest.raises(InputError, match="s_noise must be a non-negative number"):
        local.txt2img(replace(request, s_noise=float("nan")))


def test_seeds_follow_automatic1111(local):
    pair = local.txt2img(Txt2ImgRequest(prompt="a cat", steps=2, seed=100, batch_size=2, width=64, height=64))
    assert pair.seeds == [100, 101]
    single = local.txt2img(Txt2ImgRequest(prompt="a cat", steps=2, seed=101, width=64, height=64))
    assert _max_diff(pair.images[1:], single.images) <= 1
    drawn = local.txt2img(Txt2ImgRequest(prompt="a cat", steps=1, seed=-1, width=64, height=64))
    assert 0 <= drawn.seeds[0] < 2**32 and drawn.info["seed"] == drawn.seeds[0]


@pytest.mark.parametrize("source", ["NV", "GPU"])
def test_the_nv_and_gpu_sources_draw_what_torch_draws_on_an_nvidia_gpu_through_the_whole_run(local, reference_pipe,
                                                                                              source):
    """AUTOMATIC1111's NV and GPU sources: the initial noise is the seed's first Philox draw and an ancestral
    sampler's noise the draws after it, so diffusers given that generator (and that noise) gives the same image."""
    from orchestrator.pipeline.noise import Philox

    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=4, sampler="Euler a",
                             cfg_scale=7.5, seed=77, width=64, height=64, randn_source=source)
    result = local.txt2img(request)
    pipe, config = reference_pipe
    pipe.scheduler = make_scheduler("Euler a", config)
    generator, side = Philox(77), 64 // pipe.vae_scale_factor
    expected = _as_uint8(pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5,
                              height=64, width=64, latents=generator.randn((1, 4, side, side)), generator=generator,
                              output_type="np").images)
    assert generator.get_state() == (77, 0, 5)  # the initial noise and four steps' noise
    assert _max_diff(result.images, expected) <= 2
    assert result.info["rng"] == "NV" if source == "NV" else "rng" not in result.info  # GPU: AUTOMATIC1111 names none
    cpu = local.txt2img(replace(request, randn_source="CPU"))
    assert _max_diff(cpu.images, result.images) > 8 and cpu.info["rng"] == "CPU"
    with pytest.raises(InputError, match="randn_source .RNG. must be one of GPU, CPU, NV, got 'XPU'"):
        local.txt2img(replace(request, randn_source="XPU"))


def test_long_prompts_are_chunked_not_cut(local):
    request = Txt2ImgRequest(prompt="a cat", width=64, height=64)
    step = local.encode_prompts(["a photo of a cat " * 30, ""], request).at(0)  # each its own length: two UNet calls
    assert step.negative.context.shape[:2] == (1, 77 * 2) and step.prompt.context.shape[:2] == (1, 77)
    padded = local.encode_prompts(["a photo of a cat " * 30, ""], replace(request, pad_conds="empty_chunks")).at(0)
    assert padded.context.shape[:2] == (2, 77 * 2)


@pytest.mark.parametrize("field, value, message", [
    ("width", 60, "multiple of 8"),
    ("height", 256, "within the built profile"),
    ("steps", 0, "steps must be between"),
    ("steps", 10_000, "steps must be between"),
    ("cfg_scale", float("nan"), "cfg_scale must be a finite"),
    ("cfg_scale", float("inf"), "cfg_scale must be a finite"),
    ("sampler", "Euler z", "Sampler not found.*valid samplers: Euler, Euler a"),
    ("seed", 2**32, "seed must be"),
    ("prompt", "cat " * 5000, "prompt of 20000 characters exceeds"),
    ("clip_skip", 0, r"clip_skip \(CLIP_stop_at_last_layers\) must be 1 to 5, got 0"),
    ("clip_skip", 6, "must be 1 to 5"),
])
def test_bad_requests_are_clear_errors(local, field, value, message):
    with pytest.raises(InputError, match=message):
        local.txt2img(Txt2ImgRequest(**({"prompt": "a cat", "width": 64, "height": 64} | {field: value})))
    ok = local.txt2img(Txt2ImgRequest(prompt="ok", steps=1, seed=1, width=64, height=64))
    assert ok.images.shape == (1, 64, 64, 3)


def test_plms_runs_its_ladder_with_one_unet_call_per_entry(local):
    """AUTOMATIC1111's PLMS (no Runge-Kutta warm-up, as diffusers' PNDM has): one call per entry of its ladder, the
    first step evaluating twice and the last entry none (2 steps: 2 calls, 3: 4, its ladder clipped at 999; 8: 8), not
    the warm-up's 13 calls for 4 steps. At 1 step its ladder has one entry and no call: refused."""
    with pytest.raises(InputError, match="steps: PLMS runs no denoising step at steps 1"):
        local.txt2img(Txt2ImgRequest(prompt="a cat", steps=1, sampler="PLMS", width=64, height=64))
    for steps, expected in ((2, 2), (3, 4), (8, 8)):
        calls = []

        def counting(graph, inputs, calls=calls):
            calls.append(len(inputs["sample"]))
            return graph(inputs)

        result = local.txt2img(Txt2ImgRequest(prompt="a cat", steps=steps, sampler="PLMS", cfg_scale=1.0, seed=2,
                                              width=64, height=64), unet_call=counting)
        assert len(calls) == expected and result.images.shape == (1, 64, 64, 3), steps


def test_progress_and_cancellation(local):
    seen = []
    local.txt2img(Txt2ImgRequest(prompt="a cat", steps=3, seed=1, width=64, height=64),
                  progress=lambda step, total, latents: seen.append((step, total, latents.shape)))
    assert seen == [(1, 3, (1, 4, 32, 32)), (2, 3, (1, 4, 32, 32)), (3, 3, (1, 4, 32, 32))]
    with pytest.raises(Cancelled, match="after 2 of 5 steps"):
        local.txt2img(Txt2ImgRequest(prompt="a cat", steps=5, seed=1, width=64, height=64),
                      progress=lambda *a: None, cancelled=lambda: len(seen) >= 5 or bool(seen.append(0)))


@pytest.mark.parametrize("sampler, strength", [("Euler a", 0.6), ("DDPM", 0.75), ("DPM++ 2M Karras", 0.5)])
def test_img2img_matches_diffusers(local, reference_pipe, init_image_png, sampler, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, checkpoint_scheduler_config = reference_pipe
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = make_scheduler(sampler, checkpoint_scheduler_config)
    expected = _as_uint8(img2img("a photo of a cat", image=Image.open(io.BytesIO(init_image_png)),
                                 strength=diffusers_strength(sampler, 10, strength), num_inference_steps=10,
                                 guidance_scale=7.5, negative_prompt="blurry",
                                 output_type="np", generator=torch.Generator().manual_seed(99)).images)
    result = local.img2img(Img2ImgRequest(
        prompt="a photo of a cat", negative_prompt="blurry", steps=10, sampler=sampler, cfg_scale=7.5, seed=99,
        width=64, height=64, init_image=init_image_png, denoising_strength=strength))
    assert _max_diff(result.images, expected) <= 2, sampler
    assert result.info["denoising_strength"] == strength


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("sampler", "strength"), [("DDIM", 0.6), ("PLMS", 0.75)])
def test_img2img_with_automatic1111s_timestep_samplers(local, reference_pipe, init_image_png, mask_png, sampler,
                                                       strength, masked):
    """AUTOMATIC1111's DDIM and PLMS on diffusers' own components: its loop as tests/test_compvis.py writes it out,
    from the init latents (diffusers' sample of them, then the noise, as kiln draws them) noised to A[t_enc].
    Inpainting (`masked`): the model sees the clean init latents where the latent mask keeps them (its
    CFGDenoiserTimesteps), and the last blend."""
    from tests.test_compvis import _their_loop, _their_timesteps

    pipe, _ = reference_pipe
    steps, generator = 10, torch.Generator().manual_seed(99)
    scale = pipe.vae.config.scaling_factor
    with torch.inference_mode():
        pixels = pipe.image_processor.preprocess(Image.open(io.BytesIO(init_image_png)))
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator) * scale
        drawn = torch.randn(latents.shape, generator=generator)
        positive, negative = pipe.encode_prompt("a photo of a cat", "cpu", 1, True, "blurry")
        context = torch.cat([negative, positive])
        keep = latent_keep(Image.open(io.BytesIO(mask_png)), latents) if masked else torch.zeros(1)

        def guided(x, t):
            x = x * (1 - keep) + latents * keep
            uncond, cond = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            return uncond + 7.5 * (cond - uncond)

        ladder, alphas = _their_timesteps(steps), pipe.scheduler.alphas_cumprod
        t_enc = int(min(strength, 0.999) * steps)
        level = alphas[ladder[t_enc]]
        x = _their_loop(guided, latents * level ** 0.5 + drawn * (1 - level) ** 0.5, ladder[:t_enc], alphas,
                        sampler == "PLMS")
        x = x * (1 - keep) + latents * keep
        decoded = pipe.image_processor.postprocess(pipe.vae.decode(x / scale).sample, output_type="np")
    mask = dict(mask=mask_png, mask_blur=0) if masked else {}
    result = local.img2img(Img2ImgRequest(
        prompt="a photo of a cat", negative_prompt="blurry", steps=steps, sampler=sampler, cfg_scale=7.5, seed=99,
        width=64, height=64, init_image=init_image_png, denoising_strength=strength, **mask))
    assert _max_diff(result.images, _as_uint8(decoded)) <= 2, sampler


def test_latent_resize_matches_diffusers(local, reference_pipe):
    """resize_mode 3: the init image (96x48) encoded at its own size, its latents resized (bilinear) to 64x64, then
    img2img; diffusers' img2img takes those latents as its image (4 channels), with the generator that sampled them."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, config = reference_pipe
    picture = Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((96, 48), Image.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    reference = StableDiffusionImg2ImgPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = make_scheduler("Euler", config)
    generator = torch.Generator().manual_seed(19)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
    with torch.inference_mode():
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
        side = 64 // 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # 64 pixels, in latents
        latents = torch.nn.functional.interpolate(latents, size=(side, side), mode="bilinear")
    expected = _as_uint8(reference("a cat", image=latents, strength=diffusers_strength("Euler", 5, 0.7),
                                   num_inference_steps=5, guidance_scale=7.5,
                                   generator=generator, output_type="np").images)
    request = Img2ImgRequest(prompt="a cat", init_image=buffer.getvalue(), denoising_strength=0.7, steps=5,
                             sampler="Euler", cfg_scale=7.5, seed=19, width=64, height=64, latent_resize=True)
    result = local.img2img(request)
    assert _max_diff(result.images, expected) <= 2
    assert _max_diff(result.images, local.img2img(replace(request, latent_resize=False)).images) > 2


def test_img2img_bad_inputs(local, init_image_png):
    base = dict(prompt="a cat", steps=2, seed=1, width=64, height=64, init_image=init_image_png)
    for change, message in [({"denoising_strength": 1.5}, "denoising_strength must be in"),
                            ({"denoising_strength": float("nan")}, "denoising_strength must be in"),
                            ({"init_image": b"not an image"}, "init image: .*cannot decode image"),
                            ({"init_image": b""}, "init_image is empty")]:
        with pytest.raises(InputError, match=message):
            local.img2img(Img2ImgRequest(**(base | change)))
    unchanged = local.img2img(Img2ImgRequest(**(base | {"denoising_strength": 0.0})))
    assert unchanged.images.shape == (1, 64, 64, 3)  # no denoising step: the init image through the VAE


@pytest.mark.parametrize("sampler, start, end", [("Euler a", 0.0, 1.0), ("DDIM", 0.2, 0.8)])
def test_controlnet_matches_diffusers(local, sd_checkpoint, reference_pipe, edge_map_png, sampler, start, end):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe, checkpoint_scheduler_config = reference_pipe
    controlnet = ControlNetModel.from_pretrained(str(sd_checkpoint / "controlnet"))
    control_pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    control_pipe.set_progress_bar_config(disable=True)
    control_pipe.scheduler = make_scheduler(sampler, checkpoint_scheduler_config)
    expected = _as_uint8(control_pipe(
        "a photo of a cat", image=Image.open(io.BytesIO(edge_map_png)), num_inference_steps=8, guidance_scale=7.5,
        negative_prompt="blurry", controlnet_conditioning_scale=0.8, control_guidance_start=start,
        control_guidance_end=end, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(5)).images)
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=8, sampler=sampler,
                             cfg_scale=7.5, seed=5, width=64, height=64,
                             controlnet=ControlNetUnit(image=edge_map_png, weight=0.8, guidance_start=start,
                                                       guidance_end=end))
    result = local.txt2img(request)
    assert _max_diff(result.images, expected) <= 2, sampler
    plain = local.txt2img(replace(request, controlnet=None))
    assert _max_diff(plain.images, result.images) > 2  # the ControlNet did act


def test_several_controlnet_units_match_diffusers_multicontrolnet(local, sd_checkpoint, scribble, reference_pipe,
                                                                 edge_map_png, init_image_png):
    """Two units of two different ControlNets (an edge map, and a photo through the canny preprocessor), with their
    own scales and windows: diffusers' MultiControlNetModel sums their residuals, and so does the orchestrator."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe, checkpoint_scheduler_config = reference_pipe
    nets = [ControlNetModel.from_pretrained(str(sd_checkpoint / "controlnet")),
            ControlNetModel.from_pretrained(str(scribble))]
    control_pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=nets)
    control_pipe.set_progress_bar_config(disable=True)
    control_pipe.scheduler = make_scheduler("DPM++ 2M Karras", checkpoint_scheduler_config)
    second = Image.fromarray((control_image(init_image_png, 64, 64, "canny", 50, 150) * 255)
                             .astype(np.uint8).transpose(1, 2, 0))
    expected = _as_uint8(control_pipe(
        "a photo of a cat", image=[Image.open(io.BytesIO(edge_map_png)), second], num_inference_steps=8,
        guidance_scale=7.5, negative_prompt="blurry", controlnet_conditioning_scale=[0.8, 0.5],
        control_guidance_start=[0.0, 0.25], control_guidance_end=[1.0, 0.75], height=64, width=64,
        output_type="np", generator=torch.Generator().manual_seed(5)).images)
    units = (ControlNetUnit(image=edge_map_png, weight=0.8),
             ControlNetUnit(image=init_image_png, module="canny", weight=0.5, guidance_start=0.25, guidance_end=0.75,
                            threshold_a=50, threshold_b=150, model="scribble"))
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=8, sampler="DPM++ 2M Karras",
                             cfg_scale=7.5, seed=5, width=64, height=64, controlnet=units)
    result = local.txt2img(request)
    assert _max_diff(result.images, expected) <= 2
    one = local.txt2img(replace(request, controlnet=units[0]))
    assert _max_diff(one.images, result.images) > 2  # the second unit did act
    assert len(result.info["controlnet"]) == 2 and "Model: scribble [" in result.info["controlnet"][1]
    same_model = local.txt2img(replace(request, controlnet=(units[0], replace(units[1], model=None))))
    assert _max_diff(same_model.images, result.images) > 2  # the model choice matters
    with pytest.raises(InputError, match="at most 4 per request"):
        local.txt2img(replace(request, controlnet=units * 3))
    with pytest.raises(InputError, match="controlnet unit 1 weight"):
        local.txt2img(replace(request, controlnet=(units[0], replace(units[1], weight=3.0))))


def test_a_second_controlnet_by_name_matches_diffusers(local, scribble, reference_pipe, edge_map_png):
    """One unit naming the second ControlNet by its sd-webui-controlnet title runs that model."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    assert [c.name for c in local.contract.controlnets] == ["controlnet", "scribble"]
    served = local.contract.controlnet("scribble")
    assert (served.model, served.ensemble) == ("sd_controlnet_2", "sd_controlnet_unet_2")
    pipe, checkpoint_scheduler_config = reference_pipe
    control_pipe = StableDiffusionControlNetPipeline(**pipe.components,
                                                     controlnet=ControlNetModel.from_pretrained(str(scribble)))
    control_pipe.set_progress_bar_config(disable=True)
    control_pipe.scheduler = make_scheduler("Euler a", checkpoint_scheduler_config)
    expected = _as_uint8(control_pipe(
        "a photo of a cat", image=Image.open(io.BytesIO(edge_map_png)), num_inference_steps=6, guidance_scale=7.5,
        controlnet_conditioning_scale=0.9, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(9)).images)
    request = Txt2ImgRequest(prompt="a photo of a cat", steps=6, sampler="Euler a", cfg_scale=7.5, seed=9, width=64,
                             height=64, controlnet=ControlNetUnit(image=edge_map_png, weight=0.9, model=served.title))
    assert _max_diff(local.txt2img(request).images, expected) <= 2
    with pytest.raises(InputError, match=r"unknown ControlNet model 'depth'; this build serves: "
                                         r"controlnet \[.*scribble"):
        local.txt2img(replace(request, controlnet=replace(request.controlnet, model="depth")))


def test_canny_preprocessor_and_bad_units(local, init_image_png):
    edges = control_image(init_image_png, 64, 64, "canny")
    assert edges.shape == (3, 64, 64) and set(np.unique(edges)) == {0.0, 1.0}
    assert 0.01 < edges.mean() < 0.5  # a photograph has edges, not everywhere
    for unit, message in [(ControlNetUnit(image=init_image_png, module="depth"), "module 'depth' is unknown"),
                          (ControlNetUnit(image=init_image_png, weight=float("nan")), "weight must be in"),
                          (ControlNetUnit(image=init_image_png, guidance_start=0.9, guidance_end=0.1), "start < end"),
                          (ControlNetUnit(image=init_image_png, module="canny", threshold_a=200, threshold_b=100),
                           "canny thresholds"),
                          (ControlNetUnit(image=b"junk"), "controlnet image: cannot decode")]:
        with pytest.raises(InputError, match=message):
            local.txt2img(Txt2ImgRequest(prompt="a cat", steps=2, seed=1, width=64, height=64, controlnet=unit))


# Strengths where diffusers' img2img runs fewer steps than all (at 1 it would start from noise alone)
@pytest.mark.parametrize("sampler, strength, mask_round", [
    ("Euler a", 0.6, True), ("DDPM", 0.75, True), ("DPM++ 2M Karras", 0.7, True), ("UniPC", 0.7, True),
    ("Heun", 0.5, True), ("Euler a", 0.6, False), ("UniPC", 0.7, False)])
def test_inpainting_matches_automatic1111s_blend(local, reference_pipe, init_image_png, sampler, strength,
                                                 mask_round):
    """AUTOMATIC1111's inpainting (the denoised prediction blended with the init latents where its latent mask keeps
    them, then the last blend) on diffusers' img2img pipeline and components (conftest.a1111_inpainting). The mask's
    edges are odd: the latents they cut in half are decided by the latent mask's bicubic and rounding (nearest
    sampling differs by 220/255); with mask_round false they are mixed by its fractions."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, checkpoint_scheduler_config = reference_pipe
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (17, 21, 47, 51))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    mask_png = buffer.getvalue()
    expected = a1111_inpainting(img2img, sampler, checkpoint_scheduler_config, Image.open(io.BytesIO(init_image_png)),
                                mask, seed=11, strength=strength, steps=8, mask_round=mask_round,
                                prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=7.5, height=64,
                                width=64)
    request = Img2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=8, sampler=sampler,
                             cfg_scale=7.5, seed=11, width=64, height=64, init_image=init_image_png,
                             denoising_strength=strength, mask=mask_png, mask_blur=0, mask_round=mask_round)
    result = local.img2img(request)
    assert _max_diff(result.images, expected) <= 2, sampler


def test_inpainting_at_full_strength_starts_from_the_image_as_automatic1111(local, init_image_png, mask_png):
    """At strength 1 AUTOMATIC1111 starts from the image plus the whole noise (not noise alone, as diffusers'
    inpainting pipeline): a mask over everything is img2img at 1, and the masked content (fill, original, latent
    noise, latent nothing) acts at 1 too."""
    everything = io.BytesIO()
    Image.new("L", (64, 64), 255).save(everything, "PNG")
    base = Img2ImgRequest(prompt="a cat", steps=3, sampler="Euler", seed=5, width=64, height=64,
                          init_image=init_image_png, denoising_strength=1.0, mask_blur=0)
    whole = local.img2img(replace(base, mask=everything.getvalue(), inpainting_fill=1)).images
    assert _max_diff(whole, local.img2img(base).images) <= 1  # measured: 0
    fills = [local.img2img(replace(base, mask=mask_png, inpainting_fill=fill)).images for fill in range(4)]
    # measured, pair by pair: 2, 13, 6, 13, 5, 11 (fill and original differ little: a 14.6th of the colours)
    assert min(_max_diff(a, b) for i, a in enumerate(fills) for b in fills[i + 1:]) > 0
    assert _max_diff(fills[2], fills[3]) > 2  # latent noise and latent nothing: the same start from noise alone


def test_inpainting_mask_options(local, init_image_png, mask_png):
    mask = inpaint_mask(mask_png, 64, 64, blur=0, invert=False)
    assert mask.shape == (1, 64, 64) and mask[0, 30, 30] == 1 and mask[0, 2, 2] == 0
    assert np.array_equal(inpaint_mask(mask_png, 64, 64, blur=0, invert=True), 1 - mask)
    assert inpaint_mask(mask_png, 64, 64, blur=4, invert=False).sum() != mask.sum()  # blurring moves the edge
    base = dict(prompt="a cat", steps=2, seed=1, width=64, height=64, init_image=init_image_png)
    with pytest.raises(InputError, match="mask: cannot decode"):
        local.img2img(Img2ImgRequest(**base, mask=b"junk"))
    with pytest.raises(InputError, match="at least one denoising step: DDIM runs none at steps 2"):
        local.img2img(Img2ImgRequest(**base, mask=mask_png, denoising_strength=0.2, sampler="DDIM"))
    with pytest.raises(InputError, match="at least one denoising step: Euler a runs none"):
        local.img2img(Img2ImgRequest(**base, mask=mask_png, denoising_strength=0))
    # AUTOMATIC1111's k-diffusion samplers run one step more than int(steps x strength): here one
    assert local.img2img(Img2ImgRequest(**base, mask=mask_png, denoising_strength=0.2)).images.shape == (1, 64, 64, 3)
    with pytest.raises(InputError, match="mask_blur must be"):
        local.img2img(Img2ImgRequest(**base, mask=mask_png, mask_blur=-1))


@pytest.fixture(scope="module")
def inpainting_unet(tmp_path_factory):
    """A second repository, from a checkpoint whose UNet is a 9-channel inpainting UNet (with a ControlNet, which
    takes the 4-channel latents: no ControlNet -> UNet ensemble there), in process."""
    folder = write_sd_checkpoint(tmp_path_factory.mktemp("sd_inpaint") / "tiny", size="tiny", seed=3,
                                 controlnet=True, inpainting=True)
    repo = folder.parent / "repo"
    build_sd(SDBuildOptions(weights=str(folder), repository=repo, images=IMAGES, progress=False), log=lambda _m: None)
    return Pipeline.from_repository(repo), folder


def test_nine_channel_inpainting_unet_matches_automatic1111(inpainting_unet, init_image_png, mask_png):
    """diffusers' inpaint pipeline gives the UNet its mask and masked image; AUTOMATIC1111 blends with a 9-channel
    UNet too (conftest.a1111_inpainting)."""
    from diffusers import StableDiffusionInpaintPipeline

    pipeline, folder = inpainting_unet
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    mask = Image.open(io.BytesIO(mask_png))
    expected = a1111_inpainting(pipe, "Euler a", dict(pipe.scheduler.config), Image.open(io.BytesIO(init_image_png)),
                                mask, seed=4, strength=0.5, steps=6, mask_image=mask, prompt="a photo of a cat",
                                guidance_scale=7.5, height=64, width=64)
    assert pipeline.contract.unet_in_channels == 9
    result = pipeline.img2img(Img2ImgRequest(prompt="a photo of a cat", steps=6, sampler="Euler a", cfg_scale=7.5,
                                             seed=4, width=64, height=64, init_image=init_image_png,
                                             denoising_strength=0.5, mask=mask_png, mask_blur=0))
    assert _max_diff(result.images, expected) <= 2
    halves = pipeline.img2img(Img2ImgRequest(
        prompt="a photo of a cat :0.5 AND a photo of a cat :0.5", steps=6, sampler="Euler a", cfg_scale=7.5, seed=4,
        width=64, height=64, init_image=init_image_png, denoising_strength=0.5, mask=mask_png, mask_blur=0))
    assert _max_diff(halves.images, result.images) <= 2  # AND's rows take the mask's rows too


def test_txt2img_and_img2img_on_a_nine_channel_unet_mask_the_whole_image(inpainting_unet, init_image_png,
                                                                          monkeypatch):
    """AUTOMATIC1111 runs an inpainting checkpoint without a mask too: txt2img with all of the image masked and the
    masked image zeros (its txt2img_image_conditioning: diffusers' inpaint pipeline at strength 1 with a white mask);
    img2img with all of it masked, the masked image the init image x (1 - inpainting_mask_weight) (its
    img2img_image_conditioning: at 1, diffusers' with a white mask, blended as there); the hires pass as img2img on
    its upscaled image (the decoded latents in a latent mode, where the weight keeps some of it)."""
    from diffusers import StableDiffusionInpaintPipeline

    pipeline, folder = inpainting_unet
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    white, init = Image.new("L", (64, 64), 255), Image.open(io.BytesIO(init_image_png))
    common = dict(prompt="a photo of a cat", guidance_scale=7.5, height=64, width=64)
    from orchestrator.pipeline import inpaint

    made, unmasked = [], inpaint.unmasked_channels
    monkeypatch.setattr(inpaint, "unmasked_channels", lambda *a, **k: made.append(unmasked(*a, **k)) or made[-1])
    txt = Txt2ImgRequest(prompt="a photo of a cat", steps=6, sampler="Euler", cfg_scale=7.5, seed=4, width=64,
                         height=64)
    served = pipeline.txt2img(txt).images
    (channels,) = made
    side, contract = 64 // pipeline.contract.vae_scale_factor, pipeline.contract
    assert torch.equal(channels[:, :1], torch.ones(1, 1, side, side))
    # the masked image's latents: the VAE's sample of zeros, drawn after the noise (diffusers' order)
    zeros = np.zeros((1, 3, 64, 64), np.float32)
    mean, logvar = torch.from_numpy(pipeline.components.vae.encode_pixels(zeros)).chunk(2, 1)
    generator = torch.Generator().manual_seed(4)
    torch.randn(1, 4, side, side, generator=generator)
    drawn = mean + torch.exp(0.5 * logvar) * torch.randn(1, 4, side, side, generator=generator)
    torch.testing.assert_close(channels[:, 1:], drawn * contract.scaling_factor, atol=1e-5, rtol=1e-5)
    # diffusers' inpaint pipeline with those latents (a constant image's encoding differs between runtimes: a
    # GroupNorm of a constant divides rounding by sqrt(eps); measured 0.47 between ONNX Runtime's and PyTorch's)
    pipe.scheduler = make_scheduler("Euler", dict(pipe.scheduler.config))
    expected = pipe(image=init, mask_image=white, masked_image_latents=channels[:, 1:], strength=1.0,
                    num_inference_steps=6, generator=torch.Generator().manual_seed(4), output_type="np",
                    **common).images
    assert _max_diff(served, (expected * 255).round().astype(np.uint8)) <= 1
    img2img = Img2ImgRequest(prompt="a photo of a cat", steps=6, sampler="Euler", cfg_scale=7.5, seed=4, width=64,
                             height=64, init_image=init_image_png, denoising_strength=0.5)
    whole = pipeline.img2img(img2img)
    drawn = torch.randn(1, 4, side, side, generator=generator)  # after the image's latents and the noise
    torch.testing.assert_close(made[-1][:, 1:], (mean + torch.exp(0.5 * logvar) * drawn) * contract.scaling_factor,
                               atol=1e-5, rtol=1e-5)
    expected = a1111_inpainting(pipe, "Euler", dict(pipe.scheduler.config), init, white, seed=4, strength=0.5,
                                steps=6, mask_image=white, masked_image_latents=made[-1][:, 1:], **common)
    assert _max_diff(whole.images, expected) <= 1
    assert whole.info["conditional_mask_weight"] == 1.0
    vae_class = type(pipeline.components.vae)
    encode, seen = vae_class.encode_pixels, []
    monkeypatch.setattr(vae_class, "encode_pixels", lambda self, pixels: seen.append(pixels) or encode(self, pixels))
    half = pipeline.img2img(replace(img2img, inpainting_mask_weight=0.5))
    np.testing.assert_allclose(seen[-1][0], 0.5 * vae_input(init_image_png, 64, 64), atol=1e-6)
    assert _max_diff(half.images, whole.images) > 0
    for upscaler in ("Latent", "Lanczos"):
        fix = HiresFix(scale=1.5, upscaler=upscaler, steps=2, denoising_strength=0.6)
        hires = pipeline.txt2img(replace(txt, steps=3, hires=fix))
        assert hires.images.shape[1:3] == (96, 96)
        seen.clear()
        weighted = pipeline.txt2img(replace(txt, steps=3, hires=fix, inpainting_mask_weight=0.5))
        assert _max_diff(hires.images, weighted.images) > 0, upscaler
        assert np.abs(seen[-1]).max() > 0  # the upscaled image, half masked
    with pytest.raises(InputError, match="txt2img's is all masked whatever it is"):
        pipeline.txt2img(replace(txt, inpainting_mask_weight=0.5))


def test_the_conditional_mask_weight_hides_part_of_the_masked_area(inpainting_unet, init_image_png, mask_png,
                                                                   monkeypatch):
    """AUTOMATIC1111's inpainting_mask_weight: the 9-channel UNet's masked image is its lerp from the image to the
    image with the mask's area black, by the weight (1: all hidden, diffusers' masked image); written as
    Conditional mask weight, and the API's is_using_inpainting_conditioning."""
    pipeline, _ = inpainting_unet
    vae_class = type(pipeline.components.vae)
    encode, seen = vae_class.encode_pixels, []
    monkeypatch.setattr(vae_class, "encode_pixels", lambda self, pixels: seen.append(pixels) or encode(self, pixels))
    base = Img2ImgRequest(prompt="a photo of a cat", steps=4, sampler="Euler a", seed=4, width=64, height=64,
                          init_image=init_image_png, denoising_strength=0.5, mask=mask_png, mask_blur=0)
    full, half = pipeline.img2img(base), pipeline.img2img(replace(base, inpainting_mask_weight=0.5))
    mask = np.asarray(Image.open(io.BytesIO(mask_png)).convert("L"), dtype=np.float32) / 255
    (image, hidden_all), (_, hidden_half) = seen
    np.testing.assert_allclose(hidden_all, image * (1 - mask), atol=1e-6)
    np.testing.assert_allclose(hidden_half, image + 0.5 * (image * (1 - mask) - image), atol=1e-6)  # torch.lerp's
    assert _max_diff(full.images, half.images) > 0
    assert (full.info["conditional_mask_weight"], half.info["conditional_mask_weight"]) == (1.0, 0.5)
    assert "Denoising strength: 0.5, Conditional mask weight: 0.5, " in parameters_text(half.info)
    with pytest.raises(InputError, match=r"inpainting_mask_weight must be in \[0, 1\]"):
        pipeline.img2img(replace(base, inpainting_mask_weight=1.5))


def test_controlnet_with_a_nine_channel_inpainting_unet_matches_automatic1111(inpainting_unet, init_image_png,
                                                                             mask_png, edge_map_png):
    """The ControlNet sees the latents, the UNet the latents + mask + masked image (diffusers'
    StableDiffusionControlNetInpaintPipeline, blended as AUTOMATIC1111): two calls, the UNet's in the step batcher."""
    from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline

    pipeline, folder = inpainting_unet
    pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(
        str(folder), controlnet=ControlNetModel.from_pretrained(str(folder / "controlnet")), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    mask = Image.open(io.BytesIO(mask_png))
    expected = a1111_inpainting(pipe, "DPM++ 2M Karras", dict(pipe.scheduler.config),
                                Image.open(io.BytesIO(init_image_png)), mask, seed=4, strength=0.5, steps=6,
                                mask_image=mask, control_image=Image.open(io.BytesIO(edge_map_png)),
                                prompt="a photo of a cat", guidance_scale=7.5, controlnet_conditioning_scale=0.9,
                                height=64, width=64)
    assert pipeline.contract.controlnet(None).ensemble == ""  # the ControlNet takes 4 channels, the UNet 9
    request = Img2ImgRequest(prompt="a photo of a cat", steps=6, sampler="DPM++ 2M Karras", cfg_scale=7.5, seed=4,
                             width=64, height=64, init_image=init_image_png, denoising_strength=0.5, mask=mask_png,
                             mask_blur=0, controlnet=ControlNetUnit(image=edge_map_png, weight=0.9))
    result = pipeline.img2img(request)
    assert _max_diff(result.images, expected) <= 2
    assert _max_diff(pipeline.img2img(replace(request, controlnet=None)).images, result.images) > 2  # it did act


def test_more_bad_requests(local):
    with pytest.raises(InputError, match="LCM cannot run 60 steps"):
        local.txt2img(Txt2ImgRequest(prompt="a cat", steps=60, sampler="LCM", width=64, height=64))
    with pytest.raises(InputError, match="prompt of .* tokens needs 9 chunks; the limit is 8"):
        local.txt2img(Txt2ImgRequest(prompt="cat " * 650, steps=1, width=64, height=64))
    with pytest.raises(InputError, match="txt2img got an img2img request"):
        local.txt2img(Img2ImgRequest(prompt="a cat", init_image=b"x", width=64, height=64))


# -- the same through Triton ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(triton):
    return Pipeline.from_triton(triton.grpc_url)


def _cases(init_image_png, mask_png, edge_map_png) -> dict:
    base = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=5, sampler="DPM++ 2M Karras",
                cfg_scale=7.5, seed=21, width=64, height=64)
    edges = ControlNetUnit(image=edge_map_png, weight=0.8)
    return {
        "txt2img": Txt2ImgRequest(**base | {"batch_size": 2, "width": 96}),
        "emphasis and BREAK": Txt2ImgRequest(**base | {"prompt": "a photo of a ((cat)) BREAK [in the] (snow:1.3)",
                                                       "negative_prompt": "(blurry:0.8)"}),
        "clip skip": Txt2ImgRequest(**base | {"clip_skip": 3}),
        "composable diffusion (AND)": Txt2ImgRequest(**base | {"prompt": "a photo of a cat AND in the snow :0.6",
                                                                "s_min_uncond": 1.5}),
        "prompt editing and alternation": Txt2ImgRequest(**base | {"prompt": "a photo of a [cat:dog:0.4] [in the "
                                                                             "snow|on grass, sunny, detailed]",
                                                                   "negative_prompt": "[blurry::2]"}),
        "a long prompt, its own UNet call (ControlNet's ensemble on each)": Txt2ImgRequest(
            **base | {"prompt": "a photo of a cat, " * 15}, controlnet=edges),
        "hires fix": Txt2ImgRequest(**base | {"steps": 2}, hires=HiresFix(upscaler="Lanczos", steps=2)),
        "hires fix with ControlNet (its ensemble)": Txt2ImgRequest(**base | {"steps": 2}, controlnet=edges,
                                                                   hires=HiresFix(steps=2)),
        "img2img": Img2ImgRequest(**base, init_image=init_image_png, denoising_strength=0.6),
        "inpainting": Img2ImgRequest(**base, init_image=init_image_png, mask=mask_png, denoising_strength=0.9,
                                     inpainting_fill=0, overlay=True),
        "controlnet (ensemble)": Txt2ImgRequest(**base, controlnet=edges),
        "controlnet, ControlNet is more important (residuals)": Txt2ImgRequest(
            **base, controlnet=replace(edges, control_mode=2)),
        "scribble by name (its ensemble)": Txt2ImgRequest(**base, controlnet=replace(edges, model="scribble")),
        "two units (residuals, then the UNet)": Txt2ImgRequest(**base, controlnet=(
            edges, ControlNetUnit(image=init_image_png, module="canny", weight=0.5, guidance_start=0.2,
                                  model="scribble"))),
    }


@pytest.mark.parametrize("case", ["txt2img", "emphasis and BREAK", "clip skip", "composable diffusion (AND)",
                                  "prompt editing and alternation",
                                  "a long prompt, its own UNet call (ControlNet's ensemble on each)", "hires fix",
                                  "hires fix with ControlNet (its ensemble)", "img2img", "inpainting",
                                  "controlnet (ensemble)", "controlnet, ControlNet is more important (residuals)",
                                  "scribble by name (its ensemble)", "two units (residuals, then the UNet)"])
def test_triton_gives_the_in_process_images(served, local, init_image_png, mask_png, edge_map_png, case):
    """Every model call through Triton (ensembles, per-row scalars, the VAE encode ensemble): the same images."""
    request = _cases(init_image_png, mask_png, edge_map_png)[case]
    through_triton, in_process = served.generate(request), local.generate(request)
    assert np.array_equal(through_triton.images, in_process.images), case
    assert through_triton.info == in_process.info


def test_shared_memory_carries_the_steps_and_is_released(served, triton, init_image_png, mask_png, edge_map_png):
    """The service's client sends a step's tensors through Triton's system shared memory (the cases above compared
    its images with the in-process ones); over the network the images are the same, and closing a client removes
    its regions from Triton and from /dev/shm."""
    import os

    import tritonclient.grpc as grpcclient

    assert served.components.unet.client.uses_shared_memory
    request = _cases(init_image_png, mask_png, edge_map_png)["two units (residuals, then the UNet)"]
    network = Pipeline.from_triton(triton.grpc_url, shared_memory="off")
    assert not network.components.unet.client.uses_shared_memory
    shared = Pipeline.from_triton(triton.grpc_url, shared_memory="on")
    assert np.array_equal(shared.generate(request).images, network.generate(request).images)
    prefix = f"kiln-{os.getpid()}-"
    status = grpcclient.InferenceServerClient(triton.grpc_url)

    def ours() -> set[str]:
        return {r["name"] for r in status.get_system_shared_memory_status(as_json=True).get("regions", {}).values()
                if r["name"].startswith(prefix)}

    mine = shared.components.unet.client.shared_memory_regions
    assert mine and mine <= ours() and all(os.path.exists(f"/dev/shm/{name}") for name in mine)
    shared.close()
    assert not mine & ours() and not any(os.path.exists(f"/dev/shm/{name}") for name in mine)
    network.close()


def test_a_triton_that_cannot_map_shared_memory_is_reached_over_the_network(triton, monkeypatch):
    """A Triton elsewhere (another host, a container without --ipc=host) cannot open our regions. That fault is
    produced here by registering under a key no region has (a test seam: the real Triton really refuses it)."""
    from kiln import shared_memory
    from kiln.errors import ServerError

    def register_elsewhere(region):
        region._connection.register_system_shared_memory(region.name, "/kiln-no-such-region", region.byte_size)

    monkeypatch.setattr(shared_memory.Region, "register", register_elsewhere)
    request = Txt2ImgRequest(prompt="a barn", steps=2, width=64, height=64, seed=3)
    auto = Pipeline.from_triton(triton.grpc_url)
    assert auto.components.unet.client.uses_shared_memory
    image = auto.generate(request).images
    assert not auto.components.unet.client.uses_shared_memory  # fell back, for good, and said why
    assert "kiln-no-such-region" in auto.components.unet.client.shared_memory_error
    assert np.array_equal(image, Pipeline.from_triton(triton.grpc_url, shared_memory="off").generate(request).images)
    with pytest.raises(ServerError, match="cannot map this process's shared memory"):
        Pipeline.from_triton(triton.grpc_url, shared_memory="on").generate(request)


def test_triton_txt2img_matches_diffusers(served, reference_pipe):
    result = served.txt2img(Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=6,
                                           sampler="Euler a", cfg_scale=7.5, seed=1234, width=64, height=64))
    expected = _diffusers_image(reference_pipe, "Euler a", "a photo of a cat", "blurry", 6, 7.5, 1234)
    assert _max_diff(result.images, expected) <= 2


def test_triton_models_refuse_bad_input_by_name(served, init_image_png):
    """Errors found inside Triton's models reach the caller as InputErrors naming the model."""
    with pytest.raises(InputError, match="sd_tokenizer: prompt of .* tokens needs 9 chunks; the limit is 8"):
        served.txt2img(Txt2ImgRequest(prompt="cat " * 650, steps=1, width=64, height=64))
    with pytest.raises(InputError, match="init image: .*sd_image_preprocess: .*cannot decode image"):
        served.components.vae.encode_image(b"not an image", 64, 64)
    assert served.txt2img(Txt2ImgRequest(prompt="ok", steps=1, seed=1, width=64, height=64)).images.shape == \
        (1, 64, 64, 3)


def test_no_server_is_a_clear_error():
    with pytest.raises(KilnError, match="is `kiln serve` running"):
        Pipeline.from_triton(f"127.0.0.1:{free_port()}")


def test_generate_command_writes_a_png_with_parameters(triton, tmp_path, kiln):
    """`kiln generate` (txt2img, img2img, ControlNet, inpainting) against the running Triton; the first through the
    real entry point in its own process."""
    import subprocess
    import sys

    out = tmp_path / "cat.png"
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "generate", "a photo of a cat", "--steps", "3",
                             "--sampler", "DDIM", "--seed", "42", "--width", "64", "--height", "64",
                             "--url", triton.grpc_url, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (64, 64)
    assert image.text["parameters"].startswith("a photo of a cat\nSteps: 3, Sampler: DDIM, CFG scale: 7.0, Seed: 42, "
                                               "Size: 64x64")
    common = ("--width", "64", "--height", "64", "--url", triton.grpc_url)
    code, _, err = kiln("generate", "a painting of a cat", "--steps", "4", "--init-image", out, "--strength", "0.5",
                        "--seed", "3", *common, "--out", tmp_path / "cat2.png")
    assert code == 0, err
    assert "Seed: 3" in Image.open(tmp_path / "cat2.png").text["parameters"]
    code, _, err = kiln("generate", "a cat", "--steps", "2", "--control-image", out, "--control-module", "canny",
                        "--control-weight", "0.5", *common, "--out", tmp_path / "cat3.png")
    assert code == 0 and Image.open(tmp_path / "cat3.png").size == (64, 64), err
    code, _, err = kiln("generate", "a photo of a cat, " * 15, "--negative-prompt", "blurry", "--steps", "1",
                        "--pad-conds", "last_vector", *common, "--out", tmp_path / "long.png")
    assert code == 0 and "Pad conds v0: True" in Image.open(tmp_path / "long.png").text["parameters"], err
    code, _, err = kiln("generate", "a cat", "--steps", "2", "--subseed", "3", "--subseed-strength", "0.4",
                        "--seed-resize-from", "48x48", "--ensd", "31337", "--rng", "NV", *common, "--out",
                        tmp_path / "seeds.png")
    parameters = Image.open(tmp_path / "seeds.png").text["parameters"]  # Euler a draws from the ENSD's generators
    assert code == 0 and "Variation seed: 3, Variation seed strength: 0.4, Seed resize from: 48x48, ENSD: 31337, " \
        "RNG: NV" in parameters, err
    code, _, err = kiln("generate", "a [cat:dog:1.0]", "--steps", "2", "--old-scheduling", *common, "--out",
                        tmp_path / "old.png")
    assert code == 0 and "Old prompt editing timelines: True" in Image.open(tmp_path / "old.png").text["parameters"]
    code, _, err = kiln("generate", "a cat", "--seed-resize-from", "48", *common)
    assert code == 2 and "'48' is not WxH" in err and "Traceback" not in err
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    code, _, err = kiln("generate", "a dog", "--steps", "2", "--init-image", out, "--mask", tmp_path / "mask.png",
                        "--mask-blur", "2", "--strength", "1.0", *common, "--out", tmp_path / "dog.png")
    assert code == 0 and Image.open(tmp_path / "dog.png").size == (64, 64), err
    code, _, err = kiln("generate", "x", "--sampler", "Nope", *common)
    assert code == 2 and "Sampler not found" in err and "Traceback" not in err
    code, _, err = kiln("generate", "a cat", "--steps", "2", "--hires", "2", "--hires-steps", "1", "--clip-skip", "2",
                        *common, "--out", tmp_path / "big.png")
    big = Image.open(tmp_path / "big.png")
    assert code == 0 and big.size == (128, 128) and "Hires upscale: 2.0" in big.text["parameters"], err
    assert "Clip skip: 2" in big.text["parameters"]
    code, _, err = kiln("generate", "a cat", "--hires", "2", "--init-image", out, *common)
    assert code == 2 and "--hires is txt2img's hires fix" in err
    code, _, err = kiln("generate", "a cat", "--hires", "2", "--hires-steps", "1", "--hires-first-pass", out, *common,
                        "--out", tmp_path / "given.png")  # AUTOMATIC1111's firstpass_image: the hires pass alone
    assert code == 0 and Image.open(tmp_path / "given.png").size == (128, 128) and "step 1/1" in err, err
    code, _, err = kiln("generate", "a cat", "--hires-first-pass", out, *common)
    assert code == 2 and "it needs --hires SCALE" in err
    code, _, err = kiln("generate", "a cat", "--steps", "2", "--vae", "anime-vae.safetensors", "--tiling", *common)
    assert code == 2 and "tiling with another VAE" in err  # the build's seamless VAE is the checkpoint's own
    code, _, err = kiln("generate", "a cat", "--steps", "2", "--vae", "anime-vae.safetensors", "--hires", "1.5",
                        "--hires-upscaler", "4x-tiny", *common, "--out", tmp_path / "vae.png")
    parameters = Image.open(tmp_path / "vae.png").text["parameters"]
    assert code == 0 and "VAE: anime-vae.safetensors" in parameters and "Hires upscaler: 4x-tiny" in parameters, err


def test_s_min_uncond_skips_the_unconditional_half_on_every_other_step_below_its_sigma(local):
    """AUTOMATIC1111's s_min_uncond (NGMS): odd steps whose sigma is under it run the prompt's rows alone, and take
    the prompt's prediction; 0 never skips."""
    from orchestrator.pipeline.sampling import schedule
    from orchestrator.pipeline.sigmas import sigma_at

    def run(s_min_uncond: float, batch: int = 1) -> tuple[np.ndarray, list[int]]:
        rows: list[int] = []

        def counting(graph, inputs):
            rows.append(len(inputs["sample"]))
            return graph(inputs)

        request = Txt2ImgRequest(prompt="a cat", negative_prompt="blurry", steps=6, sampler="Euler", seed=3, width=64,
                                 height=64, batch_size=batch, s_min_uncond=s_min_uncond)
        return local.txt2img(request, unet_call=counting).images, rows

    plain, rows = run(0.0)
    assert rows == [2] * 6
    scheduler, timesteps = schedule("Euler", local.contract.scheduler_config, 6, 3)
    sigmas = [sigma_at(scheduler, t) for t in timesteps]
    threshold = (sigmas[2] + sigmas[3]) / 2  # steps 3 and 5 are under it (odd), step 4 too (even: not skipped)
    skipped, rows = run(threshold, batch=2)
    assert rows == [4, 4, 4, 2, 4, 2]
    assert _max_diff(skipped[:1], plain) > 0
    assert np.array_equal(run(1e-6)[0], plain)  # no step's sigma is that low: nothing skipped
    assert abs(sigma_at(scheduler, 999) - 14.6) < 0.1 and sigma_at(scheduler, 0) < 0.03  # SD 1.x's schedule
