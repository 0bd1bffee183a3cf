"""AUTOMATIC1111's DDIM and PLMS (orchestrator.pipeline.compvis) against its own loops, written out here as its
sd_samplers_timesteps and sd_samplers_timesteps_impl run them: the same model calls at the same timesteps, and the
same latents, from noise, from an img2img start and in the hires fix's second pass."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kiln.errors import InputError
from orchestrator.pipeline.hires import second_pass_steps
from orchestrator.pipeline.requests import HiresFix
from orchestrator.pipeline.sampling import img2img_start, noised_to, schedule, step_kwargs

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
        "timestep_spacing": "leading", "_class_name": "PNDMScheduler"}  # SD 1.5's own scheduler config
SHAPE = (2, 4, 6, 6)


def _their_timesteps(steps: int) -> torch.Tensor:
    """CompVisSampler.get_timesteps."""
    return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)


def _their_loop(model, x, timesteps, alphas_cumprod, plms: bool, eta: float = 0.0, generator=None):
    """sd_samplers_timesteps_impl's ddim (plms False) or plms: len(timesteps) - 1 iterations from the top."""
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    old = []

    def update(e, index, x, noisy=False):
        a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
        sigma = sigmas[index].item() if noisy else 0.0
        pred_x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
        out = a_prev ** 0.5 * pred_x0 + (1 - a_prev - sigma ** 2) ** 0.5 * e
        return out + sigma * torch.randn(x.shape, generator=generator) if noisy and eta > 0 else out

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e = model(x, timesteps[index].item())
        if not plms:
            x = update(e, index, x, noisy=True)
            continue
        if not old:  # pseudo improved Euler
            e_prime = (e + model(update(e, index, x), timesteps[max(index - 1, 0)].item())) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = update(e_prime, index, x)
        old.append(e)
        if len(old) >= 4:
            old.pop(0)
    return x


class _Model:
    """A smooth stand-in for the UNet that records the timesteps it is called at."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.calls.append(int(t))
        return torch.tanh(0.5 * x + int(t) / 1000) - 0.1 * x * int(t) / 1000


def _ours(sampler: str, steps: int, x, start=None, init=None, config=SD15, eta=0.0, generator=None):
    """The pipeline's way (pipeline.generate and _denoise): schedule, noise img2img's latents, step each call."""
    model = _Model()
    scheduler, timesteps = schedule(sampler, config, steps, seed=0, start=start)
    if init is not None and len(timesteps):
        x = scheduler.add_noise(init, x, noised_to(scheduler, timesteps, len(x)))
    kwargs = step_kwargs(scheduler, generator, eta)
    for t in timesteps:
        x = scheduler.step(model(x, t), t, x, **kwargs).prev_sample
    return x, model.calls, scheduler


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
@pytest.mark.parametrize("steps", [2, 3, 9, 20, 27, 30, 37, 105, 150])
def test_from_noise_as_automatic1111(sampler, steps):
    """Its ladder, A[-1] down to A[1] (clipped at 999 for 3, 9, 27, 37 and 105 steps; 31 entries at 30)."""
    ours, calls, scheduler = _ours(sampler, steps, _noise(1))
    theirs = _Model()
    expected = _their_loop(theirs, _noise(1), _their_timesteps(steps), scheduler.alphas_cumprod, sampler == "PLMS")
    assert calls == theirs.calls
    assert torch.allclose(ours, expected, atol=1e-5), float((ours - expected).abs().max())


def test_the_calls_are_not_diffusers():
    """At 20 steps DDIM calls the model 19 times (diffusers' first 19, ending at timestep 1's noise level), at 30 it
    starts one entry higher (991, not 958); PLMS calls it once more than DDIM (its first step evaluates twice)."""
    assert _ours("DDIM", 20, _noise(1))[1] == list(range(951, 1, -50))
    assert _ours("DDIM", 30, _noise(1))[1] == list(range(991, 1, -33))
    assert _ours("PLMS", 20, _noise(1))[1] == [951, 901] + list(range(901, 1, -50))
    assert _ours("DDIM", 1, _noise(1))[1] == []  # refused by validation (below)


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
@pytest.mark.parametrize(("steps", "strength"), [(20, 0.75), (10, 0.5), (30, 1.0), (7, 0.3), (9, 0.999)])
def test_img2img_as_automatic1111(sampler, steps, strength):
    """sample_img2img: t_enc = int(min(strength, 0.999) x steps), the init latents noised to A[t_enc], the loop over
    A[:t_enc] (t_enc - 1 calls, the first at A[t_enc - 1])."""
    init, drawn = _noise(2), _noise(3)
    ours, calls, scheduler = _ours(sampler, steps, drawn, img2img_start(sampler, steps, strength), init)
    t_enc = int(min(strength, 0.999) * steps)
    ladder, a = _their_timesteps(steps), scheduler.alphas_cumprod
    level = a[ladder[t_enc]]
    theirs = _Model()
    expected = _their_loop(theirs, init * level ** 0.5 + drawn * (1 - level) ** 0.5, ladder[:t_enc], a,
                           sampler == "PLMS")
    assert calls == theirs.calls and len(calls) == t_enc - 1 + (sampler == "PLMS")
    assert torch.allclose(ours, expected, atol=1e-5), float((ours - expected).abs().max())


@pytest.mark.parametrize(("run", "strength"), [(8, 0.55), (20, 0.7), (3, 0.3)])
def test_the_hires_pass_as_automatic1111(run, strength):
    """The second pass's explicit step count N: setup_img2img_steps' steps = int(N / strength), t_enc = N - 1."""
    total, run = second_pass_steps(HiresFix(steps=run, denoising_strength=strength), 0)
    init, drawn = _noise(4), _noise(5)
    ours, calls, scheduler = _ours("DDIM", total, drawn, total - run, init)
    ladder, a = _their_timesteps(total), scheduler.alphas_cumprod
    level = a[ladder[run - 1]]
    theirs = _Model()
    expected = _their_loop(theirs, init * level ** 0.5 + drawn * (1 - level) ** 0.5, ladder[:run - 1], a, False)
    assert calls == theirs.calls and len(calls) == run - 2
    assert torch.allclose(ours, expected, atol=1e-5)


def test_ddim_eta_draws_from_the_generator_as_there():
    ours, _, scheduler = _ours("DDIM", 12, _noise(1), eta=0.7, generator=torch.Generator().manual_seed(8))
    expected = _their_loop(_Model(), _noise(1), _their_timesteps(12), scheduler.alphas_cumprod, False, eta=0.7,
                           generator=torch.Generator().manual_seed(8))
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(ours, _ours("DDIM", 12, _noise(1))[0], atol=1e-2)  # eta moved it


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
def test_a_v_prediction_model_is_turned_into_epsilon_first(sampler):
    """SD 2.x's v models (CompVisTimestepsVDenoiser: eps = sqrt(a_t) v + sqrt(1 - a_t) x)."""
    config = SD15 | {"prediction_type": "v_prediction"}
    ours, _, scheduler = _ours(sampler, 10, _noise(1), config=config)
    a = scheduler.alphas_cumprod

    def as_epsilon(x, t):
        return a[t] ** 0.5 * _Model()(x, t) + (1 - a[t]) ** 0.5 * x

    expected = _their_loop(as_epsilon, _noise(1), _their_timesteps(10), a, sampler == "PLMS")
    assert torch.allclose(ours, expected, atol=1e-5)


def test_out_of_order_calls_steps_past_the_ladder_and_other_predictions_are_errors():
    scheduler, timesteps = schedule("DDIM", SD15, 5, seed=0)
    with pytest.raises(ValueError, match="call 0 runs at timestep 801, not 601"):
        scheduler.step(_noise(1), timesteps[1], _noise(2))
    for t in timesteps:
        scheduler.step(_noise(1), t, _noise(2))
    with pytest.raises(ValueError, match="all 4 calls have run"):
        scheduler.step(_noise(1), timesteps[-1], _noise(2))
    with pytest.raises(InputError, match="steps: DDIM cannot run 1001 steps"):
        schedule("DDIM", SD15, 1001, seed=0)
    scheduler, timesteps = schedule("PLMS", SD15 | {"prediction_type": "sample"}, 5, seed=0)
    with pytest.raises(InputError, match="this checkpoint predicts 'sample': choose another sampler"):
        scheduler.step(_noise(1), timesteps[0], _noise(2))


def test_requests_on_which_they_call_no_model_are_refused():
    """One step from noise is a ladder of one entry, a hires pass of N steps runs N - 2 and img2img t_enc - 1: where
    that is no call, a clear error before any model runs (AUTOMATIC1111 decodes the noised latents as they are)."""
    from kiln.contract import SDContract
    from orchestrator.pipeline import HiresFix, Img2ImgRequest, Txt2ImgRequest, check_request

    contract = SDContract(scheduler_config={}, vae_scale_factor=2, latent_channels=4, unet_in_channels=4,
                          scaling_factor=0.18, min_size=32, max_size=128, size_multiple=8)
    base = Txt2ImgRequest(prompt="a cat", steps=1, sampler="DDIM", width=64, height=64)
    with pytest.raises(InputError, match="steps: DDIM runs no denoising step at steps 1"):
        check_request(base, contract)
    check_request(replace(base, sampler="Euler"), contract)
    fix = HiresFix(steps=2, denoising_strength=0.5, upscaler="Latent", scale=2.0)
    with pytest.raises(InputError, match="hr_second_pass_steps: PLMS runs no denoising step in the second pass at 2"):
        check_request(replace(base, steps=4, hires=replace(fix, sampler="PLMS")), contract)
    check_request(replace(base, steps=4, hires=replace(fix, steps=3)), contract)
    img2img = Img2ImgRequest(prompt="a cat", steps=2, sampler="DDIM", width=64, height=64, init_image=b"x",
                             denoising_strength=0.7)
    with pytest.raises(InputError, match="img2img needs at least one denoising step: DDIM runs none at steps 2"):
        check_request(img2img, contract)
    check_request(replace(img2img, steps=4), contract)  # t_enc 2: one call
    check_request(replace(img2img, denoising_strength=0.0), contract)  # none on purpose: the init image as it is


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_cfgpp_is_automatic1111s(prediction, eta):
    """AUTOMATIC1111's DDIM CFG++ (its ddim_cfgpp, written out here): on DDIM's ladder, the guided prediction (the
    guidance scale divided by 12.5) to x0 and the unconditional one back towards the noise, eta's noise as DDIM's;
    a v-prediction checkpoint's outputs as epsilon first. Its step refuses to run without the unconditional one."""
    config = SD15 | {"prediction_type": prediction}
    steps, cfg = 10, 3.0
    start = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    ours, timesteps = schedule("DDIM CFG++", config, steps, seed=0)
    cumprod = ours.alphas_cumprod

    def outputs(x, t):  # the conditional and unconditional rows' outputs, in the checkpoint's parameterisation
        return torch.tanh(0.5 * x + t / 1000), 0.8 * torch.tanh(0.4 * x - t / 2000)

    def eps(output, x, t):
        a = float(cumprod[t])
        return output if prediction == "epsilon" else a ** 0.5 * output + (1 - a) ** 0.5 * x

    ladder = _their_timesteps(steps)
    alphas, previous = cumprod[ladder], cumprod[torch.nn.functional.pad(ladder[:-1], pad=(1, 0))].double()
    sigmas = eta * ((1 - previous) / (1 - alphas) * (1 - alphas / previous)).sqrt()
    theirs, generator = start.clone(), torch.Generator().manual_seed(7)
    for index in range(len(ladder) - 1, 0, -1):
        t = int(ladder[index])
        cond, uncond = (eps(output, theirs, t) for output in outputs(theirs, t))
        e_t = uncond + (cond - uncond) * cfg / 12.5
        a_t, a_prev, sigma = float(alphas[index]), float(previous[index]), float(sigmas[index])
        pred_x0 = (theirs - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
        theirs = a_prev ** 0.5 * pred_x0 + (1 - a_prev - sigma ** 2) ** 0.5 * uncond
        if eta > 0:
            theirs = theirs + sigma * torch.randn(theirs.shape, generator=generator)
    x, generator = start.clone(), torch.Generator().manual_seed(7)
    scale = cfg * ours.cfg_scale_multiplier
    for t in timesteps:
        cond, uncond = outputs(x, int(t))
        x = ours.step(uncond + (cond - uncond) * scale, t, x, eta=eta, generator=generator,
                      uncond_output=uncond).prev_sample
    assert torch.allclose(x, theirs, atol=1e-4)
    plain, timesteps = schedule("DDIM", config, steps, seed=0)
    ddim, generator = start.clone(), torch.Generator().manual_seed(7)
    for t in timesteps:  # DDIM on the same guided outputs: back towards the noise along them
        cond, uncond = outputs(ddim, int(t))
        ddim = plain.step(uncond + (cond - uncond) * scale, t, ddim, eta=eta, generator=generator).prev_sample
    assert not torch.allclose(x, ddim, atol=1e-2)
    with pytest.raises(ValueError, match="unconditional"):
        schedule("DDIM CFG++", config, steps, seed=0)[0].step(x, timesteps[0], x)
