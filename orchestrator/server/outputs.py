"""AUTOMATIC1111's save_images: a finished job's images written to the outputs folder, each with its infotext, as its
UI saves them: outputs/txt2img-images/<date>/<number>-<seed>.png (img2img-images for img2img; the extension is
samples_format's: png, jpg, jpeg or webp), numbered on from the highest number in that folder; with more than one
image, also their grid (unless do_not_save_grid; grid_format's), in outputs/txt2img-grids/<date>/grid-<number>.png,
laid out as its image_grid (round(sqrt(n)) rows)."""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.imaging import PNG, ImageFormat
from kiln.infotext import parameters_text
from orchestrator.jobs import Job, Status

_LOCK = threading.Lock()  # numbering: two jobs finishing at once must not take the same number
_NUMBERED = re.compile(r"^(\d{5})-")
_GRID = re.compile(r"^grid-(\d{4})")


@dataclass(frozen=True)
class Outputs:
    """Where and how save_images writes: the outputs folder, the images' encoding (samples_format, jpeg_quality,
    webp_lossless) and the grids' (grid_format)."""

    folder: Path
    samples: ImageFormat = PNG
    grids: ImageFormat = PNG


def save_job_images(job: Job, outputs: Outputs, grid: bool = True) -> list[Path]:
    """Write a done job's images under the outputs folder (nothing for a failed or cancelled one), and their grid
    where there are several and `grid`; return the paths written."""
    if job.status != Status.DONE or not job.images:
        return []
    kind, date = "img2img" if job.kind == "img2img" else "txt2img", time.strftime("%Y-%m-%d")
    grids = outputs.folder / f"{kind}-grids" / date
    with _LOCK:
        paths = _write_samples(list(zip(job.images, job.infos)), kind, outputs)
        if grid and len(job.images) > 1:
            grids.mkdir(parents=True, exist_ok=True)
            path = grids / f"grid-{_next_number(grids, _GRID):04d}.{outputs.grids.name}"
            text = {"parameters": parameters_text(job.infos[0])}
            path.write_bytes(outputs.grids.encode(image_grid(job.images), text))
            paths.append(path)
    return paths


def save_picture(image: np.ndarray, info: dict, kind: str, outputs: Outputs) -> Path:
    """One picture a script made of its jobs' (poor man's outpainting's), saved as a job's image is."""
    with _LOCK:
        return _write_samples([(image, info)], "img2img" if kind == "img2img" else "txt2img", outputs)[0]


def _write_samples(pictures: list[tuple[np.ndarray, dict]], kind: str, outputs: Outputs) -> list[Path]:
    """outputs/<kind>-images/<date>/<number>-<seed>.<samples_format>, numbered on from the folder's highest (under
    _LOCK)."""
    day = outputs.folder / f"{kind}-images" / time.strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    number, paths = _next_number(day, _NUMBERED), []
    for offset, (image, info) in enumerate(pictures):
        path = day / f"{number + offset:05d}-{info.get('seed')}.{outputs.samples.name}"
        path.write_bytes(outputs.samples.encode(image, {"parameters": parameters_text(info)}))
        paths.append(path)
    return paths


def save_grid(grid: np.ndarray, info: dict, kind: str, outputs: Outputs, basename: str = "xyz_grid") -> Path:
    """A script's grid (the X/Y/Z plot's xyz_grid, the prompt matrix's prompt_matrix), as AUTOMATIC1111 saves it:
    outputs/<kind>-grids/<date>/<basename>-<number>.<grid_format>."""
    grids = outputs.folder / f"{'img2img' if kind == 'img2img' else 'txt2img'}-grids" / time.strftime("%Y-%m-%d")
    numbered = re.compile(rf"^{re.escape(basename)}-(\d{{4}})")
    with _LOCK:
        grids.mkdir(parents=True, exist_ok=True)
        path = grids / f"{basename}-{_next_number(grids, numbered):04d}.{outputs.grids.name}"
        path.write_bytes(outputs.grids.encode(grid, {"parameters": parameters_text(info)}))
    return path


def image_grid(images: list[np.ndarray], rows: int | None = None) -> np.ndarray:
    """AUTOMATIC1111's image_grid: `rows` rows (by default, as its default options, round(sqrt(n))), filled row by
    row."""
    rows = min(max(rows or round(math.sqrt(len(images))), 1), len(images))
    cols = math.ceil(len(images) / rows)
    height, width = images[0].shape[:2]
    grid = np.zeros((rows * height, cols * width, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        row, col = divmod(index, cols)
        grid[row * height:(row + 1) * height, col * width:(col + 1) * width] = image
    return grid


def _next_number(folder: Path, pattern: re.Pattern) -> int:
    return 1 + max((int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))), default=-1)
