"""The outputs folder as a gallery: what save_images wrote (AUTOMATIC1111's layout), listed newest first with each
image's infotext, and the files themselves. Read-only; nothing outside the folder is reachable."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from kiln.imaging import IMAGE_FORMATS
from kiln.infotext import infotext_of, parse_infotext
from orchestrator.server.errors import APIError

router = APIRouter(prefix="/v1/outputs", tags=["outputs"])
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}  # (IMAGE_FORMATS' values)


class OutputItem(BaseModel):
    path: str  # relative to the outputs folder: txt2img-images/2026-11-30/00003-42.png (by default)
    url: str
    kind: str  # txt2img-images, img2img-images, txt2img-grids, img2img-grids, ...
    modified: float
    width: int
    height: int
    parameters: str  # the image's infotext ("" when it has none; a JPEG's or WebP's from its EXIF)
    fields: dict  # the infotext parsed (Prompt, Negative prompt, Steps, Sampler, Seed, ...)


class OutputList(BaseModel):
    total: int
    items: list[OutputItem]


def _listing(folder: Path, offset: int, limit: int, kind: str | None) -> dict:
    from PIL import Image

    if not folder.is_dir():
        return {"total": 0, "items": []}
    files = sorted(((p.stat().st_mtime, p.name, p) for p in folder.glob("*/**/*.*") if _saved(p) and
                    not _copy(p) and _kind(folder, p) != "init-images" and (kind is None or _kind(folder, p) == kind)),
                   reverse=True)
    items = []
    for modified, _, path in files[offset:offset + limit]:
        try:
            with Image.open(path) as image:
                size, text = image.size, infotext_of(image)
        except Exception:  # noqa: BLE001 - being written, not an image after all, or metadata PIL cannot read: left
            # out of this page (one odd file never fails the listing)
            continue
        relative = path.relative_to(folder).as_posix()
        items.append({"path": relative, "url": f"/v1/outputs/file/{quote(relative)}", "kind": _kind(folder, path),
                      "modified": modified, "width": size[0], "height": size[1], "parameters": text,
                      "fields": parse_infotext(text) if text else {}})
    return {"total": len(files), "items": items}


@router.get("", response_model=OutputList)
async def list_outputs(request: Request, offset: int = Query(0, ge=0), limit: int = Query(48, ge=1, le=500),
                       kind: str | None = None):
    """Saved images, newest first (`kind`: one folder, e.g. txt2img-images)."""
    folder = Path(request.app.state.settings.outputs_dir)
    return await run_in_threadpool(_listing, folder, offset, limit, kind)


@router.get("/file/{path:path}")
async def output_file(request: Request, path: str):
    folder = Path(request.app.state.settings.outputs_dir).resolve()
    target = (folder / path).resolve()
    if not target.is_relative_to(folder) or not _saved(target) or not target.is_file():
        raise APIError(404, "not_found", f"no saved image {path!r}")
    return FileResponse(target, media_type=MEDIA_TYPES[IMAGE_FORMATS[target.suffix.lower()[1:]]])


def _kind(folder: Path, path: Path) -> str:
    """The folder a saved image is under (txt2img-images, ...), whatever folders its names' settings put below it
    (save_to_dirs: a date's by default; directories_filename_pattern's; none)."""
    return path.relative_to(folder).parts[0]


def _copy(path: Path) -> bool:
    """A JPEG copy of a saved image (export_for_4chan's), listed as its image is, once."""
    return path.suffix == ".jpg" and any(path.with_suffix(f".{name}").exists() for name in ("png", "webp"))


def _saved(path: Path) -> bool:
    """A file save_images writes: png, jpg, jpeg or webp (samples_format)."""
    return path.suffix.lower()[1:] in IMAGE_FORMATS
