"""`kiln build vit`: artifacts, parity against PyTorch, the build report, and refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import build.vit.build as vit_build
from build import auto, parity, report
from build.convert import VIT_VARIANTS as VARIANTS
from build.convert import open_session
from build.specs import Tolerance
from build.vit import VIT_SPEC, ViTBuildOptions, parity_batch
from build.vit.export import reference_outputs
from build.vit.transform import eval_transform
from kiln.errors import ConfigError, ParityError
from kiln.imaging import decode_image
from kiln.model_config import read_config
from kiln.runtime import ByteScale
from tests.conftest import ALL_VIT_VARIANTS


@pytest.mark.slow
def test_report_of_the_served_build(model_repo, vit_model):
    content = report.read_report(model_repo)["vit"]
    assert content["weights"]["random"] is True  # (kiln-weights.json in the folder says so)
    assert content["weights"]["parameters"] == sum(p.numel() for p in vit_model.parameters())
    assert content["served"] == {"backend": "onnxruntime", "precision": "fp32", "artifact": "model.onnx",
                                 "triton_backend": "python", "device": "cpu", "instances": 1, "torch_compile": False,
                                 "caveat": None}
    entry = content["artifacts"]["onnxruntime-fp32"]
    path = model_repo / entry["file"]
    assert entry["sha256"] == report.sha256(path) and entry["size_bytes"] == path.stat().st_size
    assert entry["parity"]["logits"]["cosine"] >= 0.99999 and entry["parity"]["logits"]["top1"] == 1.0
    assert {"torch", "onnx", "onnxruntime", "timm"} <= set(content["versions"])
    assert set(content["models"]) == {"vit_preprocess", "vit", "vit_postprocess", "vit_classify", "vit_embed"}
    for name in content["models"]:
        assert (model_repo / name / "config.pbtxt").exists()
    assert content["preprocess"]["jpeg_draft"] == {"enabled": False}
    assert read_config(model_repo / "vit_preprocess" / "config.pbtxt").parameters["jpeg_draft"].string_value == "false"


@pytest.mark.slow
def test_jpeg_draft_build_reports_what_it_changes(tmp_path, kiln, sample_images, tiny_vit):
    """--jpeg-draft: vit_preprocess is told to decode large JPEGs reduced, and the report gives, for the parity images
    that do, the pixels' PSNR and PyTorch's logits against those of the exact pixels."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    source = Image.open(next(p for p in sample_images if p.suffix == ".jpg")).convert("RGB")
    source.resize((1600, 1200), Image.Resampling.BICUBIC).save(photos / "large.jpg", quality=92)
    source.save(photos / "small.jpg", quality=92)  # under twice the resize target: decoded in full
    code, out, err = kiln("build", "vit", "--weights", tiny_vit, "--variants", "served", "--no-extra-exports",
                          "--jpeg-draft", "--calibration", photos, "--instances", "2", "--repo", tmp_path / "repo")
    assert code == 0, err
    draft = report.read_report(tmp_path / "repo")["vit"]["preprocess"]["jpeg_draft"]
    assert draft["enabled"] and (draft["parity_images"], draft["decoded_reduced"]) == (2, 1), draft
    assert 38 < draft["pixels_psnr_db"] < 80 and draft["logits_vs_exact_pixels"]["cosine"] > 0.999, draft
    assert "1 of 2 parity images decode reduced" in out
    config = read_config(tmp_path / "repo" / "vit_preprocess" / "config.pbtxt")
    assert config.parameters["jpeg_draft"].string_value == "true"
    assert read_config(tmp_path / "repo" / "vit" / "config.pbtxt").instance_group[0].count == 2  # --instances
    assert report.read_report(tmp_path / "repo")["vit"]["served"]["instances"] == 2


@pytest.mark.slow
def test_torch_decode_build_reports_what_it_changes(tmp_path, kiln, sample_images, tiny_vit):
    """--decode torch: vit_preprocess is told to decode with torchvision, and the report gives the parity images'
    pixels and PyTorch's logits against PIL's; what it cannot honour is refused before anything is built."""
    code, out, err = kiln("build", "vit", "--weights", tiny_vit, "--variants", "served", "--no-extra-exports",
                          "--decode", "torch", "--pixel-wire", "uint8", "--repo", tmp_path / "repo")
    assert code == 0, err
    decode = report.read_report(tmp_path / "repo")["vit"]["preprocess"]["decode"]
    jpegs = sum(p.suffix == ".jpg" for p in sample_images)
    assert (decode["decode"], decode["device"], decode["decoded_by_torch"]) == ("torch", "cpu", jpegs), decode
    assert 0 < decode["pixels_max_abs_levels"] <= 16 and decode["pixels_psnr_db"] > 35, decode
    assert decode["logits_vs_pil_pixels"]["cosine"] > 0.999, decode
    assert f"{jpegs} of {len(sample_images)} parity images decoded by torchvision on cpu" in out
    config = read_config(tmp_path / "repo" / "vit_preprocess" / "config.pbtxt")
    assert config.parameters["decode"].string_value == "torch" and config.parameters["scaled"].string_value == "false"
    for flags, message in ((("--pixel-wire", "float32"), "needs --pixel-wire uint8"),
                           (("--pixel-wire", "uint8", "--jpeg-draft"), "choose one")):
        code, _, err = kiln("build", "vit", "--weights", tiny_vit, "--decode", "torch", *flags, "--repo",
                            tmp_path / "refused")
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "refused").exists()


def test_unknown_backend_precision_pair_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid backend-precision pairs: .*openvino-int8"):
        ViTBuildOptions(random_weights=True, backend="onnxruntime", precision="bf16").variant_keys()
    with pytest.raises(ConfigError, match="unknown variant"):
        ViTBuildOptions(random_weights=True, variants=("tensorrt-fp8",)).variant_keys()


def test_variant_dependencies_are_added():
    keys = ViTBuildOptions(random_weights=True, backend="openvino", precision="int8", variants=()).variant_keys()
    assert keys == ["onnxruntime-fp32", "openvino-fp32", "openvino-int8"]
    # "all": every variant this device serves; the torch ones need no ONNX file but it is the parity anchor.
    cpu = ViTBuildOptions(random_weights=True).variant_keys()
    assert {"torch-fp32", "torch-aoti-fp32", "torch-aoti-bf16"} <= set(cpu) and "torch-cuda-fp16" not in cpu
    gpu = ViTBuildOptions(random_weights=True, backend="torch-aoti-cuda", precision="fp16", device="gpu",
                          variants=("torch-aoti-cuda-fp16",)).variant_keys()
    assert gpu == ["onnxruntime-fp32", "torch-aoti-cuda-fp16"]


@pytest.mark.slow
def test_out_of_tolerance_artifact_is_refused_and_removed(tmp_path, monkeypatch):
    impossible = dataclasses.replace(VIT_SPEC, tolerances={**VIT_SPEC.tolerances,
                                                           "fp32": Tolerance(min_cosine=1.5, why="test: impossible")})
    monkeypatch.setattr(vit_build, "VIT_SPEC", impossible)
    with pytest.raises(ParityError, match="cosine .* < 1.5.*test: impossible.*removed"):
        vit_build.build_vit(ViTBuildOptions(random_weights=True, variants=(), extra_exports=(), repository=tmp_path,
                                            progress=False), log=lambda _m: None)
    assert not (tmp_path / "vit" / "1" / "model.onnx").exists()
    assert not (tmp_path / "build-report.json").exists()


@pytest.mark.slow
def test_every_variant_is_within_its_tolerance(all_variants_repo, vit_model, sample_images):
    """Re-open every artifact and compare with PyTorch on the shipped images, independently of the build."""
    repo, result = all_variants_repo
    cpu = {k: VARIANTS[k] for k in ALL_VIT_VARIANTS}  # "all" on the CPU, but for the AOTInductor packages
    assert set(result.artifacts) == set(cpu) | {"safetensors", "torchscript"}
    transform = eval_transform(vit_model)
    pixels, layers = parity_batch(sample_images, transform, len(vit_model.blocks))
    raw = np.stack([transform.pixels(decode_image(p.read_bytes())) for p in sample_images])  # uint8, before scaling
    reference = reference_outputs(vit_model, pixels, layers)
    figures = {}
    for key, variant in cpu.items():
        session = open_session(variant, repo / "vit" / "1" / variant.artifact,
                               byte_inputs={"pixel_values": ByteScale(transform.mean, transform.std)})
        outputs = session.run({"pixel_values": pixels, "layer": layers})
        # uint8 pixels, scaled by the session (the Python-backend vit's `pixels`): the same floats, the same outputs
        scaled = session.run({"pixel_values": raw, "layer": layers})
        for name in outputs:
            np.testing.assert_array_equal(scaled[name], outputs[name], err_msg=f"{key} {name}")
        figures[key] = parity.compare(reference["logits"], outputs["logits"], classify=True)
        tolerance = VIT_SPEC.tolerance(variant.tolerance_key)
        parity.check(key, figures[key], tolerance)
        # Features too (the embedding ensemble serves them), to the precision's cosine: int8's is 0.98, as the
        # logits' (on an AVX2-only CPU, without VNNI, ONNX Runtime's int8 pooled features measured 0.9855)
        for name in ("pooled", "tokens"):
            cosine = parity.compare(reference[name], outputs[name]).cosine
            assert cosine >= min(0.99, tolerance.min_cosine), f"{key} {name}: cosine {cosine}"
        assert result.artifacts[key]["parity"]["logits"]["cosine"] == pytest.approx(figures[key].cosine, abs=1e-6)
    for key in ("onnxruntime-fp32", "openvino-fp32"):
        assert figures[key].max_abs <= 1e-3 and figures[key].top1 == 1.0


def test_a_torch_session_takes_tensors_as_it_takes_arrays(all_variants_repo, vit_model, sample_images):
    """What a torch model on a GPU gets from a client's CUDA shared memory (kiln.runtime.model.read_input): torch
    tensors, float32 pixel_values or uint8 pixels to scale, beside a numpy `layer`. On the CPU the same code path
    casts and scales them: the outputs are those of the numpy inputs, exactly."""
    import torch

    repo, _ = all_variants_repo
    variant = VARIANTS["torch-fp32"]
    transform = eval_transform(vit_model)
    pixels, layers = parity_batch(sample_images, transform, len(vit_model.blocks))
    raw = np.stack([transform.pixels(decode_image(p.read_bytes())) for p in sample_images])
    session = open_session(variant, repo / "vit" / "1" / variant.artifact,
                           byte_inputs={"pixel_values": ByteScale(transform.mean, transform.std)})
    for batch in (pixels, raw):
        arrays = session.run({"pixel_values": batch, "layer": layers})
        tensors = session.run({"pixel_values": torch.from_numpy(batch), "layer": layers})
        for name in arrays:
            np.testing.assert_array_equal(tensors[name], arrays[name], err_msg=f"{batch.dtype} {name}")


def _has_int8_dot_product() -> bool:
    """VNNI or AMX: int8 dot products without the 7-bit weight workaround of plain AVX2."""
    from benchmarks.vit import cpu_ceiling_gflops

    return any("vnni" in flag or flag.startswith("amx") for flag in cpu_ceiling_gflops()["isa"])


@pytest.mark.slow
def test_int8_keeps_cosine_on_in_distribution_images(tmp_path, sample_images):
    """int8 goal: cosine >= 0.998 to fp32 logits on real photographs (not noise), for ViT-B/16 itself (the tests'
    tiny ViT's int8 error is its own: OpenVINO's measured 0.992, inside the build's int8 tolerance).

    OpenVINO int8 on a CPU with only AVX2 (no VNNI) measures 0.9980 on these images with seeded
    random weights (0.9977-0.9978 with its head in int8, whatever the calibration, SmoothQuant on or off):
    there the bar is 0.997, and the build report shows the figure.
    """
    from build.vit import ViTBuildOptions, build_vit
    from build.vit.weights import load_vit

    repo = tmp_path / "repo"
    build_vit(ViTBuildOptions(random_weights=True, repository=repo, progress=False, extra_exports=(),
                              variants=("onnxruntime-int8", "openvino-int8")), log=lambda _m: None)
    vit_model = load_vit(random_weights=True).model  # the build's seeded random weights (seed 0)
    pixels, _ = parity_batch(sample_images, eval_transform(vit_model))
    layers = np.full((len(pixels), 1), 11, dtype=np.int64)
    reference = reference_outputs(vit_model, pixels, layers)["logits"]
    goals = {"onnxruntime-int8": 0.998, "openvino-int8": 0.998 if _has_int8_dot_product() else 0.997}
    for key, goal in goals.items():
        variant = VARIANTS[key]
        outputs = open_session(variant, repo / "vit" / "1" / variant.artifact).run(
            {"pixel_values": pixels, "layer": layers}, ["logits"])
        assert parity.compare(reference, outputs["logits"]).cosine >= goal, key


def test_int8_keeps_the_head_in_float(all_variants_repo, vit_model):
    """OpenVINO int8 (static): the blocks' qkv, fc1 and fc2 read int8 (FakeQuantized) inputs (NNCF's transformer preset
    leaves attn.proj's in float), the head, which makes the logits, does not (its int8 dot products saturate without
    VNNI, and its error is the logits'; see build/vit/build.py)."""
    import openvino as ov

    from build.convert import _producers

    repo, _ = all_variants_repo
    model = ov.Core().read_model(repo / "vit" / "1" / VARIANTS["openvino-int8"].artifact)
    matmuls = [op for op in model.get_ops() if op.get_type_name() == "MatMul"]
    head = next(op for op in matmuls if op.get_friendly_name() == _producers(model, ("logits",))[0])

    def quantized(op) -> bool:
        return op.input_value(0).get_node().get_type_name() == "FakeQuantize"

    int8 = sorted(op.get_friendly_name() for op in matmuls if quantized(op))
    layers = ("attn/qkv", "mlp/fc1", "mlp/fc2")
    assert int8 == sorted(f"/blocks.{b}/{layer}/MatMul" for b in range(len(vit_model.blocks)) for layer in layers)
    assert not quantized(head)


def test_the_precision_a_session_reports_shows_int8_layers(all_variants_repo):
    """OpenVINO's precision hint says f32 for a quantized model; its compiled graph runs int8 layers, and what a
    session reports (the build report's and the benchmarks' "executes in") says so."""
    from kiln.runtime import Session, SessionOptions

    repo, _ = all_variants_repo
    folder = repo / "vit" / "1"
    assert Session(SessionOptions("openvino", folder / VARIANTS["openvino-int8"].artifact)).execution_precision == \
        "int8+f32"
    assert Session(SessionOptions("openvino", folder / VARIANTS["openvino-fp32"].artifact)).execution_precision == "f32"


@pytest.mark.slow
def test_extra_exports_load_back(all_variants_repo, vit_model):
    import torch
    from safetensors.torch import load_file

    repo, result = all_variants_repo
    state = load_file(str(repo / result.artifacts["safetensors"]["file"]))
    assert all(torch.equal(state[k], v) for k, v in vit_model.state_dict().items())
    scripted = torch.jit.load(str(repo / result.artifacts["torchscript"]["file"]))
    x = torch.from_numpy(VIT_SPEC.sample_inputs(seed=5, batch=2)["pixel_values"])
    with torch.inference_mode():
        logits = scripted(x, torch.tensor([[len(vit_model.blocks) - 1], [0]]))[0]
        assert torch.allclose(logits, vit_model(x), atol=1e-4)
    report_json = json.loads((repo / "build-report.json").read_text())
    assert report_json["vit"]["artifacts"]["torchscript"]["parity"]["logits"]["cosine"] > 0.99999


def test_parity_of_identical_zero_outputs_is_perfect():
    zeros = np.zeros((2, 5), np.float32)
    assert parity.compare(zeros, zeros).cosine == 1.0
    assert parity.compare(zeros, np.ones((2, 5), np.float32)).cosine == 0.0


@pytest.mark.slow
def test_auto_serves_the_fastest_variant_measured_here(tmp_path, kiln, monkeypatch, tiny_vit):
    """Which variant wins depends on the CPU (OpenVINO int8 with VNNI, ONNX Runtime int8 without): the test checks
    that the build served what it measured fastest, whatever this machine is. A candidate outside its tolerance
    (bf16 made impossible here) is not served, and the report says so."""
    impossible = dataclasses.replace(VIT_SPEC, tolerances={**VIT_SPEC.tolerances,
                                                           "bf16": Tolerance(min_cosine=1.5, why="test: impossible")})
    monkeypatch.setattr(vit_build, "VIT_SPEC", impossible)
    code, out, err = kiln("build", "vit", "--weights", tiny_vit, "--backend", "auto", "--variants",
                          "onnxruntime-fp32,onnxruntime-int8,openvino-bf16", "--no-extra-exports", "--repo", tmp_path)
    assert code == 0, err
    choice = report.read_report(tmp_path)["vit"]["auto"]
    speeds = {k: v["per_s"] for k, v in choice["candidates"].items()}
    assert set(speeds) == {"onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32"}  # fp32's IR came with bf16
    assert all(s > 0 for s in speeds.values()) and list(choice["rejected"]) == ["openvino-bf16"]
    assert choice["chosen"] == max(speeds, key=speeds.get) and choice["reason"].startswith("fastest of 3")
    assert choice["reason"].endswith("outside tolerance: openvino-bf16")
    assert f"served: vit = {choice['chosen']}" in out
    served = read_config(tmp_path / "vit" / "config.pbtxt").parameters["artifact"].string_value
    assert served == VARIANTS[choice["chosen"]].artifact


def test_auto_refuses_what_it_cannot_measure(kiln, tmp_path):
    code, _, err = kiln("build", "vit", "--random-weights", "--backend", "auto", "--precision", "int8",
                        "--repo", tmp_path)
    assert code == 2 and "--backend auto chooses the precision too" in err
    import torch

    if not torch.cuda.is_available():  # a GPU build is timed on the GPU it serves from
        code, _, err = kiln("build", "vit", "--random-weights", "--backend", "auto", "--triton-backend", "native",
                            "--device", "gpu", "--repo", tmp_path)
        assert code == 2 and "this machine has none" in err


def test_auto_choice_says_why_and_refuses_when_nothing_passed():
    measured = {"a": {"per_s": 10.0}, "b": {"per_s": 12.5}}
    chosen, reason = auto.choose(measured, {"c": "outside tolerance"}, "images/s")
    assert chosen == "b" and reason == ("fastest of 2 within tolerance: 12.50 images/s, 1.25x the next, a (10.00); "
                                        "outside tolerance: c")
    with pytest.raises(ConfigError, match="no variant is inside its tolerance on this machine: c: cosine too low"):
        auto.choose({}, {"c": "cosine too low"}, "images/s")
    figures = auto.throughput(lambda: sum(range(1000)), items=8, repeats=3)
    assert figures["per_s"] > 0 and figures["repeats"] == 3


def test_parity_notes_say_what_was_not_measured_on_a_gpu():
    """ONNX Runtime's GPU variants are checked on this CPU, and their reports say so; torch's CUDA variants are checked
    on the GPU they are built for, and say nothing of the kind."""
    from build.native import parity_note

    for key in ("onnxruntime-cuda-fp16", "onnxruntime-tensorrt-fp16"):
        assert "not run on a GPU here" in parity_note(VARIANTS[key])
    assert parity_note(VARIANTS["torch-cuda-fp16"]) is None and parity_note(VARIANTS["onnxruntime-fp32"]) is None
