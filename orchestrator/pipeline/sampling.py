"""Samplers, seeds and noise, as AUTOMATIC1111 names them and diffusers computes them.

Sampler names map to diffusers' schedulers configured from the checkpoint's scheduler config.
Seeds follow AUTOMATIC1111 (-1 draws one; image i of a batch uses seed + i), and noise is drawn
exactly as diffusers draws it (torch CPU generators, one per image), so a seed gives diffusers'
image; or, with AUTOMATIC1111's GPU and NV sources, as torch draws it on an NVIDIA GPU
(orchestrator.pipeline.noise).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import secrets
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kiln.errors import NotFoundError
from orchestrator.pipeline import noise, sigmas
from orchestrator.pipeline.sigmas import OWN_SCHEDULES, SCHEDULE_TYPES, schedule_types

if TYPE_CHECKING:
    import torch

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Sampler:
    scheduler: str  # diffusers class name
    overrides: dict = field(default_factory=dict)  # config values that make it this sampler
    seeded: bool = False  # draws its noise from a seed in its config, not from the step's generator
    second_order: bool = False  # two model calls a step: AUTOMATIC1111 counts prompt-editing steps twice
    k_diffusion: bool = True  # AUTOMATIC1111 runs it through k-diffusion (img2img_start), not as diffusers' own
    compvis: bool = False  # one of AUTOMATIC1111's own timestep samplers (orchestrator.pipeline.compvis)
    # where diffusers' scheduler has no switch for a schedule type: the scheduler, and its overrides, whose sigmas and
    # timesteps it runs (Euler a on Euler's Karras sigmas; both step through the same table)
    sigmas_from: tuple[str, dict] | None = None
    sigma_schedule: str | None = None  # one of sigmas.OWN_SCHEDULES: kiln computes its sigmas (sigmas.install)


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
UNIPC = UNIFORM | {"solver_type": "bh1", "solver_order": 3, "lower_order_final": True, "final_sigmas_type": "sigma_min"}
SAMPLERS = {
    "Euler": Sampler("EulerDiscreteScheduler", UNIFORM),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler", UNIFORM),
    "Heun": Sampler("HeunDiscreteScheduler", UNIFORM, second_order=True),
    "DDIM": Sampler("CompVisDDIM", k_diffusion=False, compvis=True),
    "DDPM": Sampler("DDPMScheduler", k_diffusion=False),
    # AUTOMATIC1111's PLMS: linear multistep alone after a first step that evaluates twice (not PNDM's Runge-Kutta
    # warm-up, which tripled the UNet calls of a short run and could not run under 4 steps)
    "PLMS": Sampler("CompVisPLMS", k_diffusion=False, compvis=True),
    "LMS": Sampler("LMSDiscreteScheduler", UNIFORM),
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": Sampler("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # Brownian-tree noise: torchsde
    "DPM++ SDE": Sampler("DPMSolverSDEScheduler", UNIFORM, seeded=True, second_order=True),
    "DPM++ SDE Karras": Sampler("DPMSolverSDEScheduler", {"use_karras_sigmas": True} | UNIFORM, seeded=True,
                                second_order=True),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                   "use_karras_sigmas": True}),
    # k-diffusion's get_sigmas_exponential (AUTOMATIC1111 1.9+'s Automatic schedule for DPM++ 2M SDE)
    "DPM++ 2M SDE Exponential": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                        "use_exponential_sigmas": True}),
    "UniPC": Sampler("UniPCMultistepScheduler", UNIPC, k_diffusion=False),
    "LCM": Sampler("LCMScheduler", k_diffusion=False),
}

# AUTOMATIC1111 1.10's schedule types (sigmas.SCHEDULE_TYPES, diffusers' switches; sigmas.OWN_SCHEDULES): any
# k-diffusion sampler above that has no schedule of its own runs on them as "<sampler> <type>" ("Euler Karras")
ALL_TYPES = sorted([*SCHEDULE_TYPES, *OWN_SCHEDULES], key=len, reverse=True)  # longest first: "SGM Uniform"
BORROWED_SIGMAS = {"EulerAncestralDiscreteScheduler": "EulerDiscreteScheduler"}  # diffusers' classes with no switch

# What the checkpoint's scheduler config may say: its training noise schedule. Anything else in it
# (use_karras_sigmas, algorithm_type, ...) belongs to the scheduler it shipped with, and would turn
# "Euler" into a Karras or SDE variant without saying so.
SCHEDULE_KEYS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type", "steps_offset",
                 "trained_betas", "clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr", "timestep_spacing")

_IMPORT_LOCK = threading.Lock()
_CLASSES: dict[str, type] = {}


class UnknownSampler(NotFoundError):
    """The sampler name is not one we know; the message lists the valid ones."""


def check_sampler(name: str) -> Sampler:
    """One of SAMPLERS, or one of them on another schedule type ("Euler Karras": split_schedule)."""
    if isinstance(name, str) and name in SAMPLERS:
        return SAMPLERS[name]
    base, kind = split_schedule(name) if isinstance(name, str) else (name, None)
    if kind is None:
        raise not_found(name)
    return _on_schedule(base, kind)


def not_found(name) -> UnknownSampler:
    return UnknownSampler(f"Sampler not found: {name!r}; valid samplers: {', '.join(SAMPLERS)}, and the k-diffusion "
                          f"ones on a schedule type: \"Euler Karras\" ({', '.join(schedule_types())})")


def split_schedule(name: str) -> tuple[str, str | None]:
    """"Euler a Karras", "DPM++ 2M Karras" and "Euler SGM Uniform" -> (sampler, type); a name without a schedule type
    -> (name, None)."""
    kind = next((kind for kind in ALL_TYPES if name.endswith(f" {kind}")), None)
    if kind is None or name[:-len(kind) - 1] not in SAMPLERS:
        return name, None
    return name[:-len(kind) - 1], kind


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
        if sampler.second_order:  # diffusers' second-order step is Euler's where a final sigma is, k-diffusion's not
            raise UnknownSampler(f"Sampler not found: {base} {kind}: {kind} ends above sigma 0, and diffusers' "
                                 f"{sampler.scheduler} takes its last step as to 0")
        if "lower_order_final" in options:  # the last step second-order where the sigma after it is not 0
            overrides |= {"final_sigmas_type": "sigma_min", "lower_order_final": False}
    if switch in options:
        return replace(sampler, overrides=overrides, sigma_schedule=own)
    if sampler.scheduler in BORROWED_SIGMAS:
        return replace(sampler, sigmas_from=(BORROWED_SIGMAS[sampler.scheduler], overrides), sigma_schedule=own)
    raise UnknownSampler(f"Sampler not found: {base} {kind}: diffusers' {sampler.scheduler} has no {kind} "
                         f"schedule")


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


def make_scheduler(name: str, base_config: dict, seed: int | None = None, family: str = "sd1",
                   settings: tuple[float, float, float] = sigmas.NO_SETTINGS):
    """A fresh scheduler for one request (schedulers keep per-run state, so never share one).

    `seed` seeds the samplers that draw their own noise (DPM++ SDE's Brownian tree), so a seed
    gives the same image every time; the others take the generator at each step. `family`
    (build.sd.families) picks Align Your Steps' sigmas; `settings` are AUTOMATIC1111's sigma_min,
    sigma_max and rho (sigmas.check_settings).
    """
    sampler = check_sampler(name)
    config = _config(base_config, sampler.overrides)
    if sampler.seeded and seed is not None:
        config["noise_sampler_seed"] = seed
    scheduler = _scheduler_class(sampler.scheduler).from_config(config)
    computes = scheduler
    if sampler.sigmas_from is not None:
        computes = _scheduler_class(sampler.sigmas_from[0]).from_config(_config(base_config, sampler.sigmas_from[1]))
        sigmas.borrow(scheduler, computes)
    kind = schedule_kind(name)
    if sampler.sigma_schedule is not None or (any(settings) and kind):  # kiln's (diffusers' take no settings)
        sigmas.install(computes, kind, family, settings)
    return scheduler


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


def schedule(name: str, base_config: dict, steps: int, seed: int, start: int | None = None, family: str = "sd1",
             settings: tuple[float, float, float] = sigmas.NO_SETTINGS) -> tuple:
    """A fresh scheduler set to `steps` steps, and the timesteps of its model calls: from noise (start None), or from
    img2img's `start` (img2img_start; its noise by step index, not by timestep value, which a multistep scheduler's
    rounding can repeat). AUTOMATIC1111's DDIM and PLMS begin where their own rules say (compvis.first_call)."""
    from kiln.errors import InputError

    scheduler = make_scheduler(name, base_config, seed=seed, family=family, settings=settings)
    try:
        scheduler.set_timesteps(steps)
    except ValueError as exc:  # e.g. LCM takes at most as many steps as its original schedule
        raise InputError(f"steps: {name} cannot run {steps} steps ({exc})") from None
    if check_sampler(name).compvis:
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
            # AUTOMATIC1111's timestep samplers are kiln's own classes (orchestrator.pipeline.compvis)
            own = name.startswith("CompVis")
            cls = getattr(importlib.import_module("orchestrator.pipeline.compvis") if own else diffusers, name)
            noise.adapt(sys.modules[cls.__module__])  # its steps' noise from a Philox generator too
            _CLASSES[name] = cls
        return _CLASSES[name]


def preload() -> None:
    """Resolve every scheduler class (and the noise helpers) now, from one thread.

    diffusers imports its classes lazily on first attribute access, and that is not thread-safe:
    two generation threads touching it at once can see a half-initialized module. Services call
    this before starting their worker threads.
    """
    import diffusers.utils.torch_utils  # noqa: F401 - randn_tensor, used by every generation

    for sampler in SAMPLERS.values():
        _scheduler_class(sampler.scheduler)


CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}  # the step options and their defaults


def step_options(name: str) -> set[str]:
    """What the named sampler's scheduler.step takes beyond the model output, timestep and sample."""
    return set(inspect.signature(_scheduler_class(check_sampler(name).scheduler).step).parameters)


def step_kwargs(scheduler, generator, eta: float, churn: dict | None = None) -> dict:
    """What diffusers' pipelines pass to scheduler.step: eta and generator, where the scheduler takes them; the churn
    options (CHURN) where it takes them (a request with others than the defaults was checked against the sampler)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    kwargs |= {k: v for k, v in (churn or {}).items() if k in accepted}
    return kwargs


# -- seeds and noise ------------------------------------------------------------------------------
def draw_seed(seed: int) -> int:
    """AUTOMATIC1111's -1: a fresh random seed; any other seed as it is. Drawn once per job, so that n_iter runs
    chain from it."""
    return secrets.randbelow(MAX_SEED + 1) if seed == -1 else seed


def batch_seeds(seed: int, count: int) -> list[int]:
    """Image i of a batch uses seed + i (AUTOMATIC1111), wrapping at 2^32."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


class Seeds:
    """A run's seeds as AUTOMATIC1111 uses them (its ImageRNG): image i's seed and variation seed, how far its noise
    is slerped toward the variation seed's (`strength`), the size whose noise it keeps at the centre ("Resize seed
    from": `resize_from`, width x height in pixels), the eta noise seed delta (ENSD: after the initial noise, the
    samplers' own noise comes from generators seeded seed + delta), and the random number source
    (orchestrator.pipeline.noise)."""

    def __init__(self, seeds: list[int], subseeds: list[int] | None = None, strength: float = 0.0,
                 resize_from: tuple[int, int] | None = None, delta: int = 0, source: str = "CPU") -> None:
        self.seeds, self.subseeds, self.strength = seeds, subseeds, strength
        self.resize_from, self.delta, self.source = resize_from, delta, source
        self._reseeded: list[tuple] = []  # (generator, its state when made): the steps' generators under ENSD

    def generators(self) -> list:
        """Fresh generators, one per image: the initial noise's (and, drawn on, the samplers')."""
        return [noise.generator(s, self.source) for s in self.seeds]

    def for_latents(self, generators: list) -> list:
        """The generators the VAE's latent sample draws from: the images' own with the CPU source (before the noise,
        diffusers' order); otherwise a stream of each seed apart, so that the noise is the seed's first draw, as
        AUTOMATIC1111's (orchestrator.pipeline.noise)."""
        return generators if self.source == "CPU" else [noise.generator(s, self.source, 1) for s in self.seeds]

    def noise(self, shape: tuple, generator, scale_factor: int) -> torch.Tensor:
        """The initial noise, drawn like diffusers' (each image's generator); with a variation seed, slerped toward
        its noise; resized from another size, that size's noise pasted at the centre of this one's (the generator
        still draws this size's, so the samplers' later noise is the same as without)."""
        import torch

        small = None
        if self.resize_from is not None:
            small = (shape[1], self.resize_from[1] // scale_factor, self.resize_from[0] // scale_factor)
            small = None if small == tuple(shape[1:]) else small
        drawn = noise.draw(shape, generator)
        if self.strength == 0 and small is None:
            return drawn
        rows = []
        for i, seed in enumerate(self.seeds):
            own = drawn[i] if small is None else self._randn(seed, small)
            if self.strength > 0:
                own = slerp(self.strength, own, self._randn(self.subseeds[i], small or tuple(shape[1:])))
            rows.append(own if small is None else _centred(own, drawn[i]))
        return torch.stack(rows)

    def for_steps(self, generator):
        """The generator(s) a pass's steps draw from: the initial noise's, or with ENSD fresh ones from seed + delta
        (AUTOMATIC1111 reseeds right after each pass's initial noise)."""
        if not self.delta:
            return generator
        fresh = [noise.generator(s + self.delta, self.source) for s in self.seeds]
        self._reseeded += [(g, g.get_state()) for g in fresh]
        return fresh if len(fresh) > 1 else fresh[0]

    @property
    def delta_used(self) -> bool:
        """Whether a sampler drew from the reseeded generators, so that ENSD changed the image (AUTOMATIC1111 writes
        ENSD in the infotext only for the samplers it changes)."""
        import torch

        def same(a, b) -> bool:
            return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

        return any(not same(g.get_state(), state) for g, state in self._reseeded)

    def _randn(self, seed: int, shape: tuple) -> torch.Tensor:
        """A seed's first draw, from a fresh generator (AUTOMATIC1111's randn(seed, shape))."""
        return noise.draw(shape, noise.generator(seed, self.source))


def _centred(small: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` with `small` pasted at its centre, cut to fit where larger (AUTOMATIC1111's arithmetic, to its odd
    sizes: the offsets are floor halves of the difference)."""
    out = full.clone()
    spans = []
    for have, want in zip(small.shape[1:], full.shape[1:]):
        offset = (want - have) // 2
        size = have if offset >= 0 else have + 2 * offset
        spans.append((max(offset, 0), max(-offset, 0), size))
    (ty, sy, h), (tx, sx, w) = spans
    out[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return out


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's spherical interpolation of one image's noise (C, H, W) from `low` (t=0) to `high` (t=1): each
    column (the H values at one channel and x) on its own great circle. Where the columns are parallel on average it
    is linear with the weights the other way round, as there (only a variation seed equal to the seed gets there, and
    then both noises are the same)."""
    import torch

    a, b = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)
    dot = (a * b).sum(1)
    if dot.mean() > 0.9995:
        return t * low + (1 - t) * high
    omega = torch.acos(dot.clamp(-1, 1))
    sine = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sine).unsqueeze(1) * low + (torch.sin(t * omega) / sine).unsqueeze(1) * high
