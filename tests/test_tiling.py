"""AUTOMATIC1111's tiling (seamless images): the build's UNet and VAE exported again with every convolution padding
circularly (its sd_hijack.apply_circular), served beside the plain ones and chosen per request; the same images as
diffusers with circular convolutions, in process and through Triton; what cannot be seamless is refused by name.

The session repository is built with --tiling.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.errors import InputError
from orchestrator.pipeline import ControlNetUnit, Img2ImgRequest, Pipeline, Txt2ImgRequest
from tests.conftest import diffusers_image, diffusers_pipeline, encode

pytestmark = pytest.mark.slow
BASE = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=4, sampler="Euler a", cfg_scale=7.5, seed=3,
            width=64, height=96)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def circular(sd_checkpoint):
    """diffusers' pipeline with every Conv2d of the UNet and the VAE padding circularly, as AUTOMATIC1111 tiles."""
    pipe = diffusers_pipeline(sd_checkpoint)
    for module in [*pipe.unet.modules(), *pipe.vae.modules()]:
        if isinstance(module, torch.nn.Conv2d):
            module.padding_mode = "circular"
    return pipe, dict(pipe.scheduler.config)


def test_txt2img_and_img2img_match_diffusers_with_circular_padding(local, circular):
    pipe, config = circular
    seamless = local.txt2img(Txt2ImgRequest(**BASE, tiling=True))
    assert _max_diff(seamless.images, diffusers_image(pipe, config, BASE)) <= 2  # measured: 1
    assert _max_diff(seamless.images, local.txt2img(Txt2ImgRequest(**BASE)).images) > 10
    assert seamless.info["tiling"] is True

    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 64, 3), dtype=np.uint8))
    result = local.img2img(Img2ImgRequest(**BASE, tiling=True, init_image=encode(start), denoising_strength=0.5))
    assert _max_diff(result.images, diffusers_image(pipe, config, BASE, init=start)) <= 2  # the seamless VAE encodes


def test_triton_gives_the_in_process_images(triton, local):
    from orchestrator.pipeline.components.triton import triton_components

    served = Pipeline(triton_components(triton.grpc_url))
    try:
        request = Txt2ImgRequest(**(BASE | {"batch_size": 2}), tiling=True)
        assert np.array_equal(served.txt2img(request).images, local.txt2img(request).images)
    finally:
        served.close()


def test_what_cannot_be_seamless_is_refused(local):
    control = encode(Image.new("RGB", (64, 96), (255, 255, 255)))
    cases = [(Txt2ImgRequest(**BASE, tiling=True, controlnet=ControlNetUnit(image=control)),
              "tiling with ControlNet"),
             (Txt2ImgRequest(**BASE, tiling=True, vae="anime-vae.safetensors"), "tiling with another VAE")]
    for request, message in cases:
        with pytest.raises(InputError, match=message):
            local.txt2img(request)
    plain_build = Pipeline(replace(local.components, unet_tiling=None, vae_tiling=None))
    with pytest.raises(InputError, match=r"no seamless models; rebuild with `kiln build sd --tiling`"):
        plain_build.txt2img(Txt2ImgRequest(**BASE, tiling=True))
