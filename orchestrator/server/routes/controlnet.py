"""sd-webui-controlnet's routes: the build's ControlNets, the built-in preprocessors, the control types that group
them, and /controlnet/detect (a preprocessor's map of images, kiln.detect)."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.detect import DEFAULT_RESOLUTION, detect_map, inpaint_display, processor_resolution
from kiln.errors import InputError, TooLargeError
from kiln.preprocessors import PREPROCESSORS, preprocessor
from orchestrator.server.answers import ImagesJSON
from orchestrator.server.generation import engine, served_contract
from orchestrator.server.inputs import decode_b64_image
from orchestrator.server.options import answer_format

router = APIRouter(prefix="/controlnet", tags=["controlnet"])
# the model-name words a control type also matches (the extension's Preprocessor.tag_to_filters, for kiln's tags)
TAG_FILTERS = {"scribble": ("sketch",), "tile": ("blur",), "t2i-adapter": ("t2i_adapter", "t2iadapter", "t2ia"),
               "instructp2p": ("ip2p",)}


@router.get("/model_list")
async def model_list(request: Request):
    """The build's ControlNets as "name [hash]" (a unit's `model` takes either form)."""
    return {"model_list": [c.title for c in (await served_contract(request)).controlnets]}


@router.get("/module_list")
async def module_list(alias_names: bool = False):
    """The modules in the extension's order (names, or with alias_names its labels), and each one's sliders."""
    keys = [p.title if alias_names else p.name for p in PREPROCESSORS.values()]
    return {"module_list": keys, "module_detail": {key: p.detail() for key, p in zip(keys, PREPROCESSORS.values())}}


def control_type(modules: list[str], models: list[str], default_option: str) -> dict:
    """One type as sd-webui-controlnet's global_state.select_control_type gives it: the default model is the first
    after "None", or the first whose name (before its [hash]) says "11"."""
    default_model = "None" if len(models) == 1 else next((m for m in models if "11" in m.split("[")[0]), models[1])
    return {"module_list": modules, "model_list": models, "default_option": default_option,
            "default_model": default_model}


@router.get("/control_types")
async def control_types(request: Request):
    """"All" (every module, every model, defaults none/None), then one type per tag of kiln's modules, sorted: its
    modules after "none" in the extension's order (labels, as it lists them; the first is the default, or none for
    InstructP2P, which has no other), and the models whose name holds the type's name (or its alias: sketch for
    Scribble, blur for Tile, ip2p for InstructP2P), after "None"."""
    models = ["None"] + [c.title for c in (await served_contract(request)).controlnets]
    titles = [p.title for p in PREPROCESSORS.values()]
    types = {"All": control_type(titles, models, "none") | {"default_model": "None"}}
    for tag in sorted({tag for p in PREPROCESSORS.values() for tag in p.tags}):
        modules = ["none"] + [p.title for p in PREPROCESSORS.values() if tag in p.tags and p.name != "none"]
        words = (tag.lower(), *TAG_FILTERS.get(tag.lower(), ()))
        matching = ["None"] + [m for m in models[1:] if any(word in m.lower() for word in words)]
        types[tag] = control_type(modules, matching, modules[1] if len(modules) > 1 else "none")  # InstructP2P: none
    return {"control_types": types}


def detect_options(body: schemas.ControlNetDetectBody) -> tuple[str, int, float, float]:
    """module (its name or label), resolution, and its two sliders; -1 is sd-webui-controlnet's default, anything it
    would replace by its default is refused by name instead; what a module does not have is ignored, as there."""
    pre = preprocessor(body.controlnet_module, "controlnet_module")
    if not body.controlnet_input_images:
        raise InputError("controlnet_input_images: no image (send one or more base64 images)")
    if body.controlnet_masks and not pre.inpaint:
        raise InputError(f"controlnet_masks: the {pre.name} preprocessor takes no mask")
    if pre.inpaint and len(body.controlnet_masks) != len(body.controlnet_input_images):
        raise InputError(f"controlnet_masks: the {pre.title} preprocessor takes one mask per image; got "
                         f"{len(body.controlnet_input_images)} images and {len(body.controlnet_masks)} masks")
    resolution = processor_resolution(body.controlnet_processor_res, "controlnet_processor_res") \
        if pre.uses_resolution else pre.resolution or DEFAULT_RESOLUTION
    a, b = pre.slider_values(body.controlnet_threshold_a, body.controlnet_threshold_b,
                             ("controlnet_threshold_a", "controlnet_threshold_b"))
    return pre.name, resolution, a, b


@router.post("/detect", response_model=schemas.ControlNetDetectResponse, response_class=ImagesJSON)
async def detect(request: Request, body: schemas.ControlNetDetectBody):
    """Each input image's map by the module (kiln.detect: at the processor resolution, or the image's own size), as
    PNGs."""
    module, resolution, a, b = detect_options(body)
    limits = engine(request).options.limits
    if len(body.controlnet_input_images) > limits.max_images:
        raise TooLargeError(f"controlnet_input_images: {len(body.controlnet_input_images)} images; at most "
                            f"{limits.max_images} per request")
    images = [(f"controlnet_input_images[{index}]", text) for index, text in enumerate(body.controlnet_input_images)]

    masks = [(f"controlnet_masks[{index}]", text) for index, text in enumerate(body.controlnet_masks)]

    encoding = answer_format(request)  # (the extension encodes as AUTOMATIC1111's API does)

    def run() -> list[str]:  # every header first: an image refused before any is decoded
        checked = [(what, decode_b64_image(text, what, limits.max_image_pixels)) for what, text in images]
        if masks:  # an inpaint module's: the image with its mask shown as the extension shows it
            given = [(what, decode_b64_image(text, what, limits.max_image_pixels)) for what, text in masks]
            return [base64.b64encode(encoding.encode(inpaint_display(data, mask, limits.max_image_pixels, what,
                                                                     mask_what))).decode()
                    for (what, data), (mask_what, mask) in zip(checked, given)]
        return [base64.b64encode(encoding.encode(detect_map(data, module, resolution, a, b, limits.max_image_pixels,
                                                            what))).decode() for what, data in checked]

    return {"images": await run_in_threadpool(run), "info": "Success"}
