"""Our task API: submit (202 at once), status with queue position and progress, cancel, interrupt and skip
(AUTOMATIC1111's), WebSocket events."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.errors import KilnError
from orchestrator.jobs import FINISHED, Job, Status
from orchestrator.server import a1111, cells
from orchestrator.server.answers import ImagesJSON
from orchestrator.server.errors import APIError, as_api_error, count
from orchestrator.server.generation import client_id, engine, kept_overrides, own, saved, saving, submit
from orchestrator.server.options import answer_format
from orchestrator.server.preview import preview_png

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])
log = logging.getLogger("kiln.api")
FINAL_EVENTS = {status.value for status in FINISHED}  # a task's socket closes after one of these
SAVE_WAIT_S = 10.0  # how long GET /v1/tasks/{id} waits for a done task's files before it answers "running"


def task_state(request: Request, job: Job) -> dict:
    """A task's state; a done one's answer once its images are saved (while they are written it is still running,
    at progress 1)."""
    status = shown_status(job)
    state = {"id": job.id, "kind": job.kind, "status": status.value,
             "queue_position": engine(request).queue.position(job), "progress": job.progress,
             "iteration": job.iteration, "n_iter": job.n_iter, "step": job.step, "steps": job.steps,
             "eta_seconds": job.eta_seconds(), "error": str(job.error) if job.error else None, "result": None,
             "interrupted": job.interrupted}
    if status == Status.DONE:
        state["result"] = a1111.to_response(job, job.context["body"], answer_format(request, job.context["body"]))
    return state


async def accept(request: Request, kind: str, body: schemas.Txt2ImgBody) -> JSONResponse:
    try:
        kept = await kept_overrides(request, body)
        job = await submit(request, kind, body, "tasks")
    except (APIError, KilnError) as exc:
        count(request, f"/v1/tasks/{kind}", str(as_api_error(exc).status))
        raise
    request.app.state.options.update(kept)  # (accepted: it will run)
    count(request, f"/v1/tasks/{kind}", "202")
    position = await run_in_threadpool(engine(request).queue.position, job)
    accepted = {"id": job.id, "status": job.status.value, "queue_position": position}
    return JSONResponse(accepted, status_code=202, headers={"Location": f"/v1/tasks/{job.id}"})


@router.post("/txt2img", status_code=202, response_model=schemas.TaskAccepted)
async def task_txt2img(request: Request, body: schemas.Txt2ImgBody):
    return await accept(request, "txt2img", body)


@router.post("/img2img", status_code=202, response_model=schemas.TaskAccepted)
async def task_img2img(request: Request, body: schemas.Img2ImgBody):
    return await accept(request, "img2img", body)


@router.get("", response_model=schemas.TaskList)
async def list_tasks(request: Request, limit: int = Query(50, ge=1, le=512)):
    """The caller's own tasks, newest first, with queue positions and progress; everyone else's as counts only."""
    return await run_in_threadpool(tasks_of, request, limit)


def tasks_of(request: Request, limit: int) -> dict:
    caller = client_id(request)
    queue = engine(request).queue
    mine, others = [], {"queued": 0, "running": 0}
    for job in queue.jobs():
        if job.context.get("family") == "tasks" and job.client_id == caller:
            mine.append(job)
        elif job.status in (Status.QUEUED, Status.RUNNING):
            others[job.status.value] += 1
    mine.sort(key=lambda job: job.created, reverse=True)
    return {"tasks": [summary(queue, job) for job in mine[:limit]], "others": others}


def shown_status(job: Job) -> Status:
    """A task's status as its caller sees it: running while a done one's images are being saved."""
    return Status.RUNNING if job.status == Status.DONE and saving(job) else job.status


def summary(queue, job: Job) -> dict:
    body = job.context.get("body")
    return {"id": job.id, "kind": job.kind, "status": shown_status(job).value, "queue_position": queue.position(job),
            "progress": job.progress, "step": job.step, "steps": job.steps, "iteration": job.iteration,
            "n_iter": job.n_iter, "eta_seconds": job.eta_seconds(), "created": job.created,
            "prompt": getattr(body, "prompt", ""), "error": str(job.error) if job.error else None,
            "interrupted": job.interrupted}


def writing(job: Job) -> str:
    """What a 409 adds for a done task that GET still shows running."""
    return " (its images are being written)" if job.status == Status.DONE and saving(job) else ""


def finished(job: Job) -> APIError:
    return APIError(409, "finished", f"task {job.id} already {job.status.value}{writing(job)}")


async def find(request: Request, task_id: str) -> Job:
    job = await run_in_threadpool(engine(request).queue.get, task_id)
    if not own(request, job, "tasks"):
        raise APIError(404, "not_found", f"no task {task_id!r}")
    return job


@router.get("/{task_id}", response_model=schemas.TaskState, response_class=ImagesJSON)
async def get_task(request: Request, task_id: str):
    job = await find(request, task_id)
    if job.status == Status.DONE:  # (its answer once its images are saved, as the AUTOMATIC1111 routes'; a save
        with suppress(asyncio.TimeoutError):  # longer than this shows the task running: the client asks again)
            await asyncio.wait_for(saved(job), SAVE_WAIT_S)
    return await run_in_threadpool(task_state, request, job)


@router.delete("/{task_id}")
async def cancel_task(request: Request, task_id: str):
    job = await find(request, task_id)
    if job.status in FINISHED:
        raise finished(job)
    await run_in_threadpool(engine(request).queue.cancel, job)
    return {"id": job.id, "status": "cancelling" if job.status == Status.RUNNING else job.status.value}


@router.post("/{task_id}/interrupt")
async def interrupt_task(request: Request, task_id: str):
    """AUTOMATIC1111's Interrupt: stop now, keep what is done (the images made, the running one at the step it was
    at: the task ends done); one still queued ends without starting; a script's other cells with it."""
    job = await find(request, task_id)
    if job.status in FINISHED:
        raise finished(job)
    await run_in_threadpool(engine(request).queue.interrupt, job)
    await cells.interrupt_scripts(request, [job])
    return {"id": job.id, "status": "interrupting"}


@router.post("/{task_id}/skip")
async def skip_task(request: Request, task_id: str):
    """AUTOMATIC1111's Skip: end the running image (its run of n_iter, kept at the step it was at), go on with the
    next run."""
    job = await find(request, task_id)
    if job.status != Status.RUNNING:
        raise APIError(409, "not_running", f"task {task_id} is {job.status.value}{writing(job)}; skip ends a running "
                                           "task's image")
    await run_in_threadpool(engine(request).queue.skip, job)
    return {"id": job.id, "status": "skipping"}


def latest_preview(queue, job: Job, kept: dict) -> str | None:
    """A preview of the job's latest latents (wherever it runs: a shared queue's are in Redis), made in a thread as
    its socket sends the event, rather than by the listener (on the engine's worker that ran the step, once per
    watching socket: it delayed the job's next step and, with step batching, everyone's; benchmarks.previews).
    None where there are none, or where they cannot be read now (the event goes without one: a preview is never
    worth the stream). `kept`: the socket's last preview, made again only for other latents (a socket behind the job
    sends the same latest latents with every event it has queued)."""
    try:
        latents = queue.latents(job)
        if latents is None:
            return None
        if kept.get("latents") is not latents:
            kept.update(latents=latents, preview=preview_png(latents))
        return kept["preview"]
    except Exception as exc:  # noqa: BLE001 - (the job store's trouble in a line; anything else with its traceback)
        log.warning("preview of task %s: %s", job.id, exc, exc_info=not isinstance(exc, KilnError))
        return None


async def next_event(events: asyncio.Queue, job: Job, wait_s: float = 1.0) -> dict:
    """The job's next event; once it has finished and its final event has not come for a while, that event made from
    its status. A job's status turns finished before its final event is handed over (Job.finish; a shared queue's
    mirror reads its status from Redis before the event arrives by pub/sub, and a mirror read again after the
    connection was away never gets it): the socket must not close on the status alone, nor wait for ever."""
    waited_finished = 0
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=wait_s)
        except asyncio.TimeoutError:
            waited_finished = waited_finished + 1 if job.status in FINISHED else 0
            if waited_finished >= 2:  # (a whole wait since it was seen finished)
                return job.final_event()


@router.websocket("/{task_id}/events")
async def task_events(websocket: WebSocket, task_id: str, preview_every: int = 0):
    """Progress events as JSON: queued, started, progress (with a preview every N steps), done/failed/cancelled."""
    try:
        job = await run_in_threadpool(engine(websocket).queue.get, task_id)  # type: ignore[arg-type]
    except KilnError:  # the job store is away
        await websocket.close(code=1013, reason="the job store is unreachable; try again")
        return
    if not own(websocket, job, "tasks"):  # type: ignore[arg-type]
        await websocket.close(code=4404, reason="no such task")
        return
    await websocket.accept()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    kept: dict = {}  # the last preview sent, and its latents (latest_preview)

    queue = engine(websocket).queue  # type: ignore[arg-type]

    def listener(event: dict) -> None:  # (on the engine's worker, between two steps: it only hands the event over)
        loop.call_soon_threadsafe(events.put_nowait, event)

    unsubscribe = job.subscribe(listener)
    try:
        await websocket.send_json({"event": "state", "task_id": job.id, "status": job.status.value,
                                   "progress": job.progress, "step": job.step, "steps": job.steps})
        event: dict = {}
        while event.get("event") not in FINAL_EVENTS:
            # (one finished before it was watched: its final event at once)
            event = job.final_event() if job.status in FINISHED and not event else await next_event(events, job)
            if preview_every > 0 and event.get("event") == "progress" and event["step"] % preview_every == 0:
                preview = await run_in_threadpool(latest_preview, queue, job, kept)
                event = event | {"preview": preview} if preview is not None else event
            await websocket.send_json(event)
        await websocket.close()
    except WebSocketDisconnect:
        pass
    finally:
        unsubscribe()
