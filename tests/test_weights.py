"""Weight loading: local folders, single safetensors files, hub ids without a network, refusals."""

from __future__ import annotations

import pytest
import torch

from build.vit.weights import load_vit, save_vit_checkpoint
from kiln.errors import WeightsError


def test_random_weights_are_seeded_and_flagged():
    a = load_vit(random_weights=True, seed=3)
    b = load_vit(random_weights=True, seed=3)
    assert a.random and "random" in a.source
    assert torch.equal(a.model.head.weight, b.model.head.weight)
    assert not torch.equal(a.model.head.weight, load_vit(random_weights=True, seed=4).model.head.weight)


def test_folder_round_trip(tmp_path, vit_model):
    folder = save_vit_checkpoint(vit_model, tmp_path / "ckpt")
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    loaded = load_vit(str(folder))
    assert not loaded.random
    for (name, ours), (_, theirs) in zip(vit_model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(ours, theirs), name
    assert tuple(loaded.model.pretrained_cfg["mean"]) == tuple(vit_model.pretrained_cfg["mean"])


def test_single_safetensors_file(tmp_path, vit_model):
    full = load_vit(random_weights=True, seed=1).model  # a lone file has no config: ViT-B/16's shape
    folder = save_vit_checkpoint(full, tmp_path / "ckpt")
    loaded = load_vit(str(folder / "model.safetensors"))
    assert torch.equal(loaded.model.cls_token, full.cls_token)
    # the tiny ViT's file without its config.json does not fit ViT-B/16: said so, no traceback from torch
    tiny = save_vit_checkpoint(vit_model, tmp_path / "tiny")
    with pytest.raises(WeightsError, match="tiny/model.safetensors does not fit VisionTransformer: .*size mismatch"):
        load_vit(str(tiny / "model.safetensors"))


def test_the_tiny_folder_keeps_its_shape_and_says_it_is_random(tiny_vit, vit_model, tmp_path):
    """`kiln weights vit --tiny`: config.json's model_args give the shape (timm's save_for_hf key), and
    kiln-weights.json marks the weights random, as `kiln weights sd` does; a folder written from the model keeps
    the shape; model_args the architecture does not take are refused naming them."""
    import json

    from build.vit.weights import TINY_VIT_ARGS

    assert json.loads((tiny_vit / "config.json").read_text())["model_args"] == TINY_VIT_ARGS
    loaded = load_vit(str(tiny_vit))
    assert loaded.random and len(loaded.model.blocks) == 12 and loaded.model.embed_dim == 64
    assert loaded.model.patch_embed.num_patches == 196 and loaded.model.num_classes == 1000
    config = json.loads((tiny_vit / "config.json").read_text())
    config["model_args"] = {"depth": 2, "no_such_argument": 1}
    (tmp_path / "model.safetensors").symlink_to(tiny_vit / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="model_args .*no_such_argument.* do not fit 'vit_base_patch16_224'"):
        load_vit(str(tmp_path))


def test_pickled_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="never unpickled"):
        load_vit(str(path))


def test_wrong_architecture_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"not_a_vit.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(WeightsError, match="does not fit"):
        load_vit(str(path))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="no model.safetensors"):
        load_vit(str(tmp_path))


def test_hub_id_without_network_fails_clearly(monkeypatch):
    # This machine has no route to the hub; offline mode makes the failure immediate instead of a timeout.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="cannot fetch .* local folder"):
        load_vit("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")


def test_exactly_one_source():
    with pytest.raises(WeightsError, match="exactly one"):
        load_vit()
    with pytest.raises(WeightsError, match="exactly one"):
        load_vit("x/y", random_weights=True)
    with pytest.raises(WeightsError, match="no such file"):
        load_vit("./missing-folder")
