"""The web page (`/`): static files only, a client of the public API and the task WebSocket; and
`/v1/capabilities`, what this server's build can do (sizes, limits, ControlNets, upscalers), which the page and
any other client read to offer only what the server will accept."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from kiln.contract import VIT_CLASSIFY
from kiln.errors import KilnError
from orchestrator.server.errors import APIError
from orchestrator.server.generation import engine, served_contract
from orchestrator.server.xyz import supported_axes

UI = Path(__file__).resolve().parent.parent / "ui"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
         ".png": "image/png"}
router = APIRouter()


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(UI / "index.html", media_type=TYPES[".html"], headers={"Cache-Control": "no-cache"})


@router.get("/ui/{name}", include_in_schema=False)
async def asset(name: str):
    path = UI / name
    if "/" in name or path.suffix not in TYPES or not path.is_file():
        raise APIError(404, "not_found", f"no page asset {name!r}")
    return FileResponse(path, media_type=TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


@router.get("/v1/capabilities", tags=["kiln"])
async def capabilities(request: Request):
    """What requests may ask of this server: image sides, the limits, the ControlNets, upscalers, VAEs, and
    whether it classifies. `sd` is null while no SD build is served (Triton away, or a ViT-only repository)."""
    limits = request.app.state.settings.limits
    out = {"limits": {name: getattr(limits, name) for name in (
        "max_steps", "max_batch_size", "max_n_iter", "max_images", "max_controlnet_units", "max_mask_blur")},
        "sd": None, "classify": await run_in_threadpool(request.app.state.probe.is_model_ready, VIT_CLASSIFY)}
    try:
        contract = await served_contract(request)
        checkpoints = [c.title for c in (await run_in_threadpool(engine(request).checkpoints.known)).values()]
    except KilnError as exc:
        out["sd_unavailable"] = str(exc)
        return out
    out["sd"] = {"checkpoint": contract.title, "checkpoints": checkpoints, "family": contract.family,
                 "prediction_type": contract.prediction_type,
                 "min_size": contract.min_size, "max_size": contract.max_size,
                 "size_multiple": contract.size_multiple, "inpainting_unet": contract.inpainting_unet,
                 "edit_unet": contract.edit_unet,
                 "controlnets": [c.title for c in contract.controlnets], "upscalers": list(contract.upscaler_names),
                 "vaes": [v.name for v in contract.vaes], "tiling": contract.tiling,
                 "clip_skip_layers": contract.clip_skip_layers}
    return out


@router.get("/v1/xyz-axes", tags=["kiln"])
async def xyz_axes():
    """The X/Y/Z plot's axes this server varies, per route (a script_args type may be the label or AUTOMATIC1111's
    index of it)."""
    return {route: supported_axes(route) for route in ("txt2img", "img2img")}
