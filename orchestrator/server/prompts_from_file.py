"""AUTOMATIC1111's "Prompts from file or textbox" script (`script_name: "prompts from file or textbox"`) over the API:
each non-empty line of its text a generation of its own, all queued at once, so the step batcher denoises them
together (AUTOMATIC1111 runs them one after another); the answer every line's images in order, no grid.
/sdapi/v1/interrupt ends the lines, as AUTOMATIC1111's: the lines running keep what they made, those not started are
left out.

script_args as AUTOMATIC1111 1.10's script takes them: [checkbox_iterate, checkbox_iterate_batch, prompt_position,
prompt_txt]. A line is a prompt, or (starting with `--`) options as its scripts/prompts_from_file.py reads them:

    --prompt "a photo of a cat" --negative_prompt "blurry" --steps 30 --cfg_scale 5 --seed 7 --sampler_name "Euler a"

A line's prompt (and negative prompt) joins the request's, before it (position "start") or after it ("end"), with a
space; a request without one takes the line's as it is. The other options replace the request's field of that name;
--sd_model picks the line's checkpoint (override_settings.sd_model_checkpoint). Seeds as there: with
checkbox_iterate, line k's seed is the request's + k x batch_size x n_iter; with either box and a seed of -1, one seed
is drawn for every line; with neither, a -1 seed is drawn per line.

Where kiln is stricter than AUTOMATIC1111 (which logs a line it cannot read and takes all of it as a prompt): a line
starting with `--` that does not parse, an unknown option and a value of the wrong type are refused (422) naming the
line. --outpath_samples and --outpath_grids (the server's folders are its own) and --prompt_for_display are refused.
--styles takes style names separated by commas (AUTOMATIC1111 sets the string itself, whose letters name no style).
"""

from __future__ import annotations

import random
import shlex
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kiln import schemas
from kiln.errors import InputError
from orchestrator.jobs import Status
from orchestrator.pipeline.seeds import MAX_SEED
from orchestrator.server import cells
from orchestrator.server.generation import pipeline

# its arguments as AUTOMATIC1111's /sdapi/v1/script-info lists them
ARGS = [{"label": "Iterate seed every line", "value": False},
        {"label": "Use same random seed for all lines", "value": False},
        {"label": "Insert prompts at the", "value": "start", "choices": ["start", "end"]},
        {"label": "List of prompt inputs", "value": ""}]
MAX_LINES = 64  # every line is queued at once: the server's default queue (kiln serve --max-queue)


def _boolean(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(value)
    return value.lower() == "true"


def _styles(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


# the options a line may set, and how each value is read (AUTOMATIC1111's prompt_tags)
OPTIONS = {"prompt": str, "negative_prompt": str, "styles": _styles, "sd_model": str, "sampler_name": str,
           **dict.fromkeys(("seed", "subseed", "seed_resize_from_h", "seed_resize_from_w", "sampler_index",
                            "batch_size", "n_iter", "steps", "width", "height"), int),
           **dict.fromkeys(("subseed_strength", "cfg_scale"), float),
           **dict.fromkeys(("restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid"), _boolean)}
KINDS = {int: "a whole number", float: "a number", _boolean: "true or false"}  # what a value that fails must be
REFUSED = {"outpath_samples": "the server saves where its --outputs folder says",
           "outpath_grids": "the server saves where its --outputs folder says",
           "prompt_for_display": "kiln's infotexts carry the prompt run"}


@dataclass(frozen=True)
class Lines:
    options: tuple[dict[str, Any], ...]  # each line's options (a prompt line: {"prompt": line})
    iterate: bool  # checkbox_iterate: line k's seed is the first's + k x batch_size x n_iter
    same_seed: bool  # checkbox_iterate_batch: a -1 seed drawn once for every line
    at_start: bool  # prompt_position "start": the line's prompt before the request's


def read_line(line: str) -> dict[str, Any]:
    """One line's options: a line starting with `--` read as AUTOMATIC1111's cmdargs reads it (a prompt runs to the
    next option), any other line its prompt; a ValueError saying what cannot be read."""
    if not line.startswith("--"):
        return {"prompt": line}
    words, options, at = shlex.split(line), {}, 0
    while at < len(words):
        word = words[at]
        if not word.startswith("--"):
            raise ValueError(f"{word!r} is not an option (--name value)")
        name = word[2:]
        if name in REFUSED:
            raise ValueError(f"{word} is not supported by this server: {REFUSED[name]}")
        if name not in OPTIONS:
            raise ValueError(f"unknown option {word}; a line may set {', '.join('--' + o for o in OPTIONS)}")
        if at + 1 >= len(words):
            raise ValueError(f"{word} has no value")
        if name in ("prompt", "negative_prompt"):
            end = next((k for k in range(at + 2, len(words)) if words[k].startswith("--")), len(words))
            options[name], at = " ".join(words[at + 1:end]), end
            continue
        try:
            options[name] = OPTIONS[name](words[at + 1])
        except ValueError:
            raise ValueError(f"{word} {words[at + 1]!r} is not {KINDS[OPTIONS[name]]}") from None
        at += 2
    return options


def parse(body: schemas.Txt2ImgBody) -> Lines:
    """The lines a body's script_args describe; an InputError naming what cannot run."""
    args = list(body.script_args)
    if len(args) != 4:
        raise InputError(f"script_args: prompts from file or textbox takes 4 values (AUTOMATIC1111 1.10's "
                         f"[checkbox_iterate, checkbox_iterate_batch, prompt_position, prompt_txt]), got {len(args)}")
    iterate, same_seed, position, text = args
    if position not in ("start", "end"):
        raise InputError(f"script_args: prompts from file or textbox prompt_position must be start or end, got "
                         f"{position!r}")
    if not isinstance(text, str):
        raise InputError(f"script_args: prompts from file or textbox prompt_txt must be text, got "
                         f"{type(text).__name__}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError("prompts from file or textbox: prompt_txt has no line to run")
    if len(lines) > MAX_LINES:
        raise InputError(f"prompts from file or textbox: {len(lines)} lines; this server runs at most {MAX_LINES} "
                         "in one request (send the others in another)")
    options = []
    for number, line in enumerate(lines, 1):
        try:
            options.append(read_line(line))
        except ValueError as exc:
            raise InputError(f"prompts from file or textbox: line {number} ({line[:80]!r}): {exc}") from None
    return Lines(tuple(options), bool(iterate), bool(same_seed), position == "start")


def bodies(body: schemas.Txt2ImgBody, lines: Lines) -> list[schemas.Txt2ImgBody]:
    """Each line's body: the request's with the line's options, its prompts joined to the request's."""
    seed = random.randrange(MAX_SEED) if (lines.iterate or lines.same_seed) and body.seed == -1 else body.seed
    out = []
    for number, options in enumerate(lines.options, 1):
        update = {"script_name": None, "script_args": [], "seed": seed}
        for name, value in options.items():
            if name in ("prompt", "negative_prompt"):
                own = getattr(body, name)
                update[name] = value if not (own and value) else \
                    f"{value} {own}" if lines.at_start else f"{own} {value}"
            elif name == "sd_model":
                update["override_settings"] = {**body.override_settings, "sd_model_checkpoint": value}
            else:
                update[name] = value
                if name == "sampler_index":  # the index names the sampler, as an SD.Next client's does
                    update["sampler_name"] = None
        checked = {name: value for name, value in options.items() if name in type(body).model_fields}
        try:  # the line's values against the fields' types and refusals (restore_faces true, ...)
            type(body).model_validate(checked)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise InputError(f"prompts from file or textbox: line {number}: {where + ': ' if where else ''}"
                             f"{problem['msg'].removeprefix('Value error, ')}") from None
        out.append(body.model_copy(update=update))
        if lines.iterate:
            seed += body.batch_size * body.n_iter
    return out


async def run(request, kind: str, body: schemas.Txt2ImgBody) -> dict:
    """The lines of an /sdapi/v1 request: every line checked, all queued at once and waited for; the answer every
    line's images in order (a line's images are its batch's, n_iter x batch_size)."""
    await pipeline(request)  # the server's default checkpoint is set, and Triton is there
    lines = parse(body)
    line_bodies = bodies(body, lines)
    jobs = await cells.run_cells(request, kind, line_bodies, lambda i: f"prompts from file or textbox line {i + 1}")
    for number, job in enumerate(jobs, 1):
        if job.error is not None and not isinstance(job.error, InputError):
            raise job.error  # the server's trouble (Triton gone, ...), with its own status
        if (job.status != Status.DONE or not job.images) and not cells.stopped(job):
            raise InputError(f"prompts from file or textbox: line {number} was not made "
                             f"({job.error or job.status.value})")
    made = [job for job in jobs if job.images]  # all, unless /sdapi/v1/interrupt ended the lines
    if not made:
        return cells.nothing_made(request, body, jobs[0])
    images = [(image, info) for job in made for image, info in zip(job.images, job.infos)]
    await cells.save(request, body, kind, made, None, {}, "")  # no grid, as there
    details = cells.details(made[0], [info for _, info in images], jobs=jobs)
    details["prompts_from_file"] = {"lines": len(jobs), "images": len(images), "interrupted": len(jobs) - len(made),
                                    "seconds": round(time.time() - jobs[0].created, 3)}
    return await cells.answer(request, body, images, details)
