"""sd-webui-controlnet's routes: the build's ControlNets, the built-in preprocessors, the control types that group
them, and /controlnet/detect (a preprocessor's map of images, kiln.detect)."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.control import CONTROL_MODULES
from kiln.detect import DEFAULT_RESOLUTION, DEFAULT_THRESHOLDS, detect_map, processor_resolution
from kiln.errors import InputError, TooLargeError
from kiln.imaging import encode_png
from orchestrator.server.generation import engine, served_contract
from orchestrator.server.inputs import decode_b64_image

router = APIRouter(prefix="/controlnet", tags=["controlnet"])
# sd-webui-controlnet's control-type tags of kiln's modules (scripts/preprocessor/*.py); "none" goes in every type
TAGS = {"canny": ("Canny",), "invert": ("Canny", "Lineart", "Scribble", "Sketch", "MLSD")}


@router.get("/model_list")
async def model_list(request: Request):
    """The build's ControlNets as "name [hash]" (a unit's `model` takes either form)."""
    return {"model_list": [c.title for c in (await served_contract(request)).controlnets]}


@router.get("/module_list")
async def module_list():
    return {"module_list": list(CONTROL_MODULES)}


def control_type(modules: list[str], models: list[str], default_option: str) -> dict:
    """One type as sd-webui-controlnet's global_state.select_control_type gives it: the default model is the first
    after "None", or the first whose name (before its [hash]) says "11"."""
    default_model = "None" if len(models) == 1 else next((m for m in models if "11" in m.split("[")[0]), models[1])
    return {"module_list": modules, "model_list": models, "default_option": default_option,
            "default_model": default_model}


@router.get("/control_types")
async def control_types(request: Request):
    """"All" (every module, every model, defaults none/None), then one type per tag of kiln's modules: its modules
    after "none", and the models whose name holds the type's name, after "None" (sd-webui-controlnet's filter)."""
    models = ["None"] + [c.title for c in (await served_contract(request)).controlnets]
    types = {"All": control_type(list(CONTROL_MODULES), models, "none") | {"default_model": "None"}}
    for tag in sorted({tag for module in CONTROL_MODULES for tag in TAGS.get(module, ())}):
        modules = ["none"] + [m for m in CONTROL_MODULES if tag in TAGS.get(m, ())]
        matching = ["None"] + [m for m in models[1:] if tag.lower() in m.lower()]
        types[tag] = control_type(modules, matching, modules[1])
    return {"control_types": types}


def _threshold(body: schemas.ControlNetDetectBody, name: str, default: int) -> int:
    value = getattr(body, name)
    if value == -1:
        return default
    if value != int(value) or not 0 <= value <= 255:
        raise InputError(f"{name} must be an integer from 0 to 255 (or -1: {default}), got {value!r}")
    return int(value)


def detect_options(body: schemas.ControlNetDetectBody) -> tuple[str, int, int, int]:
    """module, resolution, low and high thresholds; -1 is sd-webui-controlnet's default, anything it would clamp
    back to its default is refused by name instead."""
    module = body.controlnet_module.lower()
    if module not in CONTROL_MODULES:
        raise InputError(f"controlnet_module {body.controlnet_module!r} is not available; valid: "
                         f"{', '.join(CONTROL_MODULES)}")
    if not body.controlnet_input_images:
        raise InputError("controlnet_input_images: no image (send one or more base64 images)")
    if body.controlnet_masks:
        raise InputError(f"controlnet_masks: the {module} preprocessor takes no mask")
    if module != "canny":  # none and invert: no resolution, no thresholds (sd-webui-controlnet ignores them)
        return module, DEFAULT_RESOLUTION, *DEFAULT_THRESHOLDS
    resolution = processor_resolution(body.controlnet_processor_res, "controlnet_processor_res")
    low = _threshold(body, "controlnet_threshold_a", DEFAULT_THRESHOLDS[0])
    high = _threshold(body, "controlnet_threshold_b", DEFAULT_THRESHOLDS[1])
    if low >= high:
        raise InputError(f"controlnet_threshold_a ({low}) must be below controlnet_threshold_b ({high}): the low "
                         "and high Canny thresholds")
    return module, resolution, low, high


@router.post("/detect", response_model=schemas.ControlNetDetectResponse)
async def detect(request: Request, body: schemas.ControlNetDetectBody):
    """Each input image's map by the module (canny: kiln.control's Canny at the processor resolution), as PNGs."""
    module, resolution, low, high = detect_options(body)
    limits = engine(request).options.limits
    if len(body.controlnet_input_images) > limits.max_images:
        raise TooLargeError(f"controlnet_input_images: {len(body.controlnet_input_images)} images; at most "
                            f"{limits.max_images} per request")
    images = [(f"controlnet_input_images[{index}]", text) for index, text in enumerate(body.controlnet_input_images)]

    def run() -> list[str]:  # every header first: an image refused before any is decoded
        checked = [(what, decode_b64_image(text, what, limits.max_image_pixels)) for what, text in images]
        return [base64.b64encode(encode_png(detect_map(data, module, resolution, low, high, limits.max_image_pixels,
                                                       what))).decode() for what, data in checked]

    return {"images": await run_in_threadpool(run), "info": "Success"}
