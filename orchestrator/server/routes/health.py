"""Probes and metrics: /health/live, /health/ready (Triton, and what it serves: an SD checkpoint or the ViT; the
shared job store where there is one),
/metrics (Prometheus; its own token with `kiln serve --metrics-token`)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from kiln.contract import (
    SD_READY,
    SD_UNET,
    VIT,
    VIT_CLASSIFY,
    VIT_EMBED,
    VIT_POSTPROCESS,
    VIT_PREPROCESS,
    SDModels,
    base_name,
)
from kiln.triton_client import TritonClient

router = APIRouter(tags=["health"])
VIT_READY = (VIT, VIT_PREPROCESS, VIT_POSTPROCESS, VIT_CLASSIFY, VIT_EMBED)  # the ViT's whole service


@router.get("/health/live")
async def live():
    return {"status": "live"}


@router.get("/health/ready")
async def ready(request: Request):
    """Ready when a Triton (any of several: orchestrator.replicas) serves something whole; its figures, and with
    several Tritons each one's readiness."""
    on_demand = request.app.state.settings.model_control is not None
    probes = request.app.state.probes
    # All at once: a Triton that is gone costs its 2 s timeout once, not once per replica before it
    found = await asyncio.gather(*(run_in_threadpool(_ready, client, on_demand) for client in probes.values()))
    answers = dict(zip(probes, found))
    ok, detail = next((answer for answer in answers.values() if answer[0]), next(iter(answers.values())))
    if len(answers) > 1:
        detail = detail | {"replicas": {url: "ready" if up else "not ready" for url, (up, _) in answers.items()}}
    queue = getattr(getattr(request.app.state, "engine", None), "queue", None)
    if hasattr(queue, "reachable"):  # the job store shared with other orchestrators (kiln serve --redis)
        store = await run_in_threadpool(queue.reachable)
        ok, detail = ok and store, detail | {"job_store": "reachable" if store else "unreachable"}
    return JSONResponse({"status": "ready" if ok else "not ready"} | detail, status_code=200 if ok else 503)


def _ready(client: TritonClient, on_demand: bool) -> tuple[bool, dict]:
    # Under model control Triton's own readiness is false once a model was unloaded (strict readiness): live it is
    if not (client.is_server_live() if on_demand else client.is_server_ready()):
        return False, {"triton": "unreachable or not ready"}
    # Ready when it serves something whole: a checkpoint that can generate (its text encoding, UNet and decoding all
    # ready) or the ViT (classify and embed); under model control (kiln serve --max-checkpoints) when Triton is, as
    # checkpoints load on demand. A Triton with the ViT alone is a ready classification service.
    loaded = set(client.ready_models())
    checkpoints = {SDModels.of(m).checkpoint for m in loaded if base_name(m) == SD_UNET}
    complete = sorted(c for c in checkpoints if all(SDModels(c)(m) in loaded for m in SD_READY))
    models = {model: model in loaded for model in SD_READY}  # the default checkpoint's
    vit = all(model in loaded for model in VIT_READY)
    return bool(complete) or vit or on_demand, {"triton": "ready", "models": models,
                                                "checkpoints": [c or "default" for c in complete], "vit": vit}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")
