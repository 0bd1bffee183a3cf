"""Single-file SD 1.x checkpoints (the original layout AUTOMATIC1111 loads), read by diffusers' own loader offline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from build.sd.families import ARCHITECTURES
from build.sd.single_file import (
    CONV_IN,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    inspect_single_file,
    ldm_state_dict,
    write_family_config,
    write_single_file,
)
from build.sd.weights import CLIP_VOCAB_SIZE, clip_text_config, load_sd, write_sd_checkpoint
from kiln.errors import WeightsError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny diffusers folder and the same checkpoint as one original-layout file."""
    root = tmp_path_factory.mktemp("single")
    folder = write_sd_checkpoint(root / "tiny", size="tiny", seed=3, controlnet=False)
    return folder, write_single_file(folder, root / "tiny.safetensors")


def test_the_file_has_the_original_layout(tiny):
    _folder, path = tiny
    info = inspect_single_file(path)
    assert info["in_channels"] == 4 and info["cross_attention_dim"] == 32
    assert json.loads(info["metadata"]["kiln-weights"])["random"] is True
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        # An attention projection of the VAE is a 1x1 convolution in the original layout.
        assert handle.get_slice(VAE_PREFIX + "decoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    for key in (UNET_PREFIX + "input_blocks.3.0.op.weight", UNET_PREFIX + "middle_block.1.proj_in.weight",
                UNET_PREFIX + "output_blocks.2.2.conv.weight", UNET_PREFIX + "output_blocks.2.1.proj_out.weight",
                VAE_PREFIX + "decoder.up.1.upsample.conv.weight", VAE_PREFIX + "encoder.norm_out.weight",
                TEXT_PREFIX + "text_model.embeddings.position_embedding.weight", CONV_IN):
        assert key in keys, key


def test_diffusers_reads_it_back_tensor_for_tensor(tiny):
    """diffusers' from_single_file (config from the folder) gives back every tensor of the folder, exactly."""
    folder, path = tiny
    original, single = load_sd(folder), load_sd(path, config=folder)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys(), name
        for key, tensor in a.items():
            assert torch.equal(tensor, b[key]), (name, key)
    assert single.random and single.source == str(path) and single.controlnet is None
    assert len(single.tokenizer) == CLIP_VOCAB_SIZE and single.scheduler_config == original.scheduler_config


@pytest.mark.parametrize("in_channels", [4, 9])
def test_default_config_is_sd15(tmp_path, in_channels):
    """Without --config a file is read with SD 1.5's configs: diffusers' own conversion of a full-size file in
    the original layout (built on the meta device: names and shapes, no memory) fills exactly that UNet and VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    config = write_family_config(tmp_path / "sd15", in_channels=in_channels)
    arch = ARCHITECTURES["full"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(config / "vae")))
        reference = UNet2DConditionModel(**(arch.unet | {"in_channels": in_channels}))
    assert unet.config.in_channels == in_channels and vae.config.scaling_factor == 0.18215
    text = clip_text_config(arch.text_encoder)
    assert json.loads((config / "text_encoder" / "config.json").read_text())["hidden_size"] == text.hidden_size == 768
    ldm = ldm_state_dict(reference, vae, torch.nn.Module())
    unet_part = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    vae_part = convert_ldm_vae_checkpoint({k.removeprefix(VAE_PREFIX): v for k, v in ldm.items()
                                           if k.startswith(VAE_PREFIX)}, dict(vae.config))
    for converted, model in ((unet_part, unet), (vae_part, vae)):
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_bad_single_files_are_clear_errors(tmp_path, tiny):
    folder, path = tiny
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not really")
    with pytest.raises(WeightsError, match="pickle checkpoints"):
        load_sd(pickle)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a readable .safetensors"):
        load_sd(garbage)
    other = tmp_path / "vit.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(2, 3, 16, 16)}, str(other))
    with pytest.raises(WeightsError, match="not a Stable Diffusion checkpoint in the original layout"):
        load_sd(other)
    sd2 = tmp_path / "sd2.safetensors"
    save_file({CONV_IN: torch.zeros(2, 4, 3, 3), VAE_PREFIX + "quant_conv.weight": torch.zeros(1),
               "cond_stage_model.model.ln_final.weight": torch.zeros(1)}, str(sd2))
    with pytest.raises(WeightsError, match="SD 2.x"):
        load_sd(sd2)
    # The tiny file read with SD 1.5's configs: its 32-wide cross-attention says it needs --config.
    with pytest.raises(WeightsError, match="pass --config"):
        load_sd(path)
    with pytest.raises(WeightsError, match="no model_index.json"):
        load_sd(path, config=tmp_path)
    with pytest.raises(WeightsError, match="only a single-file checkpoint takes a config"):
        load_sd(folder, config=folder)
    # A config that does not describe the file (an inpainting UNet's 9 input channels): diffusers' error, named.
    inpainting = write_sd_checkpoint(tmp_path / "inpainting", size="tiny", controlnet=False, inpainting=True)
    with pytest.raises(WeightsError, match="cannot load the single-file checkpoint"):
        load_sd(path, config=inpainting)


def test_a_controlnet_single_file_reads_back_tensor_for_tensor(tmp_path, tiny):
    """sd-webui-controlnet's files: the original layout with or without "control_model.", its architecture that
    of a ControlNet for the checkpoint's UNet. The tiny UNet's ControlNet here has SD's 8x conditioning embedding,
    which the build then refuses for the tiny (2x) VAE, naming why."""
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    from build.sd import sd_specs
    from build.sd.single_file import CONTROLNET_PREFIX, load_controlnet_single_file, write_controlnet_single_file
    from kiln.errors import ExportError

    folder, _path = tiny
    loaded = load_sd(folder)
    torch.manual_seed(0)
    control = ControlNetModel.from_unet(loaded.unet, load_weights_from_unet=False).eval()
    for parameter in control.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    prefixed = write_controlnet_single_file(control, tmp_path / "control_tiny.safetensors")
    assert CONTROLNET_PREFIX + "input_hint_block.14.weight" in load_file(str(prefixed))
    bare = tmp_path / "bare.safetensors"
    save_file({k.removeprefix(CONTROLNET_PREFIX): v for k, v in load_file(str(prefixed)).items()}, str(bare))
    for path in (prefixed, bare):
        back = load_sd(folder, controlnet=(str(path),)).controlnets["control_tiny" if path == prefixed else "bare"]
        for key, tensor in control.state_dict().items():
            assert torch.equal(tensor, back.state_dict()[key]), (path.name, key)
    loaded.controlnets["control_tiny"] = back
    with pytest.raises(ExportError, match="scales the control image down 8x, the VAE's latents are 2x smaller"):
        sd_specs(loaded)
    with pytest.raises(WeightsError, match="pickle checkpoints"):
        load_controlnet_single_file(tmp_path / "control_sd15_canny.pth", loaded.unet)
    with pytest.raises(WeightsError, match="not a ControlNet"):
        load_controlnet_single_file(_path, loaded.unet)


def test_a_controlnet_for_sd15_is_sd15s_controlnet():
    """Without a config, a ControlNet file takes the architecture of a ControlNet for the checkpoint's UNet:
    for SD 1.5's UNet that is SD 1.5's ControlNet."""
    from diffusers import UNet2DConditionModel

    from build.sd.single_file import controlnet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHITECTURES["full"].unet)
    config = controlnet_config(unet)
    for key, value in ARCHITECTURES["full"].controlnet.items():
        assert (tuple(config[key]) if isinstance(value, tuple) else config[key]) == value, key


@pytest.mark.slow
def test_kiln_writes_and_builds_a_single_file(tmp_path, kiln):
    """`kiln weights sd --single-file`, then `kiln build sd --weights FILE --config DIR`: the user's path, end to
    end."""
    folder, path, repo = tmp_path / "tiny", tmp_path / "tiny.safetensors", tmp_path / "repo"
    code, _, err = kiln("weights", "sd", "--tiny", folder, "--single-file", path)
    assert code == 0 and path.is_file(), err
    code, _, err = kiln("build", "sd", "--weights", path, "--repo", repo)
    assert code == 2 and "pass --config" in err and "Traceback" not in err
    for stale in ("sd_controlnet_2", "sd_controlnet_unet_2"):  # what an earlier build with two ControlNets left
        (repo / stale / "1").mkdir(parents=True)
        (repo / stale / "config.pbtxt").write_text(f'name: "{stale}"\n')
    # A single file carries no ControlNet: the checkpoint folder's, named by the user.
    code, _, err = kiln("build", "sd", "--weights", path, "--config", folder, "--repo", repo,
                        "--controlnet", f"edges={folder / 'controlnet'}", "--opt-size", "64", "--max-size", "128")
    assert code == 0, err
    report = json.loads((repo / "build-report.json").read_text())["sd"]
    assert report["weights"] == {"source": str(path), "random": True}
    assert {"sd_controlnet", "sd_controlnet_unet", "sd_unet_control"} <= set(report["models"])
    assert not (repo / "sd_controlnet_2").exists() and not (repo / "sd_controlnet_unet_2").exists()
    unet_config = (repo / "sd_unet" / "config.pbtxt").read_text()
    assert 'key: "model_name"\n  value {\n    string_value: "tiny"\n' in unet_config
    assert '\\"name\\": \\"edges\\"' in unet_config
