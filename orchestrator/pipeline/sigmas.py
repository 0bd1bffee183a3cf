"""Noise levels as k-diffusion and AUTOMATIC1111 compute them, for the schedule types diffusers has no switch for.

AUTOMATIC1111 1.10's schedule types (its modules/sd_schedulers.py) are functions from a step count to the sigmas a
k-diffusion sampler walks, over the model's training table (1000 sigmas, sqrt((1 - alpha_bar) / alpha_bar)): Karras,
Exponential and Beta diffusers computes the same way (SCHEDULE_TYPES, its config switches); the others
(OWN_SCHEDULES) are computed here and handed to diffusers' scheduler through the hook its Karras switch calls, so that
each scheduler's own bookkeeping (timesteps from sigmas, the second-order samplers' doubled entries, the final sigma)
stays diffusers'. So are all of them where AUTOMATIC1111's schedule settings (sigma_min, sigma_max, rho: Settings)
move their range or curve, which diffusers' switches do not take. Checked against the formulas in tests/test_core.py.
"""

from __future__ import annotations

import functools
import importlib.util
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


def _karras(n: int, table: Table, low: float, high: float, family: str, rho: float = 7.0) -> list[float]:
    # Karras et al.'s: evenly in sigma^(1/rho)
    ramp = np.linspace(0, 1, n)
    return [*(high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho, 0.0]


def _exponential(n: int, table: Table, low: float, high: float, family: str) -> list[float]:
    return [*np.exp(np.linspace(math.log(high), math.log(low), n)), 0.0]


def _polyexponential(n: int, table: Table, low: float, high: float, family: str, rho: float = 1.0) -> list[float]:
    # k-diffusion's get_sigmas_polyexponential; at its rho 1 (AUTOMATIC1111's default for it) Exponential's sigmas
    ramp = np.linspace(1, 0, n) ** rho
    return [*np.exp(ramp * (math.log(high) - math.log(low)) + math.log(low)), 0.0]


def _beta(n: int, table: Table, low: float, high: float, family: str) -> list[float]:
    # "Beta Sampling is All You Need" at AUTOMATIC1111's alpha = beta = 0.6
    from scipy import stats

    return [*(low + stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6) * (high - low)), 0.0]


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
# AUTOMATIC1111 1.9+'s types that diffusers computes as k-diffusion does (tests/test_core.py), as the config switch
# that turns a scheduler's sigmas into them (Beta needs scipy)
SCHEDULE_TYPES = {"Karras": "use_karras_sigmas", "Exponential": "use_exponential_sigmas", "Beta": "use_beta_sigmas"}
SWITCHED = {"Karras": _karras, "Exponential": _exponential, "Beta": _beta}  # diffusers' switches: here for settings
# The types that take AUTOMATIC1111's sigma range (the others ignore it there, and kiln refuses it with them), and
# those that take a rho, with their own
TAKE_RANGE = ("Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Normal", "Beta")
OWN_RHO = {"Karras": 7.0, "Polyexponential": 1.0}
NO_SETTINGS = (0.0, 0.0, 0.0)  # (sigma_min, sigma_max, rho): 0 is the model's range, the type's own rho


@functools.cache
def schedule_types() -> list[str]:
    """The schedule types this install runs (Beta needs scipy, which the serving install leaves out)."""
    return [kind for kind in [*SCHEDULE_TYPES, *OWN_SCHEDULES]
            if kind != "Beta" or importlib.util.find_spec("scipy") is not None]


def schedule_sigmas(kind: str, steps: int, alphas_cumprod, family: str = "sd1",
                    settings: tuple[float, float, float] = NO_SETTINGS) -> np.ndarray:
    """The steps + 1 sigmas, highest first, that AUTOMATIC1111's schedule type `kind` gives a k-diffusion sampler
    for `steps` steps over the model's whole sigma range, or over `settings`' (check_settings)."""
    table = Table(alphas_cumprod)
    low, high = settings[0] or table.sigmas[0], settings[1] or table.sigmas[-1]
    if low >= high:
        raise InputError(f"sigma_min {low:.4g} must be below sigma_max {high:.4g} (0 is the model's: "
                         f"{table.sigmas[0]:.4g} and {table.sigmas[-1]:.4g})")
    options = {"rho": settings[2]} if settings[2] and kind in OWN_RHO else {}
    function = OWN_SCHEDULES.get(kind) or SWITCHED[kind]
    sigmas = np.asarray(function(steps, table, low, high, family, **options), np.float64)
    if len(sigmas) != steps + 1:
        raise InputError(f"steps: the {kind} schedule type runs {len(sigmas) - 1} steps for {steps} (AUTOMATIC1111 "
                         f"strides the model's {len(table.sigmas)} sigmas by {len(table.sigmas)} // {steps}); kiln "
                         f"runs the steps asked for only: use {_counts_that_run(kind, steps, table)}")
    return sigmas


def _counts_that_run(kind: str, steps: int, table: Table) -> str:
    """The step counts nearest `steps`, below and above, that the schedule type runs as asked."""
    def runs(n: int) -> bool:
        return len(OWN_SCHEDULES[kind](n, table, table.sigmas[0], table.sigmas[-1], "sd1")) == n + 1

    below = next((n for n in range(steps - 1, 0, -1) if runs(n)), None)
    above = next((n for n in range(steps + 1, len(table.sigmas) + 1) if runs(n)), None)
    return " or ".join(str(n) for n in (below, above) if n is not None)


def check_settings(kind: str | None, settings: tuple[float, float, float], sampler: str) -> None:
    """AUTOMATIC1111's schedule settings only where they change the sigmas: a range for the types that span one
    (TAKE_RANGE), a rho for Karras and Polyexponential; it ignores them elsewhere, and kiln refuses them there."""
    low, high, rho = settings
    for name, value in zip(("sigma_min", "sigma_max", "rho"), settings):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise InputError(f"{name} must be a number, 0 or more (0: the model's, or the type's own), got {value!r}")
    if (low or high) and kind not in TAKE_RANGE:
        raise InputError(f"sigma_min / sigma_max: the {sampler} sampler's schedule ({kind or 'Uniform'}) spans no "
                         f"range to move (AUTOMATIC1111 ignores them there); types that do: {', '.join(TAKE_RANGE)}")
    if rho and kind not in OWN_RHO:
        raise InputError(f"rho: the {sampler} sampler's schedule ({kind or 'Uniform'}) has no rho (AUTOMATIC1111 "
                         f"ignores it there); types that do: {', '.join(OWN_RHO)}")


def install(scheduler, kind: str, family: str, settings: tuple[float, float, float] = NO_SETTINGS) -> None:
    """From now on `scheduler.set_timesteps` (configured with one of diffusers' sigma switches, whose hooks this
    replaces) sets the sigmas of schedule type `kind`, within `settings`; where they end above 0, the scheduler's last
    sigma is set to that end (before a scheduler that interleaves its calls interleaves them: steps_method)."""
    method = steps_method(scheduler)
    own = getattr(scheduler, method)
    final: list[float] = []

    def convert(in_sigmas, num_inference_steps: int | None = None) -> np.ndarray:
        sigmas = schedule_sigmas(kind, num_inference_steps or scheduler.num_inference_steps, scheduler.alphas_cumprod,
                                 family, settings)
        final[:] = [float(sigmas[-1])]
        return sigmas[:-1]

    def set_timesteps(num_inference_steps: int, device=None) -> None:
        own(num_inference_steps, device)
        if final and final[0] != 0:
            scheduler.sigmas[-1] = final[0]

    scheduler._convert_to_karras = scheduler._convert_to_exponential = scheduler._convert_to_beta = convert
    setattr(scheduler, method, set_timesteps)


def steps_method(scheduler) -> str:
    """The method that sets a scheduler's sigmas one a step: set_timesteps, or for the schedulers that interleave
    their later calls' sigmas after it (orchestrator.pipeline.second_order) their k_timesteps."""
    return "k_timesteps" if hasattr(scheduler, "k_timesteps") else "set_timesteps"


def discard_penultimate(scheduler) -> None:
    """From now on `scheduler.set_timesteps(n)` sets the sigmas of n + 1 steps with the last above the final one left
    out (AUTOMATIC1111's discard_next_to_last_sigma): n steps, the last from the second-lowest sigma to the end. For
    schedulers that call the model once a sigma (timesteps[i] is sigmas[i]'s), or that interleave their second calls
    after these steps (steps_method)."""
    import torch

    method = steps_method(scheduler)
    own = getattr(scheduler, method)

    def set_timesteps(num_inference_steps: int, device=None) -> None:
        try:
            own(num_inference_steps + 1, device)
        except InputError as exc:
            raise InputError(f"{exc} (always_discard_next_to_last_sigma: {num_inference_steps} steps take the sigmas "
                             f"of {num_inference_steps + 1}; ask for one step fewer than those)") from None
        scheduler.sigmas = torch.cat([scheduler.sigmas[:-2], scheduler.sigmas[-1:]])
        scheduler.timesteps = scheduler.timesteps[:-1]
        scheduler.num_inference_steps = num_inference_steps

    setattr(scheduler, method, set_timesteps)


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
