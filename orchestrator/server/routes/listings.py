"""The listing routes AUTOMATIC1111's clients call when they connect, answered truthfully in AUTOMATIC1111's shapes
(modules/api/models.py): what kiln serves (the upscalers of kiln.upscale), and an empty list where it has none (VAEs,
LoRAs, embeddings, styles, hypernetworks, face restorers, extensions). The refresh routes have nothing to rescan
and answer as AUTOMATIC1111 does (null). sd-webui-controlnet's version and settings too."""

from __future__ import annotations

from fastapi import APIRouter, Request

from kiln import schemas
from kiln.upscale import UPSCALERS
from orchestrator.pipeline.hires import LATENT_MODES
from orchestrator.server.generation import engine

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])
controlnet = APIRouter(prefix="/controlnet", tags=["controlnet"])
CONTROLNET_API_VERSION = 2  # sd-webui-controlnet's /controlnet/version: the API generation kiln's units follow
EMPTY = ("sd-vae", "loras", "hypernetworks", "face-restorers", "realesrgan-models",
         "extensions")  # kiln has none of these yet: an empty list, never an invented entry


def _empty_list(name: str) -> None:
    @router.get(f"/{name}", name=f"list_{name.replace('-', '_')}")
    async def listing() -> list:
        return []


for _name in EMPTY:
    _empty_list(_name)


@router.get("/upscalers", response_model=list[schemas.UpscalerItem])
async def upscalers() -> list[dict]:
    """AUTOMATIC1111's built-in upscalers, which the extras routes run: "None", "Lanczos", "Nearest" (PIL's resampling;
    no model, so no model name, path or URL; scale 4 is what AUTOMATIC1111 lists for them)."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for name in UPSCALERS]


@router.get("/prompt-styles")
async def prompt_styles(request: Request) -> list[dict]:
    """The styles file's entries (kiln serve --styles), in AUTOMATIC1111's shape; none without a file."""
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
            for s in request.app.state.styles.styles().values()]


@router.get("/latent-upscale-modes")
async def latent_upscale_modes() -> list[dict]:
    """The hires fix's latent modes (hr_upscaler also takes the upscalers above)."""
    return [{"name": name} for name in LATENT_MODES]


@router.get("/embeddings")
async def embeddings() -> dict:
    return {"loaded": {}, "skipped": {}}


@router.get("/scripts")
async def scripts() -> dict:
    """The scripts a request may name: ControlNet, an always-on script in both modes."""
    return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}


@router.get("/script-info")
async def script_info() -> list[dict]:
    return [{"name": "controlnet", "is_alwayson": True, "is_img2img": img2img, "args": []} for img2img in (False, True)]


@router.get("/memory")
async def memory() -> dict:
    """This service's host memory; its CUDA memory is Triton's (see Triton's metrics), not this process's."""
    import psutil

    ram = psutil.virtual_memory()
    return {"ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total},
            "cuda": {"error": "the service holds no GPU memory: the models run in Triton (its /metrics report it)"}}


def _refresh(name: str) -> None:
    @router.post(f"/{name}", name=name.replace("-", "_"))
    async def refresh() -> None:
        return None


for _name in ("refresh-checkpoints", "refresh-vae", "refresh-loras"):
    _refresh(_name)


@controlnet.get("/version")
async def controlnet_version() -> dict:
    return {"version": CONTROLNET_API_VERSION}


@controlnet.get("/settings")
async def controlnet_settings(request: Request) -> dict:
    return {"control_net_unit_count": engine(request).options.limits.max_controlnet_units}
