"""A denoising step's UNet call with ControlNet units, as sd-webui-controlnet weighs them (its hook.py).

- Balanced (control_mode 0): every residual x the unit's weight, on every row.
- My prompt is more important (1): soft injection, residual i (the down residuals in the UNet's order, the middle
  one last) x weight x 0.825^(12 - i): the high-resolution residuals weakest (x 0.0995), the middle one x 1.
- ControlNet is more important (2): soft injection, and no residuals on the unconditional rows (the prompt's rows
  alone carry the control: classifier-free guidance amplifies it).
- In the hires fix's second pass a canny (or mlsd) unit soft-injects whatever its mode, as the extension forces.
- A ControlNet that pools its residuals (shuffle's: ServedControlNet.global_pool) acts on the prompt's rows alone in
  every mode, as the extension's global_average_pooling and diffusers' global_pool_conditions do.
- advanced_weighting (the extension's): residual i x its i-th scale, in place of the weight and any soft injection
  (mode 2 still leaves the unconditional rows out).
- effective_region_mask (the extension's): every residual x the mask stretched to its size (bilinear, as torch's
  interpolate), so that the unit acts where the mask is white.

One plain Balanced unit with a fused ensemble runs ControlNet -> UNet in one Triton call (the residuals never leave the
server); any soft unit, or several units, run each ControlNet for its residuals, weigh and sum them here, then the
UNet that takes them (diffusers' MultiControlNetModel).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from kiln.control import control_image
from kiln.imaging import ImageLimits, decode_image
from kiln.preprocessors import numpy_seed, preprocessor

SOFT = 0.825  # sd-webui-controlnet's soft-injection base
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")  # its hr_option's labels (ControlNetUnit.hr_option)


def residual_count(family: str) -> int:
    """How many residuals a family's ControlNet hands the UNet: 12 down and the middle one; SDXL's 9 and 1."""
    return 10 if family.startswith("sdxl") else 13


def soft(unit) -> bool:
    """Whether the unit soft-injects: its mode, or in the second pass a module the extension soft-projects there
    (canny; its mlsd too, which kiln does not have)."""
    return unit.control_mode != 0 or (unit.second_pass and preprocessor(unit.module).soft_in_hires)


def row_scales(unit, scale: float, rows: int, unconditional: int, pooled: bool = False) -> np.ndarray:
    """Each row's conditioning scale: the unit's weight, 0 on the `unconditional` first rows in mode 2 or for a
    ControlNet that pools its residuals."""
    scales = np.full(rows, scale, np.float32)
    if unit.control_mode == 2 or pooled:
        scales[:unconditional] = 0
    return scales


def soften(residuals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Soft injection: down residual i x 0.825^(12 - i), the middle residual x 0.825^(12 - its position)
    (the extension's scales zipped with the residuals in order: 1 for SD 1.x/2.x's 13th, 0.825^3 for SDXL's 10th)."""
    order = residual_order(residuals)
    return {name: residuals[name] * np.float32(SOFT ** float(12 - order.index(name))) for name in residuals}


def residual_order(residuals) -> list[str]:
    """The residuals' names in the ControlNet's order (the extension's): the down ones by index, the middle last."""
    down = [name for name in residuals if name.startswith("down_residual_")]
    return [*sorted(down, key=lambda name: int(name.rsplit("_", 1)[1])), "mid_residual"]


def weighted(unit) -> bool:
    """Whether the unit's residuals are weighed here, not by the fused ensemble: soft injection, advanced weighting or
    a region mask."""
    return soft(unit) or unit.advanced_weighting is not None or bool(unit.region_mask)


@lru_cache(maxsize=4)
def _region_mask(data: bytes) -> np.ndarray:
    """An effective_region_mask's first channel (its RGB's red, as the extension reads it), uint8: a few are kept
    decoded while their jobs run."""
    return np.asarray(decode_image(data, ImageLimits(min_side=1)).convert("RGB"))[..., 0].copy()


@lru_cache(maxsize=64)
def region_at(data: bytes, height: int, width: int) -> np.ndarray:
    """The mask stretched to a residual's height x width: torch's bilinear interpolate (align_corners false, no
    antialias), as the extension's apply_effective_region_mask."""
    import torch
    import torch.nn.functional as F

    mask = torch.from_numpy(_region_mask(data)).float()[None, None] / 255  # (the extension's get_pytorch_control)
    return F.interpolate(mask, size=(height, width), mode="bilinear").numpy()[0, 0]


def unit_residuals(unit, residuals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A unit's residuals (its rows' scales applied by its ControlNet) weighed here: advanced weighting's scales, or
    soft injection's; then its region mask."""
    if unit.advanced_weighting is not None:
        order = residual_order(residuals)
        residuals = {name: residuals[name] * np.float32(unit.advanced_weighting[order.index(name)])
                     for name in residuals}
    elif soft(unit):
        residuals = soften(residuals)
    if unit.region_mask:
        residuals = {name: value * region_at(unit.region_mask, *value.shape[-2:]) for name, value in residuals.items()}
    return residuals


def unet_with_units(active: list, inputs: dict[str, np.ndarray], control_input: np.ndarray, unet_control, lora: str,
                    nine_channels: bool, unconditional: int) -> tuple | None:
    """The UNet call (graph, inputs) of the step's rows with the `active` units [(unit, its rows' control images,
    scale, ControlNet)] (`unconditional`: how many of the rows are the negative prompt's); None: no unit acts (the
    caller runs the plain UNet: zero residuals equal it exactly)."""
    if not active:
        return None
    rows = len(inputs["sample"])
    if len(active) == 1 and not weighted(active[0][0]) and active[0][3].fused is not None and not nine_channels:
        unit, unit_cond, scale, control = active[0]  # ControlNet -> UNet in one call: the residuals stay in Triton
        return control.fused.with_lora(lora), inputs | {
            "controlnet_cond": unit_cond,
            "conditioning_scale": row_scales(unit, scale, rows, unconditional, control.served.global_pool)}
    total: dict[str, np.ndarray] = {}
    for unit, unit_cond, scale, control in active:
        residuals = control.residuals(inputs | {"sample": control_input, "controlnet_cond": unit_cond,
                                                "conditioning_scale": row_scales(unit, scale, rows, unconditional,
                                                                                 control.served.global_pool)})
        for name, value in unit_residuals(unit, residuals).items():
            total[name] = total[name] + value if name in total else value
    return unet_control.with_lora(lora), inputs | total


def control_images(request, width: int, height: int, rows: int, seed: int) -> list[np.ndarray]:
    """Each ControlNet unit's input at width x height (its preprocessor run, a random one seeded by the run's first
    `seed`, or its map fitted by its resize mode; an inpaint unit's masked pixels -1), once per row of the UNet
    batch."""
    return [np.repeat(control_image(unit.image, width, height, unit.preprocessor, unit.threshold_a, unit.threshold_b,
                                    unit.resize_mode, numpy_seed(seed), unit.mask,
                                    preprocessor(unit.module).inpaint)[None], rows, axis=0)
            for unit in request.controlnet_units]
