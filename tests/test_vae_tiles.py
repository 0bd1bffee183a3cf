"""VAE tiled decode and encode (orchestrator.pipeline.vae_tiles) against diffusers' own (AutoencoderKL with
enable_tiling()) on the tiny weights: the served models' tiles blended as diffusers blends them, within 2/255 of
diffusers' tiled images; chosen by request or above the service's size; and through the API (`vae_tiling`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.pipeline import Img2ImgRequest, Limits, Pipeline, Txt2ImgRequest
from orchestrator.pipeline.vae_tiles import TiledVAE, tiled_decode
from tests.conftest import diffusers_image, diffusers_pipeline, encode


@pytest.fixture(scope="module")
def reference(plain_checkpoint):
    """diffusers' pipeline over the same weights, its VAE tiling on (tile = the VAE's sample size, 64 here)."""
    pipe = diffusers_pipeline(plain_checkpoint)
    pipe.vae.enable_tiling()
    return pipe


@pytest.fixture(scope="module")
def local(plain_repo) -> Pipeline:
    return Pipeline.from_repository(plain_repo)


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_the_build_records_the_vaes_tile(local, reference):
    assert local.contract.vae_tile == reference.vae.config.sample_size == 64


def test_tiled_decode_matches_diffusers(local, reference):
    contract, vae = local.contract, local.components.vae
    latents = torch.Generator().manual_seed(3)
    latents = torch.randn((2, 4, 48, 64), generator=latents)  # 96x128 pixels: 2 x 3 tiles of 64, not square
    with torch.no_grad():
        expected = reference.vae.decode(latents / contract.scaling_factor).sample.numpy()
    tiled = tiled_decode(vae.decode_pixels, latents.numpy(), contract.vae_tile, contract.vae_scale_factor)
    assert tiled.shape == expected.shape == (2, 3, 96, 128)
    assert np.abs(tiled - expected).max() <= 1e-3
    images = TiledVAE(vae, contract.vae_tile, contract.vae_scale_factor, lambda h, w: True).decode(latents.numpy())
    whole = vae.decode(latents.numpy())
    reference_uint8 = (np.clip(expected / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    assert _diff(images, reference_uint8) <= 2
    assert _diff(images, whole) > 2  # it did tile: the seams' blend is not the whole image's decode


def test_tiled_encode_matches_diffusers(local, reference):
    contract, vae = local.contract, local.components.vae
    pixels = torch.rand((1, 3, 128, 96), generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        expected = reference.vae.encode(pixels).latent_dist.parameters.numpy()
    tiled = TiledVAE(vae, contract.vae_tile, contract.vae_scale_factor, lambda h, w: True).encode_pixels(pixels.numpy())
    assert tiled.shape == expected.shape == (1, 8, 64, 48)
    assert np.abs(tiled - expected).max() <= 1e-3
    assert np.abs(vae.encode_pixels(pixels.numpy()) - expected).max() > 1e-2  # untiled differs: the tiles are real


REQUEST = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=4, sampler="Euler", cfg_scale=7.5, seed=5,
               width=128, height=128)


def test_txt2img_with_vae_tiling_matches_diffusers(local, reference, plain_repo):
    expected = diffusers_image(reference, local.contract.scheduler_config, REQUEST)[0]
    tiled = local.txt2img(Txt2ImgRequest(**REQUEST, vae_tiling=True)).images[0]
    assert _diff(tiled, expected) <= 2
    untiled = local.txt2img(Txt2ImgRequest(**REQUEST, vae_tiling=False)).images[0]
    assert _diff(untiled, tiled) > 2
    # Not asked: the service's size decides (Limits.vae_tile_above, kiln serve --vae-tile-above).
    assert np.array_equal(local.txt2img(Txt2ImgRequest(**REQUEST)).images[0], untiled)  # 128x128 <= 1024x1024
    small = Pipeline(local.components, Limits(vae_tile_above=100 * 100))
    assert np.array_equal(small.txt2img(Txt2ImgRequest(**REQUEST)).images[0], tiled)
    assert np.array_equal(small.txt2img(Txt2ImgRequest(**REQUEST, vae_tiling=False)).images[0], untiled)
    # A smaller tile than the VAE's own: more tiles, other seams, same size.
    finer = Pipeline(local.components, Limits(vae_tile=32)).txt2img(Txt2ImgRequest(**REQUEST, vae_tiling=True))
    assert finer.images[0].shape == tiled.shape and not np.array_equal(finer.images[0], tiled)


def test_img2img_with_vae_tiling_matches_diffusers(local, reference):
    init = Image.fromarray(diffusers_image(reference, local.contract.scheduler_config, REQUEST | {"seed": 9})[0])
    expected = diffusers_image(reference, local.contract.scheduler_config, REQUEST, init=init, strength=0.6)[0]
    request = Img2ImgRequest(**REQUEST, init_image=encode(init), denoising_strength=0.6, vae_tiling=True)
    assert _diff(local.img2img(request).images[0], expected) <= 2


def test_kiln_serve_flags_set_the_tiles(tmp_path, capsys):
    from kiln.cli import build_parser
    from kiln.cli.serve import settings_from
    from kiln.errors import KilnError

    def settings(*flags: str):
        return settings_from(build_parser().parse_args(["serve", "--repo", str(tmp_path), *flags]))

    limits = settings("--vae-tile-above", "0", "--vae-tile", "256").limits
    assert (limits.vae_tile_above, limits.vae_tile) == (0, 256)
    assert settings().limits.vae_tile_above == 1024 * 1024
    with pytest.raises(KilnError, match="--vae-tile must be a multiple of 64"):
        settings("--vae-tile", "100")
    with pytest.raises(SystemExit):  # argparse's error: the flag's type refuses it
        settings("--vae-tile-above", "-1")
    assert "--vae-tile-above: must be at least 0" in capsys.readouterr().err


def test_kiln_generate_takes_vae_tiling(triton, tmp_path, kiln):
    """kiln generate --vae-tiling on|off (the loop here, the models in the session's Triton): tiles change the image."""
    images = {}
    for mode in ("on", "off"):
        out = tmp_path / f"{mode}.png"
        code, _, err = kiln("generate", "a photo of a cat", "--url", triton.grpc_url, "--width", "128", "--height",
                            "128", "--steps", "2", "--seed", "3", "--vae-tiling", mode, "--out", str(out))
        assert code == 0, err
        images[mode] = np.asarray(Image.open(out))
    assert _diff(images["on"], images["off"]) > 2


def test_vae_tiles_never_go_with_seamless_tiling(model_repo):
    from kiln.errors import InputError

    seamless = Pipeline.from_repository(model_repo)  # its build serves the seamless (_tiling) models too
    request = Txt2ImgRequest(**REQUEST, tiling=True)
    seamless.check(request)  # not asked: the seamless VAE decodes the whole image
    assert not isinstance(seamless.parts(request).vae, TiledVAE)
    with pytest.raises(InputError, match="vae_tiling with tiling"):
        seamless.check(Txt2ImgRequest(**REQUEST, tiling=True, vae_tiling=True))
