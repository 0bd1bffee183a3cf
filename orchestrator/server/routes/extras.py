"""AUTOMATIC1111's extras: /sdapi/v1/extra-single-image and /sdapi/v1/extra-batch-images, upscaling with its built-in
PIL upscalers (kiln.upscale) or the repository's upscaler networks (kiln build upscaler, run in Triton). The work
runs in the thread pool, off the event loop, and never in the generation queue."""

from __future__ import annotations

import base64
from collections.abc import Mapping

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.errors import InputError, KilnError, TooLargeError
from kiln.imaging import PNG, ImageFormat, ImageLimits, decode_image
from kiln.upscale import NO_NETWORKS, UPSCALERS, Network, UpscaleOptions, check, html_info, upscale
from orchestrator.server.answers import ImagesJSON
from orchestrator.server.errors import count
from orchestrator.server.generation import engine, pipeline
from orchestrator.server.inputs import decode_b64_image
from orchestrator.server.options import answer_format

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])


def options_of(body: schemas.ExtrasBody) -> UpscaleOptions:
    return UpscaleOptions(resize_mode=body.resize_mode, upscaling_resize=body.upscaling_resize,
                          upscaling_resize_w=body.upscaling_resize_w, upscaling_resize_h=body.upscaling_resize_h,
                          upscaling_crop=body.upscaling_crop, upscaler_1=body.upscaler_1, upscaler_2=body.upscaler_2,
                          extras_upscaler_2_visibility=body.extras_upscaler_2_visibility)


def run_extras(images: list[tuple[str, str]], options: UpscaleOptions, max_pixels: int,
               networks: Mapping[str, Network] = NO_NETWORKS, encoding: ImageFormat = PNG
               ) -> tuple[list[str], str]:
    """Every image's header checked (refused before any is decoded), then each decoded, upscaled and encoded as
    base64 (`encoding`: the server's samples_format, PNG by default), one at a time; and the (last) infotext. A PNG
    carries the input's text chunks (its `parameters`, say) and `postprocessing`, as AUTOMATIC1111's do (a JPEG or
    WebP its `parameters`, in EXIF)."""
    checked = [(what, decode_b64_image(text, what, max_pixels)) for what, text in images]
    encoded, info = [], ""
    for what, data in checked:
        try:
            image = decode_image(data, ImageLimits(max_pixels=max_pixels, min_side=1))
            chunks = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
            result, info = upscale(image, options, max_pixels, networks)
        except InputError as exc:
            raise InputError(f"{what}: {exc}") from None
        encoded.append(base64.b64encode(encoding.encode(result, chunks | {"postprocessing": info})).decode())
    return encoded, info


async def extras(request: Request, endpoint: str, body: schemas.ExtrasBody, images: list[tuple[str, str]]):
    """Check the options and the number of images, then run them in the thread pool (base64 decoding too)."""
    limits = engine(request).options.limits
    try:
        options = options_of(body)
        networks = NO_NETWORKS
        if {options.upscaler_1, options.upscaler_2} - set(UPSCALERS):  # a network: the served repository's
            networks = (await pipeline(request)).components.upscalers
        check(options, networks)  # an unknown upscaler is refused before any image is read
        if len(images) > limits.max_images:
            raise TooLargeError(f"imageList: {len(images)} images; at most {limits.max_images} per request")
        encoded, text = await run_in_threadpool(run_extras, images, options, limits.max_image_pixels, networks,
                                                answer_format(request))
    except KilnError as exc:
        count(request, endpoint, "413" if isinstance(exc, TooLargeError) else "422")
        raise
    count(request, endpoint, "200")
    return encoded, html_info(text)


@router.post("/extra-single-image", response_model=schemas.ExtrasSingleImageResponse, response_class=ImagesJSON)
async def extra_single_image(request: Request, body: schemas.ExtrasSingleImageBody):
    """One image upscaled as AUTOMATIC1111's extras tab does (upscaler_1, an upscaler_2 blend, scale by or to)."""
    encoded, info = await extras(request, "/sdapi/v1/extra-single-image", body, [("image", body.image)])
    return {"html_info": info, "image": encoded[0]}


@router.post("/extra-batch-images", response_model=schemas.ExtrasBatchImagesResponse, response_class=ImagesJSON)
async def extra_batch_images(request: Request, body: schemas.ExtrasBatchImagesBody):
    """Every image of imageList upscaled alike, in order; html_info is the last one's (as AUTOMATIC1111's)."""
    images = [(f"imageList[{index}].data" + (f" ({item.name[:80]})" if item.name else ""), item.data)
              for index, item in enumerate(body.imageList)]
    encoded, info = await extras(request, "/sdapi/v1/extra-batch-images", body, images)
    return {"html_info": info, "images": encoded}
