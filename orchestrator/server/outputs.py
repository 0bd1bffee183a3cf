"""AUTOMATIC1111's save_images: a finished job's images written to the outputs folder, each with its infotext, as its
UI saves them: by default outputs/txt2img-images/<date>/<number>-<seed>.png (img2img-images for img2img; the
extension is samples_format's: png, jpg, jpeg or webp), numbered on from the highest number in that folder, named
and foldered as its file name settings say (orchestrator.server.filenames); with more than one image, also their
grid (unless do_not_save_grid; grid_format's), in outputs/txt2img-grids/<date>/grid-<number>.png, laid out as its
image_grid (round(sqrt(n)) rows). samples_save and grid_save off save no images or no grids. With save_txt, each
saved image and grid has its infotext beside it in a .txt of the same name; with save_init_img, img2img's init
images go to outputs/init-images/<md5>.png; inpainting's masks (save_mask, save_mask_composite) and the images from
before the hires fix and colour correction (save_images_before_*) go beside the images, numbered on as theirs."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import math
import threading
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import KilnError
from kiln.imaging import PNG, ImageFormat
from kiln.infotext import infotext_of, parameters_text
from kiln.machine import cores
from orchestrator.jobs import Job, Status
from orchestrator.server.filenames import Naming, Picture, saved_path
from orchestrator.server.sampler_names import schedule_label

if TYPE_CHECKING:
    from PIL import Image

MASK_KINDS = {"mask": "-mask", "mask_composite": "-mask-composite"}  # save_/return_<kind> -> a saved file's suffix
log = logging.getLogger("kiln.api")
Encoding = tuple[ImageFormat, np.ndarray, dict[str, str] | None]  # what a picture is encoded from: how, its pixels,
# its text chunks (the infotext's "parameters")
_LOCK = threading.Lock()  # numbering: two jobs finishing at once must not take the same number


@dataclass(frozen=True)
class Outputs:
    """Where and how save_images writes: the outputs folder, the images' encoding (samples_format, jpeg_quality,
    webp_lossless) and the grids' (grid_format); `txt`: save_txt (each one's infotext in a .txt beside it);
    `init_images`: save_init_img (img2img's init images kept, in outputs/init-images); `masks`: inpainting's mask
    pictures saved (save_mask, save_mask_composite) and returned, in the grid too (return_mask, ...)."""

    folder: Path
    samples: ImageFormat = PNG
    grids: ImageFormat = PNG
    txt: bool = False
    init_images: bool = False
    masks: frozenset[str] = frozenset()  # the mask settings on (options.MASK_SETTINGS: save_mask, return_mask, ...)
    naming: Naming = Naming()  # the saved files' names and folders (filenames.NAMING_SETTINGS)
    samples_save: bool = True  # samples_save: the images (and their masks and befores) saved
    grid_save: bool = True  # grid_save: the grids saved
    styles: tuple[tuple[str, str], ...] = ()  # the request's styles (name, prompt): [styles], [prompt_no_styles]
    return_grid: bool = True  # return_grid: a saving request's answer has its grid first (generation.returns_grid)
    # export_for_4chan: a JPEG copy of a saved file over img_downscale_threshold MB or target_side_length pixels
    # on a side (then downscaled to it); None: off
    jpeg_copies: tuple[float, float] | None = (4.0, 4000.0)

    def file_of(self, image: np.ndarray, info: dict, grid: bool = False) -> Encoding:
        """What an image's file is encoded from (a grid's encoding where `grid`), with its infotext (for encoded)."""
        return self.grids if grid else self.samples, image, {"parameters": parameters_text(info)}

    def write(self, path: Path, image: np.ndarray, info: dict, grid: bool = False, data: bytes | None = None) -> Path:
        """One image (a grid's encoding where `grid`; `data`: its file, as encode made it) with its infotext, and with
        save_txt that infotext in <name>.txt beside it (AUTOMATIC1111 writes it with a newline after); a large one's
        JPEG copy beside it."""
        text = parameters_text(info)
        encoding = self.grids if grid else self.samples
        path.write_bytes(data if data is not None else encoded([self.file_of(image, info, grid)])[0])
        if self.jpeg_copies is not None and encoding.name not in ("jpg", "jpeg"):
            quietly(self.jpeg_copy, path, image, text, what="export_for_4chan")  # (as there: the copy's trouble
            # is the log's)
        if self.txt:
            path.with_suffix(".txt").write_text(f"{text}\n", encoding="utf-8")
        return path

    def jpeg_copy(self, path: Path, image: np.ndarray | Image.Image, text: str) -> None:
        """AUTOMATIC1111's export_for_4chan: where the file is over img_downscale_threshold MB or a side over
        target_side_length pixels, <name>.jpg beside it (jpeg_quality's, with the infotext), downscaled (Lanczos)
        to target_side_length on its longer side where that is over. (A JPEG's own file is left alone: there, the
        copy would replace it.)"""
        from PIL import Image

        megabytes, side = self.jpeg_copies
        width, height = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
        oversize = max(width, height) > side
        if not oversize and path.stat().st_size <= megabytes * 1024 * 1024:
            return
        picture = image.convert("RGB") if isinstance(image, Image.Image) else \
            Image.fromarray(np.ascontiguousarray(image))
        if oversize:
            size = (round(side), max(1, round(height * side / width))) if width > height else \
                (max(1, round(width * side / height)), round(side))
            picture = picture.resize(size, Image.LANCZOS)
        copy = ImageFormat("jpg", self.samples.quality)
        path.with_suffix(".jpg").write_bytes(copy.encode(picture, {"parameters": text}))


class Encoded:
    """A saving job's images and grid as encoded for its files, kept for its answer (a1111.to_response), which takes
    the same bytes where its encoding and infotext are the files' (a PNG, the default), and closes it: encoded once.
    Keyed by the encoding (a PNG's whatever its quality), the text and the pixels (their digest: the answer's grid is
    made again). Thread-safe: the saving thread fills it, the answer's reads it. A job never answered (a task never
    polled) keeps its bytes as long as the queue keeps the job (JobQueue: the newest 512)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[tuple, bytes] | None = {}

    def __call__(self, encoding: ImageFormat, picture: np.ndarray, text: dict[str, str] | None) -> bytes:
        if self._kept is None:  # (closed: nothing to find)
            return encoding.encode(picture, text)
        pixels = np.ascontiguousarray(picture)
        key = ("png" if encoding.name == "png" else encoding, tuple(sorted((text or {}).items())), pixels.shape,
               pixels.dtype.str, hashlib.blake2b(pixels.data, digest_size=20).digest())
        with self._lock:
            found = None if self._kept is None else self._kept.get(key)
        if found is not None:
            return found
        data = encoding.encode(pixels, text)
        with self._lock:
            if self._kept is not None:
                self._kept[key] = data
        return data

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept or ())

    def close(self) -> None:
        """Nothing kept from now on (the answer is made)."""
        with self._lock:
            self._kept = None


def encoded(pictures: list[Encoding], memo: Encoded | None = None, shared: Collection[int] | None = None,
            errors: bool = False) -> list[Any]:
    """Each (encoding, picture, text)'s bytes, encoded side by side: PIL lets go of the GIL while it compresses, so
    an answer's or a save's pictures take about the time of the largest where there are cores for them
    (benchmarks.task_answers). Through a saving job's `memo` where it has one (`shared`: the indices of the pictures
    its answer has too; None: all). An encoding's error is raised as it is, or with `errors` returned in the
    picture's place (the others are encoded whatever one's trouble)."""
    def encode(index: int) -> Any:
        how, picture, text = pictures[index]
        try:
            if memo is not None and (shared is None or index in shared):
                return memo(how, picture, text)
            return how.encode(picture, text)
        except Exception as exc:
            if not errors:
                raise
            return exc

    if len(pictures) < 2:
        return [encode(index) for index in range(len(pictures))]
    return list(_encoders().map(encode, range(len(pictures))))


def answer_images(encoding: ImageFormat, pictures: list[tuple[np.ndarray, dict | None]], memo: Encoded | None = None
                  ) -> list[str]:
    """An AUTOMATIC1111 answer's images: each picture base64 as `encoding` with its infotext (None: none), encoded
    side by side (through a saving job's memo, where it has one)."""
    return [base64.b64encode(data).decode() for data in encoded(
        [(encoding, picture, None if info is None else {"parameters": parameters_text(info)})
         for picture, info in pictures], memo)]


_ENCODERS: list[ThreadPoolExecutor] = []  # encoded's threads: made on first use, kept for the process
_ENCODERS_LOCK = threading.Lock()


def _encoders() -> ThreadPoolExecutor:
    """The threads encoded works on: as many as this process may run on, up to 8."""
    with _ENCODERS_LOCK:
        if not _ENCODERS:
            _ENCODERS.append(ThreadPoolExecutor(max_workers=min(8, cores()), thread_name_prefix="kiln-encode"))
    return _ENCODERS[0]


def quietly(save: Callable[..., Any], *args: Any, what: str = "save_images") -> Any:
    """A save that never fails the request (its result, or None): its trouble (the outputs folder's, an image its
    format cannot hold, a name the file system refuses) is the log's; the answer goes out whatever happened here."""
    try:
        return save(*args)
    except Exception as exc:  # noqa: BLE001 - saving never fails an answer, as AUTOMATIC1111's own save errors
        logged(exc, what)
        return None


def logged(exc: Exception, what: str) -> None:
    """A save's trouble in the log: the folder's (or a format's) in a line; anything else with its traceback (a
    fault of the code reads as one)."""
    log.error("%s: could not write to the outputs folder: %s", what, exc, exc_info=(
        None if isinstance(exc, (OSError, KilnError)) else (type(exc), exc, exc.__traceback__)))


def save_job_images(job: Job, outputs: Outputs, grid: bool = True) -> list[Path]:
    """Write a done job's images under the outputs folder (nothing for a failed or cancelled one; none with
    samples_save off), and their grid where there are several, `grid` and grid_save; return the paths written."""
    if job.status != Status.DONE or not job.images:
        return []
    masks, before = mask_pictures(job, outputs.masks), job.before or [{}] * len(job.images)
    shown = answer_pictures(job, outputs.masks, masks)
    # as AUTOMATIC1111 saves them: a batch's first passes before the hires fix, then each image (after its own from
    # before colour correction) and its saved masks; the grid: the answer's pictures
    pictures, batch = [], max(getattr(job.request, "batch_size", 1), 1)
    for start in range(0, len(job.images), batch) if outputs.samples_save else ():
        run = range(start, min(start + batch, len(job.images)))
        pictures += [(before[i]["highres-fix"], i, "-before-highres-fix") for i in run if "highres-fix" in before[i]]
        for i in run:
            pictures += [(before[i]["color-correction"], i, "-before-color-correction")] \
                if "color-correction" in before[i] else []
            pictures += [(job.images[i], i, "")] + [(masks[i][k], i, MASK_KINDS[k]) for k in masks[i]
                                                    if f"save_{k}" in outputs.masks]
    samples = _folder(outputs, job.kind, "images")
    grids = [answer_grid(shown)] if grid and outputs.grid_save and len(shown) > 1 else []
    # encoded before the lock (two jobs encode at once), each picture whatever another's trouble (a grid too wide
    # for WebP leaves its images saved); the images and the grid the answer has too, through the job's memo
    shared = [n for n, (_, _, suffix) in enumerate(pictures) if not suffix] + \
        ([len(pictures)] if grids and job.context.get("grid") else [])
    files = encoded([outputs.file_of(image, job.infos[i]) for image, i, _ in pictures] +
                    [outputs.file_of(picture, job.infos[0], grid=True) for picture in grids],
                    job.context.get("encoded"), set(shared), errors=True)
    paths = []
    with _LOCK:
        for (image, i, suffix), data in zip(pictures, files):
            if isinstance(data, Exception):
                logged(data, f"save_images (job {job.id}, image {i + 1}{suffix})")
                continue
            paths.append(outputs.write(saved_path(samples, "", named(job, i, image, outputs), outputs.naming,
                                                  outputs.samples.name, suffix=suffix), image, job.infos[i], data=data))
        for picture, data in zip(grids, files[len(pictures):]):
            if isinstance(data, Exception):
                logged(data, f"save_images (job {job.id}, its grid)")
                continue
            path = saved_path(_folder(outputs, job.kind, "grids"), "grid", named(job, 0, picture, outputs),
                              outputs.naming, outputs.grids.name, grid=True, short=not outputs.naming.grid_extended)
            paths.append(outputs.write(path, picture, job.infos[0], grid=True, data=data))
    return paths


def _folder(outputs: Outputs, kind: str, what: str) -> Path:
    """outputs/<kind>-<what>: txt2img-images, img2img-grids, ... (txt2img's for any kind but img2img)."""
    return outputs.folder / f"{'img2img' if kind == 'img2img' else 'txt2img'}-{what}"


def named(job: Job, index: int, image: np.ndarray, outputs: Outputs) -> Picture:
    """What a saved picture's name reads (filenames.TAGS): the job's `index`th image's info, `image`'s pixels, and
    the job's seeds, batch, runs, styles, schedule type, caller and start."""
    body, caller = job.context.get("body"), job.client_id or ""
    sampler = getattr(body, "sampler_name", None) or ""
    return Picture(job.infos[index], image,
                   seeds=tuple(i.get("seed") for i in job.infos), batch_size=getattr(job.request, "batch_size", 1),
                   n_iter=job.n_iter, index=index, styles=outputs.styles, sampler=sampler,
                   scheduler=schedule_label(sampler, getattr(body, "scheduler", None)),
                   user=caller.removeprefix("user:") if caller.startswith("user:") else None,
                   started=job.started or job.created)


def save_picture(image: np.ndarray, info: dict, kind: str, outputs: Outputs) -> Path | None:
    """One picture a script made of its jobs' (poor man's outpainting's), saved as a job's image is (samples_save:
    only where it is on, as there)."""
    return _save_alone(image, info, _folder(outputs, kind, "images"), outputs) if outputs.samples_save else None


def answer_pictures(job: Job, settings: frozenset[str], masks: list[dict[str, np.ndarray]] | None = None
                    ) -> list[tuple[np.ndarray, dict | None]]:
    """A job's pictures as AUTOMATIC1111's answer lists them (its output_images), with each one's info (None: none):
    each image, then its mask pictures that the mask `settings` on return (return_mask, return_mask_composite);
    `masks`: mask_pictures(job, settings), where the caller has them."""
    pictures, masks = [], masks if masks is not None else mask_pictures(job, settings)
    for image, info, own in zip(job.images, job.infos, masks):
        pictures += [(image, info)] + [(own[kind], None) for kind in own if f"return_{kind}" in settings]
    return pictures


def answer_grid(pictures: list[tuple[np.ndarray, dict | None]]) -> np.ndarray:
    """The grid of an answer's pictures (answer_pictures'), as AUTOMATIC1111 makes it of its output_images (in RGB:
    a composite's transparency is pasted as its colours)."""
    return image_grid([picture[..., :3] for picture, _ in pictures])


def mask_pictures(job: Job, settings: frozenset[str]) -> list[dict[str, np.ndarray]]:
    """Each of an inpainting job's images' mask pictures that the mask `settings` on ask for (saved or returned), by
    kind, from what the pipeline kept (its intermediates "mask" and "overlay"): "mask", AUTOMATIC1111's
    mask_for_overlay in RGB; "mask_composite", the image before the init image was pasted over it, where the mask
    repaints, transparent elsewhere (RGBA), made as there. None for an image without a kept mask."""
    from PIL import Image

    from kiln.masks import shaped

    kinds = [kind for kind in MASK_KINDS if {f"save_{kind}", f"return_{kind}"} & settings]
    pictures = []
    for image, kept in zip(job.images, job.before or [{}] * len(job.images)):
        if not kinds or "mask" not in kept:
            pictures.append({})
            continue
        mask, own = Image.fromarray(kept["mask"], "L"), {}
        own["mask"] = np.asarray(mask.convert("RGB"))
        if "mask_composite" in kinds:
            picture = Image.fromarray(kept.get("overlay", image))
            alpha = shaped(mask, picture.width, picture.height, 2)
            own["mask_composite"] = np.asarray(Image.composite(picture.convert("RGBA").convert("RGBa"),
                                                               Image.new("RGBa", picture.size), alpha).convert("RGBA"))
        pictures.append({kind: own[kind] for kind in kinds})
    return pictures


def save_grid(grid: np.ndarray, info: dict, kind: str, outputs: Outputs, basename: str = "xyz_grid") -> Path | None:
    """A script's grid (the X/Y/Z plot's xyz_grid, the prompt matrix's prompt_matrix, the loopback's grid), as
    AUTOMATIC1111 saves it where grid_save is on: outputs/<kind>-grids/<date>/<basename>-<number>[-<seed>].<grid_format>
    (the seed, or samples_filename_pattern's, after the number of all but a "grid" without grid_extended_filename)."""
    if not outputs.grid_save:
        return None
    short = basename == "grid" and not outputs.naming.grid_extended
    return _save_alone(grid, info, _folder(outputs, kind, "grids"), outputs, basename, short=short)


def _save_alone(image: np.ndarray, info: dict, folder: Path, outputs: Outputs, basename: str = "",
                short: bool = False) -> Path:
    """A picture of no job of its own (a script's grid, or its picture made of its jobs'), named from `info`
    alone, written under `folder` (a grid where it has a basename: grid_format's, grid_save_to_dirs)."""
    grid = bool(basename)
    picture = Picture(info, image, seeds=(info.get("seed"),), styles=outputs.styles)
    with _LOCK:
        path = saved_path(folder, basename, picture, outputs.naming, (outputs.grids if grid else outputs.samples).name,
                          grid=grid, short=short)
        return outputs.write(path, image, info, grid=grid)


def save_init_image(data: bytes, outputs: Outputs) -> Path:
    """save_init_img: an img2img init image as sent, as AUTOMATIC1111 keeps it: outputs/init-images/<the md5 of its
    pixels as decoded>.png (PNG whatever samples_format says, in the image's own mode; the same image twice: one
    file), with the infotext it carries, if any; a large one's export_for_4chan JPEG copy beside it (as there:
    through its save_image)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        text = infotext_of(image)
        folder = outputs.folder / "init-images"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{hashlib.md5(image.tobytes()).hexdigest()}.png"  # noqa: S324 - a name, not a secret
        savable = image if image.mode in ("1", "L", "LA", "I", "P", "RGB", "RGBA") else image.convert("RGB")  # (CMYK)
        path.write_bytes(PNG.encode(savable, {"parameters": text} if text else None))
        if outputs.jpeg_copies is not None:
            quietly(outputs.jpeg_copy, path, savable, text or "", what="export_for_4chan")
    return path


def image_grid(images: list[np.ndarray], rows: int | None = None) -> np.ndarray:
    """AUTOMATIC1111's image_grid: `rows` rows (by default, as its default options, round(sqrt(n))), filled row by
    row."""
    rows = min(max(rows or round(math.sqrt(len(images))), 1), len(images))
    cols = math.ceil(len(images) / rows)
    height, width = images[0].shape[:2]
    grid = np.zeros((rows * height, cols * width, 3), dtype=np.uint8)
    for index, image in enumerate(images):  # (another size, as a skipped hires pass leaves it: clipped, or black
        row, col = divmod(index, cols)          # around it, where AUTOMATIC1111's paste clips too)
        part = image[:height, :width, :3]
        grid[row * height:row * height + part.shape[0], col * width:col * width + part.shape[1]] = part
    return grid


