"""Inpainting's blend as AUTOMATIC1111 runs it (orchestrator.pipeline.blend), on a smooth stand-in model: every
sampler predicts the init latents where the mask keeps them, k-diffusion's Euler a written out, AUTOMATIC1111's
DDIM and PLMS with the init latents pasted into their input (tests/test_compvis.py's loops), the latent mask, the
overlay and the alpha mask. tests/test_sd_pipeline.py checks the same on diffusers' components."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from kiln.masks import gaussian_blur, latent_mask, opencv_kernel, paste_outside_mask, rounded, soft_mask
from orchestrator.pipeline.blend import Blend
from orchestrator.pipeline.sampling import SAMPLERS, img2img_start, noised_to, schedule, step_kwargs
from tests.test_compvis import SD15, _Model, _their_loop, _their_timesteps

SHAPE = (2, 4, 8, 8)
REPAINT = torch.zeros(1, 1, 8, 8)
REPAINT[..., 2:6, 1:5] = 1
# LMS's last step combines the derivatives of four calls: it ends near the init latents, not on them (below); DPM
# fast and DPM adaptive end at the lowest sigma above 0, as k-diffusion's, so near them too (the last blend puts
# them back)
AFTER = [name for name in SAMPLERS if name not in ("DDIM", "PLMS", "UniPC", "LMS", "DDIM CFG++", "DPM fast",
                                                   "DPM adaptive")]


class _Spatial(_Model):
    """The stand-in, with each latent seeing its neighbours (as a UNet does): so the kept region's latents reach the
    masked area's."""

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        return super().__call__(x, t) + 0.3 * torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)


def _noise(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _run(sampler: str, steps: int, strength: float, config=SD15, seed: int = 3, final: bool = True, check=None,
         soft=None):
    """The pipeline's loop (pipeline._denoise) on the stand-in: the start noised to the first call's level, the
    model's input and output through the blend, the last blend (where `final`); check(scheduler, t, x, output, init)
    before each step; `soft`: soft inpainting's settings."""
    init, drawn = _noise(1), _noise(2)
    scheduler, timesteps = schedule(sampler, config, steps, seed, img2img_start(sampler, steps, strength))
    x = scheduler.add_noise(init, drawn, noised_to(scheduler, timesteps, len(init)))
    blend = Blend.for_sampler(sampler, REPAINT, init, soft)
    model = _Spatial()
    kwargs = step_kwargs(scheduler, torch.Generator().manual_seed(seed), 0.0)
    for t in timesteps:
        output = blend.prediction(scheduler, t, x, model(scheduler.scale_model_input(blend.model_input(x, t), t), t))
        if check is not None:
            check(scheduler, t, x, output, init)
        x = scheduler.step(output, t, x, **kwargs).prev_sample
    return (blend.final(x) if final else x), init


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", AFTER + ["Euler Karras", "DPM++ SDE Karras", "Euler a Exponential"])
def test_every_k_diffusion_sampler_predicts_the_init_where_the_mask_keeps_it(sampler, prediction):
    """With the denoised prediction the init latents in the kept region at every call, the sampler's own latents
    end there (its last step goes to sigma 0, or to the last timestep's level), before the last blend: so the
    output that predicts them was computed for the sigma each call runs at (DPM++ SDE's midpoint, Heun's second
    call, DPM++ 2M's step index), in its sample space, for epsilon and v. A wrong sigma misses by far more."""
    config = SD15 | {"prediction_type": prediction, "clip_sample": False}  # SD 1.5's own: DDPM clips x0 otherwise
    x, init = _run(sampler, 8, 0.7, config, final=False)
    kept = (1 - REPAINT).bool().expand_as(x)
    gap = float((x - init)[kept].abs().max())
    assert gap < 2e-4, (sampler, gap)
    assert float((x - init)[~kept].abs().max()) > 0.05  # the masked area was repainted


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "Heun", "LMS", "DPM++ SDE", "DPM++ SDE Karras", "DPM2 a",
                                     "DPM++ 2S a", "Restart", "DPM fast", "DPM adaptive"])
def test_each_call_of_a_sigma_space_sampler_denoises_to_the_init_where_kept(sampler, prediction):
    """At every call (DPM++ SDE's midpoint, Heun's second call, DPM fast's three a step too), the denoised prediction
    from the output the scheduler gets, at the sigma the model's input was scaled for (1 / sqrt(sigma^2 + 1)), is the
    init latents where the mask keeps them."""
    calls = []

    def check(scheduler, t, x, output, init):
        scale = float(scheduler.scale_model_input(torch.ones(1, dtype=torch.float64), t))
        sigma = (1 / scale ** 2 - 1) ** 0.5
        if prediction == "epsilon":
            denoised = x - sigma * output
        else:
            denoised = output * -sigma / (sigma ** 2 + 1) ** 0.5 + x / (sigma ** 2 + 1)
        kept = (1 - REPAINT).bool().expand_as(x)
        calls.append(float((denoised - init)[kept].abs().max()))

    _run(sampler, 6, 0.8, SD15 | {"prediction_type": prediction}, check=check)
    assert len(calls) >= 5 and max(calls) < 1e-4, calls


@pytest.mark.parametrize("sampler", ["LMS", "LMS Karras", "Euler", "DPM++ 2M Karras"])
def test_a_one_call_sampler_takes_the_output_that_predicts_the_init_at_each_sigma(sampler):
    """The i-th call runs at sigmas[begin + i]: the output there is (x - init) / sigma (Euler and LMS step x0 +
    sigma eps), or (x - alpha init) / (sigma alpha) with alpha = 1 / sqrt(sigma^2 + 1) (DPM++ 2M, in VP space)."""
    ours, init = _run(sampler, 8, 0.7, final=False)
    scheduler, timesteps = schedule(sampler, SD15, 8, 3, img2img_start(sampler, 8, 0.7))
    x = scheduler.add_noise(init, _noise(2), noised_to(scheduler, timesteps, len(init)))
    keep, model, vp = 1 - REPAINT, _Spatial(), sampler.startswith("DPM")
    for i, t in enumerate(timesteps):
        sigma = float(scheduler.sigmas[scheduler.begin_index + i])
        alpha = (sigma ** 2 + 1) ** -0.5 if vp else 1.0
        output = model(scheduler.scale_model_input(x, t), t)
        output = output * (1 - keep) + (x - alpha * init) / (sigma * (alpha if vp else 1.0)) * keep
        x = scheduler.step(output, t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), float((ours - x).abs().max())


@pytest.mark.parametrize("steps, strength", [(10, 0.6), (6, 1.0)])
def test_euler_a_blends_the_denoised_prediction_as_k_diffusion(steps, strength):
    """sample_euler_ancestral under AUTOMATIC1111's CFGDenoiser, written out: denoised = x - sigma eps, blended with
    the clean init latents; then the ancestral step, its noise from the same generator. Its kept region carries the
    sampler's own noise, not the first noise at each level (diffusers' inpainting pipelines)."""
    ours, init = _run("Euler a", steps, strength)
    scheduler, timesteps = schedule("Euler a", SD15, steps, 3, img2img_start("Euler a", steps, strength))
    sigmas = scheduler.sigmas[scheduler.begin_index:]
    x, model, generator = init + _noise(2) * sigmas[0], _Spatial(), torch.Generator().manual_seed(3)
    keep = 1 - REPAINT
    diffusers_way = x.clone()
    for i, t in enumerate(timesteps):
        sigma, following = float(sigmas[i]), float(sigmas[i + 1])
        up = min(following, (following ** 2 * (sigma ** 2 - following ** 2) / sigma ** 2) ** 0.5)
        down = (following ** 2 - up ** 2) ** 0.5
        denoised = x - sigma * model(x / (sigma ** 2 + 1) ** 0.5, t)
        denoised = denoised * (1 - keep) + init * keep
        ancestral = torch.randn(x.shape, generator=generator)
        x = x + (x - denoised) / sigma * (down - sigma) + ancestral * up
        # diffusers' inpainting pipelines: the latents blended with the init plus the first noise at the next level
        denoised = diffusers_way - sigma * model(diffusers_way / (sigma ** 2 + 1) ** 0.5, t)
        diffusers_way = diffusers_way + (diffusers_way - denoised) / sigma * (down - sigma) + ancestral * up
        diffusers_way = diffusers_way * (1 - keep) + (init + _noise(2) * following) * keep
    expected = x * (1 - keep) + init * keep
    assert torch.allclose(ours, expected, atol=1e-5), float((ours - expected).abs().max())
    assert float((ours - diffusers_way).abs().max()) > 0.05  # the kept region's noise reached the masked one


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
def test_automatic1111s_timestep_samplers_paste_the_init_into_the_models_input(sampler):
    """CFGDenoiserTimesteps (mask_before_denoising): the model sees the clean init latents where the mask keeps
    them, the sampler's latents stay its own; then the last blend. tests/test_compvis.py's loops, the model
    wrapped so."""
    steps, strength = 20, 0.75
    ours, init = _run(sampler, steps, strength)
    keep = 1 - REPAINT
    scheduler, _ = schedule(sampler, SD15, steps, 3)
    t_enc = int(strength * steps)
    ladder, alphas = _their_timesteps(steps), scheduler.alphas_cumprod
    level = alphas[ladder[t_enc]]
    model = _Spatial()
    x = _their_loop(lambda x, t: model(x * (1 - keep) + init * keep, t),
                    init * level ** 0.5 + _noise(2) * (1 - level) ** 0.5, ladder[:t_enc], alphas, sampler == "PLMS")
    expected = x * (1 - keep) + init * keep
    assert torch.allclose(ours, expected, atol=1e-5), float((ours - expected).abs().max())


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_the_latent_mask_is_the_soft_mask_resized_bicubic_and_rounded():
    """PIL's bicubic to the latents' size, rounded: a latent whose 8x8 pixels are half masked goes by the filter's
    weights (nearest-neighbour sampling would take one pixel), and a blurred edge counts as far as it reaches."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 16, 44, 48))  # columns 20-43: latent columns 2 and 5 half covered
    values = latent_mask(mask, 8, 8)
    assert values.shape == (1, 8, 8) and set(np.unique(values)) == {0.0, 1.0}
    assert values[0, 4].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]  # the half-covered columns round down
    assert values[0, :, 3].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    nearest = np.asarray(mask.resize((8, 8), Image.Resampling.NEAREST)) / 255
    assert not np.array_equal(values[0], nearest)  # nearest takes column 20's and 44's pixels: 2 in, 5 out
    blurred = soft_mask(_png(mask), 64, 64, 8, invert=False)
    assert latent_mask(blurred, 8, 8).sum() != values.sum()
    # mask_round false: the filter's fractions as they are (AUTOMATIC1111 divides by 255 and stops there)
    soft = latent_mask(mask, 8, 8, rounding=False)
    assert np.array_equal(np.around(soft), values) and 0 < soft[0, 4, 2] < 1 and 0 < soft[0, 4, 5] < 1
    assert np.array_equal(soft * 255, np.asarray(mask.resize((8, 8), Image.Resampling.BICUBIC), np.float32)[None])


def test_the_overlay_doubles_the_mask_first():
    """AUTOMATIC1111's mask_for_overlay (whole picture): min(2 x mask, 255): a pixel masked a quarter shows half the
    result, one masked half or more the result alone."""
    generated = np.full((1, 4, 4, 3), 255, np.uint8)
    black = _png(Image.new("RGB", (4, 4)))
    mask = Image.new("L", (4, 4), 64)
    mask.paste(128, (0, 0, 2, 4))
    out = paste_outside_mask(generated, black, soft_mask(_png(mask), 4, 4, 0, invert=False))[0, ..., 0]
    assert out[:, :2].tolist() == [[255, 255]] * 4 and out[:, 2:].tolist() == [[128, 128]] * 4


def test_the_overlay_rounds_as_automatic1111s():
    """Its overlay is the init image pasted premultiplied under the inverted mask, unpremultiplied, then alpha-
    composited over the result (processing.py's overlay_images and apply_overlay, written out here): on every mask
    level that is its pixels, where a blend in floats is off by one on about a third of them."""
    rng = np.random.default_rng(0)
    init, generated = rng.integers(0, 256, (2, 64, 128, 3), dtype=np.uint8)
    mask = Image.fromarray(np.tile(np.arange(0, 256, 2, dtype=np.uint8), (64, 1)), "L")  # halved before doubling
    out = paste_outside_mask(generated[None], _png(Image.fromarray(init)), mask)[0]
    doubled = Image.fromarray(np.clip(np.asarray(mask, np.float32) * 2, 0, 255).astype(np.uint8), "L")
    theirs = Image.new("RGBa", (128, 64))
    theirs.paste(Image.fromarray(init).convert("RGBA").convert("RGBa"), mask=ImageOps.invert(doubled))
    expected = Image.fromarray(generated).convert("RGBA")
    expected.alpha_composite(theirs.convert("RGBA"))
    assert np.array_equal(out, np.asarray(expected.convert("RGB")))
    repaint = np.asarray(doubled, np.float32)[..., None] / 255
    in_floats = np.round(generated * repaint + init * (1 - repaint)).astype(np.uint8)
    assert (out != in_floats).any()


def test_an_alpha_mask_is_read_opaque_above_128():
    """create_binary_mask: a partly transparent mask is its alpha channel, binarized at 128."""
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 129), (0, 0, 2, 4))
    rgba.paste((0, 0, 0, 128), (2, 0, 4, 4))
    mask = np.asarray(soft_mask(_png(rgba), 4, 4, 0, invert=False))
    assert mask[:, :2].tolist() == [[255, 255]] * 4 and mask[:, 2:].tolist() == [[0, 0]] * 4
    # mask_round false: the alpha as it is, and an inpainting UNet's mask as soft
    soft = soft_mask(_png(rgba), 4, 4, 0, invert=False, binarize=False)
    assert np.asarray(soft)[:, :2].tolist() == [[129, 129]] * 4 and np.asarray(soft)[:, 2:].tolist() == [[128, 128]] * 4
    assert rounded(soft).tolist() == [[[1, 1, 1, 1]] * 4] and rounded(soft, False).max() == np.float32(129 / 255)


def test_the_mask_blur_is_opencvs():
    """AUTOMATIC1111 blurs the mask with OpenCV's GaussianBlur (8-bit fixed point). Its kernels, read from
    opencv-python 5.1's impulse responses (a 255 pixel, kernel taps under 128 come back whole): kiln's are those
    (and gave the same pixels as OpenCV on 480 random and rectangular masks, 3 to 160 pixels a side, radii 1 to 64,
    one measurement outside the suite: OpenCV is not a dependency). PIL's GaussianBlur, kiln's before, was 5 levels
    off at radius 4."""
    assert opencv_kernel(3).tolist() == [1, 2, 5, 8, 14, 21, 28, 32, 34, 32, 28, 21, 14, 8, 5, 2, 1]
    assert opencv_kernel(5)[:13].tolist() == [1, 1, 2, 2, 5, 5, 8, 10, 12, 15, 18, 19, 20]
    assert all(opencv_kernel(r).sum() == 256 for r in (1, 2, 4, 16, 64))
    impulse = Image.new("L", (41, 41), 0)
    impulse.putpixel((20, 20), 255)
    row = np.asarray(gaussian_blur(impulse, 3, 0))[20, 12:29]
    assert row.tolist() == [(255 * w + 128) >> 8 for w in opencv_kernel(3).tolist()]
    column = np.asarray(gaussian_blur(impulse, 0, 3))[:, 20]
    assert column.tolist() == np.asarray(gaussian_blur(impulse, 3, 0))[20].tolist()
    edge = Image.new("L", (8, 1), 0)
    edge.putpixel((0, 0), 255)  # mirrored without repeating the edge pixel (a repeat would add 62 at the edge)
    kernel = opencv_kernel(1)  # [1, 14, 62, 102, 62, 14, 1]
    assert np.asarray(gaussian_blur(edge, 1, 0))[0, :2].tolist() == [(255 * int(kernel[3]) + 128) >> 8,
                                                                     (255 * int(kernel[2]) + 128) >> 8]
