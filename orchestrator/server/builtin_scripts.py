"""AUTOMATIC1111's built-in always-on scripts as a request's alwayson_scripts names them (its web UI's own payload,
a client replaying one): Seed, Sampler and Refiner hold the UI's copy of fields the request also has, and
AUTOMATIC1111's API never runs them (their setup is the UI's only: setup_for_ui_only), so the request's fields rule;
Comments and Hypertile take no values; Extra options takes the values of the settings its server's
extra_options_txt2img/img2img name (none by default), which kiln has no such list for.

kiln accepts them where nothing would be dropped: Seed's, Sampler's and Refiner's values must be what the request's
own fields say (as the UI's setup would set them), and the others' args empty. A difference is a 422 naming both,
never a value taken and ignored. Names in any case, as AUTOMATIC1111 looks them up. A script's request is checked
once, as sent; its cells (their seeds and steps the script's) do not carry them (`without`).
"""

from __future__ import annotations

from typing import Any

from kiln import schemas
from kiln.errors import InputError
from orchestrator.pipeline.requests import Refiner
from orchestrator.server.sampler_names import sampler_name, samplers, schedulers

ARGS = {"seed": ("seed", "Extra", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h"),
        "sampler": ("steps", "sampler_name", "scheduler"),
        "refiner": ("Refiner", "refiner_checkpoint", "refiner_switch_at"),
        "comments": (), "extra options": (), "hypertile": ()}
NAMES = tuple(ARGS)


def script_args(name: str) -> list[dict]:
    """/sdapi/v1/script-info's args of a built-in script, as its UI declares them (its defaults, ranges, choices)."""
    if name == "seed":
        return [{"label": "Seed", "value": -1}, {"label": "Extra", "value": False},
                {"label": "Variation seed", "value": -1},
                {"label": "Variation strength", "value": 0, "minimum": 0, "maximum": 1, "step": 0.01},
                *({"label": f"Resize seed from {side}", "value": 0, "minimum": 0, "maximum": 2048, "step": 8}
                  for side in ("width", "height"))]
    if name == "sampler":
        return [{"label": "Sampling steps", "value": 20, "minimum": 1, "maximum": 150, "step": 1},
                {"label": "Sampling method", "value": "DPM++ 2M", "choices": [s["name"] for s in samplers()]},
                {"label": "Schedule type", "value": "Automatic", "choices": [s["label"] for s in schedulers()]}]
    if name == "refiner":
        return [{"label": "Refiner", "value": False}, {"label": "Checkpoint", "value": ""},
                {"label": "Switch at", "value": 0.8, "minimum": 0.01, "maximum": 1, "step": 0.01}]
    return []


def without(scripts: dict) -> dict:
    """alwayson_scripts less the built-in ones."""
    return {name: section for name, section in scripts.items() if name.lower() not in ARGS}


def check(body: schemas.Txt2ImgBody) -> None:
    """Each built-in script the request names: its args at most its own, each what the request's field says."""
    for name, section in body.alwayson_scripts.items():
        key = name.lower()
        if key not in ARGS:
            continue
        args = section.get("args", []) if isinstance(section, dict) else None
        where = f"alwayson_scripts.{name}.args"
        if not isinstance(args, list):
            raise InputError(f"{where} must be a list")
        labels = ARGS[key]
        if len(args) > len(labels):
            raise InputError(f"{where}: {len(args)} values; AUTOMATIC1111's {name} takes "
                             + (f"{len(labels)} ({', '.join(labels)})" if labels else "none over the API"))
        if not args:
            continue
        padded = args + [None] * (len(labels) - len(args))
        try:
            differences = _differences(key, body, padded)
        except InputError as exc:  # a name that is no sampler or schedule type
            raise InputError(f"{where}: {exc}") from None
        for field, sent, own in differences:
            raise InputError(f"{where}: {field} {sent!r} is not the request's {own!r}. AUTOMATIC1111's API runs the "
                             f"request's own {field} and drops its built-in {name} script's copy; kiln refuses the "
                             "difference rather than drop a value (send the same, or leave the script out)")


def _differences(key: str, body: schemas.Txt2ImgBody, args: list[Any]) -> list[tuple[str, Any, Any]]:
    """(field, the script's value, the request's) for each value the UI's setup would set differently."""
    if key == "seed":
        seed, extra, subseed, strength, width, height = args
        pairs = [("seed", seed, body.seed)]
        varied = bool(extra) and _number(strength) > 0
        pairs.append(("subseed_strength", strength if varied else 0, body.subseed_strength))
        if varied:
            pairs.append(("subseed", subseed, body.subseed))
        resized = bool(extra) and _number(width) > 0 and _number(height) > 0
        own = (body.seed_resize_from_w, body.seed_resize_from_h) if body.seed_resize_from_w > 0 else None
        pairs.append(("seed_resize_from_w/_h", (width, height) if resized else None, own))
    elif key == "sampler":
        steps, name, scheduler = args
        pairs = [("steps", steps, body.steps)] if steps is not None else []
        if not all(value is None or isinstance(value, str) for value in (name, scheduler)):
            raise InputError(f"the sampling method and schedule type are names, got {name!r} and {scheduler!r}")
        if name is not None or scheduler is not None:
            theirs = body.model_copy(update={"sampler_name": name or body.sampler_name, "sampler_index": None,
                                             "scheduler": scheduler or body.scheduler})
            pairs.append(("sampler_name and scheduler", sampler_name(theirs), sampler_name(body)))
    elif key == "refiner":
        enabled, checkpoint, switch_at = args
        sent, own = Refiner.asked(checkpoint if enabled else None, switch_at), \
            Refiner.asked(body.refiner_checkpoint, body.refiner_switch_at)
        pairs = [("refiner_checkpoint and refiner_switch_at", sent and (sent.checkpoint, sent.switch_at),
                  own and (own.checkpoint, own.switch_at))]
    else:
        pairs = []
    return [(field, sent, own) for field, sent, own in pairs if not _same(sent, own)]


def _number(value) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= 1e-9
    return a == b
