"""AUTOMATIC1111's X/Y/Z plot script (`script_name: "x/y/z plot"`) over the API: every cell its own job, queued at
once, so the step batcher merges the cells' denoising steps; then the grid with its labels, as AUTOMATIC1111 draws it.

script_args as AUTOMATIC1111 1.10's script takes them: [x_type, x_values, x_values_dropdown, y_type, y_values,
y_values_dropdown, z_type, z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids,
no_fixed_seeds, margin_size, csv_mode, raw_mode]; the answer's images: the grid, then each z's grid
(include_sub_grids, with a Z axis), then the cells (include_lone_images). A type is an index into AUTOMATIC1111's
axis list for the route (its UI's order) or the axis's label ("Steps", "[ControlNet] Weight"). Values:
comma-separated text (numbers also as ranges: 1-5, 10-30 (+10), 1-2 [5]; one per line with raw_mode), or the
dropdown's list. Axes kiln cannot vary are refused by name. The cells are tasks of the caller (GET /v1/tasks lists
them, DELETE cancels one: its cell stays black in the grid). /sdapi/v1/interrupt ends the plot, as AUTOMATIC1111's:
the cells running keep what they made, those not started stay black.
"""

from __future__ import annotations

import csv
import itertools
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.errors import InputError
from kiln.infotext import parameters_text
from orchestrator.jobs import Status
from orchestrator.pipeline.seeds import MAX_SEED
from orchestrator.server import a1111
from orchestrator.server.cells import answer, fix_seeds, nothing_made, run_cells, save, stopped
from orchestrator.server.generation import pipeline
from orchestrator.server.outputs import image_grid

# AUTOMATIC1111 1.10's axis lists, in its UI's order (an integer type indexes these).
_ALL = ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "*Hires steps", "CFG Scale", "+Image CFG Scale",
        "Prompt S/R", "Prompt order", "*Sampler", "*Hires sampler", "+Sampler", "Checkpoint name",
        "Negative Guidance minimum sigma", "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise", "Schedule type",
        "Schedule min sigma", "Schedule max sigma", "Schedule rho", "Eta", "Clip skip", "Denoising",
        "Initial noise multiplier", "Extra noise", "*Hires upscaler", "+Cond. Image Mask Weight", "VAE", "Styles",
        "UniPC Order", "Face restore", "Token merging ratio", "Token merging ratio high-res",
        "Always discard next-to-last sigma", "SGM noise multiplier", "Refiner checkpoint", "Refiner switch at",
        "RNG source"]
A1111_AXES = {route: [a.lstrip("*+") for a in _ALL if not a.startswith("+" if route == "txt2img" else "*")]
              for route in ("txt2img", "img2img")}


def _field(name: str):
    return lambda body, value: body.model_copy(update={name: value})


def boolean(text: str) -> bool:
    """AUTOMATIC1111's boolean axis values: True or False."""
    if text.strip() not in ("True", "False"):
        raise ValueError(text)
    return text.strip() == "True"


def _override(name: str):
    return lambda body, value: body.model_copy(update={"override_settings": {**body.override_settings, name: value}})


def _prompt_sr(body, value, first):
    if first not in body.prompt and first not in body.negative_prompt:
        raise InputError(f"X/Y/Z plot: Prompt S/R did not find {first!r} in the prompt or the negative prompt")
    return body.model_copy(update={"prompt": body.prompt.replace(first, value),
                                   "negative_prompt": body.negative_prompt.replace(first, value)})


def _prompt_order(body, order: tuple[str, ...]):
    """AUTOMATIC1111's Prompt order: the axis's values, each found in the prompt, put back in the places they held
    (taken in the order they appear) in this cell's order."""
    missing = [token for token in order if token not in body.prompt]
    if missing:
        raise InputError(f"X/Y/Z plot: Prompt order did not find {missing[0]!r} in the prompt")
    rest, parts = body.prompt, []
    for token in sorted(order, key=body.prompt.find):  # each place's text before it, the token taken out
        at = rest.find(token)
        parts.append(rest[:at])
        rest = rest[at + len(token):]
    return body.model_copy(update={"prompt": "".join(part + token for part, token in zip(parts, order)) + rest})


def _controlnet_weight(body, value):
    scripts = body.alwayson_scripts or {}
    units = (scripts.get("controlnet") or {}).get("args") or []
    if not units:
        raise InputError("X/Y/Z plot: [ControlNet] Weight needs a ControlNet unit in alwayson_scripts.controlnet")
    changed = [dict(unit, weight=value) if i == 0 else unit for i, unit in enumerate(units)]  # the first unit's
    return body.model_copy(update={"alwayson_scripts": {**scripts, "controlnet": {"args": changed}}})


# label -> (value type, apply(body, value)); "prompt" marks Prompt S/R, whose first value is the one replaced
AXES: dict[str, tuple[type, Any]] = {
    "Nothing": (str, None), "Seed": (int, _field("seed")), "Var. seed": (int, _field("subseed")),
    "Var. strength": (float, _field("subseed_strength")), "Steps": (int, _field("steps")),
    "Hires steps": (int, _field("hr_second_pass_steps")), "CFG Scale": (float, _field("cfg_scale")),
    "Image CFG Scale": (float, _field("image_cfg_scale")),
    "Prompt S/R": (str, "prompt"), "Prompt order": (str, _prompt_order), "Sampler": (str, _field("sampler_name")),
    "Hires sampler": (str, _field("hr_sampler_name")),
    "Checkpoint name": (str, _override("sd_model_checkpoint")),
    "Negative Guidance minimum sigma": (float, _field("s_min_uncond")), "Sigma Churn": (float, _field("s_churn")),
    "Sigma min": (float, _field("s_tmin")), "Sigma max": (float, _field("s_tmax")),
    "Sigma noise": (float, _field("s_noise")), "Schedule type": (str, _field("scheduler")),
    "Schedule min sigma": (float, _override("sigma_min")), "Schedule max sigma": (float, _override("sigma_max")),
    "Schedule rho": (float, _override("rho")),
    "Eta": (float, _field("eta")), "Clip skip": (int, _override("CLIP_stop_at_last_layers")),
    "Denoising": (float, _field("denoising_strength")),
    "Initial noise multiplier": (float, _field("initial_noise_multiplier")),
    "Extra noise": (float, _override("img2img_extra_noise")),
    "Cond. Image Mask Weight": (float, _override("inpainting_mask_weight")),
    "Hires upscaler": (str, _field("hr_upscaler")),
    "VAE": (str, _override("sd_vae")), "Styles": (str, lambda b, v: b.model_copy(update={"styles": [*b.styles, v]})),
    "Always discard next-to-last sigma": (boolean, _override("always_discard_next_to_last_sigma")),
    "SGM noise multiplier": (boolean, _override("sgm_noise_multiplier")),
    "Refiner checkpoint": (str, _field("refiner_checkpoint")),
    "Refiner switch at": (float, _field("refiner_switch_at")), "RNG source": (str, _override("randn_source")),
    "[ControlNet] Weight": (float, _controlnet_weight),
}
MAX_CELLS = 64


def supported_axes(route: str) -> list[str]:
    """The axes this server plots for a route, in AUTOMATIC1111's order, then the extensions' ("[ControlNet] ...")."""
    return [a for a in A1111_AXES[route] if a in AXES] + [a for a in AXES if a.startswith("[")]


def xyz_script_args(route: str) -> list[dict]:
    """The script's 16 arguments as AUTOMATIC1111's /sdapi/v1/script-info lists them (types index its full list;
    the axes this server cannot vary are refused when sent)."""
    axis = [{"label": f"{name} type", "value": A1111_AXES[route][1 if name == "X" else 0],
             "choices": A1111_AXES[route]} for name in "XYZ"]
    args = []
    for name, kind in zip("XYZ", axis):
        args += [kind, {"label": f"{name} values", "value": ""}, {"label": f"{name} values", "value": None}]
    return args + [{"label": label, "value": value} for label, value in (
        ("Draw legend", True), ("Include Sub Images", False), ("Include Sub Grids", False),
        ("Keep -1 for seeds", False), ("Grid margins (px)", 0), ("Use text inputs instead of dropdowns", False),
        ("Use raw text lines", False))]


@dataclass
class Axis:
    label: str
    values: list
    text: str  # as the request gave them (the infotext's "X Values")

    def names(self) -> list[str]:
        if self.label == "Nothing":
            return [""]
        if self.label == "Prompt order":  # its format_value_join_list
            return [", ".join(v) for v in self.values]
        return [f"{self.label}: {v}" if self.label not in ("Prompt S/R", "Sampler", "Checkpoint name") else str(v)
                for v in self.values]


@dataclass
class Plot:
    axes: tuple[Axis, Axis, Axis]
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False
    margin_size: int = 0


_RANGE = re.compile(r"\s*([+-]?\d+(?:\.\d*)?)\s*-\s*([+-]?\d+(?:\.\d*)?)(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_COUNT = re.compile(r"\s*([+-]?\d+(?:\.\d*)?)\s*-\s*([+-]?\d+(?:\.\d*)?)\s*\[(\d+)\s*]\s*")


def parse(body: schemas.Txt2ImgBody, route: str) -> Plot:
    """The plot a body's script_args describe; an InputError naming what cannot be plotted."""
    args = list(body.script_args)
    if len(args) > 16:
        raise InputError(f"script_args: the X/Y/Z plot takes at most 16 values (AUTOMATIC1111 1.10's), got {len(args)}")
    args += [None] * (16 - len(args))
    axes = tuple(_axis("XYZ"[i], args[3 * i], args[3 * i + 1], args[3 * i + 2], route, args[14] is not False,
                       bool(args[15])) for i in range(3))
    plot = Plot(axes, draw_legend=args[9] is not False, include_lone_images=bool(args[10]),
                include_sub_grids=bool(args[11]), no_fixed_seeds=bool(args[12]), margin_size=int(args[13] or 0))
    cells = len(axes[0].values) * len(axes[1].values) * len(axes[2].values)
    if cells > MAX_CELLS:
        raise InputError(f"X/Y/Z plot: {cells} cells; this server plots at most {MAX_CELLS}")
    if not 0 <= plot.margin_size <= 500:
        raise InputError(f"script_args: margin_size must be within [0, 500], got {plot.margin_size}")
    if not plot.no_fixed_seeds:
        for axis in axes:
            if axis.label in ("Seed", "Var. seed"):
                axis.values = [random.randrange(MAX_SEED) if v == -1 else v for v in axis.values]
    return plot


def _axis(name: str, kind: Any, text: Any, dropdown: Any, route: str, csv_mode: bool, raw_mode: bool) -> Axis:
    listed = A1111_AXES[route]
    if kind is None:
        kind = 0
    if isinstance(kind, int) and not isinstance(kind, bool):
        if not 0 <= kind < len(listed):
            raise InputError(f"script_args: {name} type {kind} is not an axis (0 to {len(listed) - 1}, AUTOMATIC1111's "
                             f"{route} list)")
        label = listed[kind]
    else:
        label = next((a for a in [*listed, *AXES] if a.lower() == str(kind).strip().lower()), str(kind))
    if label not in AXES:
        raise InputError(f"X/Y/Z plot: the {name} axis {label!r} is not supported by this server; it plots: "
                         f"{', '.join(supported_axes(route))}")
    if label not in listed and not label.startswith("["):  # its img2img-only or txt2img-only axes ("+", "*")
        other = "img2img" if route == "txt2img" else "txt2img"
        raise InputError(f"X/Y/Z plot: the {name} axis {label!r} is {other}'s (AUTOMATIC1111 lists it there only); "
                         f"{route} plots: {', '.join(supported_axes(route))}")
    value_type, _ = AXES[label]
    if label == "Nothing":
        return Axis(label, [None], "")
    if (not text or not csv_mode) and isinstance(dropdown, list) and dropdown:
        raw = [str(v) for v in dropdown]
        text = ", ".join(raw)
    elif raw_mode and "\n" in str(text).strip():  # "Use raw text lines": one value per line, commas kept
        raw = [line.strip() for line in str(text).strip().split("\n") if line.strip()]
    else:
        raw = [v.strip() for v in next(csv.reader([str(text or "")]), []) if v.strip()]
    if not raw:
        raise InputError(f"X/Y/Z plot: the {name} axis ({label}) has no values")
    if label == "Prompt order":  # every order of the values, each a cell (its str_permutations)
        if len(raw) > 4:
            raise InputError(f"X/Y/Z plot: Prompt order of {len(raw)} values makes {math.factorial(len(raw))} cells; "
                             f"this server plots at most {MAX_CELLS}")
        return Axis(label, list(itertools.permutations(raw)), str(text))
    values = []
    for item in raw:
        values += _expand(item, value_type, name, label)
    return Axis(label, values, str(text))


def _expand(item: str, value_type: type, name: str, label: str) -> list:
    """One comma-separated item: a value, or for numbers a range (1-5, 10-30 (+10), 1-2 [5])."""
    try:
        if value_type in (int, float) and (match := _COUNT.fullmatch(item)):
            values = np.linspace(float(match[1]), float(match[2]), int(match[3])).tolist()
            return [value_type(round(v)) if value_type is int else v for v in values]
        if value_type in (int, float) and (match := _RANGE.fullmatch(item)) and not item.lstrip().startswith("-"):
            start, end = value_type(match[1]), value_type(match[2])
            step = value_type(match[3]) if match[3] else value_type(1)
            if step == 0 or (end - start) / step > MAX_CELLS:
                raise ValueError("too many values")
            return [value_type(v) for v in np.arange(start, end + step / 2, step).tolist()]
        return [value_type(item)]
    except ValueError:
        raise InputError(f"X/Y/Z plot: the {name} axis ({label}) value {item!r} is not a {value_type.__name__} or a "
                         "range") from None


def cell_bodies(body: schemas.Txt2ImgBody, plot: Plot) -> list[tuple[tuple[int, int, int], schemas.Txt2ImgBody]]:
    """Each cell's body, z outermost and x innermost (AUTOMATIC1111's order), its seed fixed once for all of them."""
    base = body.model_copy(update={"script_name": None, "script_args": []})
    if not plot.no_fixed_seeds:
        base = fix_seeds(base)
    x, y, z = plot.axes
    cells = []
    for iz, zv in enumerate(z.values):
        for iy, yv in enumerate(y.values):
            for ix, xv in enumerate(x.values):
                cell = base
                for axis, value in ((x, xv), (y, yv), (z, zv)):
                    apply = AXES[axis.label][1]
                    if apply == "prompt":
                        cell = _prompt_sr(cell, value, axis.values[0])
                    elif apply is not None:
                        cell = apply(cell, value)
                cells.append(((ix, iy, iz), cell))
    return cells


def draw_grid(plot: Plot, images: dict[tuple[int, int, int], np.ndarray]) -> np.ndarray:
    """The cells as one picture: each z's x-by-y grid with its column and row labels, the z grids side by side under
    their titles (AUTOMATIC1111's layout)."""
    from PIL import Image, ImageDraw, ImageFont

    x, y, z = plot.axes
    height, width = next(iter(images.values())).shape[:2]
    font = ImageFont.load_default(size=max(12, (width + height) // 25))
    margin = plot.margin_size
    draw_x, draw_y = plot.draw_legend and x.label != "Nothing", plot.draw_legend and y.label != "Nothing"
    top = (font.size * 2 + 8) if draw_x else 0
    left = max((int(font.getlength(n)) for n in y.names()), default=0) + 16 if draw_y else 0
    grids = []
    for iz in range(len(z.values)):
        cols, rows = len(x.values), len(y.values)
        size = (left + cols * width + (cols - 1) * margin, top + rows * height + (rows - 1) * margin)
        canvas = Image.new("RGB", size, "white")
        pen = ImageDraw.Draw(canvas)
        for (ix, iy, cz), pixels in images.items():
            if cz == iz:
                canvas.paste(Image.fromarray(pixels), (left + ix * (width + margin), top + iy * (height + margin)))
        for ix, label in enumerate(x.names() if draw_x else []):
            pen.text((left + ix * (width + margin) + width / 2, top / 2), label, fill="black", font=font, anchor="mm")
        for iy, label in enumerate(y.names() if draw_y else []):
            pen.text((left - 8, top + iy * (height + margin) + height / 2), label, fill="black", font=font,
                     anchor="rm")
        grids.append(canvas)
    if len(grids) == 1:
        return np.asarray(grids[0])
    title = font.size * 2 + 8 if plot.draw_legend else 0
    whole = Image.new("RGB", (sum(g.width for g in grids), title + max(g.height for g in grids)), "white")
    pen, offset = ImageDraw.Draw(whole), 0
    for grid, label in zip(grids, z.names()):
        whole.paste(grid, (offset, title))
        if title:
            pen.text((offset + grid.width / 2, title / 2), label, fill="black", font=font, anchor="mm")
        offset += grid.width
    return np.asarray(whole)


async def run(request, kind: str, body: schemas.Txt2ImgBody) -> dict:
    """The plot for an /sdapi/v1 request: every cell checked before any is queued, all queued at once (tasks of the
    caller), waited for together; the grid first in the answer (then the cells with include_lone_images). A cell of
    several images (batch_size, n_iter) is their grid, as AUTOMATIC1111 draws it."""
    await pipeline(request)  # the server's default checkpoint is set, and Triton is there
    plot = parse(body, kind)
    cells = cell_bodies(body, plot)
    jobs = await run_cells(request, kind, [cell for _, cell in cells],
                           lambda i: f"X/Y/Z plot cell {', '.join(n for n in _cell_names(plot, cells[i][0]) if n)}")
    done = [job for job in jobs if job.status == Status.DONE and job.images]
    if not done:
        failed = next((job for job in jobs if job.error is not None), None)
        if failed is None and all(stopped(job) for job in jobs):
            return nothing_made(request, body, jobs[0])
        raise InputError(f"X/Y/Z plot: no cell produced an image ({failed.error if failed else 'all cancelled'})")
    pictures = await run_in_threadpool(lambda: {index: image_grid(job.images) for (index, _), job in zip(cells, jobs)
                                                if job in done})
    blank = np.zeros_like(next(iter(pictures.values())))
    pictures = {index: pictures.get(index, blank) for index, _ in cells}
    grid = await run_in_threadpool(draw_grid, plot, pictures)
    x, y, z = plot.axes
    flat = Plot((x, y, Axis("Nothing", [None], "")), plot.draw_legend, margin_size=plot.margin_size)
    subgrids = [await run_in_threadpool(draw_grid, flat, {(ix, iy, 0): image for (ix, iy, iz), image in
                                                          pictures.items() if iz == k})
                for k in range(len(z.values))] if plot.include_sub_grids and len(z.values) > 1 else []
    info = dict(done[0].infos[0]) | {"script": "X/Y/Z plot"}
    for axis, name in zip(plot.axes, "XYZ"):
        if axis.label != "Nothing":
            info |= {f"{name.lower()}_type": axis.label, f"{name.lower()}_values": axis.text}
    await save(request, body, kind, done, grid, info, "xyz_grid")
    details = a1111.response_info(done[0], done[0].context["body"])
    lone = [(image, image_info) for job in done for image, image_info in zip(job.images, job.infos)] \
        if plot.include_lone_images else []
    details["infotexts"] = [parameters_text(info)] * (1 + len(subgrids)) + [parameters_text(i) for _, i in lone]
    details["interrupted"] = any(job.interrupted for job in jobs)
    details["xyz"] = {"cells": len(jobs), "done": len(done), "seconds": round(time.time() - jobs[0].created, 3),
                      "failed": [str(job.error) for job in jobs if job.status != Status.DONE],
                      "interrupted": sum(stopped(job) for job in jobs)}  # not run: blank in the grid
    return await answer(request, body, [(picture, info) for picture in (grid, *subgrids)] + lone, details)


def _cell_names(plot: Plot, index: tuple[int, int, int]) -> list[str]:
    return [axis.names()[i] for axis, i in zip(plot.axes, index)]
