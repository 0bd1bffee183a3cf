"""AUTOMATIC1111's "SD upscale" img2img script (scripts/sd_upscale.py): the init image upscaled (None, Lanczos or
Nearest, as its upscalers run), cut into overlapping tiles of the request's width x height, each tile redrawn by
img2img (tile k with seed + k), and the tiles put back with their overlaps blended (its split_grid/combine_grid).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from kiln.contract import SDContract
from kiln.errors import InputError
from kiln.imaging import ImageLimits, decode_image, encode_png, header_size
from kiln.upscale import NO_NETWORKS, UPSCALERS, Network, Plan, UpscaleOptions, plan, upscale_with
from orchestrator.pipeline.requests import GenerationResult, Img2ImgRequest, ProgressCallback
from orchestrator.pipeline.seeds import draw_seed

MAX_TILES = 64  # tiles one request may cut (each is a whole img2img run)


@dataclass
class Tile:
    x: int
    y: int
    image: object  # PIL image: the crop, then its redrawn version


def upscale_plan(request: Img2ImgRequest, width: int, height: int, max_pixels: int) -> Plan | None:
    """The sizes AUTOMATIC1111's upscaler.upscale takes a width x height init image through (None: "None" leaves it
    as it is); too large is refused by kiln.upscale.plan before a pixel is touched."""
    script = request.sd_upscale
    if script.upscaler == "None":
        return None
    options = UpscaleOptions(upscaling_resize=script.scale, upscaler_1=script.upscaler)
    return plan(width, height, options, max_pixels)


def upscaled_image(request: Img2ImgRequest, max_pixels: int, networks: Mapping[str, Network] = NO_NETWORKS):
    """The init image upscaled as AUTOMATIC1111's upscaler.upscale does it ("None": unchanged)."""
    image = decode_image(request.init_image, ImageLimits(min_side=1))
    planned = upscale_plan(request, image.width, image.height, max_pixels)
    return image if planned is None else upscale_with(image, request.sd_upscale.upscaler, planned, networks)


def grid_shape(width: int, height: int, tile_w: int, tile_h: int, overlap: int) -> tuple[int, int]:
    """split_grid's (columns, rows) of tiles over a width x height image."""
    return math.ceil((width - overlap) / (tile_w - overlap)), math.ceil((height - overlap) / (tile_h - overlap))


def split(image, tile_w: int, tile_h: int, overlap: int) -> list[list[Tile]]:
    """AUTOMATIC1111's split_grid: rows of tiles covering the image, spread evenly, the last flush with the edge."""
    cols, rows = grid_shape(image.width, image.height, tile_w, tile_h, overlap)
    dx = (image.width - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (image.height - tile_h) / (rows - 1) if rows > 1 else 0
    grid = []
    for row in range(rows):
        y = min(int(row * dy), image.height - tile_h)
        xs = [min(int(col * dx), image.width - tile_w) for col in range(cols)]
        grid.append([Tile(x, y, image.crop((x, y, x + tile_w, y + tile_h))) for x in xs])
    return grid


def combine(grid: list[list[Tile]], width: int, height: int, overlap: int):
    """AUTOMATIC1111's combine_grid: each tile over its left neighbour, each row over the one above, with a linear
    ramp across the overlap."""
    from PIL import Image

    tile_w, tile_h = grid[0][0].image.size
    ramp = np.arange(overlap, dtype=np.float32) * 255 / max(overlap, 1)
    mask_w = Image.fromarray(np.repeat(ramp[None], tile_h, axis=0).astype(np.uint8), "L")
    mask_h = Image.fromarray(np.repeat(ramp[:, None], width, axis=1).astype(np.uint8), "L")
    combined = Image.new("RGB", (width, height))
    for row in grid:
        line = Image.new("RGB", (width, tile_h))
        for tile in row:
            if tile.x == 0:
                line.paste(tile.image, (0, 0))
                continue
            line.paste(tile.image.crop((0, 0, overlap, tile_h)), (tile.x, 0), mask=mask_w)
            line.paste(tile.image.crop((overlap, 0, tile_w, tile_h)), (tile.x + overlap, 0))
        y = row[0].y
        if y == 0:
            combined.paste(line, (0, 0))
            continue
        combined.paste(line.crop((0, 0, width, overlap)), (0, y), mask=mask_h)
        combined.paste(line.crop((0, overlap, width, tile_h)), (0, y + overlap))
    return combined


def check(request: Img2ImgRequest, contract: SDContract, max_pixels: int) -> None:
    script = request.sd_upscale
    valid = (*UPSCALERS, *contract.upscaler_names)
    if script.upscaler not in valid:
        raise InputError(f"script_args: SD upscale's upscaler {script.upscaler!r} is not one of this server's: "
                         f"{', '.join(valid)} (0 to {len(valid) - 1})")
    if not (isinstance(script.overlap, int) and 0 <= script.overlap < min(request.width, request.height)):
        raise InputError(f"script_args: SD upscale's overlap must be 0 to the tile's side ({request.width}x"
                         f"{request.height}, width x height), got {script.overlap!r}")
    if not (isinstance(script.scale, (int, float)) and 1 <= script.scale <= 4):
        raise InputError(f"script_args: SD upscale's scale_factor must be in [1, 4], got {script.scale!r}")
    if request.batch_size != 1 or request.inpainting or request.controlnet_units:
        raise InputError("script_name sd upscale redraws its tiles one by one: batch_size 1, no mask, no ControlNet")
    own = header_size(request.init_image, "init image", max_pixels)  # sizes only: sd_upscale does the pixels
    planned = upscale_plan(request, *own, max_pixels)
    width, height = own if planned is None else planned.size
    if width < request.width or height < request.height:
        raise InputError(f"script_name sd upscale: the upscaled image, {width}x{height}, is smaller than "
                         f"a tile ({request.width}x{request.height}); lower width and height")
    cols, rows = grid_shape(width, height, request.width, request.height, script.overlap)
    tiles = cols * rows
    if tiles > MAX_TILES:
        raise InputError(f"script_name sd upscale: {tiles} tiles of {request.width}x{request.height}; at most "
                         f"{MAX_TILES} (larger tiles, or a smaller scale)")


def sd_upscale(generate: Callable[..., GenerationResult], request: Img2ImgRequest, max_pixels: int,
               progress: ProgressCallback | None = None,
               networks: Mapping[str, Network] = NO_NETWORKS) -> GenerationResult:
    """Run the script: `generate(tile_request, progress)` redraws one tile (a whole img2img run); `networks`: the
    upscaler networks by name (kiln.upscale)."""
    script, seed = request.sd_upscale, draw_seed(request.seed)
    image = upscaled_image(request, max_pixels, networks)
    grid = split(image, request.width, request.height, script.overlap)
    tiles = [tile for row in grid for tile in row]
    info: dict = {}
    for index, tile in enumerate(tiles):
        def tile_progress(step: int, total: int, latents, index=index) -> None:
            if progress is not None:
                progress(index * total + step, len(tiles) * total, latents)

        inner = replace(request, init_image=encode_png(tile.image), seed=(seed + index) % 2**32,
                        sd_upscale=None)
        result = generate(inner, tile_progress)
        tile.image = _picture(result.images[0])
        info = info or result.info
    combined = combine(grid, image.width, image.height, script.overlap)
    info = info | {"seed": seed, "all_seeds": [seed], "sd_upscale_overlap": script.overlap,
                   "sd_upscale_upscaler": script.upscaler}
    return GenerationResult(images=np.asarray(combined, dtype=np.uint8)[None], seeds=[seed], info=info)


def _picture(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(pixels)
