"""The app factory: `create_app(settings)` builds the FastAPI app (AUTOMATIC1111/SD.Next's /sdapi/v1, a task API
with WebSocket progress, ViT classification, health and Prometheus metrics) over the engine and Triton.
`orchestrator.server.service` runs it on uvicorn."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from kiln.contract import DEFAULT_MODELS, SDModels
from kiln.embeddings import EmbeddingLibrary
from kiln.errors import KilnError
from kiln.lora import LoraLibrary
from kiln.machine import cores
from kiln.styles import StyleLibrary
from kiln.triton_client import TritonClient
from orchestrator.engine import Engine
from orchestrator.metrics import Metrics
from orchestrator.pipeline import Pipeline
from orchestrator.security import SecurityMiddleware
from orchestrator.server.errors import install_error_handlers
from orchestrator.server.options import default_options
from orchestrator.server.routes import controlnet, extras, health, listings, outputs, sdapi, sdnext, tasks, ui, vit
from orchestrator.server.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = Engine(settings.engine_options(), metrics, connect=lambda: _connect(settings, app),
                                  connect_one=lambda models: _connect_one(settings, app, models),
                                  control=settings.model_control, connect_at=lambda url: _connect(settings, app, url))
        # save_images' threads (generation.save_when_done): the engine's workers go on while a job's files are written
        app.state.saver = ThreadPoolExecutor(max_workers=min(4, cores()), thread_name_prefix="kiln-save")
        app.state.saving = set()  # the done jobs whose files are being written (/sdapi/v1/progress still shows them)
        try:
            yield
        finally:  # uvicorn has stopped taking requests and waited for the open ones: drain the queue, in what is
            # left of the drain's time (it started when uvicorn stopped accepting; service.run_api), then the saves
            started = getattr(app.state, "draining_since", None) or time.monotonic()
            left = max(0.0, settings.drain_timeout_s - (time.monotonic() - started))
            try:
                await run_in_threadpool(app.state.engine.close, left)
                await run_in_threadpool(app.state.saver.shutdown, True)
            finally:
                for client in list(app.state.vit.values()):  # their threads and connections
                    await run_in_threadpool(client.close)

    app = FastAPI(title="kiln", version="0.1.0", lifespan=lifespan,
                  description="Stable Diffusion and ViT served on Triton: AUTOMATIC1111/SD.Next-compatible API, "
                              "a task API with WebSocket progress, step-level batching across requests.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.options = default_options()
    app.state.styles = StyleLibrary(settings.styles_file)
    app.state.embeddings = EmbeddingLibrary(settings.embeddings_dir)
    app.state.loras = LoraLibrary(settings.loras_dir)
    app.state.vit = {}  # the ViT clients by Triton, made on first use
    app.state.vit_ready = {}  # (Triton, model) -> until when it is taken as served (routes.vit.served)
    app.state.scripts = {}  # the scripts running here: id -> {"client", "interrupted"} (orchestrator.server.cells)
    # Readiness checks, per Triton; `probe`: the first one's
    app.state.probes = {url: TritonClient(url, "grpc", timeout_s=2) for url in settings.triton_urls}
    app.state.probe = app.state.probes[settings.triton_url]
    app.add_middleware(SecurityMiddleware, options=settings.security)
    if settings.cors_origins:  # outermost: preflights carry no credentials, and 401s need CORS headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    install_error_handlers(app)
    for family in (sdapi, controlnet, tasks, vit, health, listings, extras, sdnext, outputs, ui):
        app.include_router(family.router)
    app.include_router(listings.controlnet)
    return app


def _connect(settings: Settings, app: FastAPI, url: str | None = None) -> dict[str, Pipeline]:
    """The engine's pipelines over a Triton (default: the first), one per checkpoint it serves (the repository's
    default first), their text encoders sending the vectors of the embeddings prompts name, their models the LoRA
    sets they name."""
    from orchestrator.pipeline.components.triton import served_checkpoints

    url = url or settings.triton_url
    try:
        found = served_checkpoints(app.state.probes[url])
    except KilnError:
        found = []
    pipelines: dict[str, Pipeline] = {}
    try:
        for models in found or [DEFAULT_MODELS]:  # none ready: the default's read says why generation cannot start
            pipelines[models.checkpoint] = _connect_one(settings, app, models, url)
    except BaseException:
        for pipeline in pipelines.values():
            pipeline.close()
        raise
    return pipelines


def _connect_one(settings: Settings, app: FastAPI, models: SDModels, url: str | None = None) -> Pipeline:
    from orchestrator.pipeline.components.triton import triton_components

    return Pipeline(triton_components(url or settings.triton_url, shared_memory=settings.shared_memory,
                                      embeddings=app.state.embeddings, loras=app.state.loras, models=models),
                    settings.limits)
