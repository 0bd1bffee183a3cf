"""sd-webui-controlnet's listing routes: the build's ControlNets and the built-in preprocessors."""

from __future__ import annotations

from fastapi import APIRouter, Request

from kiln.control import CONTROL_MODULES
from orchestrator.server.generation import pipeline

router = APIRouter(prefix="/controlnet", tags=["controlnet"])


@router.get("/model_list")
async def model_list(request: Request):
    """The build's ControlNets as "name [hash]" (a unit's `model` takes either form)."""
    return {"model_list": [c.title for c in (await pipeline(request)).contract.controlnets]}


@router.get("/module_list")
async def module_list():
    return {"module_list": list(CONTROL_MODULES)}
