"""AUTOMATIC1111's sampler names: sampler_name (or sampler_index, or an alias) with its 1.9+ scheduler, for both
passes, as one of kiln's samplers (orchestrator.pipeline.sampling), and the two listings."""

from __future__ import annotations

from kiln import schemas
from kiln.errors import InputError, KilnError
from orchestrator.pipeline import SAMPLERS, sampling

SAMPLER_ALIASES = {
    "Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"], "LMS": ["k_lms"], "Heun": ["k_heun"],
    "DPM++ 2M": ["k_dpmpp_2m"], "DPM++ 2M Karras": ["k_dpmpp_2m_ka"], "DPM++ SDE": ["k_dpmpp_sde"],
    "DPM++ SDE Karras": ["k_dpmpp_sde_ka"], "DPM++ 2M SDE": ["k_dpmpp_2m_sde"],
    "DPM++ 2M SDE Karras": ["k_dpmpp_2m_sde_ka"], "DPM++ 2M SDE Exponential": ["k_dpmpp_2m_sde_exp"], "DDIM": ["ddim"],
    "DDPM": ["ddpm"], "PLMS": ["plms", "PNDM"], "UniPC": ["unipc"], "LCM": ["lcm"],
    "DPM++ 2M SDE Heun": ["k_dpmpp_2m_sde_heun"], "DPM++ 3M SDE": ["k_dpmpp_3m_sde"],
    "DPM++ 2S a": ["k_dpmpp_2s_a"], "DPM2": ["k_dpm_2"], "DPM2 a": ["k_dpm_2_a"], "Restart": ["restart"],
    "DDIM CFG++": ["ddim_cfgpp"], "DPM fast": ["k_dpm_fast"], "DPM adaptive": ["k_dpm_ad"],
    # AUTOMATIC1111 1.6's names with a schedule in them, which resolve as "<sampler> <type>"
    "DPM++ 2M SDE Heun Karras": ["k_dpmpp_2m_sde_heun_ka"],
    "DPM++ 2M SDE Heun Exponential": ["k_dpmpp_2m_sde_heun_exp"],
    "DPM++ 3M SDE Karras": ["k_dpmpp_3m_sde_ka"], "DPM++ 3M SDE Exponential": ["k_dpmpp_3m_sde_exp"],
    "DPM++ 2S a Karras": ["k_dpmpp_2s_a_ka"], "DPM2 Karras": ["k_dpm_2_ka"], "DPM2 a Karras": ["k_dpm_2_a_ka"],
}
ALIAS_TO_SAMPLER = {alias.lower(): name for name, aliases in SAMPLER_ALIASES.items() for alias in aliases} | \
    {name.lower(): name for name in SAMPLERS}
# AUTOMATIC1111 1.9+ splits "DPM++ 2M Karras" into sampler_name + scheduler (a schedule type in the name wins); its
# Automatic is each sampler's own; its timestep samplers (DDIM, PLMS, UniPC) run their own steps whatever the type.
# AUTOMATIC1111 1.10's schedule types in its order: label -> (name, default rho, need_inner_model), as its
# /sdapi/v1/schedulers lists them; a request's scheduler may be the label, the name or an alias (any case).
SCHEDULE_LIST = {"Automatic": ("automatic", -1, False), "Uniform": ("uniform", -1, True),
                 "Karras": ("karras", 7.0, False),
                 "Exponential": ("exponential", -1, False), "Polyexponential": ("polyexponential", 1.0, False),
                 "SGM Uniform": ("sgm_uniform", -1, True), "KL Optimal": ("kl_optimal", -1, False),
                 "Align Your Steps": ("align_your_steps", -1, False), "Simple": ("simple", -1, True),
                 "Normal": ("normal", -1, True), "DDIM": ("ddim", -1, True), "Beta": ("beta", -1, True)}
SCHEDULE_ALIASES = {"SGM Uniform": ["SGMUniform"]}
SCHEDULES = {key.lower(): label for label, (name, *_) in SCHEDULE_LIST.items()
             for key in (label, name, *SCHEDULE_ALIASES.get(label, []))}
# their noise from the step's generator (ENSD's)
USES_ENSD = ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive")
AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential",  # the others: uniform
             "DPM++ 2M SDE Heun": "Exponential", "DPM++ 3M SDE": "Exponential", "DPM++ 2S a": "Karras",
             "DPM2": "Karras", "DPM2 a": "Karras", "Restart": "Karras"}


def sampler_name(body: schemas.Txt2ImgBody) -> str:
    """sampler_name (or the old sampler_index, or an alias such as k_euler_a) + scheduler -> one of SAMPLERS, or one
    on a schedule type ("Euler Karras"). SD.Next's integer sampler_index is the position in /sdapi/v1/samplers."""
    index = body.sampler_index
    if isinstance(index, int) and not isinstance(index, bool):
        if not 0 <= index < len(SAMPLERS):
            raise sampling.UnknownSampler(f"Sampler not found: index {index}; /sdapi/v1/samplers lists "
                                          f"{len(SAMPLERS)} (0 to {len(SAMPLERS) - 1})")
        index = list(SAMPLERS)[index]
    name = body.sampler_name or index or "Euler"  # AUTOMATIC1111's API default (its sampler_index field's)
    base, label = _named(name)
    scheduler = (body.scheduler or "automatic").lower()
    if scheduler not in SCHEDULES:
        raise InputError(f"scheduler {body.scheduler!r} is not supported; valid: {', '.join(SCHEDULE_LIST)}")
    label = label or SCHEDULES[scheduler]
    if label == "Automatic":
        label = AUTOMATIC.get(base, "Uniform")
    if label == "Uniform" or SAMPLERS[base].own_timesteps:
        return base
    sampling.check_sampler(f"{base} {label}")  # not found where it cannot run, saying why
    return f"{base} {label}"


def schedule_label(sampler_name: str | None, scheduler: str | None) -> str:
    """The schedule type a request runs by AUTOMATIC1111's name for it (its get_scheduler_str, before capitalizing):
    the one it names, or for Automatic the one its sampler's name carries or the sampler's own (DPM++ 2M: Karras),
    else Automatic."""
    label = scheduler or "Automatic"
    if label.lower() != "automatic":
        return label
    try:
        base, carried = _named(sampler_name or "Euler")
    except KilnError:  # (a name no sampler has: the request is refused before anything is saved)
        return label
    return carried or AUTOMATIC.get(base, "Automatic")


def _named(name: str) -> tuple[str, str | None]:
    """A sampler's name or alias -> (the sampler, the schedule type the name carries): "DPM++ 2M Karras" and
    "k_dpmpp_2m_ka" -> ("DPM++ 2M", "Karras"); "Euler a Uniform" -> ("Euler a", "Uniform"); "Euler" -> ("Euler",
    None)."""
    resolved = ALIAS_TO_SAMPLER.get(name.lower())
    if resolved is not None:
        return sampling.split_schedule(resolved)
    lowered = name.lower()
    label = sampling.type_ending(name, SCHEDULE_LIST, any_case=True)
    resolved = ALIAS_TO_SAMPLER.get(lowered[:-len(label) - 1]) if label else None
    if resolved is None:
        raise sampling.not_found(name)
    if sampling.split_schedule(resolved)[1]:  # "DPM++ 2M Karras Beta": not found, saying why
        sampling.check_sampler(f"{resolved} {label}")
    return resolved, label


def samplers() -> list[dict]:
    """AUTOMATIC1111's listing: each sampler's name, aliases and options, as its own say them (its Automatic schedule,
    second_order, discard_next_to_last_sigma, uses_ensd, brownian_noise, solver_type; strings, as its API's)."""
    return [{"name": name, "aliases": SAMPLER_ALIASES.get(name, []), "options": _options(name, sampler)}
            for name, sampler in SAMPLERS.items()]


def _options(name: str, sampler: sampling.Sampler) -> dict[str, str]:
    label = sampling.split_schedule(name)[1] or AUTOMATIC.get(name)  # "DPM++ 2M Karras": its own type
    flags = {"second_order": sampler.second_order, "discard_next_to_last_sigma": sampler.discard_penultimate,
             "uses_ensd": name in USES_ENSD, "brownian_noise": sampler.seeded}
    options = ({"scheduler": SCHEDULE_LIST[label][0]} if label else {}) | {k: "True" for k, on in flags.items() if on}
    if sampler.seeded and sampler.overrides.get("solver_type") == "heun" and "solver_order" not in sampler.overrides:
        options["solver_type"] = "heun"  # DPM++ 2M SDE Heun's (3M SDE's Heun is diffusers' switch, not its option)
    return options


def schedulers() -> list[dict]:
    runs = {"Automatic", "Uniform", *sampling.schedule_types()}  # Beta where scipy is installed
    return [{"name": name, "label": label, "aliases": SCHEDULE_ALIASES.get(label), "default_rho": rho,
             "need_inner_model": inner} for label, (name, rho, inner) in SCHEDULE_LIST.items() if label in runs]


def hires_fix_sampler(body: schemas.Txt2ImgBody) -> str:
    """The hires pass's sampler: hr_sampler_name (default: the first pass's, a type in its name taken off, as
    AUTOMATIC1111 takes it off on arrival) with hr_scheduler (default: the first pass's)."""
    name, label = _named(body.sampler_name) if body.sampler_name else (None, None)
    return sampler_name(body.model_copy(update={"sampler_name": body.hr_sampler_name or name,
                                                "scheduler": body.hr_scheduler or label or body.scheduler}))
