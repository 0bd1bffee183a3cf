"""Stable Diffusion components: specs derived from the checkpoint, ONNX export, parity with PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from build.sd import ImageRange, axis_sizes, sd_specs
from build.sd.export import check_component, export_component, export_modules
from build.sd.weights import load_sd


@pytest.fixture(scope="module")
def tiny(sd_checkpoint):
    loaded = load_sd(sd_checkpoint)
    return loaded, sd_specs(loaded, ImageRange(32, 64, 128)), export_modules(loaded)


def test_specs_follow_the_checkpoint(tiny):
    loaded, specs, _ = tiny
    assert set(specs) == {"text_encoder", "unet", "unet_control", "controlnet", "vae_encoder", "vae_decoder"}
    context = specs["unet"].inputs[2]
    assert context.shape[-1] == loaded.text_encoder.config.hidden_size == loaded.unet.config.cross_attention_dim
    # The ControlNet's outputs are exactly the UNet-with-residuals' extra inputs.
    assert [t.name for t in specs["controlnet"].outputs] == [t.name for t in specs["unet_control"].inputs[3:]]


def test_controlnet_residual_shapes_match_the_real_model(tiny):
    loaded, specs, _ = tiny
    sizes = axis_sizes(loaded, batch=1, height=64, width=96)
    x = specs["controlnet"].sample_inputs(seed=0, **sizes)
    with torch.inference_mode():
        down, mid = loaded.controlnet(torch.from_numpy(x["sample"]), torch.from_numpy(x["timestep"]),
                                      torch.from_numpy(x["encoder_hidden_states"]),
                                      torch.from_numpy(x["controlnet_cond"]), return_dict=False)
    expected = [tuple(t.shape) for t in (*down, mid)]
    assert [o.concrete_shape(sizes) for o in specs["controlnet"].outputs] == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", ["text_encoder", "unet", "unet_control", "controlnet", "vae_encoder", "vae_decoder"])
def test_export_matches_pytorch_at_other_shapes(tiny, model_repo, name):
    """The build exported each component at 64x64, batch 2, one prompt chunk (and checked it at 80x64); here it is
    checked again at 96x64, batch 3, two chunks: every axis is dynamic."""
    loaded, specs, modules = tiny
    path = model_repo / f"sd_{name}" / "1" / "model.onnx"
    figures = check_component(modules[name], specs[name], path,
                              axis_sizes(loaded, batch=3, height=96, width=64, chunks=2))
    reference = figures[specs[name].reference_output]
    assert reference.cosine >= 0.99999 and reference.max_abs <= 1e-3


@pytest.mark.slow
def test_a_model_past_two_gigabytes_keeps_its_weights_in_one_data_file(tiny, tmp_path, monkeypatch):
    """The full-size UNet is past protobuf's 2 GB: its weights go to one model.onnx.data beside it. Forced here on
    the tiny text encoder by making the exporter write external data, as it does past the limit."""
    import torch.onnx

    loaded, specs, modules = tiny
    export = torch.onnx.export

    def external(*args, **kwargs):  # the legacy exporter splits a model past 2 GB into one file per tensor
        export(*args, **kwargs)
        import onnx

        model = onnx.load(args[2])
        onnx.save_model(model, args[2], save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)

    monkeypatch.setattr(torch.onnx, "export", external)
    path = tmp_path / "model.onnx"
    export_component(modules["text_encoder"], specs["text_encoder"], path, axis_sizes(loaded, batch=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    figures = check_component(modules["text_encoder"], specs["text_encoder"], path,
                              axis_sizes(loaded, batch=3, chunks=2))
    assert figures["last_hidden_state"].cosine >= 0.99999


def test_unet_with_zero_residuals_equals_plain_unet(tiny):
    loaded, specs, modules = tiny
    sizes = axis_sizes(loaded, batch=2)
    x = specs["unet_control"].sample_inputs(seed=3, **sizes)
    args = [torch.from_numpy(x[n]) for n in specs["unet"].input_names]
    zeros = [torch.zeros(t.concrete_shape(sizes)) for t in specs["unet_control"].inputs[3:]]
    with torch.inference_mode():
        plain = modules["unet"](*args)
        with_zero = modules["unet_control"](*args, *zeros)
    assert torch.equal(plain, with_zero)


def test_vae_decoder_applies_the_checkpoint_scaling_factor(tiny):
    loaded, _, modules = tiny
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = modules["vae_decoder"](latent)
        theirs = loaded.vae.decode(latent / loaded.vae.config.scaling_factor).sample
    assert np.array_equal(ours.numpy(), theirs.numpy())


def test_random_controlnet_has_non_zero_residuals(tiny):
    loaded, specs, _ = tiny
    x = specs["controlnet"].sample_inputs(seed=0, **axis_sizes(loaded, batch=1))
    with torch.inference_mode():
        down, mid = loaded.controlnet(torch.from_numpy(x["sample"]), torch.from_numpy(x["timestep"]),
                                      torch.from_numpy(x["encoder_hidden_states"]),
                                      torch.from_numpy(x["controlnet_cond"]), return_dict=False)
    assert all(t.abs().max() > 0 for t in (*down, mid))


@pytest.mark.slow
def test_step_models_wait_for_no_batching_partners(model_repo):
    """The service's step batcher merges the steps; a queue delay on the models each step calls would only add to
    every step. The once-per-image models keep theirs."""
    from kiln.model_config import read_config

    def delay(model: str) -> int:
        return read_config(model_repo / model / "config.pbtxt").dynamic_batching.max_queue_delay_microseconds

    assert [delay(m) for m in ("sd_unet", "sd_unet_control", "sd_controlnet", "sd_controlnet_2")] == [0, 0, 0, 0]
    assert delay("sd_vae_decoder") == delay("sd_vae_encoder") == 2000
