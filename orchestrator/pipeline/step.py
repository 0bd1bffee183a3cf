"""A denoising step's UNet calls, and what the step makes of their predictions (guidance, s_min_uncond).

The step's rows (the negative prompt's, then each of the prompt's parts', for every image) go to the UNet in one call,
unless their conditioning splits them (conditioning.Split: the negative prompt and the prompt differ in length and
nothing pads them, AUTOMATIC1111's default): then one call for each, handed over together, so a StepBatcher merges
each with the other generations' calls of its shape in the same tick. Each call carries the ControlNet units that act
on its rows (control.unet_with_units).
"""

from __future__ import annotations

import inspect

import numpy as np

from kiln.prompt_schedule import composable
from orchestrator.pipeline.control import unet_with_units
from orchestrator.pipeline.requests import ProgressCallback
from orchestrator.pipeline.sampling import CHURN, step_options
from orchestrator.pipeline.sigmas import sigma_at

UNCOND = "uncond_output"  # what a scheduler's step takes the unconditional rows' prediction as (DDIM CFG++)


def predict(step, skip: int, inputs: dict[str, np.ndarray], control_input: np.ndarray, active: list, components,
            lora: str, unet_call, nine_channels: bool, unconditional: int) -> np.ndarray:
    """The step's noise prediction, its rows in order. `step`: the step's conditioning (Conditioning or Split);
    `skip`: its first rows left out (s_min_uncond's steps); `inputs`: sample and timestep of every row run; `active`:
    the units that act [(unit, their rows' control images, scale, ControlNet)]; `unconditional`: how many of the rows
    run are the negative prompt's."""
    total = len(inputs["sample"])
    calls = []
    for rows, conditioning in step.calls(skip):
        start, stop, _ = rows.indices(total)
        part = {name: value[rows] for name, value in inputs.items()} | conditioning
        units = [(unit, images[rows], scale, control) for unit, images, scale, control in active]
        call = unet_with_units(units, part, control_input[rows], components.unet_control, lora, nine_channels,
                               max(0, min(unconditional, stop) - start))
        calls.append(call or (components.unet.with_lora(lora), part))
    predictions = run_all(unet_call, calls)
    return predictions[0] if len(predictions) == 1 else np.concatenate(predictions)


def run_all(unet_call, calls: list[tuple]) -> list[np.ndarray]:
    """Each (graph, inputs) call's result: all handed over at once where `unet_call` takes several (a StepBatcher:
    one arrival of this generation's in its tick), else one after another."""
    together = getattr(unet_call, "run_all", None)
    if together is not None and len(calls) > 1:
        return together(calls)
    return [unet_call(graph, inputs) for graph, inputs in calls]


def skips_unconditional(s_min_uncond: float, scheduler, t, index: int) -> bool:
    """AUTOMATIC1111's s_min_uncond (NGMS): every other step below that sigma runs the prompt's rows alone. Off (0),
    no step looks its sigma up."""
    return s_min_uncond > 0 and index % 2 == 1 and 0 < sigma_at(scheduler, t) < s_min_uncond


def guides(request) -> bool:
    """Whether classifier-free guidance runs (the negative prompt's rows too): at a cfg_scale above 1, or at any where
    a pass's sampler steps along the unconditional prediction (DDIM CFG++, whose scale is divided by 12.5)."""
    return request.cfg_scale > 1 or any(UNCOND in step_options(name) for name in request.samplers)


def takes_unconditional(scheduler) -> bool:
    """Whether the scheduler's step takes the unconditional rows' prediction too (guides())."""
    return UNCOND in inspect.signature(scheduler.step).parameters


def combine(noise_pred, weights: tuple[float, ...], cfg_scale: float, unconditional: bool):
    """AUTOMATIC1111's combine_denoised: uncond + (part - uncond) x weight x cfg_scale, for each part (one part of
    weight 1: classifier-free guidance exactly). Without unconditional rows (s_min_uncond's skipped steps) the first
    part stands in for them, as AUTOMATIC1111's."""
    parts = noise_pred.chunk(len(weights) + unconditional)
    guided = uncond = parts[0]
    for weight, part in zip(weights, parts[1:] if unconditional else parts):
        guided = guided + (part - uncond) * (weight * cfg_scale)
    return guided


def guidance(negative: str, prompt: str, guided: bool) -> tuple[list[str], tuple[float, ...]]:
    """The texts of the UNet's rows (the negative prompt first where guided, then each of AND's parts: AUTOMATIC1111's
    composable diffusion) and each part's weight."""
    parts = composable(prompt)
    texts = [text for text, _ in parts]
    return ([negative, *texts] if guided else texts), tuple(weight for _, weight in parts)


def step_settings(request) -> dict:
    """The request's churn options (sampling.CHURN) and ancestral eta, for the samplers whose step takes them."""
    return {name: getattr(request, name) for name in CHURN} | {"eta_ancestral": request.eta_ancestral}


def counting(progress: ProgressCallback | None, before: int, total: int) -> ProgressCallback | None:
    """A pass's progress as the whole run's: its steps after the `before` steps of earlier passes, of `total`."""
    if progress is None:
        return None
    return lambda step, _pass_total, latents: progress(before + step, total, latents)
