"""AUTOMATIC1111's /sdapi/v1: generation, progress, interrupt/skip, the listings, options and png-info."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.contract import SD_UNET, SDModels
from kiln.errors import InputError, KilnError, NotFoundError
from kiln.infotext import read_png_info
from orchestrator.jobs import FINISHED, Job
from orchestrator.security import is_loopback
from orchestrator.server import (
    a1111,
    builtin_scripts,
    cells,
    loopback,
    outpainting,
    outpainting_mk2,
    prompt_matrix,
    prompts_from_file,
    sampler_names,
    xyz,
)
from orchestrator.server.answers import ImagesJSON
from orchestrator.server.errors import APIError, as_api_error, count
from orchestrator.server.generation import (
    engine,
    kept_overrides,
    option_updates,
    own,
    response,
    saving,
    served_contract,
    submit,
    wait_for,
)
from orchestrator.server.inputs import decode_b64_image
from orchestrator.server.options import answer_format, check_save_settings
from orchestrator.server.preview import preview_png

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])
# each of a1111.CELL_SCRIPTS's scripts: the module whose run(request, kind, body) answers its requests
CELL_SCRIPTS = {"x/y/z plot": xyz, "prompt matrix": prompt_matrix, "prompts from file or textbox": prompts_from_file,
                "loopback": loopback, outpainting.NAME: outpainting, outpainting_mk2.NAME: outpainting_mk2}


async def own_running(request: Request) -> list[Job]:
    """AUTOMATIC1111 calls act on the caller's own /sdapi jobs (all of them when auth is off)."""
    return [job for job in await run_in_threadpool(engine(request).queue.running) if own(request, job, "sdapi")]


async def current_job(request: Request, with_saving: bool = False) -> Job | None:
    """AUTOMATIC1111's current image: the caller's oldest running job (what /progress shows and /skip ends).
    with_saving (/progress): where none runs, a done one whose files are being written (AUTOMATIC1111 writes them
    inside its job, before it answers; here on the orchestrator that took its request)."""
    jobs = await own_running(request)
    if with_saving and not jobs:
        jobs = [job for job in list(request.app.state.saving) if own(request, job, "sdapi")]
    return min(jobs, key=lambda job: job.started or 0, default=None)


async def generate(request: Request, kind: str, body: schemas.Txt2ImgBody) -> dict:
    endpoint = f"/sdapi/v1/{kind}"
    try:
        script = CELL_SCRIPTS.get(a1111.cell_script(body))
        kept = await kept_overrides(request, body)
        if script is not None:  # generations of their own (orchestrator.server.cells)
            builtin_scripts.check(body)  # (the request's own: its cells' seeds and steps are the script's)
            check_save_settings(body, kind, a1111.cell_script(body))
            with cells.script(request):
                answer = await script.run(request, kind, body)
        else:
            job = await submit(request, kind, body, "sdapi")
            await wait_for(request, job, request.app.state.settings.request_timeout_s)
            answer = await run_in_threadpool(response, request, job)  # (encoding: off the event loop)
        request.app.state.options.update(kept)  # (they stay only when it answered)
    except (APIError, KilnError) as exc:
        count(request, endpoint, str(as_api_error(exc).status))
        raise
    count(request, endpoint, "200")
    return answer


@router.post("/txt2img", response_model=schemas.GenerationResponse, response_class=ImagesJSON)
async def txt2img(request: Request, body: schemas.Txt2ImgBody):
    return await generate(request, "txt2img", body)


@router.post("/img2img", response_model=schemas.GenerationResponse, response_class=ImagesJSON)
async def img2img(request: Request, body: schemas.Img2ImgBody):
    return await generate(request, "img2img", body)


@router.get("/progress", response_model=schemas.ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False,
                   id_task: str | None = Query(None, description="a task id; default: the oldest running job")):
    job = await run_in_threadpool(engine(request).queue.get, id_task) if id_task else None
    if id_task and not own(request, job, "sdapi"):  # never another task's progress in its place
        raise NotFoundError(f"unknown task {id_task!r} (finished tasks are forgotten after a while)")
    if job is None:
        job = await current_job(request, with_saving=True)
    if job is None:
        return schemas.ProgressResponse(progress=0.0, eta_relative=0.0, state=schemas.ProgressState())
    state = schemas.ProgressState(
        skipped=job.skipped, interrupted=job.interrupted, job=f"task({job.id})",
        job_count=job.n_iter if job.status not in FINISHED or saving(job) else 0,
        job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), job_no=job.iteration,
        sampling_step=job.step, sampling_steps=job.steps)
    current = None
    options = request.app.state.options
    every = int(options.get("show_progress_every_n_steps", 10))
    if not skip_current_image and every != 0 and options.get("live_previews_enable", True) \
            and (every < 0 or job.step % every == 0 or job.step == job.steps):
        latents = await run_in_threadpool(engine(request).queue.latents, job)
        current = None if latents is None else await run_in_threadpool(preview_png, latents, answer_format(request))
    return schemas.ProgressResponse(progress=job.progress, eta_relative=job.eta_seconds() or 0.0, state=state,
                                    current_image=current, textinfo=None)


@router.post("/interrupt")
async def interrupt(request: Request):
    """Stop now, keep what is done; a script's cells not yet run are not run (AUTOMATIC1111 ends the script)."""
    queue, running = engine(request).queue, await own_running(request)
    for job in running:
        await run_in_threadpool(queue.interrupt, job)
    await cells.interrupt_scripts(request, running, every=True)
    return {}


@router.post("/skip")
async def skip(request: Request):
    """End the current image and go on: AUTOMATIC1111's current one, the oldest running (what /progress shows); the
    others running beside it (a script's other cells, another request) go on."""
    job = await current_job(request)
    if job is not None:
        await run_in_threadpool(engine(request).queue.skip, job)
    return {}


@router.get("/samplers", response_model=list[schemas.SamplerItem])
async def samplers():
    return sampler_names.samplers()


@router.get("/schedulers")
async def schedulers():
    return sampler_names.schedulers()


@router.get("/sd-models", response_model=list[schemas.ModelItem])
async def sd_models(request: Request):
    await served_contract(request)
    known = await run_in_threadpool(engine(request).checkpoints.known)  # loaded or not (kiln serve --max-checkpoints)
    return [{"title": contract.title, "model_name": contract.model_name, "hash": contract.model_hash or None,
             "sha256": contract.model_sha256 or None,
             "filename": f"triton://{SDModels(checkpoint)(SD_UNET)}/{contract.model_name}",
             "config": contract.a1111_config}
            for checkpoint, contract in known.items()]


@router.get("/options")
async def get_options(request: Request):
    try:
        await served_contract(request)
    except KilnError:
        pass  # options are readable while Triton is away (or serves no SD build)
    return dict(request.app.state.options)


@router.post("/options")
async def post_options(request: Request, body: dict[str, Any]):
    request.app.state.options.update(await option_updates(request, body))
    return {}


@router.get("/cmd-flags")
async def cmd_flags(request: Request):
    s = request.app.state.settings
    return {"listen": not is_loopback(s.listen), "server_name": s.listen, "port": s.port, "api": True,
            "nowebui": True, "api_auth": "***" if s.security.credentials else None,
            "api_keys": len(s.security.api_keys), "cors_allow_origins": ",".join(s.cors_origins) or None,
            "queue_size": s.max_queue, "max_steps": s.limits.max_steps, "workers": s.workers,
            "step_batching": s.step_batching, "request_timeout": s.request_timeout_s, "triton": s.triton_url}


@router.post("/interrogate")
async def interrogate(request: Request, body: schemas.InterrogateBody):
    """AUTOMATIC1111's interrogators (BLIP captions ranked by CLIP, DeepDanbooru tags) are models this server does not
    serve: the image is read, then the request refused naming what it asked for and what there is instead."""
    await run_in_threadpool(decode_b64_image, body.image, "image", request.app.state.settings.limits.max_image_pixels)
    raise InputError(f"interrogate model {body.model!r}: this server has no interrogator (AUTOMATIC1111's clip and "
                     "deepdanbooru are models it does not serve); POST /v1/classify labels an image with its ViT "
                     "classifier's ImageNet classes")


@router.post("/png-info", response_model=schemas.PngInfoResponse)
async def png_info(request: Request, body: schemas.PngInfoBody):
    data = await run_in_threadpool(decode_b64_image, body.image, "image",
                                   request.app.state.settings.limits.max_image_pixels)
    return await run_in_threadpool(read_png_info, data)
