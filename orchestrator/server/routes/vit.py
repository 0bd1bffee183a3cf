"""ViT classification and features: /v1/classify and /v1/embed, JSON (base64) or multipart; a bad image fails
alone."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.contract import VIT_CLASSIFY, VIT_EMBED
from kiln.errors import InputError, KilnError, TooLargeError
from kiln.imaging import header_size
from kiln.vit import ViTClient
from orchestrator.server.errors import APIError, count, short
from orchestrator.server.inputs import decode_b64

router = APIRouter(prefix="/v1", tags=["vit"])
MAX_IMAGES = 64  # per request
READY_FOR_S = 1.0  # how long a model Triton said it serves is taken as served (served)

OPENAPI = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "description": "base64 image"}, "minItems": 1}}}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}, "required": True}}


def vit_client(request: Request) -> ViTClient:
    """The ViT client of the first Triton that is up (orchestrator.replicas)."""
    state = request.app.state
    url = state.engine.replicas.primary.url
    if url not in state.vit:
        state.vit[url] = ViTClient(url, "grpc")
    return state.vit[url]


async def images_from(request: Request, body_model) -> tuple[list[tuple[str, bytes]], Any]:
    """JSON {"images": [base64...]} or multipart files (field `files`), with the other fields as form fields."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=MAX_IMAGES, max_fields=16)
        except Exception:  # noqa: BLE001 - malformed multipart: starlette raises several types
            raise InputError("malformed multipart body") from None
        files = [v for k, v in form.multi_items() if k in ("files", "file", "images") and hasattr(v, "read")]
        if not files:
            raise InputError("multipart body has no image files (field name: files)")
        fields = {k: v for k, v in form.multi_items() if not hasattr(v, "read")}
        images = [(upload.filename or f"files[{index}]", await upload.read()) for index, upload in enumerate(files)]
        payload = {"images": ["-"] * len(images)} | fields
    else:
        try:
            payload = await request.json()
        except ValueError:  # not JSON at all (or not UTF-8)
            raise InputError("body must be JSON {\"images\": [base64, ...]} or multipart") from None
        images = None
    try:
        params = body_model.model_validate(payload)
    except ValidationError as exc:  # name the fields, not the values
        raise InputError(short(exc)) from None
    if images is None:  # (up to 64 images' base64: off the event loop)
        images = await run_in_threadpool(lambda: [(f"images[{index}]", decode_b64(text, f"images[{index}]"))
                                                  for index, text in enumerate(params.images)])
    if len(images) > MAX_IMAGES:
        raise TooLargeError(f"{len(images)} images in one request; the limit is {MAX_IMAGES}")
    return images, params


def _readable(images: list[tuple[str, bytes]], max_pixels: int) -> tuple[list[tuple[str, bytes]], dict[int, str]]:
    """The images whose headers read (their size within the limit), and each other one's error by its index."""
    good, errors = [], {}
    for index, (name, data) in enumerate(images):
        try:
            header_size(data, name, max_pixels)
            good.append((name, data))
        except KilnError as exc:
            errors[index] = str(exc)
    return good, errors


async def served(request: Request, client: ViTClient, model: str, fresh: bool = False) -> bool:
    """Whether Triton serves `model`: asked again at most once a second while it does (a readiness call before each
    classification was a second round trip to Triton per request; benchmarks.classify_api), at once while it does
    not, or where `fresh`."""
    known, key, now = request.app.state.vit_ready, (client.url, model), time.monotonic()
    if not fresh and known.get(key, 0.0) > now:
        return True
    ready = await run_in_threadpool(client.is_ready, model)
    known[key] = now + READY_FOR_S if ready else 0.0
    return ready


async def run_vit(request: Request, endpoint: str, model: str, images: list, call) -> list[dict]:
    """Results in the images' order; an image whose header is unreadable gets its error without reaching Triton.
    503 where Triton does not serve the model (asked again where every image failed, or one reached no Triton: it may
    have gone since; ViTClient stops sending a request's images once one reached none, and they go once more where
    Triton is back)."""
    good, errors = await run_in_threadpool(_readable, images, request.app.state.settings.limits.max_image_pixels)
    client = vit_client(request)
    answered = None
    if await served(request, client, model):
        answered = await run_in_threadpool(call, client, good) if good else []
        unsent = [index for index, result in enumerate(answered) if result.unreachable]
        if answered and (unsent or all(result.error for result in answered)):
            if not await served(request, client, model, True):
                answered = None
            elif unsent:  # Triton back already: the images that reached none go once more
                again = iter(await run_in_threadpool(call, client, [good[index] for index in unsent]))
                answered = [next(again) if index in unsent else result for index, result in enumerate(answered)]
    if answered is None:
        count(request, endpoint, "503")
        raise APIError(503, "unavailable", "the ViT models are not being served by Triton (build them with "
                                           "`kiln build vit`)", {"Retry-After": "5"})
    results = iter(answered)
    count(request, endpoint, "200")
    return [{"image": name, "error": errors[index]} if index in errors else next(results).as_dict()
            for index, (name, _) in enumerate(images)]


@router.post("/classify", openapi_extra=OPENAPI)
async def classify(request: Request):
    """Top-k labels per image; a bad image fails alone (its entry has `error`)."""
    images, params = await images_from(request, schemas.ClassifyBody)
    results = await run_vit(request, "/v1/classify", VIT_CLASSIFY, images,
                            lambda client, good: client.classify(good, top_k=params.top_k))
    return {"results": results}


@router.post("/embed", openapi_extra=OPENAPI)
async def embed(request: Request):
    """Pooled features (and optionally one block's tokens) per image."""
    images, params = await images_from(request, schemas.EmbedBody)
    try:
        blocks = await run_in_threadpool(vit_client(request).blocks)  # asked once, then remembered
    except KilnError:
        blocks = None  # no ViT served: run_vit answers 503
    if blocks is not None and not -blocks <= params.layer < blocks:
        raise InputError(f"layer must be in [-{blocks}, {blocks - 1}] (the served ViT has {blocks} blocks), "
                         f"got {params.layer}")
    results = await run_vit(request, "/v1/embed", VIT_EMBED, images,
                            lambda client, good: client.embed(good, layer=params.layer, tokens=params.tokens))
    return {"results": results}
