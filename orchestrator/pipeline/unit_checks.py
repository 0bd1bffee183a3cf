"""The checks of a request's ControlNet units (orchestrator.pipeline.validate's, kept apart), and the checks of numbers
that validate shares with them."""

from __future__ import annotations

import math
import numbers

from kiln.contract import SDContract
from kiln.errors import InputError
from kiln.preprocessors import CONTROL_MODULES, preprocessor
from orchestrator.pipeline.control import residual_count
from orchestrator.pipeline.requests import ControlNetUnit


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite(value) -> bool:
    """A real number (numpy's too), not a bool, neither NaN nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_units(units: tuple[ControlNetUnit, ...], contract: SDContract, max_units: int, inpainting: bool) -> None:
    """Raise an InputError naming the unit and its bad field."""
    if units and not contract.controlnets:
        raise InputError("controlnet: this build has no ControlNet (build with --controlnet or a controlnet/ folder)")
    if len(units) > max_units:
        raise InputError(f"controlnet: {len(units)} units; at most {max_units} per request")
    for index, unit in enumerate(units):
        name = "controlnet" if len(units) == 1 else f"controlnet unit {index}"
        if not isinstance(unit, ControlNetUnit):
            raise InputError(f"{name} is not a ControlNet unit")
        if unit.module not in CONTROL_MODULES:  # by name (the API's units carry the name of a label they sent)
            raise InputError(f"{name} module {unit.module!r} is unknown; valid: {', '.join(CONTROL_MODULES)}")
        pre = preprocessor(unit.module)
        if unit.mask and not pre.inpaint:
            raise InputError(f"{name} has a mask; only the inpaint modules take one (inpaint_global_harmonious), "
                             f"not {unit.module}")
        if unit.module == "inpaint_only" and inpainting:
            raise InputError(f"{name} module inpaint_only restores its image outside its mask, as AUTOMATIC1111's "
                             "inpainting does outside the request's: send inpaint_global_harmonious (the API's "
                             "units run that in its place there, as sd-webui-controlnet does)")
        if not finite(unit.inpaint_blur) or unit.inpaint_blur % 1 or not 1 <= unit.inpaint_blur <= 64:
            raise InputError(f"{name} inpaint_blur (control_net_inpaint_blur_sigma) must be a whole number in [1, 64], "
                             f"got {unit.inpaint_blur!r}")
        if unit.module == "inpaint_only" and contract.prediction_type != "epsilon":
            raise InputError(f"{name} module inpaint_only reads the UNet's output as noise (sd-webui-controlnet's "
                             f"restore); this checkpoint predicts {contract.prediction_type}")
        if unit.control_mode not in (0, 1, 2) or isinstance(unit.control_mode, bool):
            raise InputError(f"{name} control_mode must be 0 (Balanced), 1 (My prompt is more important) or 2 "
                             f"(ControlNet is more important), got {unit.control_mode!r}")
        if not finite(unit.weight) or not 0 <= unit.weight <= 2:
            raise InputError(f"{name} weight must be in [0, 2], got {unit.weight!r}")
        checked = pre.slider_values(unit.threshold_a, unit.threshold_b, ("threshold_a", "threshold_b"), f"{name} ")
        lacking = [field for field, value, kept in zip(("threshold_a", "threshold_b"),
                                                       (unit.threshold_a, unit.threshold_b), checked)
                   if kept == -1 and value != -1]
        if lacking:
            raise InputError(f"{name} module {unit.module} has no {' or '.join(lacking)} (leave it -1)")
        if not (0 <= unit.guidance_start < unit.guidance_end <= 1):
            raise InputError(f"{name} guidance_start/end must satisfy 0 <= start < end <= 1, "
                             f"got {unit.guidance_start!r}, {unit.guidance_end!r}")
        if unit.model is not None and not isinstance(unit.model, str):
            raise InputError(f"{name} model must be a ControlNet's name, got {unit.model!r}")
        try:
            served = contract.controlnet(unit.model)
        except InputError as exc:
            raise InputError(f"{name}: {exc}") from None
        _check_weighting(name, unit, residual_count(contract.family))
        if unit.region_mask and served.global_pool:
            raise InputError(f"{name}: effective_region_mask on {served.name}, a ControlNet that pools its residuals "
                             "(shuffle's): a mask has no region to act on in a pooled residual")


def _check_weighting(name: str, unit: ControlNetUnit, residuals: int) -> None:
    """sd-webui-controlnet's advanced_weighting: a scale for each residual in order (the down residuals, the middle one
    last), over the unit's weight and control mode's soft injection. The extension zips it with the residuals, so a
    longer list's extra scales go unused (one made for SD 1.x's 13 on SDXL's 10), but a shorter one would drop the
    residuals past its end without a word: refused."""
    weights = unit.advanced_weighting
    if weights is None:
        return
    if not isinstance(weights, tuple) or len(weights) < residuals or not all(finite(w) for w in weights):
        raise InputError(f"{name} advanced_weighting must be a list of at least {residuals} numbers (one for each of "
                         f"this model's ControlNet residuals), got {weights!r}"[:300])
    if not all(0 <= w <= 2 for w in weights):
        raise InputError(f"{name} advanced_weighting: each scale must be in [0, 2], as a unit's weight")
