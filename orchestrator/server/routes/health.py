"""Probes and metrics: /health/live, /health/ready (Triton and the SD models), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from kiln.contract import SD_READY
from kiln.triton_client import TritonClient

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live():
    return {"status": "live"}


@router.get("/health/ready")
async def ready(request: Request):
    def check() -> tuple[bool, dict]:
        client: TritonClient = request.app.state.probe
        if not client.is_server_ready():
            return False, {"triton": "unreachable or not ready"}
        models = {model: client.is_model_ready(model) for model in SD_READY}
        return all(models.values()), {"triton": "ready", "models": models}

    ok, detail = await run_in_threadpool(check)
    return JSONResponse({"status": "ready" if ok else "not ready"} | detail, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")
