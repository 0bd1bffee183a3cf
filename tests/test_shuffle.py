"""Shuffle ControlNets: a ControlNet that pools its residuals (diffusers' global_pool_conditions; sd-webui-controlnet's
global_average_pooling, which it gives to files named "shuffle") acts on the prompt's rows alone, in process and
through Triton's ControlNet -> UNet ensemble, as diffusers' pipeline runs it."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from build.sd import SDBuildOptions, build_sd
from build.sd.weights import random_controlnet
from kiln.errors import InputError
from orchestrator.pipeline import ControlNetUnit, Pipeline, Txt2ImgRequest, make_scheduler
from tests.conftest import IMAGES, diffusers_pipeline, start_triton


@pytest.mark.slow
def test_a_pooling_controlnet_acts_on_the_prompts_rows_as_diffusers_runs_it(tmp_path, plain_checkpoint,
                                                                            edge_map_png):
    from diffusers import StableDiffusionControlNetPipeline

    control = random_controlnet("tiny", seed=13)
    control.register_to_config(global_pool_conditions=True)
    folder = tmp_path / "control_v11e_shuffle"
    control.save_pretrained(str(folder), safe_serialization=True)
    repo = tmp_path / "repo"
    build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=repo, images=IMAGES, progress=False,
                            controlnet=(f"shuffle={folder}",)), log=lambda _m: None)
    local = Pipeline.from_repository(repo)
    assert [(c.name, c.global_pool) for c in local.contract.controlnets] == [("shuffle", True)]
    # pooled in the export and spread back over each residual's size: the UNet's inputs keep their shapes everywhere
    rows = {"sample": np.ones((2, 4, 32, 32), np.float32), "timestep": np.full(2, 500, np.float32),
            "encoder_hidden_states": np.ones((2, 77, 32), np.float32), "conditioning_scale": np.ones(2, np.float32),
            "controlnet_cond": np.random.default_rng(0).random((2, 3, 64, 64), np.float32)}
    residuals = local.components.controlnets["shuffle"].residuals(rows)
    assert residuals["down_residual_0"].shape[2:] == (32, 32)
    for value in residuals.values():
        assert value.shape[2:] != (1, 1) and np.abs(value).max() > 0
        assert np.allclose(value, value[:, :, :1, :1], rtol=0, atol=1e-6)  # one value per channel

    pipe = diffusers_pipeline(plain_checkpoint)
    scheduler_config = dict(pipe.scheduler.config)
    control_pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=control.eval())
    control_pipe.set_progress_bar_config(disable=True)
    control_pipe.scheduler = make_scheduler("Euler a", scheduler_config)
    expected = (control_pipe(
        "a photo of a cat", image=Image.open(io.BytesIO(edge_map_png)), num_inference_steps=6, guidance_scale=7.5,
        negative_prompt="blurry", controlnet_conditioning_scale=0.8, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(5)).images * 255).round().astype(np.uint8)
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=6, sampler="Euler a",
                             cfg_scale=7.5, seed=5, width=64, height=64,
                             controlnet=ControlNetUnit(image=edge_map_png, weight=0.8))
    result = local.txt2img(request).images
    assert np.abs(result.astype(int) - expected.astype(int)).max() <= 2

    # a region mask has no region in a pooled residual (the extension masks before it pools: refused, not guessed)
    with pytest.raises(InputError, match="effective_region_mask on shuffle, a ControlNet that pools its residuals"):
        local.txt2img(replace(request, controlnet=replace(request.controlnet, region_mask=edge_map_png)))

    # Without the pooling rule (residuals on every row, as before) the image is another one: the rule is what matched.
    unpooled = replace(local.contract.controlnets[0], global_pool=False)
    local.components.controlnets = {"shuffle": replace(local.components.controlnets["shuffle"], served=unpooled)}
    assert np.abs(local.txt2img(request).images.astype(int) - expected.astype(int)).max() > 2

    server = start_triton(repo, tmp_path / "triton.log")
    try:
        served = Pipeline.from_triton(server.grpc_url)
        assert served.contract.controlnets[0].global_pool
        assert np.array_equal(served.txt2img(request).images, result)  # the ensemble: pooled residuals, one call
    finally:
        assert server.stop() == 0, server.explain()


def test_a_single_file_named_shuffle_pools_as_the_extension_decides(tmp_path, plain_checkpoint):
    """A ControlNet file carries no config: sd-webui-controlnet pools the residuals of SD 1.x/2.x files whose name
    says "shuffle", and so does kiln's loader; other names do not pool."""
    from diffusers import ControlNetModel

    from build.sd.single_file import write_controlnet_single_file
    from build.sd.weights import load_controlnet, load_sd

    unet = load_sd(plain_checkpoint).unet
    control = ControlNetModel.from_unet(unet, load_weights_from_unet=False).eval()
    for name, pooled in (("control_v11e_sd15_Shuffle", True), ("control_v11p_sd15_canny", False)):
        path = write_controlnet_single_file(control, tmp_path / f"{name}.safetensors")
        assert load_controlnet(path, unet).config.global_pool_conditions is pooled, name
