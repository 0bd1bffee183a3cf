"""AUTOMATIC1111's Soft inpainting script over its API: `alwayson_scripts["soft inpainting"].args`, [enabled,
schedule bias, preservation strength, transition contrast boost, mask influence, difference threshold, difference
contrast] (its UI's order), img2img's only; its infotext fields pasted back into those args.

As there: args left out take its defaults (none at all: disabled), `enabled` is read for its truth, the numbers
are kept as sent (the infotext writes them so), and without a mask the script does nothing (its
processing_uses_inpainting), so its fields are not written either."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from kiln.errors import InputError
from orchestrator.pipeline import SoftInpainting
from orchestrator.pipeline.soft_inpainting import ARGS, ENABLED_LABEL, LABELS

NAME = "soft inpainting"  # its title, lowered, as AUTOMATIC1111's API finds always-on scripts
DEFAULTS = SoftInpainting()
# /sdapi/v1/script-info's args: its UI's checkbox and sliders
SCRIPT_ARGS = [{"label": "Soft inpainting", "value": False}] + [
    {"label": label, "value": getattr(DEFAULTS, name), "minimum": low, "maximum": high, "step": step}
    for name, label, low, high, step in (
        ("schedule_bias", "Schedule bias", 0, 8, 0.1), ("preservation_strength", "Preservation strength", 0, 8, 0.05),
        ("transition_contrast_boost", "Transition contrast boost", 1, 32, 0.5),
        ("mask_influence", "Mask influence", 0, 1, 0.05), ("difference_threshold", "Difference threshold", 0, 8, 0.25),
        ("difference_contrast", "Difference contrast", 0, 8, 0.25))]
INFOTEXT_KEYS = {ENABLED_LABEL, *LABELS.values()}


def section(scripts: dict | None) -> tuple[str, Any] | None:
    """The (name as sent, value) of the soft inpainting entry of alwayson_scripts, its name in any case."""
    return next(((key, value) for key, value in (scripts or {}).items() if key.lower() == NAME), None)


def _args(scripts: dict | None) -> tuple[str, list] | None:
    found = section(scripts)
    if found is None:
        return None
    key, value = found
    where = f"alwayson_scripts.{key}"
    args = value.get("args", []) if isinstance(value, dict) else None
    if not isinstance(args, list):
        raise InputError(f"{where}.args must be a list: [enabled, {', '.join(ARGS)}]")
    if len(args) > 1 + len(ARGS):
        raise InputError(f"{where}.args takes at most {1 + len(ARGS)} values: [enabled, {', '.join(ARGS)}], got "
                         f"{len(args)}")
    return where, args


def settings(scripts: dict | None, img2img: bool, masked: bool) -> SoftInpainting | None:
    """The settings alwayson_scripts asks for; None where it is absent, not enabled, or there is no mask to blend
    by. A txt2img request that names the script is refused: AUTOMATIC1111 has it in img2img only."""
    found = _args(scripts)
    if found is None:
        return None
    where, args = found
    if not img2img:
        raise InputError(f"{where}: soft inpainting is img2img's (with a mask); txt2img has no such script")
    if args and not isinstance(args[0], (bool, int, float)):
        raise InputError(f"{where}.args[0], enabled, must be true or false, got {args[0]!r}")
    if not args or not args[0] or not masked:
        return None
    given = dict(zip(ARGS, args[1:]))
    for name, number in given.items():
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            raise InputError(f"{where}.args[{1 + ARGS.index(name)}], {name}, must be a number, got {number!r}")
    return SoftInpainting(**{field.name: given.get(field.name, getattr(DEFAULTS, field.name))
                             for field in fields(SoftInpainting)})


def _number(label: str, text: str) -> int | float:
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        raise InputError(f"infotext: {label} {text!r} is not a number") from None


def pasted(params: dict[str, Any], scripts: dict) -> dict | None:
    """alwayson_scripts with the soft inpainting args an infotext's fields give, in the places the request's own
    args leave empty (None: nothing to add)."""
    if not INFOTEXT_KEYS & set(params):
        return None
    found = _args(scripts)
    own = [] if found is None else found[1]
    if ENABLED_LABEL in params and params[ENABLED_LABEL] not in ("True", "False"):
        raise InputError(f"infotext: {ENABLED_LABEL} {params[ENABLED_LABEL]!r} is not True or False")
    from_text = [params.get(ENABLED_LABEL, "False") == "True"] + [
        getattr(DEFAULTS, name) if params.get(LABELS[name]) in (None, "") else _number(LABELS[name],
                                                                                      params[LABELS[name]])
        for name in ARGS]
    key = NAME if found is None else section(scripts)[0]
    return {**scripts, key: {"args": own + from_text[len(own):]}}
