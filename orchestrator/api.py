"""The HTTP API: AUTOMATIC1111/SD.Next's /sdapi/v1, a task API with WebSocket progress, ViT
classification, health and Prometheus metrics, over the Engine (jobs.py) and Triton.

`create_app(settings)` builds the FastAPI app; `orchestrator.service` runs it on uvicorn with an
embedded Triton. Every error a caller can cause is a 4xx JSON body {"error", "detail"} naming the
problem; Triton being away is a 503; nothing internal (traceback, addresses) reaches a response.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from build.errors import InputError, KilnError, ServerError
from build.imaging import ImageLimits
from orchestrator import schemas
from orchestrator.diffusion import CONTROL_MODULES, ControlNetUnit, Img2ImgRequest, Txt2ImgRequest
from orchestrator.images import parameters_text, png_bytes
from orchestrator.jobs import FINISHED, Engine, EngineOptions, Job, QueueFull, Status
from orchestrator.metrics import Metrics
from orchestrator.samplers import SAMPLERS, UnknownSampler
from orchestrator.security import SecurityMiddleware, SecurityOptions

SAMPLER_ALIASES = {
    "Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"], "LMS": ["k_lms"], "Heun": ["k_heun"],
    "DPM++ 2M": ["k_dpmpp_2m"], "DPM++ 2M Karras": ["k_dpmpp_2m_ka"], "DPM++ SDE": ["k_dpmpp_sde"],
    "DPM++ SDE Karras": ["k_dpmpp_sde_ka"], "DPM++ 2M SDE": ["k_dpmpp_2m_sde_ka"], "DDIM": ["ddim"],
    "DDPM": ["ddpm"], "PNDM": ["pndm", "PLMS"], "UniPC": ["unipc"], "LCM": ["lcm"],
}
ALIAS_TO_SAMPLER = {alias.lower(): name for name, aliases in SAMPLER_ALIASES.items() for alias in aliases} | \
    {name.lower(): name for name in SAMPLERS}
# AUTOMATIC1111 1.9+ splits "DPM++ 2M Karras" into sampler_name + scheduler.
SCHEDULER_SUFFIX = {"automatic": "", "uniform": "", "karras": " Karras"}


@dataclass
class Settings:
    triton_url: str = "127.0.0.1:8001"
    max_queue: int = 64
    workers: int = 16
    step_batching: bool = True
    max_batch_rows: int = 0
    request_timeout_s: float = 600.0
    max_prompt_chars: int = 16384
    max_image_pixels: int = 4096 * 4096
    max_n_iter: int = 16
    max_steps: int = 150  # per request (the pipeline's own hard limit is 500)
    max_images_per_request: int = 16
    cors_origins: tuple[str, ...] = ()
    security: SecurityOptions = field(default_factory=SecurityOptions)
    listen: str = "127.0.0.1"
    port: int = 7860
    vit_models: bool = True  # /v1/classify and /v1/embed are served when the ViT ensembles are


class APIError(Exception):
    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers = status, kind, detail, headers


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    engine_options = EngineOptions(triton_url=settings.triton_url, max_queue=settings.max_queue,
                                   workers=settings.workers, step_batching=settings.step_batching,
                                   max_batch_rows=settings.max_batch_rows)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = Engine(engine_options, metrics)
        try:
            yield
        finally:  # uvicorn has stopped taking requests and waited for the open ones: drain the queue
            await run_in_threadpool(app.state.engine.close, settings.request_timeout_s)

    app = FastAPI(title="kiln", version="0.1.0", lifespan=lifespan,
                  description="Stable Diffusion and ViT served on Triton: AUTOMATIC1111/SD.Next-compatible API, "
                              "a task API with WebSocket progress, step-level batching across requests.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.options = default_options()
    app.state.vit = None
    app.add_middleware(SecurityMiddleware, options=settings.security)
    if settings.cors_origins:  # outermost: preflights carry no credentials, and 401s need CORS headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    _install_error_handlers(app)
    _sdapi_routes(app)
    _task_routes(app)
    _vit_routes(app)
    _health_routes(app)
    return app


# -- errors -----------------------------------------------------------------------------------------
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse({"error": exc.kind, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(e['loc'][1:]) or e['loc'][0] if e['loc'] else 'body'}: {e['msg']}"
                           for e in errors)
        return JSONResponse({"error": "validation", "detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": "http", "detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return JSONResponse({"error": "internal", "detail": f"internal error ({type(exc).__name__})"}, status_code=500)


def _kiln_error(exc: KilnError) -> APIError:
    if isinstance(exc, UnknownSampler):
        return APIError(404, "not_found", str(exc))
    if isinstance(exc, QueueFull):
        return APIError(429, "queue_full", str(exc), {"Retry-After": "2"})
    if isinstance(exc, InputError):
        return APIError(422, "invalid_input", str(exc))
    if isinstance(exc, ServerError):
        return APIError(503, "unavailable", str(exc), {"Retry-After": "5"})
    return APIError(500, "generation_failed", str(exc))


def _count(request: Request, endpoint: str, outcome: str) -> None:
    request.app.state.metrics.requests.labels(endpoint=endpoint, outcome=outcome).inc()


# -- decoding inputs ----------------------------------------------------------------------------------
_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,", re.IGNORECASE)


def decode_b64(text: Any, what: str) -> bytes:
    """A base64 image (optionally a data: URL) -> bytes; refuses URLs and bad base64."""
    if not isinstance(text, str) or not text:
        raise APIError(422, "invalid_input", f"{what}: expected a base64-encoded image string")
    if text.startswith(("http://", "https://", "file:", "ftp://")):
        raise APIError(422, "invalid_input", f"{what}: image URLs are not fetched; send the image as base64")
    try:
        return base64.b64decode(_DATA_URL.sub("", text, count=1), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(422, "invalid_input", f"{what}: invalid base64") from None


def decode_b64_image(text: Any, what: str, max_pixels: int) -> bytes:
    """decode_b64, then the header check (oversized or unreadable images are refused before decoding)."""
    data = decode_b64(text, what)
    check_image_header(data, what, max_pixels)
    return data


def check_image_header(data: bytes, what: str, max_pixels: int) -> None:
    """Read only the header: unreadable or more pixels than the cap is refused before any decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise APIError(413, "too_large", f"{what}: image header declares too many pixels; refused before decoding") from None
        raise APIError(422, "invalid_input", f"{what}: not an image this server reads "
                                             "(JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    if width * height > max_pixels:
        raise APIError(413, "too_large", f"{what}: image header declares {width}x{height} = {width * height} "
                                         f"pixels, over the limit of {max_pixels}; refused before decoding")


def resize_init_image(data: bytes, width: int, height: int, mode: int) -> bytes:
    """AUTOMATIC1111's resize_mode for the init image: 1 crop and resize, 2 resize and fill (0/3: the pipeline's
    plain resize)."""
    from PIL import Image, ImageFilter, ImageOps

    from build.imaging import decode_image

    image = decode_image(data, ImageLimits(min_side=1))
    if mode == 1:
        image = ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    elif mode == 2:  # the whole image inside, the borders filled with a blurred stretch of it
        fitted = ImageOps.contain(image, (width, height), Image.Resampling.LANCZOS)
        canvas = image.resize((width, height), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(16))
        canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
        image = canvas
    else:
        return data
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- AUTOMATIC1111 bodies -> pipeline requests -----------------------------------------------------------
def sampler_name(body: schemas.Txt2ImgBody) -> str:
    name = body.sampler_name or body.sampler_index or "Euler a"
    resolved = ALIAS_TO_SAMPLER.get(name.lower())
    if resolved is None:
        raise APIError(404, "not_found", f"Sampler not found: {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    scheduler = (body.scheduler or "automatic").lower()
    if scheduler not in SCHEDULER_SUFFIX:
        raise APIError(422, "invalid_input", f"scheduler {body.scheduler!r} is not supported; valid: "
                                             "Automatic, Uniform, Karras")
    suffix = SCHEDULER_SUFFIX[scheduler]
    if suffix and not resolved.endswith(suffix):
        if resolved + suffix not in SAMPLERS:
            raise APIError(404, "not_found", f"Sampler not found: {resolved} with scheduler {body.scheduler}")
        resolved += suffix
    return resolved


def build_request(body: schemas.Txt2ImgBody, settings: Settings, options: dict) -> tuple[Txt2ImgRequest, list[str]]:
    """Validate an AUTOMATIC1111 body and turn it into the pipeline's request; also the ignored settings."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        if len(text) > settings.max_prompt_chars:
            raise APIError(413, "too_large", f"{name} of {len(text)} characters exceeds the "
                                             f"{settings.max_prompt_chars}-character limit")
    if not 1 <= body.steps <= settings.max_steps:
        raise APIError(422, "invalid_input", f"steps must be between 1 and {settings.max_steps}, got {body.steps}")
    if not 1 <= body.n_iter <= settings.max_n_iter:
        raise APIError(422, "invalid_input", f"n_iter must be between 1 and {settings.max_n_iter}, got {body.n_iter}")
    if body.batch_size * body.n_iter > settings.max_images_per_request:
        raise APIError(422, "invalid_input", f"batch_size x n_iter = {body.batch_size * body.n_iter} images exceeds "
                                             f"the limit of {settings.max_images_per_request} per request")
    ignored = sorted(k for k in body.override_settings if k not in ("sd_model_checkpoint", "eta_ddim"))
    checkpoint = body.override_settings.get("sd_model_checkpoint")
    if checkpoint and checkpoint not in (options["sd_model_checkpoint"], options.get("_model_name")):
        raise APIError(404, "not_found", f"override_settings.sd_model_checkpoint {checkpoint!r}: no such model; "
                                         f"this server serves {options['sd_model_checkpoint']!r}")
    eta = body.eta if body.eta is not None else float(body.override_settings.get("eta_ddim", options["eta_ddim"]))
    fields = dict(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                  sampler=sampler_name(body), cfg_scale=body.cfg_scale, seed=body.seed, width=body.width,
                  height=body.height, batch_size=body.batch_size, eta=eta, subseed=body.subseed,
                  subseed_strength=body.subseed_strength,
                  controlnet=_controlnet_units(body.alwayson_scripts, settings.max_image_pixels))
    if isinstance(body, schemas.Img2ImgBody):
        if len(body.init_images) != 1:
            raise APIError(422, "invalid_input", f"init_images must hold exactly one image, got {len(body.init_images)}")
        init = decode_b64_image(body.init_images[0], "init_images[0]", settings.max_image_pixels)
        mask = decode_b64_image(body.mask, "mask", settings.max_image_pixels) if body.mask else b""
        blur = body.mask_blur if body.mask_blur_x is None and body.mask_blur_y is None \
            else max(body.mask_blur_x or 0, body.mask_blur_y or 0)
        # AUTOMATIC1111 pastes the original back outside the mask: clients expect the kept area untouched.
        return Img2ImgRequest(**fields, init_image=init, denoising_strength=body.denoising_strength, mask=mask,
                              mask_blur=blur, inpainting_mask_invert=bool(body.inpainting_mask_invert),
                              inpainting_fill=body.inpainting_fill, overlay=True,
                              inpaint_full_res=body.inpaint_full_res,
                              inpaint_full_res_padding=body.inpaint_full_res_padding), ignored
    return Txt2ImgRequest(**fields), ignored


def _controlnet_units(scripts: dict, max_pixels: int) -> tuple[ControlNetUnit, ...] | None:
    """sd-webui-controlnet's alwayson_scripts.controlnet.args: every enabled unit with an image, in order."""
    from orchestrator.diffusion import MAX_CONTROLNET_UNITS

    if not scripts:
        return None
    unknown = sorted(k for k in scripts if k.lower() != "controlnet")
    if unknown:
        raise APIError(422, "invalid_input", f"alwayson_scripts: {', '.join(unknown)} not available; only controlnet")
    section = next(v for k, v in scripts.items() if k.lower() == "controlnet")
    args = section.get("args", []) if isinstance(section, dict) else None
    if not isinstance(args, list):
        raise APIError(422, "invalid_input", "alwayson_scripts.controlnet.args must be a list of units")
    try:
        units = [schemas.ControlNetUnitArgs.model_validate(a) for a in args]
    except Exception as exc:  # pydantic's ValidationError: name the fields, not the values
        raise APIError(422, "invalid_input", f"alwayson_scripts.controlnet.args: {_short(exc)}") from None
    enabled = [(i, u) for i, u in enumerate(units) if u.enabled and (u.image is not None or u.input_image is not None)]
    if not enabled:
        return None
    if len(enabled) > MAX_CONTROLNET_UNITS:
        raise APIError(422, "invalid_input", f"alwayson_scripts.controlnet: {len(enabled)} enabled units; "
                                             f"at most {MAX_CONTROLNET_UNITS} per request")
    result = []
    for index, unit in enabled:
        where = f"alwayson_scripts.controlnet.args[{index}]"
        image = unit.image if unit.image is not None else unit.input_image
        if isinstance(image, dict):
            image = image.get("image")
        module = unit.module.lower()
        if module not in CONTROL_MODULES:
            raise APIError(422, "invalid_input", f"{where}.module {unit.module!r} is unknown; "
                                                 f"valid: {', '.join(CONTROL_MODULES)}")
        for name in ("threshold_a", "threshold_b"):
            value = getattr(unit, name)
            if module == "canny" and value != int(value):
                raise APIError(422, "invalid_input", f"{where}.{name} must be an integer")
        result.append(ControlNetUnit(image=decode_b64_image(image, f"{where}.image", max_pixels), module=module,
                                     weight=unit.weight, guidance_start=unit.guidance_start,
                                     guidance_end=unit.guidance_end, low_threshold=int(unit.threshold_a),
                                     high_threshold=int(unit.threshold_b), model=unit.model))
    return tuple(result)


def _short(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors())
    return type(exc).__name__


def response_for(job: Job, body: schemas.Txt2ImgBody, ignored: list[str]) -> dict:
    """AUTOMATIC1111's response: images, parameters (the request), info (JSON string)."""
    infos = job.infos
    first = infos[0] if infos else {}
    infotexts = [parameters_text(i) for i in infos]
    info = {
        "prompt": body.prompt, "all_prompts": [body.prompt] * len(infos), "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * len(infos), "seed": first.get("seed"),
        "all_seeds": [i["seed"] for i in infos], "subseed": first.get("subseed", -1),
        "all_subseeds": [s for i in infos for s in i.get("all_subseeds", [-1])][:len(infos)],
        "subseed_strength": body.subseed_strength, "width": body.width, "height": body.height,
        "sampler_name": first.get("sampler"), "cfg_scale": body.cfg_scale, "steps": body.steps,
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.get("model"), "sd_model_hash": first.get("model_hash"),
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": first.get("denoising_strength"), "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "clip_skip": 1,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "is_using_inpainting_conditioning": False, "version": "kiln-0.1.0",
        "interrupted": job.interrupted, "ignored_override_settings": ignored,
    }
    images = [base64.b64encode(png_bytes(image, i)).decode() for image, i in zip(job.images, infos)] \
        if body.send_images else []
    parameters = body.model_dump(exclude={"init_images", "mask", "alwayson_scripts"})
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def default_options() -> dict:
    return {"sd_model_checkpoint": "", "show_progress_every_n_steps": 10, "live_previews_enable": True,
            "samples_format": "png", "eta_ddim": 0.0, "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
            "live_preview_content": "Prompt", "interrogate_return_ranks": False}


OPTION_TYPES = {"show_progress_every_n_steps": int, "live_previews_enable": bool, "samples_format": str,
                "eta_ddim": float, "CLIP_stop_at_last_layers": int, "sd_model_checkpoint": str, "sd_vae": str}


# -- routes: AUTOMATIC1111 --------------------------------------------------------------------------------
def _engine(request: Request) -> Engine:
    return request.app.state.engine


async def _pipeline(request: Request):
    try:
        pipeline = await run_in_threadpool(_engine(request).pipeline)
    except KilnError as exc:
        raise _kiln_error(exc) from None
    options = request.app.state.options
    if not options["sd_model_checkpoint"]:
        options["sd_model_checkpoint"] = model_title(pipeline)
        options["_model_name"] = pipeline.model_name
    return pipeline


def model_title(pipeline) -> str:
    return f"{pipeline.model_name} [{pipeline.model_hash}]" if pipeline.model_hash else pipeline.model_name


async def submit_job(request: Request, kind: str, body: schemas.Txt2ImgBody) -> tuple[Job, list[str]]:
    settings: Settings = request.app.state.settings
    await _pipeline(request)
    generation, ignored = await run_in_threadpool(build_request, body, settings, request.app.state.options)
    # "Only masked" crops the init image as it is; resize_mode shapes the whole picture otherwise (as in AUTOMATIC1111).
    only_masked = isinstance(body, schemas.Img2ImgBody) and body.mask and body.inpaint_full_res
    if isinstance(body, schemas.Img2ImgBody) and body.resize_mode in (1, 2) and not only_masked:
        resized = await run_in_threadpool(resize_init_image, generation.init_image, body.width, body.height,
                                          body.resize_mode)
        generation = replace(generation, init_image=resized)
    try:
        job = await run_in_threadpool(_engine(request).submit, kind, generation, body.n_iter)
    except KilnError as exc:
        raise _kiln_error(exc) from None
    job.client_id = request.scope.get("state", {}).get("client_id")
    job.api = "sdapi" if request.url.path.startswith("/sdapi") else "tasks"
    job.body, job.ignored = body, ignored
    return job, ignored


async def wait_for(request: Request, job: Job, timeout_s: float) -> None:
    """Wait for the job; a client that disconnects cancels it (it stops before its next step); 504 after timeout."""
    future = asyncio.wrap_future(job.future)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.1)
        if done:
            return
        if await request.is_disconnected():
            _engine(request).queue.cancel(job)
            raise APIError(499, "client_closed", "client disconnected; the job was cancelled")
        if loop.time() > deadline:
            _engine(request).queue.cancel(job)
            raise APIError(504, "timeout", f"the generation did not finish within {timeout_s:g} s; it was cancelled")


def _finished_response(job: Job, body, ignored) -> dict:
    if job.status == Status.DONE:
        return response_for(job, body, ignored)
    if job.status == Status.CANCELLED:
        raise APIError(409, "cancelled", str(job.error or "the job was cancelled"))
    raise _kiln_error(job.error or KilnError("the job failed"))


def _sdapi_routes(app: FastAPI) -> None:
    async def generate(request: Request, kind: str, body: schemas.Txt2ImgBody):
        endpoint = f"/sdapi/v1/{kind}"
        try:
            job, ignored = await submit_job(request, kind, body)
            await wait_for(request, job, request.app.state.settings.request_timeout_s)
            response = _finished_response(job, body, ignored)
        except APIError as exc:
            _count(request, endpoint, str(exc.status))
            raise
        _count(request, endpoint, "200")
        return response

    @app.post("/sdapi/v1/txt2img", response_model=schemas.GenerationResponse, tags=["sdapi"])
    async def txt2img(request: Request, body: schemas.Txt2ImgBody):
        return await generate(request, "txt2img", body)

    @app.post("/sdapi/v1/img2img", response_model=schemas.GenerationResponse, tags=["sdapi"])
    async def img2img(request: Request, body: schemas.Img2ImgBody):
        return await generate(request, "img2img", body)

    @app.get("/sdapi/v1/progress", response_model=schemas.ProgressResponse, tags=["sdapi"])
    async def progress(request: Request, skip_current_image: bool = False,
                       id_task: str | None = Query(None, description="a task id; default: the oldest running job")):
        engine = _engine(request)
        job = engine.queue.get(id_task) if id_task else None
        if job is None:
            running = sorted(_own_jobs(request, engine.queue.running()), key=lambda j: j.started or 0)
            job = running[0] if running else None
        if job is None:
            return schemas.ProgressResponse(progress=0.0, eta_relative=0.0, state=schemas.ProgressState())
        state = schemas.ProgressState(
            skipped=job.skipped, interrupted=job.interrupted, job=f"task({job.id})",
            job_count=job.n_iter if job.status not in FINISHED else 0,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), job_no=job.iteration,
            sampling_step=job.step, sampling_steps=job.steps)
        current = None
        every = int(request.app.state.options.get("show_progress_every_n_steps", 10))
        if not skip_current_image and every != 0 and job.latents is not None and request.app.state.options.get(
                "live_previews_enable", True) and (every < 0 or job.step % every == 0 or job.step == job.steps):
            current = await run_in_threadpool(preview_png, job.latents)
        eta = job.eta_seconds()
        return schemas.ProgressResponse(progress=job.progress, eta_relative=eta or 0.0, state=state,
                                        current_image=current, textinfo=None)

    @app.post("/sdapi/v1/interrupt", tags=["sdapi"])
    async def interrupt(request: Request):
        for job in _own_jobs(request, _engine(request).queue.running()):
            job.interrupted = True
        return {}

    @app.post("/sdapi/v1/skip", tags=["sdapi"])
    async def skip(request: Request):
        for job in _own_jobs(request, _engine(request).queue.running()):
            job.skipped = True
        return {}

    @app.get("/sdapi/v1/samplers", response_model=list[schemas.SamplerItem], tags=["sdapi"])
    async def samplers():
        return [{"name": name, "aliases": SAMPLER_ALIASES.get(name, []),
                 "options": {"scheduler": s.scheduler} | {k: str(v) for k, v in s.overrides.items()}}
                for name, s in SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers", tags=["sdapi"])
    async def schedulers():
        return [{"name": n, "label": n.capitalize(), "aliases": None, "default_rho": -1, "need_inner_model": False}
                for n in SCHEDULER_SUFFIX]

    @app.get("/sdapi/v1/sd-models", response_model=list[schemas.ModelItem], tags=["sdapi"])
    async def sd_models(request: Request):
        pipeline = await _pipeline(request)
        return [{"title": model_title(pipeline), "model_name": pipeline.model_name,
                 "hash": pipeline.model_hash or None, "sha256": pipeline.model_sha256 or None,
                 "filename": f"triton://sd_unet/{pipeline.model_name}", "config": None}]

    @app.get("/controlnet/model_list", tags=["controlnet"])
    async def controlnet_models(request: Request):
        """sd-webui-controlnet's list: the build's ControlNets as "name [hash]" (a unit's `model` takes either)."""
        pipeline = await _pipeline(request)
        served = pipeline.controlnets.values() if pipeline.has_controlnet else ()
        return {"model_list": [c.title for c in served]}

    @app.get("/controlnet/module_list", tags=["controlnet"])
    async def controlnet_modules():
        return {"module_list": list(CONTROL_MODULES)}

    @app.get("/sdapi/v1/options", tags=["sdapi"])
    async def get_options(request: Request):
        try:
            await _pipeline(request)
        except APIError:
            pass  # options are readable while Triton is away
        return {k: v for k, v in request.app.state.options.items() if not k.startswith("_")}

    @app.post("/sdapi/v1/options", tags=["sdapi"])
    async def set_options(request: Request, body: dict[str, Any]):
        if "sd_model_checkpoint" in body:
            await _pipeline(request)  # learn the served model's title before comparing with it (503 if Triton is away)
        options = request.app.state.options
        updates = {}
        for key, value in body.items():
            kind = OPTION_TYPES.get(key)
            if kind is not None:
                if kind is float and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or \
                        (kind is float and not math.isfinite(value)):
                    raise APIError(422, "invalid_input", f"option {key} must be a {kind.__name__}")
            if key == "sd_model_checkpoint" and value not in (options["sd_model_checkpoint"], options.get("_model_name")):
                raise APIError(404, "not_found", f"sd_model_checkpoint {value!r}: no such model; this server serves "
                                                 f"{options['sd_model_checkpoint']!r}")
            if key.startswith("_"):
                raise APIError(422, "invalid_input", f"option {key} is not settable")
            updates[key] = value
        options.update(updates)
        return {}

    @app.get("/sdapi/v1/cmd-flags", tags=["sdapi"])
    async def cmd_flags(request: Request):
        s: Settings = request.app.state.settings
        return {"listen": s.listen not in ("127.0.0.1", "localhost", "::1"), "server_name": s.listen, "port": s.port,
                "api": True, "nowebui": True, "api_auth": "***" if s.security.credentials else None,
                "api_keys": len(s.security.api_keys), "cors_allow_origins": ",".join(s.cors_origins) or None,
                "queue_size": s.max_queue, "max_steps": s.max_steps, "workers": s.workers, "step_batching": s.step_batching,
                "request_timeout": s.request_timeout_s, "triton": s.triton_url}

    @app.post("/sdapi/v1/png-info", response_model=schemas.PngInfoResponse, tags=["sdapi"])
    async def png_info(request: Request, body: schemas.PngInfoBody):
        data = decode_b64_image(body.image, "image", request.app.state.settings.max_image_pixels)
        return await run_in_threadpool(read_png_info, data)


def _own_jobs(request: Request, jobs: list[Job]) -> list[Job]:
    """AUTOMATIC1111 calls act on the caller's own /sdapi jobs (all of them when auth is off)."""
    client = request.scope.get("state", {}).get("client_id")
    auth = request.app.state.settings.security.auth_required
    return [j for j in jobs if j.api == "sdapi" and (not auth or j.client_id == client)]


# AUTOMATIC1111's "Approx cheap" preview: a linear map from SD 1.x's 4 latent channels to RGB.
PREVIEW_COEFFICIENTS = np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                                 [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], dtype=np.float32)


def preview_png(latents: np.ndarray) -> str:
    """A cheap preview of the first image's latents as base64 PNG (no VAE call)."""
    from PIL import Image

    sample = np.asarray(latents[0], dtype=np.float32)
    if sample.shape[0] == 4:
        rgb = np.einsum("chw,cr->hwr", sample, PREVIEW_COEFFICIENTS)
    else:
        rgb = np.repeat(sample.mean(axis=0)[..., None], 3, axis=2)
    pixels = np.clip((rgb + 1) * 127.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def read_png_info(data: bytes) -> dict:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    except Exception:  # noqa: BLE001 - already header-checked; anything else is a broken file
        raise APIError(422, "invalid_input", "image: cannot read its metadata") from None
    text = items.get("parameters", "")
    return {"info": text, "items": items, "parameters": parse_infotext(text)}


def parse_infotext(text: str) -> dict:
    """AUTOMATIC1111 infotext -> {"Prompt", "Negative prompt", "Steps", "Sampler", ...}."""
    if not text:
        return {}
    lines = text.strip().split("\n")
    last = lines[-1] if re.search(r"\bSteps: ", lines[-1]) else ""
    body = lines[:-1] if last else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        params[key.strip()] = value
    if "Size" in params and "x" in params["Size"]:
        params["Size-1"], params["Size-2"] = params["Size"].split("x", 1)
    return params


# -- routes: tasks --------------------------------------------------------------------------------------
def task_state(request: Request, job: Job) -> dict:
    state = {"id": job.id, "kind": job.kind, "status": job.status.value,
             "queue_position": _engine(request).queue.position(job), "progress": job.progress,
             "iteration": job.iteration, "n_iter": job.n_iter, "step": job.step, "steps": job.steps,
             "eta_seconds": job.eta_seconds(), "error": str(job.error) if job.error else None, "result": None}
    if job.status == Status.DONE:
        state["result"] = response_for(job, job.body, job.ignored)
    return state


def _task_routes(app: FastAPI) -> None:
    async def submit(request: Request, kind: str, body: schemas.Txt2ImgBody) -> JSONResponse:
        try:
            job, ignored = await submit_job(request, kind, body)
        except APIError as exc:
            _count(request, f"/v1/tasks/{kind}", str(exc.status))
            raise
        _count(request, f"/v1/tasks/{kind}", "202")
        return JSONResponse({"id": job.id, "status": job.status.value,
                             "queue_position": _engine(request).queue.position(job)}, status_code=202,
                            headers={"Location": f"/v1/tasks/{job.id}"})

    @app.post("/v1/tasks/txt2img", status_code=202, response_model=schemas.TaskAccepted, tags=["tasks"])
    async def task_txt2img(request: Request, body: schemas.Txt2ImgBody):
        return await submit(request, "txt2img", body)

    @app.post("/v1/tasks/img2img", status_code=202, response_model=schemas.TaskAccepted, tags=["tasks"])
    async def task_img2img(request: Request, body: schemas.Img2ImgBody):
        return await submit(request, "img2img", body)

    def find(request: Request, task_id: str) -> Job:
        job = _engine(request).queue.get(task_id)
        if job is None or job.api != "tasks":
            raise APIError(404, "not_found", f"no task {task_id!r}")
        if request.app.state.settings.security.auth_required and \
                job.client_id != request.scope.get("state", {}).get("client_id"):
            raise APIError(404, "not_found", f"no task {task_id!r}")
        return job

    @app.get("/v1/tasks/{task_id}", response_model=schemas.TaskState, tags=["tasks"])
    async def get_task(request: Request, task_id: str):
        job = find(request, task_id)
        return await run_in_threadpool(task_state, request, job)

    @app.delete("/v1/tasks/{task_id}", tags=["tasks"])
    async def cancel_task(request: Request, task_id: str):
        job = find(request, task_id)
        if job.status in FINISHED:
            raise APIError(409, "finished", f"task {task_id} already {job.status.value}")
        _engine(request).queue.cancel(job)
        return {"id": job.id, "status": "cancelling" if job.status == Status.RUNNING else job.status.value}

    @app.websocket("/v1/tasks/{task_id}/events")
    async def task_events(websocket: WebSocket, task_id: str, preview_every: int = 0):
        """Progress events as JSON: queued, started, progress (with a preview every N steps), done/failed/cancelled."""
        job = _engine(websocket).queue.get(task_id)  # type: ignore[arg-type]
        allowed = job is not None and job.api == "tasks" and (
            not websocket.app.state.settings.security.auth_required
            or job.client_id == websocket.scope.get("state", {}).get("client_id"))
        if not allowed:
            await websocket.close(code=4404, reason="no such task")
            return
        await websocket.accept()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listener(event: dict) -> None:
            if preview_every > 0 and event.get("event") == "progress" and event["step"] % preview_every == 0 \
                    and job.latents is not None:
                event = event | {"preview": preview_png(job.latents)}
            loop.call_soon_threadsafe(events.put_nowait, event)

        unsubscribe = job.subscribe(listener)
        try:
            await websocket.send_json({"event": "state", "task_id": job.id, "status": job.status.value,
                                       "progress": job.progress, "step": job.step, "steps": job.steps})
            while job.status not in FINISHED or not events.empty():
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                await websocket.send_json(event)
                if event.get("event") in ("done", "failed", "cancelled"):
                    break
            await websocket.close()
        except WebSocketDisconnect:
            pass
        finally:
            unsubscribe()


# -- routes: ViT ----------------------------------------------------------------------------------------
def _vit_client(request: Request):
    state = request.app.state
    if state.vit is None:
        from clients.vit import ViTClient

        state.vit = ViTClient(state.settings.triton_url, "grpc")
    return state.vit


async def _images_from(request: Request, body_model) -> tuple[list[tuple[str, bytes]], Any]:
    """JSON {"images": [base64...]} or multipart files (field `files`), with the other fields as form fields."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=64, max_fields=16)
        except Exception:  # noqa: BLE001 - malformed multipart
            raise APIError(422, "invalid_input", "malformed multipart body") from None
        files = [v for k, v in form.multi_items() if k in ("files", "file", "images") and hasattr(v, "read")]
        if not files:
            raise APIError(422, "invalid_input", "multipart body has no image files (field name: files)")
        fields = {k: v for k, v in form.multi_items() if not hasattr(v, "read")}
        images = []
        for index, upload in enumerate(files):
            data = await upload.read()
            name = upload.filename or f"files[{index}]"
            images.append((name, data))
        try:
            params = body_model.model_validate({"images": ["-"] * len(images)} | fields)
        except Exception as exc:  # noqa: BLE001
            raise APIError(422, "invalid_input", _short(exc)) from None
    else:
        try:
            payload = await request.json()
        except Exception:  # noqa: BLE001
            raise APIError(422, "invalid_input", "body must be JSON {\"images\": [base64, ...]} or multipart") from None
        try:
            params = body_model.model_validate(payload)
        except Exception as exc:  # noqa: BLE001
            raise APIError(422, "invalid_input", _short(exc)) from None
        images = [(f"images[{index}]", decode_b64(text, f"images[{index}]")) for index, text in enumerate(params.images)]
    if len(images) > 64:
        raise APIError(413, "too_large", f"{len(images)} images in one request; the limit is 64")
    return images, params


def _split_unreadable(images: list[tuple[str, bytes]], max_pixels: int) -> tuple[list, dict[int, str]]:
    """Header-check each image: the readable ones go to Triton; the others fail alone, undecoded."""
    good, errors = [], {}
    for index, (name, data) in enumerate(images):
        try:
            check_image_header(data, name, max_pixels)
            good.append((name, data))
        except APIError as exc:
            errors[index] = exc.detail
    return good, errors


VIT_OPENAPI = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "description": "base64 image"}, "minItems": 1}}}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}, "required": True}}


def _vit_routes(app: FastAPI) -> None:
    async def run_vit(request: Request, endpoint: str, images: list, call):
        """Results in the images' order; unreadable images get an error entry without reaching Triton."""
        good, errors = _split_unreadable(images, request.app.state.settings.max_image_pixels)
        client = _vit_client(request)
        ready = await run_in_threadpool(_model_ready, client, "vit_classify" if "classify" in endpoint else "vit_embed")
        if not ready:
            _count(request, endpoint, "503")
            raise APIError(503, "unavailable", "the ViT models are not being served by Triton "
                                               "(build them with `kiln build vit`)", {"Retry-After": "5"})
        results = iter(await run_in_threadpool(call, client, good) if good else [])
        _count(request, endpoint, "200")
        return [{"image": name, "error": errors[index]} if index in errors else next(results).as_dict()
                for index, (name, _) in enumerate(images)]

    @app.post("/v1/classify", tags=["vit"], openapi_extra=VIT_OPENAPI)
    async def classify(request: Request):
        """Top-k ImageNet labels per image; a bad image fails alone (its entry has `error`)."""
        images, params = await _images_from(request, schemas.ClassifyBody)
        results = await run_vit(request, "/v1/classify", images, lambda c, good: c.classify(good, top_k=params.top_k))
        return {"results": results}

    @app.post("/v1/embed", tags=["vit"], openapi_extra=VIT_OPENAPI)
    async def embed(request: Request):
        """Pooled features (and optionally one block's tokens) per image."""
        images, params = await _images_from(request, schemas.EmbedBody)
        results = await run_vit(request, "/v1/embed", images,
                                lambda c, good: c.embed(good, layer=params.layer, tokens=params.tokens))
        return {"results": results}


def _model_ready(client, model: str) -> bool:
    try:
        return bool(client._client().is_model_ready(model))
    except Exception:  # noqa: BLE001 - unreachable or unknown model: not ready
        return False


# -- routes: health and metrics ---------------------------------------------------------------------
SD_MODELS = ("sd_text_encode", "sd_unet", "sd_vae_decode")


def _health_routes(app: FastAPI) -> None:
    @app.get("/health/live", tags=["health"])
    async def live():
        return {"status": "live"}

    @app.get("/health/ready", tags=["health"])
    async def ready(request: Request):
        import tritonclient.grpc as grpcclient

        def check() -> tuple[bool, dict]:
            try:
                client = grpcclient.InferenceServerClient(request.app.state.settings.triton_url)
                try:
                    if not client.is_server_ready(client_timeout=2):
                        return False, {"triton": "not ready"}
                    models = {m: bool(client.is_model_ready(m, client_timeout=2)) for m in SD_MODELS}
                finally:
                    client.close()
            except Exception:  # noqa: BLE001 - unreachable
                return False, {"triton": "unreachable"}
            return all(models.values()), {"triton": "ready", "models": models}

        ok, detail = await run_in_threadpool(check)
        return JSONResponse({"status": "ready" if ok else "not ready"} | detail, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"])
    async def metrics(request: Request):
        return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")

