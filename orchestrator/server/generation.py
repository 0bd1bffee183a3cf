"""What the AUTOMATIC1111 routes and the task routes share: submitting a body as a job, waiting for it, and
answering with it. A job keeps its body and route family in its `context`."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.contract import SDContract
from kiln.errors import KilnError
from orchestrator.engine import Engine
from orchestrator.jobs import Job, Status
from orchestrator.pipeline import Pipeline
from orchestrator.server import a1111, control_units
from orchestrator.server.errors import APIError, api_error
from orchestrator.server.filenames import Naming
from orchestrator.server.inputs import decode_b64
from orchestrator.server.options import MASK_SETTINGS, answer_format, check_save_settings, image_format, runs_script
from orchestrator.server.outputs import Encoded, Outputs, quietly, save_init_image, save_job_images

log = logging.getLogger("kiln.api")


def engine(request: Request) -> Engine:
    return request.app.state.engine


async def pipeline(request: Request, checkpoint: str | None = None,
                   what: str = "override_settings.sd_model_checkpoint") -> Pipeline:
    """The pipeline of the checkpoint a request names (AUTOMATIC1111's sd_model_checkpoint; None: the server's
    default, the sd_model_checkpoint option); 503 while Triton is away, 404 for a checkpoint not served. The first
    connection sets the checkpoint option to the repository's default checkpoint."""
    if checkpoint:
        await served_contract(request)  # connected, the default option set
        return await run_in_threadpool(engine(request).pipeline, checkpoint, what)
    default = (await served_contract(request)).title
    return await run_in_threadpool(engine(request).pipeline, default, "sd_model_checkpoint")


async def served_contract(request: Request, checkpoint: str | None = None,
                          what: str = "sd_model_checkpoint") -> SDContract:
    """The contract of the checkpoint a request names (None: the server's default), without loading it: what the
    listings read (503 while Triton is away, 404 for a checkpoint not served). The first connection sets the
    checkpoint option to the repository's default checkpoint."""
    options = request.app.state.options
    if not options["sd_model_checkpoint"]:
        options["sd_model_checkpoint"] = (await run_in_threadpool(engine(request).contract)).title
    return await run_in_threadpool(engine(request).contract, checkpoint or options["sd_model_checkpoint"],
                                   what if checkpoint else "sd_model_checkpoint")


async def option_updates(request: Request, body: dict) -> dict:
    """What POST /sdapi/v1/options would set, each setting checked. The served build is needed before a checkpoint,
    a clip skip or a VAE can be checked against it (503 while Triton is away); a clip skip or a VAE against the
    checkpoint the same call sets, or else the default one."""
    checkpoint = body.get("sd_model_checkpoint")
    contract = await served_contract(request, checkpoint if isinstance(checkpoint, str) else None) \
        if {"sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae"} & set(body) else None
    updates = a1111.updated_options(request.app.state.options, body, contract)
    if "sd_model_checkpoint" in updates:  # as AUTOMATIC1111 keeps it: the title, whichever name picked it
        updates["sd_model_checkpoint"] = contract.title
    return updates


async def kept_overrides(request: Request, body: schemas.Txt2ImgBody) -> dict:
    """AUTOMATIC1111's override_settings_restore_afterwards false: the settings the request's override_settings
    leave as the server's after it (as POST /sdapi/v1/options sets them, for every caller, as there), checked before
    it runs; the caller sets them (app.state.options) once it has answered. Empty: none."""
    if body.override_settings and not body.override_settings_restore_afterwards:
        return await option_updates(request, body.override_settings)
    return {}


def client_id(request: Request) -> str | None:
    """Who is calling (the security middleware's verdict): jobs are scoped by it when auth is on."""
    return request.scope.get("state", {}).get("client_id")


async def submit(request: Request, kind: str, body: schemas.Txt2ImgBody, family: str) -> Job:
    """Translate, validate (once, in the engine) and queue an AUTOMATIC1111 body; `family`: sdapi or tasks."""
    check_save_settings(body, kind)
    served = await pipeline(request, body.override_settings.get("sd_model_checkpoint"))
    generation = await run_in_threadpool(a1111.to_request, body, served.contract, request.app.state.options,
                                         served.limits, request.app.state.styles)
    where = outputs_of(request, body)
    job = await run_in_threadpool(lambda: engine(request).submit(
        kind, generation, body.n_iter, client_id=client_id(request),
        context={"family": family, "body": body, "masks": where.masks, "grid": returns_grid(where, body),
                 "detect_maps": control_units.wants_detect_maps(body, request.app.state.options)},
        job_id=body.force_task_id, checkpoint=served.contract.title))
    if body.save_images and not body.do_not_save_samples:
        save_when_done(request, job, where, not body.do_not_save_grid)
    await keep_init_image(kind, body, where)
    return job


def returns_grid(outputs: Outputs, body: schemas.Txt2ImgBody) -> bool:
    """Whether a request's answer has its images' grid first (a1111.to_response): AUTOMATIC1111's API makes the grid
    of a request that saves its images (save_images, and here not do_not_save_grid) and runs no script (SD upscale
    makes none), and return_grid (its default: on; the request's override_settings over the server's options) puts
    it in the answer. (The loopback's and outpainting mk2's grid: return_grid alone, Outputs.return_grid.)"""
    return body.save_images and not body.do_not_save_grid and not runs_script(body) and outputs.return_grid


def outputs_of(request: Request, body: schemas.Txt2ImgBody) -> Outputs:
    """Where and how a request's save_images writes: the server's outputs folder; its encodings, names and folders
    the server's options with the request's override_settings over them (AUTOMATIC1111 saves while they are
    applied); its styles, which names can read."""
    settings, folder = request.app.state.options | body.override_settings, request.app.state.settings.outputs_dir
    known = request.app.state.styles.styles() if body.styles else {}
    return Outputs(folder, image_format(settings), image_format(settings, "grid_format"), txt=settings["save_txt"],
                   init_images=settings["save_init_img"], masks=frozenset(k for k in MASK_SETTINGS if settings[k]),
                   naming=Naming.of(settings), samples_save=settings["samples_save"], grid_save=settings["grid_save"],
                   styles=tuple((name, known[name].prompt if name in known else "") for name in body.styles),
                   return_grid=settings["return_grid"],
                   jpeg_copies=(settings["img_downscale_threshold"], settings["target_side_length"])
                   if settings["export_for_4chan"] else None)


async def keep_init_image(kind: str, body: schemas.Txt2ImgBody, outputs: Outputs) -> None:
    """save_init_img: an img2img request's init image, kept as AUTOMATIC1111 keeps it when its generation starts
    (whatever save_images says); the folder's trouble is the log's, never the request's."""
    if kind != "img2img" or not outputs.init_images:
        return
    try:
        path = await run_in_threadpool(lambda: save_init_image(decode_b64(body.init_images[0], "init_images[0]"),
                                                               outputs))
    except (OSError, KilnError) as exc:
        log.error("save_init_img: could not keep an init image in %s: %s", outputs.folder, exc)
        return
    log.info("save_init_img: wrote %s", path)


def save_when_done(request: Request, job: Job, outputs: Outputs, grid: bool) -> None:
    """save_images for a job once it is done, on the server's saving threads (app.state.saver), not on the engine's
    worker that ran it (that takes the next job at once); job.context["saved"] is done once the save is over (its
    files written, or its trouble logged: the answer waits for it, saved), and the job's images are encoded once for
    its files and its answer (outputs.Encoded)."""
    written: Future = Future()
    # (after engine.submit: a shared queue has pickled the job's context by then, and these cannot be pickled)
    job.context.update(saved=written, encoded=Encoded())
    # (the callbacks stay with the job: they keep the saver and the set, not the request)
    saver, in_progress = request.app.state.saver, request.app.state.saving

    def save() -> None:
        try:
            save_logged(job, outputs, grid)
        finally:
            in_progress.discard(job)
            if not written.done():
                written.set_result(None)

    def start(_done: Future) -> None:
        if job.status == Status.DONE:  # (a failed or cancelled job has nothing to write)
            in_progress.add(job)
        try:
            saver.submit(save)
        except Exception:  # noqa: BLE001 - (RuntimeError: the saving threads have stopped, the server is closing)
            save()  # here, then

    job.future.add_done_callback(start)


def saving(job: Job) -> bool:
    """Whether a done job's images are still being saved (its answer waits for them)."""
    written = job.context.get("saved")
    return written is not None and not written.done()


async def saved(job: Job) -> None:
    """Wait until a done job's images are saved, where it saves them (AUTOMATIC1111 writes them before it answers).
    (Shielded: a request that gives up waiting leaves the save, and the others waiting for it, alone.)"""
    written = job.context.get("saved")
    if written is not None:
        await asyncio.shield(asyncio.wrap_future(written))


def save_logged(job: Job, outputs: Outputs, grid: bool) -> None:
    """save_images for a done job: the images are answered whatever happens here (outputs.quietly)."""
    paths = quietly(save_job_images, job, outputs, grid, what=f"save_images (job {job.id}, {outputs.folder})")
    if paths:
        log.info("save_images: job %s wrote %s", job.id, ", ".join(str(p) for p in paths))


def own(request: Request, job: Job | None, family: str) -> bool:
    """A job of this route family that the caller may see (every caller's, when auth is off). A script's cells
    (orchestrator.server.cells) are the page's tasks and, for the AUTOMATIC1111 request that made them, /sdapi's too
    (its progress, interrupt and skip)."""
    if job is None or family not in (job.context.get("family"), *job.context.get("also", ())):
        return False
    return not request.app.state.settings.security.auth_required or job.client_id == client_id(request)


async def wait_for(request: Request, job: Job, timeout_s: float) -> None:
    """Wait for the job, and its saving where it saves (wait_all's, for one)."""
    await wait_all(request, [job], timeout_s)


async def wait_all(request: Request, jobs: list[Job], timeout_s: float) -> None:
    """Wait for the jobs (a script's cells), and their saving where they save: one watch of the client for them
    all (a 64-cell X/Y/Z plot polled the connection 640 times a second, a watch a cell). A client that disconnects
    cancels those not done (each stops before its next step); 504 after timeout_s, the same."""
    pending = {asyncio.wrap_future(job.future) for job in jobs}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.1)
        if not pending:
            break
        if await request.is_disconnected():
            await _cancel_unfinished(request, jobs)
            raise APIError(499, "client_closed", "client disconnected; the job was cancelled")
        if loop.time() > deadline:
            await _cancel_unfinished(request, jobs)
            raise APIError(504, "timeout", f"the generation did not finish within {timeout_s:g} s; it was cancelled")
    for job in jobs:
        await saved(job)


async def _cancel_unfinished(request: Request, jobs: list[Job]) -> None:
    for job in jobs:
        if not job.future.done():
            await run_in_threadpool(engine(request).queue.cancel, job)


def response(request: Request, job: Job) -> dict:
    """A finished job's AUTOMATIC1111 response (its images as the server's samples_format asks); a cancelled one is
    409, a failed one its error's status."""
    if job.status == Status.DONE:
        return a1111.to_response(job, job.context["body"], answer_format(request, job.context["body"]))
    if job.status == Status.CANCELLED:
        raise APIError(409, "cancelled", str(job.error or "the job was cancelled"))
    raise api_error(job.error) if job.error is not None else APIError(500, "generation_failed", "the job failed")
