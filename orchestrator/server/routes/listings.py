"""The listing routes AUTOMATIC1111's clients call when they connect, answered truthfully in AUTOMATIC1111's shapes
(modules/api/models.py): what kiln serves (the upscalers of kiln.upscale, the textual-inversion embeddings of
kiln serve --embeddings, the LoRA files of --loras, the build's VAEs, the styles), and an empty list where it has
none (hypernetworks, face restorers, extensions). The refresh routes answer as AUTOMATIC1111 does (null); embeddings and
LoRAs read their folders again. sd-webui-controlnet's version and settings too."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.errors import KilnError
from kiln.upscale import UPSCALERS
from orchestrator.pipeline.hires import LATENT_MODES
from orchestrator.server import builtin_scripts, loopback, outpainting, outpainting_mk2, prompts_from_file
from orchestrator.server.a1111 import CELL_SCRIPTS, SCRIPTS
from orchestrator.server.generation import engine, pipeline, served_contract
from orchestrator.server.prompt_matrix import ARGS as MATRIX_ARGS
from orchestrator.server.soft_inpainting import NAME as SOFT
from orchestrator.server.soft_inpainting import SCRIPT_ARGS as SOFT_ARGS
from orchestrator.server.xyz import xyz_script_args

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])
controlnet = APIRouter(prefix="/controlnet", tags=["controlnet"])
CONTROLNET_API_VERSION = 2  # sd-webui-controlnet's /controlnet/version: the API generation kiln's units follow
EMPTY = ("hypernetworks", "face-restorers", "realesrgan-models",
         "extensions")  # kiln has none of these yet: an empty list, never an invented entry


def _empty_list(name: str) -> None:
    @router.get(f"/{name}", name=f"list_{name.replace('-', '_')}")
    async def listing() -> list:
        return []


for _name in EMPTY:
    _empty_list(_name)


@router.get("/upscalers", response_model=list[schemas.UpscalerItem])
async def upscalers(request: Request) -> list[dict]:
    """AUTOMATIC1111's built-in upscalers, which the extras routes run: "None", "Lanczos", "Nearest" (PIL's resampling;
    no model, so no model name, path or URL; scale 4 is what AUTOMATIC1111 lists for them), then the repository's
    upscaler networks (kiln build upscaler: their architecture, Triton model and native scale); the built-in ones
    alone while Triton is away."""
    listed = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
              for name in UPSCALERS]
    return listed + [{"name": u.name, "model_name": u.architecture or None, "model_path": f"triton://{u.model}",
                      "model_url": None, "scale": u.scale} for u in await _networks(request)]


async def _networks(request: Request) -> tuple:
    """The repository's upscaler networks (none while Triton is away: the built-in upscalers still answer)."""
    try:
        await served_contract(request)
        served = await run_in_threadpool(engine(request).pipelines)  # the upscalers are every checkpoint's
    except KilnError:
        return ()
    return next(iter(served.values())).contract.upscalers if served else ()


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
async def embeddings(request: Request) -> dict:
    """The embeddings folder (kiln serve --embeddings) in AUTOMATIC1111's shape: `loaded` are those the served text
    encoder takes (their hidden size is its own), `skipped` the others (all of them for a build before embeddings);
    pickled or broken files are in neither (the service's log and a prompt naming one say why)."""
    contract = await served_contract(request)
    return await run_in_threadpool(request.app.state.embeddings.listing, contract.textual_inversion_dim)


@router.post("/refresh-embeddings")
async def refresh_embeddings(request: Request) -> None:
    """Read the embeddings folder again now (it is also read again whenever a file is added, removed or renamed)."""
    await run_in_threadpool(request.app.state.embeddings.refresh)


@router.get("/sd-vae")
async def sd_vae(request: Request) -> list[dict]:
    """The build's VAEs besides the checkpoint's own (kiln build sd --vae), in AUTOMATIC1111's shape: model_name is
    what sd_vae takes (options, override_settings); "Automatic" and "None" are the checkpoint's own."""
    from kiln.contract import vae_models

    contract = await served_contract(request)
    return [{"model_name": vae.name, "filename": f"triton://{vae_models(vae.suffix)['decoder']}/{vae.name}"}
            for vae in contract.vaes]


@router.get("/loras")
async def loras(request: Request) -> list[dict]:
    """The LoRA folder (kiln serve --loras) in AUTOMATIC1111's shape: name (what <lora:name:multiplier> uses), alias
    (the metadata's ss_output_name), path, metadata (kohya's ss_* fields). Unreadable files are left out (the log
    and a prompt naming one say why)."""
    return await run_in_threadpool(request.app.state.loras.listing)


@router.post("/refresh-loras")
async def refresh_loras(request: Request) -> None:
    """Read the LoRA folder again now (it is also read again whenever a file is added, removed or renamed)."""
    await run_in_threadpool(request.app.state.loras.refresh)


@router.get("/scripts")
async def scripts() -> dict:
    """The scripts a request may name: the selectable ones (script_name: SD upscale, loopback, poor man's
    outpainting and outpainting mk2, img2img's; the prompt matrix, prompts from file or textbox, the X/Y/Z plot) and
    the always-on ones (alwayson_scripts): ControlNet in both modes, soft inpainting in img2img, AUTOMATIC1111's
    built-in ones (their values the request's own: orchestrator.server.builtin_scripts)."""
    return {route: [*SCRIPTS[route], *(name for name, (_, routes) in CELL_SCRIPTS.items() if route in routes),
                    "controlnet", *([SOFT] if route == "img2img" else []), *builtin_scripts.NAMES]
            for route in ("txt2img", "img2img")}


@router.get("/script-info")
async def script_info(request: Request) -> list[dict]:
    """AUTOMATIC1111's shape: each script's name, kind and arguments (SD upscale's as its UI declares them)."""
    sd_upscale = [{"label": None, "value": None}, {"label": "Tile overlap", "value": 64, "minimum": 0, "maximum": 256,
                                                   "step": 16},
                  {"label": "Upscaler", "value": "None",
                   "choices": [*UPSCALERS, *(u.name for u in await _networks(request))]},
                  {"label": "Scale Factor", "value": 2.0, "minimum": 1.0, "maximum": 4.0, "step": 0.05}]
    return [{"name": "sd upscale", "is_alwayson": False, "is_img2img": True, "args": sd_upscale}] + \
        [{"name": "x/y/z plot", "is_alwayson": False, "is_img2img": img2img, "args": xyz_script_args(route)}
         for img2img, route in ((False, "txt2img"), (True, "img2img"))] + \
        [{"name": name, "is_alwayson": False, "is_img2img": img2img, "args": args}
         for name, args in (("prompt matrix", MATRIX_ARGS), ("prompts from file or textbox", prompts_from_file.ARGS))
         for img2img in (False, True)] + \
        [{"name": name, "is_alwayson": False, "is_img2img": True, "args": args}
         for name, args in (("loopback", loopback.ARGS), (outpainting.NAME, outpainting.ARGS),
                            (outpainting_mk2.NAME, outpainting_mk2.ARGS))] + \
        [{"name": "controlnet", "is_alwayson": True, "is_img2img": img2img, "args": []}
         for img2img in (False, True)] + \
        [{"name": SOFT, "is_alwayson": True, "is_img2img": True, "args": SOFT_ARGS}] + \
        [{"name": name, "is_alwayson": True, "is_img2img": img2img, "args": builtin_scripts.script_args(name)}
         for name in builtin_scripts.NAMES for img2img in (False, True)]


@router.get("/memory")
async def memory() -> dict:
    """This service's host memory; its CUDA memory is Triton's (see Triton's metrics), not this process's."""
    import psutil

    ram = psutil.virtual_memory()
    return {"ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total},
            "cuda": {"error": "the service holds no GPU memory: the models run in Triton (its /metrics report it)"}}


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(request: Request) -> dict | None:
    """Triton's checkpoints read again: one built into the repository since (and loaded by Triton) is served from now
    on; the served ones go on as they were. Under model control with a checkpoints folder (kiln serve --checkpoints
    --max-checkpoints), the folder's new or changed checkpoints are built first and load when a request names them;
    the answer lists each entry's fate."""
    sync = request.app.state.settings.sync_checkpoints
    synced = await run_in_threadpool(sync) if sync is not None else None
    await run_in_threadpool(engine(request).refresh)
    if synced is None:
        return None
    return {"checkpoints": [{"name": s.name, "source": s.source.name, "status": s.status, "reason": s.reason or None}
                            for s in synced]}


@router.post("/unload-checkpoint")
async def unload_checkpoint(request: Request) -> dict:
    """AUTOMATIC1111's unload-checkpoint: every loaded checkpoint no job is using leaves Triton (kiln serve
    --max-checkpoints or --checkpoint-memory-gb; a request naming one loads it again)."""
    unloaded = await run_in_threadpool(engine(request).checkpoints.unload_idle)
    return {"unloaded": [key or "default" for key in unloaded]}


@router.post("/reload-checkpoint")
async def reload_checkpoint(request: Request) -> dict:
    """AUTOMATIC1111's reload-checkpoint: the default checkpoint (the sd_model_checkpoint option) loaded again."""
    return {"loaded": (await pipeline(request)).contract.title}


@router.post("/refresh-vae")
async def refresh_vae() -> None:
    return None  # the build's VAEs: nothing to read again while it serves


@controlnet.get("/version")
async def controlnet_version() -> dict:
    return {"version": CONTROLNET_API_VERSION}


@controlnet.get("/settings")
async def controlnet_settings(request: Request) -> dict:
    return {"control_net_unit_count": engine(request).options.limits.max_controlnet_units}
