"""AUTOMATIC1111 / SD.Next sampler names -> diffusers schedulers, configured from the checkpoint's scheduler config."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from build.errors import InputError


@dataclass(frozen=True)
class Sampler:
    scheduler: str  # diffusers class name
    overrides: dict = field(default_factory=dict)  # config values that make it this sampler
    seeded: bool = False  # draws its noise from a seed in its config, not from the step's generator


SAMPLERS = {
    "Euler": Sampler("EulerDiscreteScheduler"),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler"),
    "Heun": Sampler("HeunDiscreteScheduler"),
    "DDIM": Sampler("DDIMScheduler"),
    "DDPM": Sampler("DDPMScheduler"),
    "PNDM": Sampler("PNDMScheduler"),
    "LMS": Sampler("LMSDiscreteScheduler"),
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": Sampler("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ SDE": Sampler("DPMSolverSDEScheduler", seeded=True),  # its Brownian-tree noise needs torchsde
    "DPM++ SDE Karras": Sampler("DPMSolverSDEScheduler", {"use_karras_sigmas": True}, seeded=True),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "UniPC": Sampler("UniPCMultistepScheduler"),
    "LCM": Sampler("LCMScheduler"),
}


_IMPORT_LOCK = threading.Lock()
_CLASSES: dict[str, type] = {}


class UnknownSampler(InputError):
    """The sampler name is not one we know; the message lists the valid ones."""


# What the checkpoint's scheduler config may say: its training noise schedule. Anything else in it
# (use_karras_sigmas, algorithm_type, ...) belongs to the scheduler it shipped with, and would turn
# "Euler" into a Karras or SDE variant without saying so.
SCHEDULE_KEYS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type", "steps_offset",
                 "trained_betas", "clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr", "timestep_spacing")


def make_scheduler(name: str, base_config: dict, seed: int | None = None):
    """A fresh scheduler for one request (schedulers keep per-run state, so never share one).

    `seed` seeds the samplers that draw their own noise (DPM++ SDE's Brownian tree), so a seed
    gives the same image every time; the others take the generator at each step.
    """

    try:
        sampler = SAMPLERS[name]
    except KeyError:
        raise UnknownSampler(f"Sampler not found: {name!r}; valid samplers: {', '.join(SAMPLERS)}") from None
    config = {k: v for k, v in base_config.items() if k in SCHEDULE_KEYS} | sampler.overrides
    if sampler.seeded and seed is not None:
        config["noise_sampler_seed"] = seed
    return _scheduler_class(sampler.scheduler).from_config(config)


def _scheduler_class(name: str):
    import diffusers

    with _IMPORT_LOCK:
        if name not in _CLASSES:
            _CLASSES[name] = getattr(diffusers, name)
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
