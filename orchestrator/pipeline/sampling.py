"""Samplers, as AUTOMATIC1111 names them and diffusers computes them.

Sampler names map to diffusers' schedulers configured from the checkpoint's scheduler config; a name's schedule type
("Karras", "SGM Uniform", ...) switches diffusers' own sigmas or hands it kiln's (orchestrator.pipeline.sigmas).
The samplers' own noise is drawn as orchestrator.pipeline.seeds and orchestrator.pipeline.noise say.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kiln.errors import InputError, NotFoundError
from orchestrator.pipeline import noise, sigmas
from orchestrator.pipeline.sigmas import OWN_SCHEDULES, SCHEDULE_TYPES, schedule_types

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Sampler:
    scheduler: str  # diffusers class name
    overrides: dict = field(default_factory=dict)  # config values that make it this sampler
    seeded: bool = False  # draws its noise from its images' seeds (a Brownian tree), not from the step's generator
    second_order: bool = False  # two model calls a step: AUTOMATIC1111 counts prompt-editing steps twice
    k_diffusion: bool = True  # AUTOMATIC1111 runs it through k-diffusion (img2img_start), not as diffusers' own
    compvis: bool = False  # one of AUTOMATIC1111's own timestep samplers (orchestrator.pipeline.compvis)
    # where diffusers' scheduler has no switch for a schedule type: the scheduler, and its overrides, whose sigmas and
    # timesteps it runs (Euler a on Euler's Karras sigmas; both step through the same table)
    sigmas_from: tuple[str, dict] | None = None
    sigma_schedule: str | None = None  # one of sigmas.OWN_SCHEDULES: kiln computes its sigmas (sigmas.install)
    needs: str | None = None  # a package beyond the serving install's (LMS: scipy; the SDEs' Brownian tree: torchsde)
    # AUTOMATIC1111's discard_next_to_last_sigma: the sigmas of one step more, the last above 0 left out
    discard_penultimate: bool = False

    @property
    def own_timesteps(self) -> bool:
        """One of AUTOMATIC1111's timestep samplers (DDIM, PLMS, UniPC): no sigmas, whatever the schedule type."""
        return self.compvis or self.scheduler == "UniPCMultistepScheduler"


# k-diffusion's own schedule, which AUTOMATIC1111's "Automatic" and "Uniform" run for its k-diffusion samplers: the
# timesteps evenly from the last (999) to 0. diffusers' "linspace" gives those sigmas (to 3e-5, tests/test_core.py)
# for the schedulers below that take it; a checkpoint's "leading" (SD 1.x's, SDXL's) starts lower (11.0, not 14.6, at
# 20 steps) and gave another image than AUTOMATIC1111's for the same seed and noise; its Karras sigmas span the
# spaced range there, not the model's whole one as k-diffusion's. DDIM and PLMS are its timestep samplers, with a
# ladder and an img2img start of their own (orchestrator.pipeline.compvis); DPM++ 2M (2M SDE) keep the checkpoint's
# spacing: diffusers' multistep schedulers round their timesteps, so none of theirs is k-diffusion's. UniPC is its
# settings' defaults (bh1, order 3, lower order final, time_uniform: the model at 999 (1 - k / steps), the last step
# to timestep 0's noise, not 0), timesteps rounded.
UNIFORM = {"timestep_spacing": "linspace"}
SDE = {"algorithm_type": "sde-dpmsolver++"}
UNIPC = UNIFORM | {"solver_type": "bh1", "solver_order": 3, "lower_order_final": True, "final_sigmas_type": "sigma_min"}
# DPM++ 2M SDE's noise as AUTOMATIC1111's (brownian_noise): a Brownian tree seeded by each image's seed
BROWNIAN_2M = Sampler("DPMSolverMultistepEta", SDE, seeded=True, needs="torchsde")
SAMPLERS = {
    "Euler": Sampler("EulerDiscreteScheduler", UNIFORM),
    "Euler a": Sampler("EulerAncestralEta", UNIFORM),
    "Heun": Sampler("HeunDiscreteScheduler", UNIFORM, second_order=True),
    "DDIM": Sampler("CompVisDDIM", k_diffusion=False, compvis=True),
    "DDPM": Sampler("DDPMScheduler", k_diffusion=False),
    # AUTOMATIC1111's PLMS: linear multistep alone after a first step that evaluates twice (not PNDM's Runge-Kutta
    # warm-up, which tripled the UNet calls of a short run and could not run under 4 steps)
    "PLMS": Sampler("CompVisPLMS", k_diffusion=False, compvis=True),
    "LMS": Sampler("LMSDiscreteScheduler", UNIFORM, needs="scipy"),  # its integration
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": Sampler("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # Brownian-tree noise: torchsde
    "DPM++ SDE": Sampler("DPMSolverSDEEta", UNIFORM, seeded=True, second_order=True, needs="torchsde"),
    "DPM++ SDE Karras": Sampler("DPMSolverSDEEta", {"use_karras_sigmas": True} | UNIFORM, seeded=True,
                                second_order=True, needs="torchsde"),
    "DPM++ 2M SDE": BROWNIAN_2M,
    "DPM++ 2M SDE Karras": replace(BROWNIAN_2M, overrides=SDE | {"use_karras_sigmas": True}),
    # k-diffusion's get_sigmas_exponential (AUTOMATIC1111 1.9+'s Automatic schedule for DPM++ 2M SDE)
    "DPM++ 2M SDE Exponential": replace(BROWNIAN_2M, overrides=SDE | {"use_exponential_sigmas": True}),
    "UniPC": Sampler("UniPCMultistepScheduler", UNIPC, k_diffusion=False),
    "LCM": Sampler("LCMScheduler", k_diffusion=False),
    # after the others, so that SD.Next's sampler_index (a position in /sdapi/v1/samplers) keeps its meaning
    "DPM++ 2M SDE Heun": replace(BROWNIAN_2M, overrides=SDE | {"solver_type": "heun"}),
    # k-diffusion's sample_dpmpp_3m_sde (orchestrator.pipeline.ancestral): third order from its third step, its
    # second Heun's, to the end (diffusers' lower_order_final would step second-order late in a short run);
    # AUTOMATIC1111 discards its next-to-last sigma
    "DPM++ 3M SDE": replace(BROWNIAN_2M, overrides=SDE | {"solver_order": 3, "solver_type": "heun",
                                                          "lower_order_final": False}, discard_penultimate=True),
    # k-diffusion's sample_dpmpp_2s_ancestral, sample_dpm_2, sample_dpm_2_ancestral and AUTOMATIC1111's Restart, on
    # Euler's sigmas (orchestrator.pipeline.second_order); AUTOMATIC1111 discards DPM2's and DPM2 a's next-to-last sigma
    "DPM++ 2S a": Sampler("DPMPP2SAncestralScheduler", UNIFORM, second_order=True),
    "DPM2": Sampler("DPM2Scheduler", UNIFORM, second_order=True, discard_penultimate=True),
    "DPM2 a": Sampler("DPM2AncestralScheduler", UNIFORM, second_order=True, discard_penultimate=True),
    "Restart": Sampler("RestartScheduler", UNIFORM, second_order=True),
    "DDIM CFG++": Sampler("CompVisDDIMCFGPP", k_diffusion=False, compvis=True),  # steps along the unconditional too
    "DPM fast": Sampler("DPMFastScheduler", UNIFORM),
    "DPM adaptive": Sampler("DPMAdaptiveScheduler", UNIFORM),  # its calls decided as it runs (pipeline.adaptive)
}

# AUTOMATIC1111 1.10's schedule types (sigmas.SCHEDULE_TYPES, diffusers' switches; sigmas.OWN_SCHEDULES): any
# k-diffusion sampler above that has no schedule of its own runs on them as "<sampler> <type>" ("Euler Karras")
ALL_TYPES = (*SCHEDULE_TYPES, *OWN_SCHEDULES)
BORROWED_SIGMAS = {"EulerAncestralEta": "EulerDiscreteScheduler"}  # schedulers whose diffusers class has no switch

# What the checkpoint's scheduler config may say: its training noise schedule. Anything else in it
# (use_karras_sigmas, algorithm_type, ...) belongs to the scheduler it shipped with, and would turn
# "Euler" into a Karras or SDE variant without saying so.
SCHEDULE_KEYS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type", "steps_offset",
                 "trained_betas", "clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr", "timestep_spacing")

_IMPORT_LOCK = threading.Lock()
_CLASSES: dict[str, type] = {}
OWN_CLASSES = {**dict.fromkeys(("CompVisDDIM", "CompVisPLMS", "CompVisDDIMCFGPP"), "orchestrator.pipeline.compvis"),
               # diffusers' samplers with noise of their own, taking k-diffusion's eta
               **dict.fromkeys(("EulerAncestralEta", "DPMSolverMultistepEta"), "orchestrator.pipeline.ancestral"),
               "DPMSolverSDEEta": "orchestrator.pipeline.ancestral_sde",
               # the second-order samplers planned ahead, on Euler's sigmas
               **dict.fromkeys(("DPM2Scheduler", "DPM2AncestralScheduler", "DPMPP2SAncestralScheduler",
                                "RestartScheduler", "DPMFastScheduler"), "orchestrator.pipeline.second_order"),
               "DPMAdaptiveScheduler": "orchestrator.pipeline.adaptive"}


class UnknownSampler(NotFoundError):
    """The sampler name is not one we know; the message lists the valid ones."""


def check_sampler(name: str) -> Sampler:
    """One of SAMPLERS, or one of them on another schedule type ("Euler Karras": split_schedule), that this install
    runs (Sampler.needs: LMS needs scipy, which the serving install leaves out)."""
    if not isinstance(name, str):
        raise not_found(name)
    base, kind = (name, None) if name in SAMPLERS else split_schedule(name)
    if base not in SAMPLERS:
        raise not_found(name)
    if not runs_here(SAMPLERS[base]):  # before its class is looked at
        needs = SAMPLERS[base].needs
        raise UnknownSampler(f"Sampler not found: {name}: it needs {needs}, which this install lacks (pip install "
                             f"{needs})")
    return SAMPLERS[base] if kind is None else _on_schedule(base, kind)


@functools.cache
def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def runs_here(sampler: Sampler) -> bool:
    """Whether this install has what the sampler needs (Sampler.needs)."""
    return sampler.needs is None or _installed(sampler.needs)


def not_found(name) -> UnknownSampler:
    return UnknownSampler(f"Sampler not found: {name!r}; valid samplers: {', '.join(SAMPLERS)}, and the k-diffusion "
                          f"ones on a schedule type: \"Euler Karras\" ({', '.join(schedule_types())})")


def split_schedule(name: str) -> tuple[str, str | None]:
    """"Euler a Karras", "DPM++ 2M Karras" and "Euler SGM Uniform" -> (sampler, type); a name without a schedule type
    -> (name, None)."""
    kind = type_ending(name, ALL_TYPES)
    if kind is None or name[:-len(kind) - 1] not in SAMPLERS:
        return name, None
    return name[:-len(kind) - 1], kind


def type_ending(name: str, types, any_case: bool = False) -> str | None:
    """The longest of the schedule `types` that ends `name` after a space ("Euler a SGM Uniform": "SGM Uniform", not
    "Uniform"), in any case where `any_case`; None where none does."""
    fold = str.lower if any_case else str
    return max((kind for kind in types if fold(name).endswith(f" {fold(kind)}")), key=len, default=None)


@functools.cache  # a request resolves its sampler several times (validation, steps, scheduler); the answer is fixed
def _on_schedule(base: str, kind: str) -> Sampler:
    sampler = SAMPLERS[base]
    switch = SCHEDULE_TYPES.get(kind, "use_karras_sigmas")  # kiln's own sigmas: through the Karras switch's hook
    if any(key in sampler.overrides for key in SCHEDULE_TYPES.values()):
        raise UnknownSampler(f"Sampler not found: {base} {kind}: {base} runs its own schedule already")
    if not sampler.k_diffusion:
        raise UnknownSampler(f"Sampler not found: {base} {kind}: {base} runs its own timesteps, not k-diffusion's "
                             "sigmas, which AUTOMATIC1111's schedule types are")
    if kind not in schedule_types():
        raise UnknownSampler(f"Sampler not found: {base} {kind}: the {kind} schedule needs scipy, which this install "
                             "lacks (pip install scipy)")
    own = kind if kind in OWN_SCHEDULES else None
    options = set(inspect.signature(_scheduler_class(sampler.scheduler).__init__).parameters)
    overrides = sampler.overrides | {switch: True}
    if kind in sigmas.ENDS_ABOVE_ZERO:
        # diffusers' second-order step is Euler's where a final sigma is, k-diffusion's not (kiln's planned ones are)
        if sampler.second_order and not interleaves(sampler):
            raise UnknownSampler(f"Sampler not found: {base} {kind}: {kind} ends above sigma 0, and diffusers' "
                                 f"{sampler.scheduler} takes its last step as to 0")
        if "lower_order_final" in options:  # the last step second-order where the sigma after it is not 0
            overrides |= {"final_sigmas_type": "sigma_min", "lower_order_final": False}
    if switch in options:
        return replace(sampler, overrides=overrides, sigma_schedule=own)
    if sampler.scheduler in BORROWED_SIGMAS:
        return replace(sampler, sigmas_from=(BORROWED_SIGMAS[sampler.scheduler], overrides), sigma_schedule=own)
    raise UnknownSampler(f"Sampler not found: {base} {kind}: diffusers' {sampler.scheduler} has no {kind} schedule")


def interleaves(sampler: Sampler) -> bool:
    """Whether kiln's scheduler interleaves a second-order sampler's calls itself (orchestrator.pipeline.second_order),
    after its sigmas one a step, which the schedule settings may then move; diffusers' second-order schedulers
    (Heun, DPM++ SDE) interleave them in set_timesteps."""
    return hasattr(_scheduler_class(sampler.scheduler), "k_timesteps")


def editing_steps(name: str, steps: int) -> int:
    """The steps prompt editing counts for `steps` steps of the sampler: AUTOMATIC1111's total_steps (twice the
    steps for a second-order sampler, whose every step calls the model twice)."""
    return steps * 2 if check_sampler(name).second_order else steps


def schedule_kind(name: str) -> str | None:
    """The schedule type a k-diffusion sampler runs ("DPM++ 2M Karras": Karras); None for Uniform, or a sampler with
    timesteps of its own."""
    sampler = check_sampler(name)
    overrides = sampler.sigmas_from[1] if sampler.sigmas_from else sampler.overrides  # Euler a's: Euler's switch
    switched = [kind for kind, switch in SCHEDULE_TYPES.items() if overrides.get(switch)]
    return sampler.sigma_schedule or next(iter(switched), None) if sampler.k_diffusion else None


def make_scheduler(name: str, base_config: dict, seed: int | list[int] | None = None, family: str = "sd1",
                   settings: tuple[float, float, float] = sigmas.NO_SETTINGS, discard: bool = False,
                   eta: float = 1.0):
    """A fresh scheduler for one request (schedulers keep per-run state, so never share one).

    `seed` (one, or each image's) seeds the samplers that draw their own noise (the SDEs' Brownian trees), so a seed
    gives the same image every time; the others take the generator at each step. `family` (build.sd.families) picks
    Align Your Steps' sigmas; `settings` are AUTOMATIC1111's sigma_min, sigma_max and rho (sigmas.check_settings);
    `discard` its always_discard_next_to_last_sigma (check_discard); `eta` k-diffusion's (eta_ancestral), which
    places the ancestral midpoint samplers' second calls (orchestrator.pipeline.second_order).
    """
    sampler = check_sampler(name)
    scheduler = _scheduler_class(sampler.scheduler).from_config(_config(base_config, sampler.overrides))
    if sampler.seeded and seed is not None:
        scheduler.noise_sampler_seed = seed
    if hasattr(scheduler, "planned_eta"):
        scheduler.planned_eta = eta
    computes = scheduler
    if sampler.sigmas_from is not None:
        computes = _scheduler_class(sampler.sigmas_from[0]).from_config(_config(base_config, sampler.sigmas_from[1]))
        sigmas.borrow(scheduler, computes)
    kind = schedule_kind(name)
    if sampler.sigma_schedule is not None or (any(settings) and kind):  # kiln's (diffusers' take no settings)
        sigmas.install(computes, kind, family, settings)
    if sampler.discard_penultimate or check_discard(name, discard):
        sigmas.discard_penultimate(scheduler)
    return scheduler


def _takes_setting(name: str, setting: str, on: bool, refusal: str) -> Sampler | None:
    """The sampler where an AUTOMATIC1111 setting about k-diffusion's sigmas is on and applies; None where it is off,
    or the sampler is one of the timestep samplers, which it leaves alone, as there; kiln's diffusers-only samplers
    (LCM, DDPM) refuse it, naming `setting` and why (`refusal`)."""
    sampler = check_sampler(name)
    if not on or sampler.own_timesteps:
        return None
    if not sampler.k_diffusion:
        raise InputError(f"{setting}: kiln's {name} {refusal}; turn it off or use another sampler")
    return sampler


def check_discard(name: str, discard: bool) -> bool:
    """Whether AUTOMATIC1111's always_discard_next_to_last_sigma changes the sampler's sigmas (and its infotext says
    so): on its k-diffusion samplers that do not discard already; its timestep samplers (DDIM, PLMS, UniPC) have no
    sigmas to discard, as there. Refused: diffusers' second-order samplers (Heun, DPM++ SDE: it interleaves their two
    calls' sigmas), and diffusers' LCM and DDPM, whose timesteps are not k-diffusion's sigmas (AUTOMATIC1111's LCM
    is, and discards)."""
    sampler = _takes_setting(name, "always_discard_next_to_last_sigma", discard,
                             "runs diffusers' timesteps, not k-diffusion's sigmas, and has none to discard")
    if sampler is None or sampler.discard_penultimate:
        return False
    if sampler.second_order and not interleaves(sampler):
        raise InputError(f"always_discard_next_to_last_sigma: kiln cannot discard {name}'s next-to-last sigma "
                         "(a second-order sampler, whose two calls a step diffusers interleaves); turn it off or use "
                         "another sampler")
    return True


def check_sgm(name: str, sgm: bool) -> bool:
    """Whether AUTOMATIC1111's sgm_noise_multiplier changes a txt2img pass's start (and its infotext says so): on its
    k-diffusion samplers; its timestep samplers (DDIM, PLMS, UniPC) start as they do, as there. Refused on diffusers'
    LCM and DDPM, which start as diffusers' pipelines do (AUTOMATIC1111's LCM is a k-diffusion sampler)."""
    return _takes_setting(name, "sgm_noise_multiplier", sgm,
                          "starts from diffusers' noise, not k-diffusion's sigma_max") is not None


def initial_noise_scale(name: str, scheduler, sgm: bool) -> float:
    """What a txt2img pass's noise is multiplied by: the scheduler's init_noise_sigma, k-diffusion's sigma_max for
    the samplers that step the sample in sigma space; with AUTOMATIC1111's sgm_noise_multiplier (check_sgm)
    sqrt(1 + sigma_max^2) instead, "to match the official SDXL implementation". Schedulers that step the
    variance-preserving sample (DPM++ 2M and the multistep SDEs: init_noise_sigma 1) start there already."""
    scale = float(scheduler.init_noise_sigma)
    if check_sgm(name, sgm) and scale > 1:
        return math.sqrt(1 + float(scheduler.sigmas[0]) ** 2)
    return scale


def img2img_start(name: str, steps: int, strength: float) -> int:
    """The step of `steps` that img2img (and inpainting) starts from. AUTOMATIC1111's k-diffusion samplers run t_enc +
    1 steps from step steps - t_enc - 1, t_enc = int(min(strength, 0.999) * steps) (its setup_img2img_steps): one
    more than diffusers' img2img pipelines, from a noisier start (16 of 20 at 0.75, not 15; all 20 at 1). Its DDIM
    and PLMS take the same t_enc to a start of their own (orchestrator.pipeline.compvis.first_call). UniPC, DDPM and
    LCM run diffusers' int(strength * steps). At 0 none runs (the init image through the VAE; there, one step at the
    lowest sigma)."""
    if strength <= 0:
        return steps
    sampler = check_sampler(name)
    if sampler.k_diffusion or sampler.compvis:
        return steps - int(min(strength, 0.999) * steps) - 1
    return steps - min(int(steps * strength), steps)


def _config(base_config: dict, overrides: dict) -> dict:
    """The checkpoint's training schedule (SCHEDULE_KEYS) with a sampler's overrides."""
    return {k: v for k, v in base_config.items() if k in SCHEDULE_KEYS} | overrides


def schedule(name: str, base_config: dict, steps: int, seed: int | list[int], start: int | None = None,
             family: str = "sd1", settings: tuple[float, float, float] = sigmas.NO_SETTINGS,
             discard: bool = False, eta: float = 1.0) -> tuple:
    """A fresh scheduler (make_scheduler) set to `steps` steps, and the timesteps of its model calls: from noise (start
    None), or from img2img's `start` (img2img_start; its noise by step index, not by timestep value, which a
    multistep scheduler's rounding can repeat). AUTOMATIC1111's DDIM and PLMS begin where their own rules say
    (compvis.first_call); kiln's planned second-order samplers plan their calls from there (second_order)."""
    scheduler = make_scheduler(name, base_config, seed=seed, family=family, settings=settings, discard=discard, eta=eta)
    try:
        scheduler.set_timesteps(steps)
    except ValueError as exc:  # e.g. LCM takes at most as many steps as its original schedule
        raise InputError(f"steps: {name} cannot run {steps} steps ({exc})") from None
    if hasattr(scheduler, "begin"):  # AUTOMATIC1111's DDIM and PLMS; kiln's planned second-order samplers
        return scheduler, scheduler.begin(start)
    start = start or 0
    timesteps = scheduler.timesteps[start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):  # at 0 too, as diffusers' img2img pipelines: add_noise's step by index
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler, timesteps


def noised_to(scheduler, timesteps: torch.Tensor, rows: int) -> torch.Tensor:
    """The timestep img2img's latents are noised to, for each of `rows` rows: that of the first call, or for
    AUTOMATIC1111's DDIM and PLMS the ladder's entry above it (compvis: `noise_timestep`)."""
    import torch

    own = getattr(scheduler, "noise_timestep", None)
    return (timesteps[:1] if own is None else torch.tensor([own])).repeat(rows)


def _scheduler_class(name: str):
    import sys

    import diffusers

    with _IMPORT_LOCK:
        if name not in _CLASSES:
            # kiln's own classes: AUTOMATIC1111's timestep samplers; the samplers with noise of their own, with eta
            own = OWN_CLASSES.get(name)
            cls = getattr(importlib.import_module(own) if own else diffusers, name)
            for klass in cls.__mro__:  # its steps' noise from a Philox generator too (diffusers' draws it)
                noise.adapt(sys.modules[klass.__module__])
            _CLASSES[name] = cls
        return _CLASSES[name]


def preload() -> None:
    """Resolve every scheduler class (and the noise helpers) now, from one thread. diffusers imports its classes
    lazily on first attribute access, and that is not thread-safe: two generation threads touching it at once can
    see a half-initialized module. Services call this before starting their worker threads."""
    import diffusers.utils.torch_utils  # noqa: F401 - randn_tensor, used by every generation

    for sampler in SAMPLERS.values():
        if runs_here(sampler):
            _scheduler_class(sampler.scheduler)


CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}  # the step options and their defaults


def step_options(name: str) -> set[str]:
    """What the named sampler's scheduler.step takes beyond the model output, timestep and sample."""
    return set(inspect.signature(_scheduler_class(check_sampler(name).scheduler).step).parameters)


def step_kwargs(scheduler, generator, eta: float, settings: dict | None = None) -> dict:
    """What diffusers' pipelines pass to scheduler.step: eta and generator, where the scheduler takes them; the step
    settings (CHURN, eta_ancestral) where it takes them (a request with others than the defaults was checked against
    the sampler)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    kwargs |= {k: v for k, v in (settings or {}).items() if k in accepted}
    return kwargs
