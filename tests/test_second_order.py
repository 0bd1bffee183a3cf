"""AUTOMATIC1111's DPM2, DPM2 a, DPM++ 2S a and Restart (orchestrator.pipeline.second_order) against k-diffusion's
samplers and AUTOMATIC1111's restart_sampler, written out here on k-diffusion's own sigmas and its model wrapper (the
timestep of a sigma, the input scaled by it)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from kiln.errors import InputError
from orchestrator.pipeline.sampling import check_discard, editing_steps, img2img_start, schedule
from orchestrator.pipeline.sigmas import Table, schedule_sigmas

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading"}


def _eps(x, t):
    """A model that reads its input and its timestep, so that a call at the wrong point gives another output."""
    import torch

    return 0.4 * torch.tanh(x.double()) + 1e-3 * float(t) * torch.cos(x.double())


def _k_sigmas(kind: str, steps: int, alphas, discard: bool) -> list[float]:
    """k-diffusion's sigmas of AUTOMATIC1111's schedule type (Uniform: get_sigmas; Karras from kiln's tested ones),
    with discard_next_to_last_sigma."""
    n = steps + discard
    if kind == "Uniform":
        sigmas = [*Table(alphas).t_to_sigma(np.linspace(999, 0, n)), 0.0]
    else:
        sigmas = list(schedule_sigmas(kind, n, alphas))
    return sigmas[:-2] + sigmas[-1:] if discard else sigmas


def _k_diffusion(name: str, sigmas: list[float], x, table: Table, eta: float, generator) -> tuple[list, int]:
    """k-diffusion's sample_dpm_2 (no churn), sample_dpm_2_ancestral and sample_dpmpp_2s_ancestral: x after each step,
    and the model calls made. Noise from `generator`, drawn as k-diffusion draws it (every step that ends above 0)."""
    import torch

    calls = 0

    def model(x, sigma):
        nonlocal calls
        calls += 1
        return x - sigma * _eps((x / math.sqrt(sigma**2 + 1)).float(), table.sigma_to_t(sigma))

    out = []
    for s, to in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, s)
        up = 0.0 if name == "DPM2" else min(to, eta * math.sqrt(to**2 * (s**2 - to**2) / s**2))
        down = math.sqrt(to**2 - up**2)
        if down == 0:
            x = x + (x - denoised) / s * (down - s)
        elif name == "DPM++ 2S a":
            h = math.log(s / down)
            middle = s * math.exp(-h / 2)
            x_2 = middle / s * x - math.expm1(-h / 2) * denoised
            x = down / s * x - math.expm1(-h) * model(x_2, middle)
        else:
            middle = math.exp((math.log(s) + math.log(down)) / 2)
            x_2 = x + (x - denoised) / s * (middle - s)
            x = x + (x_2 - model(x_2, middle)) / middle * (down - s)
        if name != "DPM2" and to > 0:
            x = x + torch.randn(x.shape, generator=generator).double() * up
        out.append(x)
    return out, calls


def _run(scheduler, timesteps, x, eta: float, generator, model=_eps) -> list:
    """The pipeline's loop over the scheduler's calls (scale_model_input, the model, step): x after each call."""
    out = []
    for t in timesteps:
        scaled = scheduler.scale_model_input(x, t)
        kwargs = {} if scheduler.ancestral is False else {"eta_ancestral": eta}
        x = scheduler.step(model(scaled, t).float(), t, x, generator=generator, **kwargs).prev_sample
        out.append(x)
    return out


@pytest.mark.parametrize("name", ["DPM2", "DPM2 a", "DPM++ 2S a"])
@pytest.mark.parametrize("kind", ["Uniform", "Karras", "KL Optimal"])
def test_midpoint_samplers_are_k_diffusions(name, kind):
    """Each step's two calls at k-diffusion's points (the step's sigma, then the midpoint in log sigma towards the next
    sigma or sigma_down), its formulas and its noise, at eta 1, 0 and between; DPM2 and DPM2 a on the sigmas of one
    step more with the next-to-last left out, as AUTOMATIC1111's; one call into sigma 0 (2 x steps - 1 calls); KL
    Optimal ends above sigma 0, so its last step calls twice too. Every eta draws the same noise."""
    import torch

    label = "" if kind == "Uniform" else f" {kind}"
    discard = name != "DPM++ 2S a"
    sample = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 14
    ends = {}
    for eta in (1.0, 0.0, 0.4):
        scheduler, timesteps = schedule(f"{name}{label}", SD15, 6, seed=0, eta=eta)
        table = Table(scheduler.alphas_cumprod)
        sigmas = _k_sigmas(kind, 6, scheduler.alphas_cumprod, discard)
        assert np.allclose(scheduler.edges, sigmas, rtol=1e-4, atol=1e-6), (eta, scheduler.edges, sigmas)
        expected, calls = _k_diffusion(name, sigmas, sample.double(), table, eta, torch.Generator().manual_seed(5))
        assert len(timesteps) == calls == 12 - (kind != "KL Optimal")
        generator = torch.Generator().manual_seed(5)
        got = _run(scheduler, timesteps, sample.clone(), eta, generator)
        ends[eta] = float(torch.randn(1, generator=generator))
        steps = [x for i, x in enumerate(got) if i == len(got) - 1 or scheduler.calls[i + 1][1] == 0]  # each step's end
        assert len(steps) == 6
        for i, (a, b) in enumerate(zip(steps, expected)):
            assert torch.allclose(a.double(), b, atol=2e-4 * max(1.0, float(b.abs().max()))), (eta, i)
    assert len(set(ends.values())) == 1  # the same draws at every eta
    if name != "DPM2":
        first, _ = schedule(f"{name}{label}", SD15, 6, seed=0)
        other, _ = schedule(f"{name}{label}", SD15, 6, seed=0, eta=0.4)
        assert not torch.equal(first.timesteps, other.timesteps)  # sigma_down moves the midpoints


def test_midpoint_samplers_plan_their_eta_and_discard_as_automatic1111():
    """A step with another eta than the scheduler's midpoints were planned for is refused; DPM++ 2S a discards on
    always_discard_next_to_last_sigma (interleaving after it), DPM2 and DPM2 a do already; img2img starts at a step's
    first call; prompt editing counts their steps twice, as AUTOMATIC1111's second-order samplers."""
    import torch

    scheduler, timesteps = schedule("DPM2 a", SD15, 5, seed=0, eta=0.5)
    with pytest.raises(ValueError, match=re.escape("planned for eta 0.5")):
        scheduler.step(torch.zeros(1, 4, 2, 2), timesteps[0], torch.zeros(1, 4, 2, 2), eta_ancestral=1.0)
    plain, _ = schedule("DPM++ 2S a", SD15, 6, seed=0)
    discarded, _ = schedule("DPM++ 2S a", SD15, 5, seed=0, discard=True)
    assert discarded.edges == plain.edges[:-2] + plain.edges[-1:]
    assert check_discard("DPM++ 2S a", True) and not check_discard("DPM2", True)
    with pytest.raises(InputError, match="cannot discard Heun's"):
        check_discard("Heun", True)
    _, timesteps = schedule("DPM2", SD15, 10, seed=0)
    start = img2img_start("DPM2", 10, 0.5)
    _, late = schedule("DPM2", SD15, 10, seed=0, start=start)
    assert torch.equal(late, timesteps[2 * start:])
    assert editing_steps("DPM2 a", 10) == editing_steps("DPM++ 2S a Karras", 10) == 20


def _karras(n: int, low: float, high: float):
    """k-diffusion's get_sigmas_karras, in its float32."""
    import torch

    ramp = torch.linspace(0, 1, n)
    sigmas = (high ** (1 / 7) + ramp * (low ** (1 / 7) - high ** (1 / 7))) ** 7
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _restart(sigmas, x, table: Table, generator) -> tuple:
    """AUTOMATIC1111's restart_sampler (its automatic restart list), written out: the final x, and the model calls."""
    import torch

    calls = 0

    def model(x, sigma):
        nonlocal calls
        calls += 1
        return x - sigma * _eps((x / math.sqrt(sigma**2 + 1)).float(), table.sigma_to_t(sigma))

    steps = len(sigmas) - 1
    restarts = {}
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = _karras(steps - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0]))
        restarts = {int(torch.argmin(abs(sigmas - 0.1))): (restart_steps + 1, restart_times, 2)}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restarts:
            restart_steps, times, restart_max = restarts[i + 1]
            top = int(torch.argmin(abs(sigmas - restart_max)))
            if top < i + 1:
                again = _karras(restart_steps, float(sigmas[i + 1]), float(sigmas[top]))[:-1]
                pairs += list(zip(again[:-1], again[1:])) * times
    last = None
    for old, new in pairs:
        old, new = float(old), float(new)
        if last is not None and last < old:
            x = x + torch.randn(x.shape, generator=generator).double() * math.sqrt(old**2 - last**2)
        denoised = model(x, old)
        d = (x - denoised) / old
        x_2 = x + d * (new - old)
        if new == 0:
            x = x_2
        else:
            x = x + (d + (x_2 - model(x_2, new)) / new) / 2 * (new - old)
        last = new
    return x, calls, len(pairs)


@pytest.mark.parametrize("steps, start", [(8, None), (20, None), (40, None), (40, 12), (30, 12)])
def test_restart_is_automatic1111s(steps, start):
    """AUTOMATIC1111's Restart (its restart_sampler, written out above): Heun's steps under 20, from 20 on Karras
    sigmas with a restart segment from the sigma nearest 2 down to the one nearest 0.1 (twice from 36 steps), noise
    up to each restart's top from the step's generator; in img2img planned on the sigmas left from its start (30 steps
    from 12: 18 left, no restart), as there. Its Automatic schedule is Karras."""
    import torch

    sample = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 3
    scheduler, timesteps = schedule("Restart Karras", SD15, steps, seed=0, start=start)
    table = Table(scheduler.alphas_cumprod)
    edges = torch.tensor(_k_sigmas("Karras", steps, scheduler.alphas_cumprod, False)[start or 0:], dtype=torch.float32)
    expected, calls, pairs = _restart(edges, sample.double(), table, torch.Generator().manual_seed(5))
    assert len(timesteps) == calls == 2 * pairs - 1
    left = steps - (start or 0)
    restarts = {id(step) for step, _ in scheduler.calls if step.draws}
    assert pairs == left and len(restarts) == (0 if left < 20 else 1 if left < 36 else 2)
    got = _run(scheduler, timesteps, sample.clone(), 1.0, torch.Generator().manual_seed(5))[-1]
    assert torch.allclose(got.double(), expected, atol=2e-4 * max(1.0, float(expected.abs().max())))
    if steps == 8:  # under 20 steps: Heun's on the schedule's sigmas
        heun, heun_timesteps = schedule("Heun Karras", SD15, steps, seed=0)
        assert torch.allclose(timesteps, heun_timesteps.float(), atol=1e-3)


def _dpm_fast(x, low: float, high: float, nfe: int, table: Table, eta: float, generator) -> tuple:
    """k-diffusion's sample_dpm_fast (DPMSolver.dpm_solver_fast and its 1-, 2- and 3-step updates), written out in its
    float32 t: the final x, and the model calls."""
    import torch

    calls = 0

    def eps(x, t):
        nonlocal calls
        calls += 1
        sigma = math.exp(-t)
        return _eps((x / math.sqrt(sigma**2 + 1)).float(), table.sigma_to_t(sigma)).double()

    def sigma(t):
        return math.exp(-t)

    t_start, t_end = -math.log(high), -math.log(low)
    m = nfe // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        if eta:
            to = sigma(t_next)
            up = min(to, eta * math.sqrt(to**2 * (sigma(t) ** 2 - to**2) / sigma(t) ** 2))
            t_next_ = min(t_end, -math.log(math.sqrt(to**2 - up**2)))
            su = math.sqrt(sigma(t_next) ** 2 - sigma(t_next_) ** 2)
        else:
            t_next_, su = t_next, 0.0
        h = t_next_ - t
        e = eps(x, t)
        if order == 1:
            new = x - sigma(t_next_) * math.expm1(h) * e
        elif order == 2:
            s1 = t + h / 2
            e1 = eps(x - sigma(s1) * math.expm1(h / 2) * e, s1)
            new = x - sigma(t_next_) * math.expm1(h) * e - sigma(t_next_) * math.expm1(h) * (e1 - e)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            e1 = eps(x - sigma(s1) * math.expm1(r1 * h) * e, s1)
            bend = (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)
            u2 = x - sigma(s2) * math.expm1(r2 * h) * e - sigma(s2) * bend * (e1 - e)
            e2 = eps(u2, s2)
            new = x - sigma(t_next_) * math.expm1(h) * e - sigma(t_next_) / r2 * (math.expm1(h) / h - 1) * (e2 - e)
        x = new + su * torch.randn(x.shape, generator=generator).double()
    return x, calls


def whole_range(name: str, steps: int, start: int | None, eta: float) -> tuple:
    """DPM fast's or DPM adaptive's scheduler and calls, the table, the schedule's sigmas from the start, and the
    (low, high) sigmas AUTOMATIC1111 runs it between: the model's whole range from noise (whose noise is the
    schedule's first sigma, checked), an img2img start's sigma to the schedule's last above 0."""
    scheduler, timesteps = schedule(name, SD15, steps, seed=0, start=start, eta=eta)
    table = Table(scheduler.alphas_cumprod)
    edges = _k_sigmas("Uniform", steps, scheduler.alphas_cumprod, False)[start or 0:]
    low, high = (table.sigmas[0], table.sigmas[-1]) if start is None else (edges[-2], edges[0])
    if start is None:
        assert scheduler.init_noise_sigma == pytest.approx(high, rel=1e-5)
    return scheduler, timesteps, table, edges, low, high


@pytest.mark.parametrize("steps, start", [(6, None), (7, None), (8, None), (12, 5)])
def test_dpm_fast_is_automatic1111s(steps, start):
    """AUTOMATIC1111's DPM fast (k-diffusion's sample_dpm_fast, written out above): from noise over the model's whole
    sigma range, ending at its lowest sigma; in img2img from its start's sigma to the schedule's last above 0, as
    there; as many calls as steps (the last steps of order 2 and 1 where the count is not a multiple of 3); eta 1, 0
    and between, the noise drawn at every step."""
    import torch

    sample = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 3
    for eta in (1.0, 0.0, 0.5):
        scheduler, timesteps, table, edges, low, high = whole_range("DPM fast", steps, start, eta)
        generator = torch.Generator().manual_seed(5)
        expected, calls = _dpm_fast(sample.double(), low, high, len(edges) - 1, table, eta, generator)
        after = float(torch.randn(1, generator=generator))
        assert len(timesteps) == calls == len(edges) - 1
        generator = torch.Generator().manual_seed(5)
        got = _run(scheduler, timesteps, sample.clone(), eta, generator)[-1]
        assert float(torch.randn(1, generator=generator)) == after  # a draw at every step
        assert torch.allclose(got.double(), expected, atol=2e-4 * max(1.0, float(expected.abs().max()))), eta
        assert float(scheduler.sigmas[-1]) == pytest.approx(low, rel=1e-5)  # it ends at sigma_min, not 0
