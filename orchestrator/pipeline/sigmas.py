"""Noise levels as k-diffusion and AUTOMATIC1111 compute them, for the schedule types diffusers has no switch for.

AUTOMATIC1111 1.10's schedule types (its modules/sd_schedulers.py) are functions from a step count to the sigmas a
k-diffusion sampler walks, over the model's training table (1000 sigmas, sqrt((1 - alpha_bar) / alpha_bar)): Karras,
Exponential and Beta diffusers computes the same way (orchestrator.pipeline.sampling.SCHEDULE_TYPES); the others
(OWN_SCHEDULES) are computed here and handed to diffusers' scheduler through the hook its Karras switch calls, so that
each scheduler's own bookkeeping (timesteps from sigmas, the second-order samplers' doubled entries, the final sigma)
stays diffusers'. Checked against the formulas in tests/test_core.py.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.errors import InputError

# NVIDIA's Align Your Steps sigmas for 10 steps (research.nvidia.com/labs/toronto-ai/AlignYourSteps), as AUTOMATIC1111
# takes them: SDXL's for SDXL checkpoints, SD 1.5's for every other; another step count is log-linear between them.
ALIGN_YOUR_STEPS = {
    "sd": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


class Table:
    """The model's training sigmas, and k-diffusion's conversions between a (fractional) timestep and a sigma: log
    sigma linear between neighbouring timesteps (its DiscreteSchedule's t_to_sigma and sigma_to_t)."""

    def __init__(self, alphas_cumprod) -> None:
        cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.sigmas = ((1 - cumprod) / cumprod) ** 0.5  # ascending: timestep 0's first
        self.log_sigmas = np.log(self.sigmas)

    def t_to_sigma(self, t) -> np.ndarray:
        t = np.clip(np.asarray(t, dtype=np.float64), 0, len(self.sigmas) - 1)
        low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
        fraction = t - low
        return np.exp((1 - fraction) * self.log_sigmas[low] + fraction * self.log_sigmas[high])

    def sigma_to_t(self, sigma: float) -> float:
        return float(np.interp(math.log(sigma), self.log_sigmas, np.arange(len(self.sigmas))))


def _polyexponential(n: int, table: Table, low: float, high: float, family: str) -> list[float]:
    # k-diffusion's get_sigmas_polyexponential at its rho 1 (AUTOMATIC1111's default for it): Exponential's sigmas
    ramp = np.linspace(1, 0, n)
    return [*np.exp(ramp * (math.log(high) - math.log(low)) + math.log(low)), 0.0]


def _sgm_uniform(n: int, table: Table, low: float, high: float, family: str) -> list[float]:
    # timesteps evenly from the highest sigma's towards the lowest's, the last left out (SGM's "trailing")
    t = np.linspace(table.sigma_to_t(high), table.sigma_to_t(low), n + 1)[:-1]
    return [*table.t_to_sigma(t), 0.0]


def _normal(n: int, table: Table, low: float, high: float, family: str) -> list[float]:
    # timesteps evenly from the highest sigma's to the lowest's, both kept: Uniform's sigmas on SD's table
    return [*table.t_to_sigma(np.linspace(table.sigma_to_t(high), table.sigma_to_t(low), n)), 0.0]


def _kl_optimal(n: int, table: Table, low: float, high: float, family: str) -> list[float]:
    # evenly in arctan(sigma); AUTOMATIC1111's ends at the lowest sigma, not at 0: the image keeps that little noise
    angles = np.arange(n + 1) / n
    return list(np.tan(angles * math.atan(low) + (1 - angles) * math.atan(high)))


def _align_your_steps(n: int, table: Table, low: float, high: float, family: str) -> list[float]:
    published = ALIGN_YOUR_STEPS["sdxl" if family.startswith("sdxl") else "sd"]
    if n == len(published):
        return [*published, 0.0]
    log_ascending = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(published)), np.log(published[::-1]))
    return [*np.exp(log_ascending)[::-1], 0.0]


def _simple(n: int, table: Table, low: float, high: float, family: str) -> list[float]:
    # every len/n-th training sigma from the top, the stride's product truncated
    stride = len(table.sigmas) / n
    return [float(table.sigmas[-(1 + int(x * stride))]) for x in range(n)] + [0.0]


def _ddim(n: int, table: Table, low: float, high: float, family: str) -> list[float]:
    # the training sigmas at 1, 1 + s, 1 + 2s, ... (s = len // n), highest first: more than n steps where s does not
    # divide len - 1 evenly (schedule_sigmas refuses those)
    return [float(s) for s in table.sigmas[1::max(len(table.sigmas) // n, 1)][::-1]] + [0.0]


OWN_SCHEDULES = {"Polyexponential": _polyexponential, "SGM Uniform": _sgm_uniform, "KL Optimal": _kl_optimal,
                 "Align Your Steps": _align_your_steps, "Simple": _simple, "Normal": _normal, "DDIM": _ddim}
ENDS_ABOVE_ZERO = {"KL Optimal"}  # its last sigma is the model's lowest: a sampler's final step must allow that


def schedule_sigmas(kind: str, steps: int, alphas_cumprod, family: str = "sd1") -> np.ndarray:
    """The steps + 1 sigmas, highest first, that AUTOMATIC1111's schedule type `kind` gives a k-diffusion sampler
    for `steps` steps over the model's whole sigma range."""
    table = Table(alphas_cumprod)
    sigmas = np.asarray(OWN_SCHEDULES[kind](steps, table, table.sigmas[0], table.sigmas[-1], family), np.float64)
    if len(sigmas) != steps + 1:
        raise InputError(f"steps: the {kind} schedule type runs {len(sigmas) - 1} steps for {steps} (AUTOMATIC1111 "
                         f"strides the model's {len(table.sigmas)} sigmas by {len(table.sigmas)} // {steps}); kiln "
                         f"runs the steps asked for only: use {_nearest_even(kind, steps, table)}")
    return sigmas


def check_steps(kind: str, steps: int, train_steps: int = 1000) -> None:
    """Refuse, naming the step counts that run, a step count the schedule type would run as another (DDIM's)."""
    schedule_sigmas(kind, steps, np.linspace(0.999, 0.001, train_steps))  # a count depends on the table's length only


def _nearest_even(kind: str, steps: int, table: Table) -> str:
    """The step counts nearest `steps`, below and above, that the schedule type runs as asked."""
    def runs(n: int) -> bool:
        return len(OWN_SCHEDULES[kind](n, table, table.sigmas[0], table.sigmas[-1], "sd1")) == n + 1

    below = next((n for n in range(steps - 1, 0, -1) if runs(n)), None)
    above = next((n for n in range(steps + 1, len(table.sigmas) + 1) if runs(n)), None)
    return " or ".join(str(n) for n in (below, above) if n is not None)


def install(scheduler, kind: str, family: str) -> None:
    """From now on `scheduler.set_timesteps` (configured with use_karras_sigmas, whose hook this replaces) sets the
    sigmas of schedule type `kind`; where they end above 0, the scheduler's last sigma is set to that end."""
    own = scheduler.set_timesteps
    final: list[float] = []

    def convert(in_sigmas, num_inference_steps: int | None = None) -> np.ndarray:
        sigmas = schedule_sigmas(kind, num_inference_steps or scheduler.num_inference_steps, scheduler.alphas_cumprod,
                                 family)
        final[:] = [float(sigmas[-1])]
        return sigmas[:-1]

    def set_timesteps(num_inference_steps: int, device=None) -> None:
        own(num_inference_steps, device)
        if final and final[0] != 0:
            scheduler.sigmas[-1] = final[0]

    scheduler._convert_to_karras = convert
    scheduler.set_timesteps = set_timesteps


def borrow(scheduler, other) -> None:
    """From now on, `scheduler.set_timesteps` sets `other`'s sigmas and timesteps (Sampler.sigmas_from)."""
    own = scheduler.set_timesteps

    def set_timesteps(num_inference_steps: int, device=None) -> None:
        own(num_inference_steps, device)
        other.set_timesteps(num_inference_steps, device)
        scheduler.sigmas, scheduler.timesteps = other.sigmas, other.timesteps

    scheduler.set_timesteps = set_timesteps


def sigma_at(scheduler, t) -> float:
    """The noise level (k-diffusion's sigma) of timestep `t` (fractional too), as k-diffusion's t_to_sigma, which
    AUTOMATIC1111's s_min_uncond compares against."""
    return float(Table(scheduler.alphas_cumprod).t_to_sigma(float(t)))
