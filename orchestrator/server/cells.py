"""The scripts that run a request as several generations (the X/Y/Z plot's cells, the prompt matrix's combinations,
the lines of prompts from file, the loopback's loops, poor man's outpainting's tiles): every cell checked before any
is queued, all queued at once as the caller's tasks, so the step batcher denoises them together, and waited for
together; the answer in AUTOMATIC1111's shape, its pictures first. The cells are /sdapi's jobs too: its progress
shows them, and its interrupt and skip act on them. AUTOMATIC1111's interrupt ends the whole script, keeping what is
done: the cells of one request share a script id, and /sdapi/v1/interrupt stops those not yet finished (one waiting
ends without starting, `stopped`); each script answers with the images made."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.errors import InputError
from kiln.infotext import parameters_text
from orchestrator.jobs import FINISHED, Job, Status
from orchestrator.pipeline.seeds import MAX_SEED
from orchestrator.server import a1111, builtin_scripts
from orchestrator.server.generation import (
    client_id,
    engine,
    keep_init_image,
    outputs_of,
    own,
    pipeline,
    save_logged,
    wait_all,
)
from orchestrator.server.options import answer_format
from orchestrator.server.outputs import answer_images, quietly, save_grid


def fix_seeds(body: schemas.Txt2ImgBody) -> schemas.Txt2ImgBody:
    """AUTOMATIC1111's fix_seed: a -1 seed and variation seed drawn once, for every cell made from the body."""
    return body.model_copy(update={name: random.randrange(MAX_SEED) for name in ("seed", "subseed")
                                   if getattr(body, name) == -1})


async def run_cells(request, kind: str, bodies: list[schemas.Txt2ImgBody], named: Callable[[int], str]) -> list[Job]:
    """Each body a job of the caller's (its checkpoint, override_settings.sd_model_checkpoint, picks its pipeline):
    all checked first (an InputError "<named(i)>: why" before anything is queued), then queued at once and waited
    for; all cancelled if the wait fails (a timeout, the client gone). Every call of one request (a chain's
    cells, queued one after another) has the request's script id (`script`'s); once the script was interrupted, the
    cells it queues later are interrupted as they are queued (AUTOMATIC1111's interrupt holds until the script
    ends). AUTOMATIC1111's built-in always-on scripts were checked against the request itself (builtin_scripts):
    a cell, whose seed or steps the script sets, does not carry them."""
    state, queue = request.app.state, engine(request).queue
    script = getattr(request.state, "script", None) or uuid.uuid4().hex
    request.state.script = script
    earlier = request.state.script_jobs = getattr(request.state, "script_jobs", [])
    jobs = []
    for index, cell in enumerate(bodies):
        cell = cell.model_copy(update={"alwayson_scripts": builtin_scripts.without(cell.alwayson_scripts)})
        try:
            served = await pipeline(request, cell.override_settings.get("sd_model_checkpoint"))
            generation = await run_in_threadpool(a1111.to_request, cell, served.contract, state.options,
                                                 served.limits, state.styles)
            returned = [key for key in ("return_mask", "return_mask_composite") if cell.override_settings.get(key)]
            if returned and kind == "img2img" and cell.mask:  # (set in the options, they return nothing here)
                raise InputError(f"override_settings.{returned[0]}: a script's answer does not return inpainting's "
                                 "mask pictures (save_mask and save_mask_composite save them)")
            jobs.append(await run_in_threadpool(
                engine(request).prepare, kind, generation, cell.n_iter, client_id=client_id(request),
                context={"family": "tasks", "also": ("sdapi",), "body": cell, "detect_maps": False,
                         "script": script},
                checkpoint=served.contract.title))
        except InputError as exc:
            raise InputError(f"{named(index)}: {exc}") from None
    for job in jobs:  # (each cell's: a loopback's every pass)
        await keep_init_image(kind, job.context["body"], outputs_of(request, job.context["body"]))
    earlier_ended = any(job.interrupted for job in earlier)
    queued = []
    earlier.extend(jobs)

    def ended() -> bool:
        return earlier_ended or state.scripts.get(script, {}).get("interrupted", False)

    stopped = threading.Event()  # the request ended (below): the thread queues no more cells

    def submit_each() -> None:  # (in the thread pool: a shared queue's submits are round trips to Redis)
        for job in jobs:
            if stopped.is_set():
                return
            job.interrupted = ended()  # (here: no step of it runs; elsewhere, a shared queue's, the call below)
            queued.append(queue.submit(job))
            if stopped.is_set():  # ended while this one was queued: the cancelling below may have missed it
                queue.cancel(job)
                return
            # an interrupt marks the script, then interrupts the cells queued: one queued meanwhile sees the mark
            if job.interrupted or ended():
                queue.interrupt(job)

    try:
        # (a plain task.cancel() of the request's task, as side_by_side's, returns from this await while the thread
        # still queues: `stopped` tells it, and it cancels what it queued after the loop below read `queued`)
        await run_in_threadpool(submit_each)
        await wait_all(request, jobs, state.settings.request_timeout_s)
    except BaseException:  # a timeout, the client gone, or the caller's task cancelled: nothing left running
        stopped.set()
        for job in list(queued):  # (here, not in a thread: a cancelled task's awaits are cancelled too)
            if not job.future.done():
                queue.cancel(job)
        raise
    return jobs


@contextmanager
def script(request):
    """A script request's run: its id (its cells' context["script"]) kept on the request and in the scripts running
    here, so that an interrupt reaches it between two of its chains' cells too (when none of them runs)."""
    request.state.script = uuid.uuid4().hex
    request.app.state.scripts[request.state.script] = {"client": client_id(request), "interrupted": False}
    try:
        yield
    finally:
        request.app.state.scripts.pop(request.state.script, None)


async def interrupt_scripts(request, interrupted: list[Job], every: bool = False) -> None:
    """The caller's cells of the scripts whose running cells were interrupted (`every`: of all the caller's scripts
    running here, /sdapi/v1/interrupt's), those not finished (waiting, or started since), interrupted too, and the
    scripts marked so that the cells they queue later are: AUTOMATIC1111's interrupt ends the script. A cell that
    has not started ends without an image (the engine runs no iteration of an interrupted job)."""
    scripts = {job.context["script"] for job in interrupted if "script" in job.context}
    running = request.app.state.scripts
    auth = request.app.state.settings.security.auth_required
    for name, entry in list(running.items()):
        if (name in scripts or every) and (not auth or entry["client"] == client_id(request)):
            entry["interrupted"] = True
            scripts.add(name)
    if not scripts:
        return
    queue = engine(request).queue
    for job in await run_in_threadpool(queue.jobs):
        if job.context.get("script") in scripts and job.status not in FINISHED and not job.interrupted \
                and own(request, job, "sdapi"):
            await run_in_threadpool(queue.interrupt, job)


def stopped(job: Job) -> bool:
    """A cell that an interrupt ended before it made an image (it had not started): the script leaves it out, as
    AUTOMATIC1111's leaves out what its interrupt kept from running."""
    return job.status == Status.DONE and job.interrupted and not job.images


def nothing_made(request, body: schemas.Txt2ImgBody, job: Job) -> dict:
    """The answer of a script interrupted before any image was made: none, its info the first cell's (as
    AUTOMATIC1111 answers an interrupted request)."""
    return made_answer(request, body, [], a1111.response_info(job, job.context["body"]) | {"interrupted": True})


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
    outputs = outputs_of(request, body)
    for job in jobs if body.save_images else ():
        if not job.context["body"].do_not_save_samples:
            await run_in_threadpool(save_logged, job, outputs, False)
    if body.save_images and grid is not None and not body.do_not_save_grid:
        await run_in_threadpool(quietly, save_grid, grid, info, kind, outputs, basename)


def details(job: Job, infos: list[dict], before: tuple[dict, ...] = (), jobs: list[Job] = ()) -> dict:
    """The answer's info for a script's images: the first job's (a1111.response_info), with every image's prompts,
    seed and infotext; `before`, the infos of the pictures before the images (a grid's), have infotexts only;
    interrupted if it or any of `jobs` (the script's others) was."""
    out = a1111.response_info(job, job.context["body"])
    out["interrupted"] = any(cell.interrupted for cell in (job, *jobs))
    out["all_prompts"] = [info.get("prompt", "") for info in infos]
    out["all_negative_prompts"] = [info.get("negative_prompt", "") for info in infos]
    out["all_seeds"] = [info.get("seed") for info in infos]
    out["infotexts"] = [parameters_text(info) for info in (*before, *infos)]
    return out


async def answer(request, body: schemas.Txt2ImgBody, images: list[tuple[np.ndarray, dict]], details: dict) -> dict:
    """A script's answer (made_answer), made off the event loop: an X/Y/Z plot's grid and lone images take seconds
    to encode, while every other request waits on the loop."""
    return await run_in_threadpool(made_answer, request, body, images, details)


def made_answer(request, body: schemas.Txt2ImgBody, images: list[tuple[np.ndarray, dict]], details: dict) -> dict:
    """AUTOMATIC1111's response: each picture with its infotext, encoded as the server's samples_format asks (PNG by
    default; side by side, outputs.encoded), the request's parameters, `details` as info."""
    parameters = body.model_dump(exclude={"alwayson_scripts", "init_images", "mask"})
    encoding = answer_format(request, body)
    return {"images": answer_images(encoding, images) if body.send_images else [],
            "parameters": parameters, "info": json.dumps(details)}
