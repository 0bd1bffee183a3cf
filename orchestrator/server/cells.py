"""The scripts that run a request as several generations (the X/Y/Z plot's cells, the prompt matrix's combinations,
the lines of prompts from file, the loopback's loops, poor man's outpainting's tiles): every cell checked before any
is queued, all queued at once as the caller's tasks, so the step batcher denoises them together, and waited for
together; the answer in AUTOMATIC1111's shape, its pictures first. The cells are /sdapi's jobs too: its progress
shows them, and its interrupt and skip act on them."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import Callable

import numpy as np
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.errors import InputError
from kiln.imaging import encode_png
from kiln.infotext import parameters_text
from orchestrator.jobs import Job
from orchestrator.pipeline.seeds import MAX_SEED
from orchestrator.server import a1111
from orchestrator.server.generation import client_id, engine, pipeline, save_logged, wait_for
from orchestrator.server.outputs import save_grid


def fix_seeds(body: schemas.Txt2ImgBody) -> schemas.Txt2ImgBody:
    """AUTOMATIC1111's fix_seed: a -1 seed and variation seed drawn once, for every cell made from the body."""
    return body.model_copy(update={name: random.randrange(MAX_SEED) for name in ("seed", "subseed")
                                   if getattr(body, name) == -1})


async def run_cells(request, kind: str, bodies: list[schemas.Txt2ImgBody], named: Callable[[int], str]) -> list[Job]:
    """Each body a job of the caller's (its checkpoint, override_settings.sd_model_checkpoint, picks its pipeline):
    all checked first (an InputError "<named(i)>: why" before anything is queued), then queued at once and waited
    for; all cancelled if the wait fails (a timeout, the client gone)."""
    state, queue = request.app.state, engine(request).queue
    jobs = []
    for index, cell in enumerate(bodies):
        try:
            served = await pipeline(request, cell.override_settings.get("sd_model_checkpoint"))
            generation = await run_in_threadpool(a1111.to_request, cell, served.contract, state.options,
                                                 served.limits, state.styles)
            jobs.append(await run_in_threadpool(
                engine(request).prepare, kind, generation, cell.n_iter, client_id=client_id(request),
                context={"family": "tasks", "also": ("sdapi",), "body": cell, "detect_maps": False},
                checkpoint=served.contract.title))
        except InputError as exc:
            raise InputError(f"{named(index)}: {exc}") from None
    queued = []
    try:
        for job in jobs:
            queued.append(queue.submit(job))
        await asyncio.gather(*(wait_for(request, job, state.settings.request_timeout_s) for job in jobs))
    except BaseException:  # a timeout, the client gone, or the caller's task cancelled: nothing left running
        for job in queued:
            queue.cancel(job)
        raise
    return jobs


async def side_by_side(coroutines) -> list:
    """The coroutines run side by side (chains of cells, each waiting for its own before); if one fails (or the
    client leaves), the others are cancelled and the failure raised."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def save(request, body: schemas.Txt2ImgBody, kind: str, jobs: list[Job], grid: np.ndarray | None, info: dict,
               basename: str) -> None:
    """save_images: the jobs' images (unless their do_not_save_samples) and the script's grid, where it has one
    (unless do_not_save_grid, as `basename`-NNNN.png, with `info`'s infotext)."""
    folder = request.app.state.settings.outputs_dir
    for job in jobs if body.save_images else ():
        if not job.context["body"].do_not_save_samples:
            await run_in_threadpool(save_logged, job, folder, False)
    if body.save_images and grid is not None and not body.do_not_save_grid:
        await run_in_threadpool(save_grid, grid, info, kind, folder, basename)


def details(job: Job, infos: list[dict], before: tuple[dict, ...] = ()) -> dict:
    """The answer's info for a script's images: the first job's (a1111.response_info), with every image's prompts,
    seed and infotext; `before`, the infos of the pictures before the images (a grid's), have infotexts only."""
    out = a1111.response_info(job, job.context["body"])
    out["all_prompts"] = [info.get("prompt", "") for info in infos]
    out["all_negative_prompts"] = [info.get("negative_prompt", "") for info in infos]
    out["all_seeds"] = [info.get("seed") for info in infos]
    out["infotexts"] = [parameters_text(info) for info in (*before, *infos)]
    return out


def answer(body: schemas.Txt2ImgBody, images: list[tuple[np.ndarray, dict]], details: dict) -> dict:
    """AUTOMATIC1111's response: each picture a PNG with its infotext, the request's parameters, `details` as info."""
    parameters = body.model_dump(exclude={"alwayson_scripts", "init_images", "mask"})
    return {"images": [base64.b64encode(encode_png(picture, {"parameters": parameters_text(info)})).decode()
                       for picture, info in images] if body.send_images else [],
            "parameters": parameters, "info": json.dumps(details)}
