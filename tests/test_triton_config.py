"""Triton configs come from typed data through the protobuf message; golden files pin the output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from build.triton_config import DynamicBatching, EnsembleStep, ModelConfig, Tensor
from build.vit import VIT_SPEC, ViTBuildOptions, vit_model_configs
from kiln.errors import ConfigError
from kiln.imaging import EvalTransform
from kiln.model_config import read_config

GOLDEN = Path(__file__).parent / "golden"
TRANSFORM = EvalTransform(resize=248, crop=(224, 224), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)


def _configs(**options):
    return vit_model_configs(ViTBuildOptions(random_weights=True, **options), TRANSFORM)


GPU_PYTHON = {"device": "gpu", "backend": "torch-cuda", "precision": "fp16"}


@pytest.mark.parametrize("mode, options", [
    ("python", {}),
    ("python-gpu-torch-cuda-fp16", GPU_PYTHON),
    ("native-openvino-int8", {"triton_backend": "native", "backend": "openvino", "precision": "int8"}),
    ("native-openvino-bf16-threads", {"triton_backend": "native", "backend": "openvino", "precision": "bf16",
                                      "threads": 2}),
    ("native-gpu-cuda-fp16", {"triton_backend": "native", "device": "gpu", "backend": "onnxruntime-cuda",
                              "precision": "fp16"}),
    ("native-gpu-tensorrt-fp16", {"triton_backend": "native", "device": "gpu", "backend": "onnxruntime-tensorrt",
                                  "precision": "fp16"}),
])
def test_vit_configs_match_golden_files(mode, options):
    update = os.environ.get("UPDATE_GOLDEN") == "1"
    for config in _configs(**options):
        path = GOLDEN / mode / f"{config.name}.pbtxt"
        if update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(config.to_pbtxt())
        assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
        assert config.to_pbtxt() == path.read_text(), f"{config.name} differs from {path}"


def test_vit_torch_compile_is_a_parameter_of_the_cuda_program_only(tmp_path, kiln):
    """kiln build vit --torch-compile: the served torch.export program on CUDA captures its CUDA graphs from
    torch.compile's kernels (the session reads the parameter, as the SD step models' do); any other variant is refused,
    naming what it serves."""
    from kiln.model_config import read_served
    from kiln.runtime import served_device

    configs = {c.name: c for c in _configs(torch_compile=True, **GPU_PYTHON)}
    assert configs["vit"].parameters["torch_compile"] == "1"
    assert all("torch_compile" not in c.parameters for name, c in configs.items() if name != "vit")
    served = read_served(configs["vit"].write(tmp_path))
    assert served.torch_compile == "1" and served_device(served)["torch_compile"] is True
    assert "torch_compile" not in {c.name: c for c in _configs(**GPU_PYTHON)}["vit"].parameters
    for options in ({}, {"device": "gpu", "backend": "torch-aoti-cuda", "precision": "fp16"}):
        with pytest.raises(ConfigError, match="--torch-compile compiles the CUDA graphs of a torch.export program on a "
                                              "GPU .*; the ViT serves (onnxruntime-fp32|torch-aoti-cuda-fp16)"):
            _configs(torch_compile=True, **options)
    # the command refuses it before it loads or exports anything
    code, _out, err = kiln("build", "vit", "--random-weights", "--torch-compile", "--repo", tmp_path / "repo")
    assert code != 0 and "the ViT serves onnxruntime-fp32" in err and "Traceback" not in err
    assert not (tmp_path / "repo").exists()


def test_configs_round_trip_through_protobuf(tmp_path):
    for config in _configs():
        written = config.write(tmp_path)
        assert (tmp_path / config.name / "1").is_dir()
        assert read_config(written) == config.to_proto()


def test_vit_config_is_derived_from_the_spec():
    vit = next(c for c in _configs() if c.name == "vit")
    native = next(c for c in _configs(triton_backend="native", backend="openvino") if c.name == "vit")
    assert [t.name for t in native.inputs] == VIT_SPEC.input_names  # no optional image inputs there
    # A Python-backend vit takes the image as float32 pixel_values or uint8 pixels, either one (its model.py checks)
    assert [(t.name, t.dtype, t.optional) for t in vit.inputs] == [
        ("pixel_values", "FP32", True), ("pixels", "UINT8", True), ("layer", "INT64", True)]
    assert vit.inputs[0].dims == vit.inputs[1].dims == (3, 224, 224)
    assert json.loads(vit.parameters["byte_inputs"]) == {"pixel_values": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    assert [t.name for t in vit.outputs] == VIT_SPEC.output_names
    assert vit.max_batch_size == VIT_SPEC.profile["batch"][2] > 1
    assert vit.dynamic_batching is not None


@pytest.mark.parametrize("options, wire", [({}, "pixel_values"), (GPU_PYTHON, "pixels"),
                                           ({"triton_backend": "native", "backend": "openvino"}, "pixel_values")])
def test_ensembles_wire_existing_tensors(options, wire):
    """Every ensemble step reads tensors that exist; vit_preprocess hands `vit` uint8 pixels only where a GPU scales
    them (elsewhere the decode pool scales them in parallel, and a native backend takes floats only)."""
    configs = {c.name: c for c in _configs(**options)}
    assert [t.name for t in configs["vit_preprocess"].outputs] == [wire, "layer"]
    assert configs["vit_preprocess"].parameters["scaled"] == str(wire == "pixel_values").lower()
    for ensemble in (configs["vit_classify"], configs["vit_embed"]):
        available = {t.name for t in ensemble.inputs}
        for step in ensemble.steps:
            model = configs[step.model_name]
            model_inputs = {t.name for t in model.inputs}
            model_outputs = {t.name for t in model.outputs}
            assert set(step.input_map) <= model_inputs
            assert set(step.input_map.values()) <= available, \
                f"{ensemble.name}: {step.model_name} reads an unset tensor"
            assert set(step.output_map) <= model_outputs
            available |= set(step.output_map.values())
        assert {t.name for t in ensemble.outputs} <= available


@pytest.mark.parametrize("options, count", [({}, 1), (GPU_PYTHON, 2), (GPU_PYTHON | {"instances": 1}, 1),
                                            ({"instances": 3, "threads": 1}, 3),
                                            ({"triton_backend": "native", "device": "gpu",
                                              "backend": "onnxruntime-cuda", "precision": "fp16"}, 2)])
def test_vit_runs_as_many_copies_as_asked_two_on_a_gpu(options, count):
    """--instances: Triton's instance_group count of `vit` (each copy its own session); auto gives a GPU two, so that
    one copy's host work overlaps the other's compute, and a CPU one (its session uses every core). Only `vit`:
    the decode pool and the label lookup are one copy each."""
    configs = {c.name: c for c in _configs(**options)}
    assert configs["vit"].instance_count == count
    assert configs["vit"].to_proto().instance_group[0].count == count
    assert configs["vit_preprocess"].instance_count == configs["vit_postprocess"].instance_count == 1
    with pytest.raises(ConfigError, match="--instances must be 0 \\(auto\\) or more, got -1"):
        _configs(**options | {"instances": -1})


def test_invalid_configs_are_rejected():
    with pytest.raises(ConfigError, match="unknown dtype"):
        Tensor("x", "FLOAT", (1,))
    with pytest.raises(ConfigError, match="ensemble"):
        ModelConfig("e", (), (), backend=None, platform="ensemble")
    with pytest.raises(ConfigError, match="max_batch_size"):
        ModelConfig("m", (), (), dynamic_batching=DynamicBatching())
    with pytest.raises(ConfigError, match="only an ensemble"):
        ModelConfig("m", (), (), steps=(EnsembleStep("a", {}, {}),))
    with pytest.raises(ConfigError, match="invalid model config"):
        ModelConfig("m", (Tensor("x", "FP32", (1,)),), (), kind="KIND_TPU").to_proto()
