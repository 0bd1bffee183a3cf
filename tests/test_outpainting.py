"""AUTOMATIC1111's Poor man's outpainting script (its border tiles inpainted side by side, then combined), and the
latent_mask it runs on: the mask the latents are blended by and the fill paints by, taken as given."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from kiln import schemas
from kiln.errors import InputError
from kiln.triton_server import free_port
from orchestrator.pipeline import Img2ImgRequest
from orchestrator.pipeline.requests import SoftInpainting
from orchestrator.pipeline.tiles import split
from orchestrator.pipeline.validate import Limits
from orchestrator.server.outpainting import Outpainting, canvas, outer_tiles, parse, plan
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.test_xyz import pixels


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def square(left: int, top: int, right: int, bottom: int, size: int = 64) -> bytes:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (left, top, right, bottom))
    return png(mask)


MASK, LATENT = square(8, 8, 40, 56), square(24, 16, 56, 40)


def test_the_latent_mask_blends_and_fills_in_place_of_the_mask(local, init_image_png):
    """With a latent mask the latents are blended by it and the fill paints by it, as given (not blurred): a plain
    UNet's image is then the one whose mask is the latent mask, unblurred; the mask itself makes the overlay only."""
    base = dict(prompt="a photo of a cat", steps=6, seed=3, width=64, height=64, init_image=init_image_png,
                denoising_strength=0.8, inpainting_fill=0, overlay=False)
    with_latent = local.img2img(Img2ImgRequest(**base, mask=MASK, mask_blur=6, latent_mask=LATENT))
    as_mask = local.img2img(Img2ImgRequest(**base, mask=LATENT, mask_blur=0))
    assert np.array_equal(with_latent.images, as_mask.images)
    without = local.img2img(Img2ImgRequest(**base, mask=MASK, mask_blur=6))
    assert np.abs(with_latent.images.astype(int) - without.images.astype(int)).max() > 20
    overlaid = local.img2img(Img2ImgRequest(**(base | {"overlay": True}), mask=MASK, mask_blur=0, latent_mask=LATENT))
    init = np.asarray(Image.open(io.BytesIO(init_image_png)).convert("RGB").resize((64, 64), Image.LANCZOS))
    assert np.abs(overlaid.images[0, 56:].astype(int) - init[56:]).max() <= 1  # outside the mask: the init image


@pytest.mark.parametrize(("fields", "message"), [
    ({"mask": b""}, "needs a mask"),
    ({"inpaint_full_res": True}, "with inpaint_full_res"),
    ({"soft_inpainting": SoftInpainting(), "mask_round": False}, "with soft inpainting"),
    ({"latent_mask": square(0, 0, 8, 8, size=32)}, "latent_mask is 32x32; it must be the image's size, 64x64"),
])
def test_a_latent_mask_that_cannot_act_is_refused(local, init_image_png, fields, message):
    base = dict(prompt="a cat", init_image=init_image_png, mask=MASK, latent_mask=LATENT, width=64, height=64, steps=4)
    with pytest.raises(InputError, match=message):
        local.img2img(Img2ImgRequest(**(base | fields)))


def test_the_canvas_grows_as_automatic1111s():
    """Each side asked for grows by `pixels`, the canvas to a multiple of 64, shared in proportion; the mask inset by
    twice the blur, the latent mask by half of it (PIL's rectangles include their far corner)."""
    drawn = canvas(Image.new("RGB", (64, 48), (200, 100, 50)), Outpainting(32, 4, 0, ("left", "right", "up", "down")))
    assert drawn.image.size == (128, 128) and drawn.border == (32, 40, 32, 40)
    image, mask, latent = (np.asarray(x) for x in (drawn.image, drawn.mask, drawn.latent_mask))
    assert (image[40:88, 32:96] == (200, 100, 50)).all() and image[:40].max() == 0
    assert (mask[48:81, 40:89] == 0).all() and mask[47].min() == 255 and mask[:, 89].min() == 255
    assert (latent[42:87, 34:95] == 0).all() and latent[41].min() == 255
    right = canvas(Image.new("RGB", (64, 64)), Outpainting(32, 4, 0, ("right",)))
    assert right.image.size == (128, 64) and right.border == (0, 0, 64, 0)


def test_only_the_tiles_that_reach_the_border_are_inpainted():
    drawn = canvas(Image.new("RGB", (128, 128)), Outpainting(32, 4, 0, ("left", "right", "up", "down")))
    grid = split(drawn.image, 64, 64, 32)
    assert drawn.image.size == (192, 192) and sum(len(row) for row in grid) == 25
    outer = outer_tiles(grid, drawn, 64, 64)
    assert len(outer) == 16 and all((t.x, t.y) != (64, 64) for t in outer)


def body(args, **fields) -> schemas.Img2ImgBody:
    init = base64.b64encode(png(Image.new("RGB", (64, 64), (90, 120, 200)))).decode()
    return schemas.Img2ImgBody(init_images=[init], width=64, height=64, script_name="poor man's outpainting",
                               script_args=args, **fields)


@pytest.mark.parametrize(("args", "fields", "message"), [
    ([4], {}, "pixels must be a whole number from 8 to 256"),
    ([32, 65], {}, "mask_blur must be a whole number from 0 to 64"),
    ([32, 4, "smudge"], {}, "inpainting_fill must be 0 to 3 or one of fill, original"),
    ([32, 4, 0, []], {}, "direction must be a list of some of left, right, up, down"),
    ([32, 4, 0, ["sideways"]], {}, "direction must be a list"),
    ([32], {"batch_size": 2}, "batch_size: poor man's outpainting makes one image"),
    ([32], {"mask": "eA=="}, "mask: poor man's outpainting makes its own masks"),
])
def test_what_cannot_run_is_named(args, fields, message):
    with pytest.raises(InputError, match=message):
        parse(body(args, **fields))


def test_what_the_canvas_cannot_hold_is_named():
    with pytest.raises(InputError, match="tiles of 64x64 .* larger than the 64 pixels of overlap"):
        plan(body([64]), parse(body([64])), Limits())
    with pytest.raises(InputError, match="blurs its tiles' masks by twice it"):
        plan(body([32, 40]), parse(body([32, 40])), Limits())
    assert parse(body([32, 4, "latent noise", ["up"]])).inpainting_fill == 2


@pytest.mark.slow
def test_the_outpainting_through_the_api(triton, tmp_path):
    api = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), outputs_dir=tmp_path / "outputs"))
    init = np.asarray(Image.new("RGB", (64, 64), (90, 120, 200)))
    request = body([32, 4, 0, ["right"]], prompt="a photo of a cat", steps=6, seed=11, denoising_strength=0.9,
                   save_images=True)
    try:
        with api.client() as client:
            answer = client.post("/sdapi/v1/img2img", json=request.model_dump(exclude_defaults=True))
            assert answer.status_code == 200, answer.text
            images, info = answer.json()["images"], json.loads(answer.json()["info"])
            combined = pixels(images[0])
            assert len(images) == 1 and combined.shape == (64, 128, 3)
            assert info["poor_mans_outpainting"]["tiles"] == 2 and info["seed"] == 11
            assert np.array_equal(combined[:, :32], init[:, :32])  # the untouched tile's pixels
            assert combined[:, 96:].max() > 0  # the grown border is painted, not black
            # the last tile is its own inpainting (seed + 1): the canvas's right end is its right half
            _, _, _, bodies = plan(request, parse(request), Limits())
            alone = client.post("/sdapi/v1/img2img", json=bodies[1].model_dump(exclude_defaults=True))
            assert alone.status_code == 200, alone.text
            assert np.abs(combined[:, 96:].astype(int) - pixels(alone.json()["images"][0])[:, 32:]).max() <= 2
            saved = client.get("/v1/outputs").json()["items"]
            assert len([i for i in saved if i["kind"] == "img2img-images"]) == 1 + 1  # the outpainting, the tile
            refused = client.post("/sdapi/v1/img2img", json=request.model_dump(exclude_defaults=True) |
                                  {"n_iter": 2})
            assert refused.status_code == 422 and "makes one image" in refused.text
    finally:
        api.stop()
