"""VAE tiled decode and encode, as diffusers' AutoencoderKL computes them with `enable_tiling()`: the latents (or the
image) cut into tiles of the VAE's sample size that overlap by a quarter, each tile through the served decoder (or
encoder) on its own, and the seams blended linearly over the overlap, in the order diffusers blends them (each tile
with the one above, then the one to its left, both already blended). The memory of a decode is then that of one
tile, whatever the image's size: what an edge box needs for large images.

The service tiles an image above `Limits.vae_tile_above` pixels (kiln serve --vae-tile-above), or as a request asks
(`vae_tiling`: true or false, kiln's field); `Limits.vae_tile` sets a smaller tile than the VAE's own (less memory,
more seams). Never with AUTOMATIC1111's `tiling` (seamless images): its VAE pads circularly, and a tile would wrap
around itself instead of the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from kiln.errors import InputError
from kiln.imaging import to_uint8, vae_input

OVERLAP = 0.25  # diffusers' tile_overlap_factor


def _blend_v(above: np.ndarray, tile: np.ndarray, extent: int) -> np.ndarray:
    """diffusers' blend_v: the tile's first rows fade in from the last rows of the tile above (in place)."""
    extent = min(above.shape[2], tile.shape[2], extent)
    for y in range(extent):
        tile[:, :, y, :] = above[:, :, -extent + y, :] * (1 - y / extent) + tile[:, :, y, :] * (y / extent)
    return tile


def _blend_h(left: np.ndarray, tile: np.ndarray, extent: int) -> np.ndarray:
    """diffusers' blend_h: the same across columns, from the tile to the left."""
    extent = min(left.shape[3], tile.shape[3], extent)
    for x in range(extent):
        tile[:, :, :, x] = left[:, :, :, -extent + x] * (1 - x / extent) + tile[:, :, :, x] * (x / extent)
    return tile


def _tiled(run: Callable[[np.ndarray], np.ndarray], source: np.ndarray, tile_in: int, tile_out: int) -> np.ndarray:
    """Cut source (N, C, H, W) into tiles of side tile_in, every tile_in * (1 - OVERLAP), run each, blend the outputs
    (tiles of side tile_out) over tile_out * OVERLAP and keep tile_out * (1 - OVERLAP) of each: diffusers'
    tiled_decode / _tiled_encode loop."""
    stride, blend = int(tile_in * (1 - OVERLAP)), int(tile_out * OVERLAP)
    keep = tile_out - blend
    rows = [[np.array(run(np.ascontiguousarray(source[:, :, i:i + tile_in, j:j + tile_in])), dtype=np.float32)
             for j in range(0, source.shape[3], stride)] for i in range(0, source.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend_v(rows[i - 1][j], tile, blend)
            if j > 0:
                tile = _blend_h(row[j - 1], tile, blend)
            kept.append(tile[:, :, :keep, :keep])
        out_rows.append(np.concatenate(kept, axis=3))
    return np.concatenate(out_rows, axis=2)


def tiled_decode(decode_pixels: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, tile: int,
                 scale: int) -> np.ndarray:
    """Scaled latents (N, C, h, w) -> the decoder's output (N, 3, h * scale, w * scale) in [-1, 1], tile by tile
    (`tile`: the tile's side in pixels)."""
    return _tiled(decode_pixels, latents, tile // scale, tile)


def tiled_encode(encode_pixels: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, tile: int,
                 scale: int) -> np.ndarray:
    """Pixels (N, 3, H, W) in [-1, 1] -> the latent distribution's parameters, tile by tile."""
    return _tiled(encode_pixels, pixels, tile, tile // scale)


@dataclass(frozen=True)
class TiledVAE:
    """A served VAE (components.VAE) that decodes and encodes in tiles where `wanted` says so for an image's
    (height, width); diffusers tiles only an image with a side over the tile."""

    vae: object  # components.VAE with decode_pixels
    tile: int  # pixels
    scale: int  # image side / latent side
    wanted: Callable[[int, int], bool]

    def _tiles(self, height: int, width: int) -> bool:
        return max(height, width) > self.tile and self.wanted(height, width)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        height, width = (side * self.scale for side in latents.shape[-2:])
        if not self._tiles(height, width):
            return self.vae.decode(latents)
        return to_uint8(tiled_decode(self.vae.decode_pixels, latents, self.tile, self.scale))

    def decode_pixels(self, latents: np.ndarray) -> np.ndarray:
        return self.vae.decode_pixels(latents)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if not self._tiles(*pixels.shape[-2:]):
            return self.vae.encode_pixels(pixels)
        return tiled_encode(self.vae.encode_pixels, pixels, self.tile, self.scale)

    def encode_image(self, data: bytes, width: int, height: int) -> np.ndarray:
        if not self._tiles(height, width):
            return self.vae.encode_image(data, width, height)
        return self.encode_pixels(vae_input(data, width, height)[None])


def tiling_policy(asked: bool | None, above: int) -> Callable[[int, int], bool]:
    """When to tile an image of (height, width): as the request asks (True, False), else above `above` pixels."""
    if asked is not None:
        return lambda _height, _width: asked
    return lambda height, width: height * width > above


def with_tiles(components, request, limits):
    """`components` (components.Components) with its VAE tiling as `request` asks, under the service's `limits`."""
    if getattr(request, "tiling", False):
        if request.vae_tiling:
            raise InputError("vae_tiling with tiling (seamless images) is not supported: the seamless VAE wraps "
                             "around the whole image, a tile would wrap around itself")
        return components
    contract = components.contract
    if contract.static_sizes:  # its VAE runs at the built sizes only (a request asking is refused by validate)
        return components
    tile = limits.vae_tile or contract.vae_tile or 64 * contract.vae_scale_factor  # 64 latents: SD's 512 pixels
    return replace(components, vae=TiledVAE(components.vae, tile, contract.vae_scale_factor,
                                            tiling_policy(request.vae_tiling, limits.vae_tile_above)))
