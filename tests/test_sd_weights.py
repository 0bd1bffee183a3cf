"""Stable Diffusion weights without a hub: the real CLIP tokenizer, tiny and full-size random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from build.sd.families import ARCHITECTURES
from build.sd.weights import CLIP_VOCAB_SIZE, clip_tokenizer, load_sd, write_sd_checkpoint
from kiln.errors import WeightsError


@pytest.fixture(scope="module")
def tiny_sd(sd_checkpoint):
    return sd_checkpoint


def test_tokenizer_is_the_real_clip_vocabulary():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token_id == 49407


def test_tiny_checkpoint_is_a_diffusers_folder(tiny_sd):
    for name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "controlnet"):
        assert (tiny_sd / name).exists(), name
    assert not list(tiny_sd.rglob("*.bin")), "weights must be safetensors"
    assert json.loads((tiny_sd / "kiln-weights.json").read_text())["random"] is True
    assert json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"


def test_loader_reads_it_like_a_user_checkpoint(tiny_sd):
    loaded = load_sd(tiny_sd)
    assert loaded.random and loaded.controlnet is not None
    assert len(loaded.tokenizer) == CLIP_VOCAB_SIZE
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.unet.config.cross_attention_dim == loaded.text_encoder.config.hidden_size


def test_checkpoints_are_seeded(tmp_path, tiny_sd):
    again = write_sd_checkpoint(tmp_path / "again", size="tiny", seed=0, controlnet=False)
    a, b = load_sd(tiny_sd), load_sd(again)
    for name, tensor in a.unet.state_dict().items():
        assert torch.equal(tensor, b.unet.state_dict()[name]), name
    assert b.controlnet is None


def test_diffusers_pipeline_runs_on_it(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_full_size_architecture_is_sd15():
    """Parameter counts of the full-size configs, built on the meta device (no memory, no time)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHITECTURES["full"].unet)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 859.5


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="no such file or folder"):
        load_sd(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="cannot load a Stable Diffusion checkpoint"):
        load_sd(tmp_path / "empty")


def test_controlnet_names(tmp_path):
    """--controlnet PATH or NAME=PATH, repeatable: names select ControlNets in requests, so they are checked."""
    from build.sd.weights import controlnet_sources

    (tmp_path / "control_v11p_sd15_canny").mkdir()
    (tmp_path / "ckpt" / "controlnet").mkdir(parents=True)
    canny = tmp_path / "control_v11p_sd15_canny"
    assert controlnet_sources(None, tmp_path / "ckpt") == {"controlnet": tmp_path / "ckpt" / "controlnet"}
    assert controlnet_sources(None, tmp_path) == {}
    assert controlnet_sources((str(canny), f"depth={canny}"), tmp_path) == {"control_v11p_sd15_canny": canny,
                                                                           "depth": canny}
    assert controlnet_sources("owner/sd-controlnet-canny", tmp_path) == {
        "sd-controlnet-canny": Path("owner/sd-controlnet-canny")}
    with pytest.raises(WeightsError, match="two ControlNets named 'depth'"):
        controlnet_sources((f"depth={canny}", f"depth={canny}"), tmp_path)
    with pytest.raises(WeightsError, match="must be 1-64 letters"):
        controlnet_sources((f"my depth={canny}",), tmp_path)


def test_a_controlnet_of_another_architecture_is_refused(tmp_path):
    """A full-size (SD 1.5) ControlNet cannot feed the tiny UNet: the build says so before exporting anything."""
    from diffusers import ControlNetModel

    from build.sd import sd_specs
    from kiln.errors import ExportError

    loaded = load_sd(write_sd_checkpoint(tmp_path / "tiny", size="tiny", controlnet=False))
    with torch.device("meta"):
        loaded.controlnets["sd15"] = ControlNetModel(**ARCHITECTURES["full"].controlnet)
    with pytest.raises(ExportError, match="ControlNet 'sd15' does not fit this UNet: its block_out_channels"):
        sd_specs(loaded)
