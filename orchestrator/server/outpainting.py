"""AUTOMATIC1111's "Poor man's outpainting" script (`script_name: "poor man's outpainting"`, img2img) over the API:
the init image on a larger canvas (its sides grown by `pixels` in each direction asked, then to a multiple of 64),
cut into overlapping tiles of width x height (`pixels` of overlap, its split_grid); each tile that reaches the new
border inpainted with the script's mask (the new border, blurred) and latent mask (the border, less inset), tile k
with seed + k; the tiles put back with their overlaps blended (combine_grid). As its scripts/poormans_outpainting.py.

script_args as AUTOMATIC1111 1.10's script takes them: [pixels, mask_blur, inpainting_fill, direction]: 8 to 256
pixels (its slider's range); a blur of 0 to 64 (the inpainting runs with twice it, the mask's rectangle inset by
twice it and the latent mask's by half of it, as there); the masked content by index (0 fill, 1 original, 2 latent
noise, 3 latent nothing) or name; the directions, a list of left, right, up and down. The tiles run side by side,
so the step batcher denoises them together (AUTOMATIC1111 runs one after another). The answer is the one outpainted
image, with the first tile's infotext, as there.

/sdapi/v1/interrupt ends the outpainting (as AUTOMATIC1111's): the tiles running keep what they made, those not
started stay as drawn (the fill; AUTOMATIC1111 leaves them black).

The script sets the inpainting itself: a request's own mask or latent_mask is refused, batch_size and n_iter must be
1 (AUTOMATIC1111 sets 1), and its mask_blur, inpainting_fill and inpaint_full_res give way to the script's (as
there).
"""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.errors import InputError
from kiln.imaging import ImageLimits, decode_image, encode_png
from kiln.masks import INPAINTING_FILL
from orchestrator.jobs import Status
from orchestrator.pipeline.tiles import MAX_TILES, Tile, combine, split
from orchestrator.pipeline.validate import Limits
from orchestrator.server import a1111, cells
from orchestrator.server.generation import outputs_of, pipeline
from orchestrator.server.outputs import quietly, save_picture

NAME = "poor man's outpainting"
DIRECTIONS = ("left", "right", "up", "down")
# its arguments as AUTOMATIC1111's /sdapi/v1/script-info lists them
ARGS = [{"label": "Pixels to expand", "value": 128, "minimum": 8, "maximum": 256, "step": 8},
        {"label": "Mask blur", "value": 4, "minimum": 0, "maximum": 64, "step": 1},
        {"label": "Masked content", "value": "fill", "choices": list(INPAINTING_FILL.values())},
        {"label": "Outpainting direction", "value": list(DIRECTIONS), "choices": list(DIRECTIONS)}]


@dataclass(frozen=True)
class Outpainting:
    pixels: int
    mask_blur: int
    inpainting_fill: int
    directions: tuple[str, ...]


@dataclass
class Canvas:
    image: Image.Image  # the init image on the grown canvas (black around it)
    mask: Image.Image  # "L", white = inpaint: the new border, less the blur's inset
    latent_mask: Image.Image  # "L": the new border, less half the blur
    border: tuple[int, int, int, int]  # how far the canvas grew: left, up, right, down


def parse(body: schemas.Img2ImgBody) -> Outpainting:
    """The outpainting a body's script_args describe; an InputError naming what cannot run."""
    args = list(body.script_args)
    if len(args) > 4:
        raise InputError(f"script_args: poor man's outpainting takes at most 4 values (AUTOMATIC1111 1.10's [pixels, "
                         f"mask_blur, inpainting_fill, direction]), got {len(args)}")
    pixels, blur, fill, directions = args + [128, 4, 0, list(DIRECTIONS)][len(args):]
    check_growth(NAME, pixels, blur, directions)
    names = {name: index for index, name in INPAINTING_FILL.items()}
    fill = names.get(fill, fill) if isinstance(fill, str) else fill
    if fill not in INPAINTING_FILL or isinstance(fill, bool):
        raise InputError(f"script_args: poor man's outpainting inpainting_fill must be 0 to 3 or one of "
                         f"{', '.join(names)}, got {fill!r}")
    for name in ("mask", "latent_mask"):
        if getattr(body, name):
            raise InputError(f"{name}: poor man's outpainting makes its own masks; send the image alone")
    for name in ("batch_size", "n_iter"):
        if getattr(body, name) != 1:
            raise InputError(f"{name}: poor man's outpainting makes one image (AUTOMATIC1111 sets {name} to 1; got "
                             f"{getattr(body, name)})")
    return Outpainting(int(pixels), int(blur), fill, tuple(d for d in DIRECTIONS if d in directions))


def check_growth(script: str, pixels, blur, directions) -> None:
    """The arguments both outpainting scripts share: pixels (8 to 256), mask_blur (0 to 64) and directions."""
    if not whole(pixels) or not 8 <= pixels <= 256:
        raise InputError(f"script_args: {script} pixels must be a whole number from 8 to 256, got {pixels!r}")
    if not whole(blur) or not 0 <= blur <= 64:
        raise InputError(f"script_args: {script} mask_blur must be a whole number from 0 to 64, got {blur!r}")
    if not isinstance(directions, list) or not directions or any(d not in DIRECTIONS for d in directions):
        raise InputError(f"script_args: {script} direction must be a list of some of {', '.join(DIRECTIONS)}, got "
                         f"{directions!r}")


def whole(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == int(value)


def growth(width: int, height: int, pixels: int, directions: tuple[str, ...]) -> tuple[int, int, int, int]:
    """How far each side grows (left, up, right, down), as both scripts grow them: each side asked for by `pixels`,
    then the whole to a multiple of 64, the growth shared between opposite sides in proportion."""
    grow = {d: pixels if d in directions else 0 for d in DIRECTIONS}
    grown_w = math.ceil((width + grow["left"] + grow["right"]) / 64) * 64
    grown_h = math.ceil((height + grow["up"] + grow["down"]) / 64) * 64
    left = grow["left"] * (grown_w - width) // (grow["left"] + grow["right"]) if grow["left"] else 0
    right = grown_w - width - left if grow["right"] else 0
    up = grow["up"] * (grown_h - height) // (grow["up"] + grow["down"]) if grow["up"] else 0
    down = grown_h - height - up if grow["down"] else 0
    return left, up, right, down


def canvas(init: Image.Image, outpainting: Outpainting) -> Canvas:
    """The grown canvas and its masks, as the script makes them: each side asked for grows by `pixels`, then the
    canvas to a multiple of 64, the growth shared between opposite sides in proportion."""
    left, up, right, down = growth(init.width, init.height, outpainting.pixels, outpainting.directions)
    width = math.ceil((init.width + left + right) / 64) * 64  # a side that grows not still rounds up, as there
    height = math.ceil((init.height + up + down) / 64) * 64
    image = Image.new("RGB", (width, height))
    image.paste(init, (left, up))

    def inset_by(inset: int) -> Image.Image:
        mask = Image.new("L", (width, height), "white")
        ImageDraw.Draw(mask).rectangle((left + (inset if left else 0), up + (inset if up else 0),
                                        width - right - (inset if right else 0),
                                        height - down - (inset if down else 0)), fill="black")
        return mask

    blur = outpainting.mask_blur
    return Canvas(image, inset_by(blur * 2), inset_by(blur // 2), (left, up, right, down))


def outer_tiles(grid: list[list[Tile]], drawn: Canvas, tile_w: int, tile_h: int) -> list[Tile]:
    """The tiles that reach past the init image into the grown border (the others keep their pixels)."""
    left, up, right, down = drawn.border
    width, height = drawn.image.size
    return [tile for row in grid for tile in row
            if not (tile.x >= left and tile.x + tile_w <= width - right and tile.y >= up and
                    tile.y + tile_h <= height - down)]


def png_b64(image: Image.Image | np.ndarray) -> str:
    """An image as a request carries it: PNG in base64 (both outpainting scripts' tiles, passes and masks)."""
    return base64.b64encode(encode_png(image)).decode()


def plan(body: schemas.Img2ImgBody, outpainting: Outpainting, limits: Limits) -> tuple:
    """The canvas, its tile grid (width x height, `pixels` of overlap) and the bodies of the tiles to inpaint."""
    max_pixels = limits.max_image_pixels
    if outpainting.mask_blur * 2 > limits.max_mask_blur:
        raise InputError(f"script_args: poor man's outpainting mask_blur {outpainting.mask_blur} blurs its tiles' "
                         f"masks by twice it, over this server's limit of {limits.max_mask_blur}")
    init = decode_image(a1111.init_image(body, max_pixels), ImageLimits(min_side=1))
    drawn = canvas(init, outpainting)
    width, height = drawn.image.size
    if width * height > max_pixels:
        raise InputError(f"poor man's outpainting: the grown image, {width}x{height}, is over this server's "
                         f"{max_pixels} pixels")
    if width < body.width or height < body.height or outpainting.pixels >= min(body.width, body.height):
        raise InputError(f"poor man's outpainting: tiles of {body.width}x{body.height} (width x height) must fit the "
                         f"grown image, {width}x{height}, and be larger than the {outpainting.pixels} pixels of "
                         "overlap; lower width and height (or pixels)")
    grid = split(drawn.image, body.width, body.height, outpainting.pixels)
    if sum(len(row) for row in grid) > MAX_TILES:
        raise InputError(f"poor man's outpainting: {sum(len(row) for row in grid)} tiles of {body.width}x"
                         f"{body.height}; at most {MAX_TILES} (larger tiles)")
    outer = outer_tiles(grid, drawn, body.width, body.height)
    fixed = cells.fix_seeds(body)

    def crop(image: Image.Image, tile: Tile) -> str:
        return png_b64(image.crop((tile.x, tile.y, tile.x + body.width, tile.y + body.height)))

    bodies = [fixed.model_copy(update={
        "script_name": None, "script_args": [], "init_images": [png_b64(tile.image)], "mask": crop(drawn.mask, tile),
        "latent_mask": crop(drawn.latent_mask, tile), "mask_blur": outpainting.mask_blur * 2,
        "inpainting_fill": outpainting.inpainting_fill, "inpaint_full_res": False, "resize_mode": 0,
        "seed": fixed.seed + index}) for index, tile in enumerate(outer)]
    return drawn, grid, outer, bodies


async def run(request, kind: str, body: schemas.Img2ImgBody) -> dict:
    """The outpainting of an /sdapi/v1/img2img request: its outer tiles inpainted side by side, then combined."""
    if kind != "img2img":
        raise InputError("script_name \"poor man's outpainting\" is an img2img script (/sdapi/v1/img2img): it grows "
                         "an image")
    served = await pipeline(request)  # the server's default checkpoint is set, and Triton is there
    outpainting = parse(body)
    drawn, grid, outer, bodies = await run_in_threadpool(plan, body, outpainting, served.limits)
    jobs = await cells.run_cells(request, kind, bodies, lambda i: f"poor man's outpainting tile {i + 1}")
    for number, job in enumerate(jobs, 1):
        if job.error is not None:
            raise job.error
        if (job.status != Status.DONE or not job.images) and not cells.stopped(job):
            raise InputError(f"poor man's outpainting: tile {number} was not made ({job.status.value})")
    made = [job for job in jobs if job.images]  # all, unless /sdapi/v1/interrupt ended the outpainting
    if not made:
        return cells.nothing_made(request, body, jobs[0])
    for tile, job in zip(outer, jobs):  # a tile the interrupt kept from running stays as drawn
        if job.images:
            tile.image = Image.fromarray(job.images[0])
    combined = await run_in_threadpool(combine, grid, *drawn.image.size, outpainting.pixels)
    picture, info = np.asarray(combined), made[0].infos[0]
    if body.save_images and not body.do_not_save_samples:  # the image alone, not its tiles (as there)
        await run_in_threadpool(quietly, save_picture, picture, info, kind, outputs_of(request, body))
    details = cells.details(made[0], [info], jobs=jobs)
    details["poor_mans_outpainting"] = {"tiles": len(jobs), "size": list(drawn.image.size),
                                        "interrupted": len(jobs) - len(made),
                                        "seconds": round(time.time() - jobs[0].created, 3)}
    return await cells.answer(request, body, [(picture, info)], details)
