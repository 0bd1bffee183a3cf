"""AUTOMATIC1111's "Outpainting mk2" script (`script_name: "outpainting mk2"`, img2img) over the API: the image grown
one side at a time (left, right, up, down, those asked for), each new border painted with matched noise
(kiln.outpaint_noise) and then inpainted from it ("original" fill), each pass's image the next pass's init image. As
its scripts/outpainting_mk_2.py:
- the sides grow as poor man's outpainting's (`pixels` each, the whole to a multiple of 64, shared in proportion);
- a pass pastes the image on a canvas of the grown size rounded up to 64, masks the new border less the blur (the
  mask) and less twice the blur (the latent mask), and generates, at the grown side's end, at most the request's
  width (a horizontal pass) or height (a vertical one) by the whole canvas's other side, with mask_blur x 4;
- the generated part is pasted back on the noised canvas, which is cut to the grown size.
kiln checks every pass's size before the first runs: along the side that grows, the part generated is floored to
the build's multiple of 8 (AUTOMATIC1111 floors its latents instead), and a part narrower than the growth and twice
the blur is a 422 (AUTOMATIC1111's PIL raises on its latent mask; on the left or top, it leaves a band of raw noise).
An init image with transparency is put over white first, as kiln takes every init image (AUTOMATIC1111 drops the
alpha and keeps the stored colours).

script_args as AUTOMATIC1111 1.10's script takes them: [info, pixels, mask_blur, direction, noise_q,
color_variation]: an ignored placeholder (its UI's note), 8 to 256 pixels, a blur of 0 to 64 (the passes blur by
four times it, so at most a quarter of the server's mask-blur limit: 16 by default), a list of the sides, the
fall-off exponent (0 to 4; lower, more detail) and the colour variation (0 to 1).

Image n of the request (batch_size x n_iter of them) runs seed + n (its variation seed + n) through all its passes,
as kiln's batches number seeds; the images' passes run side by side, so the step batcher denoises them together.
AUTOMATIC1111 runs every n_iter batch with the same seeds (the same images again, where the seed is fixed). The
answer is the grown images, after their grid (more than one image), each with its first pass's infotext; its width
and height are the last pass's, as AUTOMATIC1111's. /sdapi/v1/progress shows the passes, and its interrupt ends each
image's passes at the one it stops (that image grown that far), as AUTOMATIC1111's interrupt ends the script.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.errors import InputError
from kiln.imaging import ImageLimits, decode_image
from kiln.outpaint_noise import matched_noise
from orchestrator.jobs import Status
from orchestrator.pipeline.validate import check_counts
from orchestrator.server import a1111, cells
from orchestrator.server.generation import outputs_of, pipeline
from orchestrator.server.outpainting import DIRECTIONS, check_growth, growth, png_b64
from orchestrator.server.outputs import image_grid, quietly, save_picture

NAME = "outpainting mk2"
ARGS = [{"label": None, "value": None},
        {"label": "Pixels to expand", "value": 128, "minimum": 8, "maximum": 256, "step": 8},
        {"label": "Mask blur", "value": 8, "minimum": 0, "maximum": 64, "step": 1},
        {"label": "Outpainting direction", "value": list(DIRECTIONS), "choices": list(DIRECTIONS)},
        {"label": "Fall-off exponent (lower=higher detail)", "value": 1.0, "minimum": 0.0, "maximum": 4.0,
         "step": 0.01},
        {"label": "Color variation", "value": 0.05, "minimum": 0.0, "maximum": 1.0, "step": 0.01}]
HORIZONTAL = ("left", "right")


@dataclass(frozen=True)
class Mk2:
    pixels: int
    mask_blur: int
    directions: tuple[str, ...]
    noise_q: float
    color_variation: float


@dataclass
class Pass:
    """One side's growth of one image: the canvas with the border's matched noise, the part generated and its
    masks, and the grown size."""
    noised: np.ndarray  # (H, W, 3) uint8: the canvas, rounded up to 64, its border matched noise
    box: tuple[int, int, int, int]  # the part generated: x0, y0, x1, y1 (end exclusive)
    mask: np.ndarray  # (h, w) uint8, 255 = inpaint
    latent_mask: np.ndarray
    size: tuple[int, int]  # the grown image's width and height


def parse(body: schemas.Img2ImgBody) -> Mk2:
    """The outpainting a body's script_args describe; an InputError naming what cannot run."""
    args = list(body.script_args)
    if len(args) > 6:
        raise InputError(f"script_args: {NAME} takes at most 6 values (AUTOMATIC1111 1.10's [info, pixels, mask_blur, "
                         f"direction, noise_q, color_variation]), got {len(args)}")
    _, pixels, blur, directions, noise_q, variation = args + [None, 128, 8, list(DIRECTIONS), 1.0, 0.05][len(args):]
    check_growth(NAME, pixels, blur, directions)
    for name, value, top in (("noise_q", noise_q, 4), ("color_variation", variation, 1)):
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= top:
            raise InputError(f"script_args: {NAME} {name} must be a number from 0 to {top}, got {value!r}")
    for name in ("mask", "latent_mask"):
        if getattr(body, name):
            raise InputError(f"{name}: {NAME} makes its own masks; send the image alone")
    return Mk2(int(pixels), int(blur), tuple(d for d in DIRECTIONS if d in directions), float(noise_q),
               float(variation))


def _unmasked(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A white (inpaint) mask with PIL's rectangle `box` black: its far corner included, clipped to the mask, and
    nothing where it is inverted (AUTOMATIC1111's PIL raises there)."""
    mask = np.full((height, width), 255, np.uint8)
    x0, y0, x1, y1 = box
    mask[max(y0, 0):max(y1 + 1, 0), max(x0, 0):max(x1 + 1, 0)] = 0
    return mask


def pass_sizes(width: int, height: int, mk2: Mk2, generate: tuple[int, int],
               multiple: int = 8) -> list[tuple[str, int, int, int]]:
    """Each pass of an image of width x height: its side, how far it grows, and the width and height generated: along
    the side that grows, at most the request's (`generate`), down to a multiple of `multiple` (the build's; where
    AUTOMATIC1111 floors its latents instead); across it, the canvas's side."""
    left, up, right, down = growth(width, height, mk2.pixels, mk2.directions)
    passes = []
    for side, amount in zip(DIRECTIONS, (left, right, up, down)):
        if amount:
            horizontal = side in HORIZONTAL
            grown_w, grown_h = (width + amount, height) if horizontal else (width, height + amount)
            along = min(generate[0], grown_w) if horizontal else min(generate[1], grown_h)
            along -= along % multiple
            size = (along, math.ceil(grown_h / 64) * 64) if horizontal else (math.ceil(grown_w / 64) * 64, along)
            passes.append((side, amount, *size))
            width, height = grown_w, grown_h
    return passes


def grow(image: np.ndarray, side: str, amount: int, size: tuple[int, int], mk2: Mk2) -> Pass:
    """One side's pass over `image` (uint8 (h, w, 3)): `amount` pixels grown, `size` (width, height) generated."""
    height, width = image.shape[:2]
    left, right, up, down = (amount if side == s else 0 for s in DIRECTIONS)
    grown_w, grown_h = width + left + right, height + up + down
    canvas_w, canvas_h = math.ceil(grown_w / 64) * 64, math.ceil(grown_h / 64) * 64
    canvas = np.zeros((canvas_h, canvas_w, 3), np.uint8)
    canvas[up:up + height, left:left + width] = image
    blur = mk2.mask_blur
    mask = _unmasked(canvas_w, canvas_h, (amount + blur if left else 0, amount + blur if up else 0,
                                          canvas_w - amount - blur if right else grown_w,
                                          canvas_h - amount - blur if down else grown_h))
    noised = matched_noise(canvas / 255.0, mask / 255.0, mk2.noise_q, mk2.color_variation)
    noised = np.clip(noised * 255.0, 0, 255).astype(np.uint8)
    part_w, part_h = size
    x0, y0 = 0 if left else canvas_w - part_w, 0 if up else canvas_h - part_h
    box = (x0, y0, x0 + part_w, y0 + part_h)
    latent = _unmasked(part_w, part_h, (amount + blur * 2 if left else 0, amount + blur * 2 if up else 0,
                                        part_w - amount - blur * 2 if right else grown_w,
                                        part_h - amount - blur * 2 if down else grown_h))
    return Pass(noised, box, mask[y0:y0 + part_h, x0:x0 + part_w], latent, (grown_w, grown_h))


def paste(grown: Pass, generated: np.ndarray) -> np.ndarray:
    """The pass's image: the part generated pasted on the noised canvas, cut to the grown size."""
    x0, y0, x1, y1 = grown.box
    canvas = grown.noised.copy()
    canvas[y0:y1, x0:x1] = generated
    return canvas[:grown.size[1], :grown.size[0]]


def check(body: schemas.Img2ImgBody, mk2: Mk2, init: np.ndarray, served) -> list[tuple[str, int, int, int]]:
    """Every pass's size and the request's counts checked before anything runs; the passes."""
    limits, contract = served.limits, served.contract
    if mk2.mask_blur * 4 > limits.max_mask_blur:
        raise InputError(f"script_args: {NAME} mask_blur {mk2.mask_blur} blurs its passes' masks by four times it, "
                         f"over this server's limit of {limits.max_mask_blur}")
    check_counts(body.batch_size, body.n_iter, limits)
    passes = pass_sizes(init.shape[1], init.shape[0], mk2, (body.width, body.height), contract.size_multiple)
    for side, amount, width, height in passes:
        along, name = (width, "width") if side in HORIZONTAL else (height, "height")
        if along < amount + 2 * mk2.mask_blur:  # AUTOMATIC1111 raises (its latent mask's rectangle is inverted)
            raise InputError(f"{NAME}: the pass growing {side} grows the image by {amount} pixels but generates "
                             f"{along} of them (at most the request's {name}); the new border and twice the blur need "
                             f"{amount + 2 * mk2.mask_blur}: raise {name} or lower pixels")
        if not all(contract.min_size <= v <= contract.max_size for v in (width, height)) or \
                width * height > limits.max_image_pixels:
            raise InputError(f"{NAME}: the pass growing {side} generates {width}x{height} (width x height), outside "
                             f"the built profile [{contract.min_size}, {contract.max_size}] (a horizontal pass "
                             "generates at most the request's width by the grown height rounded up to 64, a vertical "
                             "one the grown width rounded up to 64 by at most the request's height)")
        contract.check_built_size(width, height, f"{NAME}: the pass growing {side}")
    return passes


def cell(body: schemas.Img2ImgBody, grown: Pass, mk2: Mk2, number: int) -> schemas.Img2ImgBody:
    """Image `number`'s pass as an img2img request: the noised part, inpainted from itself."""
    x0, y0, x1, y1 = grown.box
    return body.model_copy(update={
        "script_name": None, "script_args": [], "init_images": [png_b64(grown.noised[y0:y1, x0:x1])],
        "mask": png_b64(grown.mask), "latent_mask": png_b64(grown.latent_mask), "mask_blur": mk2.mask_blur * 4,
        "inpainting_fill": 1, "inpaint_full_res": False, "resize_mode": 0, "width": x1 - x0, "height": y1 - y0,
        "batch_size": 1, "n_iter": 1, "seed": body.seed + number, "subseed": body.subseed + number,
        "do_not_save_samples": True, "save_images": False})


async def chain(request, body: schemas.Img2ImgBody, mk2: Mk2, init: np.ndarray, passes: list, number: int) -> tuple:
    """Image `number`: its passes one after another; the grown image, its first pass's job, and whether every pass
    ran (an interrupted pass ends it, as AUTOMATIC1111's interrupt ends the script; a skipped one ends early only)."""
    image, first = init, None
    for side, amount, width, height in passes:
        grown = await run_in_threadpool(grow, image, side, amount, (width, height), mk2)
        name = f"{NAME} image {number + 1}, the pass growing {side}"
        asked = await run_in_threadpool(cell, body, grown, mk2, number)  # (three PNGs: off the event loop)
        [job] = await cells.run_cells(request, "img2img", [asked], lambda _, n=name: n)
        if job.error is not None:
            raise job.error
        if cells.stopped(job):  # interrupted while it waited (another image's pass was running): none made
            return image, first or job, False
        if job.status != Status.DONE or not job.images:
            raise InputError(f"{name} was not made ({job.status.value})")
        image, first = paste(grown, job.images[0]), first or job
        if job.interrupted:
            return image, first, False
    return image, first, True


async def run(request, kind: str, body: schemas.Img2ImgBody) -> dict:
    """The outpainting of an /sdapi/v1/img2img request: its images grown side by side, each a pass at a time."""
    if kind != "img2img":
        raise InputError(f"script_name {NAME!r} is an img2img script (/sdapi/v1/img2img): it grows an image")
    served = await pipeline(request)  # the server's default checkpoint is set, and Triton is there
    mk2 = parse(body)
    raw = await run_in_threadpool(a1111.init_image, body, served.limits.max_image_pixels)
    init = np.asarray(await run_in_threadpool(decode_image, raw, ImageLimits(min_side=1)))
    passes = check(body, mk2, init, served)
    body = cells.fix_seeds(body)
    grown = await cells.side_by_side(chain(request, body, mk2, init, passes, n)
                                     for n in range(body.batch_size * body.n_iter))
    made = [(image, job) for image, job, _ in grown if job.images]  # an image interrupted before its first pass: none
    if not made:
        return cells.nothing_made(request, body, grown[0][1])
    images = [(image, job.infos[0]) for image, job in made]
    outputs = outputs_of(request, body)
    if body.save_images and not body.do_not_save_samples:  # the grown images, not their passes (as there)
        for picture, info in images:
            await run_in_threadpool(quietly, save_picture, picture, info, kind, outputs)
    alike = len({image.shape for image, _ in images}) == 1  # (interrupted images stop at the pass they were in)
    grid = await run_in_threadpool(image_grid, [image for image, _ in images]) if len(images) > 1 and alike else None
    await cells.save(request, body, kind, [], grid, images[0][1], "grid")
    first = made[0][1]
    grid = grid if grid is not None and outputs.return_grid else None  # (saved either way)
    details = cells.details(first, [info for _, info in images], before=(images[0][1],) if grid is not None else ())
    details["interrupted"] = not all(complete for *_, complete in grown)
    details["width"], details["height"] = passes[-1][2:]  # the last pass's size, as AUTOMATIC1111's p holds it
    details["outpainting_mk2"] = {"passes": [side for side, *_ in passes], "images": len(images),
                                  "size": [int(images[0][0].shape[1]), int(images[0][0].shape[0])],
                                  "interrupted": sum(not complete for *_, complete in grown),
                                  "seconds": round(time.time() - first.created, 3)}
    return await cells.answer(request, body, ([(grid, images[0][1])] if grid is not None else []) + images, details)
