"""SD variants (OpenVINO fp32/bf16/fp16/int8, ONNX Runtime int8), the in-process loop, and `kiln bench sd` / `serve`.

Tiny seeded-random checkpoints; every model runs for real (ONNX Runtime, OpenVINO, Triton).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from build.convert import SD_VARIANTS, derive
from build.parity import psnr
from build.report import read_report
from build.sd import SDBuildOptions, axis_sizes, build_sd, sd_specs
from build.sd.export import check_component, export_modules
from build.sd.weights import load_sd
from kiln.model_config import read_config
from orchestrator.pipeline import Pipeline, Txt2ImgRequest
from tests.conftest import IMAGES, start_triton

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unet_onnx(plain_checkpoint, plain_repo):
    """The plain build's fp32 UNet export, and the PyTorch module it came from."""
    loaded = load_sd(plain_checkpoint)
    return loaded, sd_specs(loaded, IMAGES)["unet"], export_modules(loaded)["unet"], plain_repo / "sd_unet" / "1" / \
        "model.onnx"


@pytest.mark.parametrize("variant", [v for v, kind in SD_VARIANTS.items() if kind.derived and not kind.calibrated])
def test_each_variant_is_derived_and_checked_against_pytorch(unet_onnx, tmp_path, variant):
    loaded, spec, module, source = unet_onnx
    kind = SD_VARIANTS[variant]
    target = tmp_path / kind.artifact
    derive(kind, source, target)
    figures = check_component(module, spec, target, axis_sizes(loaded, batch=3, height=96, width=64, chunks=2),
                              variant=kind)  # raises ParityError outside the variant's tolerance
    unet = figures["noise_pred"]
    assert unet.cosine >= spec.tolerance(kind.precision).min_cosine
    if kind.precision in ("int8", "int4", "fp16"):  # really a lower precision: smaller, and not bit-identical
        weights = target.with_suffix(".bin") if kind.runtime == "openvino" else target
        # ONNX Runtime int8 quantizes the MatMuls only (the tiny UNet is mostly convolutions); int4 (MatMuls) with
        # int8 convolutions is under a quarter of fp32.
        share = {"onnxruntime": 0.9, "int4": 0.25}.get(kind.runtime if kind.runtime == "onnxruntime" else
                                                       kind.precision, 0.7)
        assert weights.stat().st_size < share * source.stat().st_size
        assert unet.max_abs > 0


def test_a_static_variant_needs_calibration(unet_onnx, tmp_path):
    from kiln.errors import ExportError

    with pytest.raises(ExportError, match="needs calibration inputs"):
        derive(SD_VARIANTS["openvino-int8-hybrid"], unet_onnx[3], tmp_path / "x.xml")


def test_unknown_variant_is_a_clear_error(plain_checkpoint, tmp_path):
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown SD variant 'tensorrt-fp4'.*openvino-int8"):
        build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=tmp_path, variant="tensorrt-fp4",
                                progress=False),
                 log=lambda _m: None)


def test_a_mix_names_what_each_part_runs(plain_checkpoint, tmp_path, kiln):
    """KEY+PART=KEY: the UNet, its tiling twin and the ControlNets run the first variant; each part named runs its own
    (only the UNet is calibrated, so a calibrated key elsewhere means its int8 weights)."""
    from build.sd.mix import parse_mix
    from kiln.errors import ConfigError

    mix = parse_mix("openvino-int8-hybrid+vae=openvino-bf16")
    assert mix.label == "openvino-int8-hybrid+vae=openvino-bf16" and mix.keys() == (
        "openvino-int8-hybrid", "openvino-bf16")
    for component in ("unet", "unet_tiling", "unet_control", "controlnet", "controlnet_2"):
        assert mix.key(component) == "openvino-int8-hybrid"
    assert mix.variant("unet") == SD_VARIANTS["openvino-int8-hybrid"]
    assert mix.variant("controlnet") == mix.variant("text_encoder") == SD_VARIANTS["openvino-int8"]  # uncalibrated
    for component in ("vae_decoder", "vae_encoder", "vae_decoder_2", "vae_encoder_tiling"):
        assert mix.variant(component) == SD_VARIANTS["openvino-bf16"]
    # One spelling per choice: the parts in a fixed order, a part that runs the base dropped.
    assert parse_mix("onnxruntime-fp32 + vae=openvino-bf16+text_encoder=onnxruntime-int8").label == \
        "onnxruntime-fp32+text_encoder=onnxruntime-int8+vae=openvino-bf16"
    assert parse_mix("openvino-fp32+vae=openvino-fp32") == parse_mix("openvino-fp32")
    # Outside the UNet a calibrated key means its int8 weights: the same models, the same label.
    assert parse_mix("openvino-int8-hybrid+vae=openvino-int8").label == "openvino-int8-hybrid"
    assert parse_mix("openvino-int8+text_encoder=openvino-int8-hybrid").label == "openvino-int8"
    assert parse_mix("openvino-int8-hybrid+vae=auto").choose("vae", "openvino-int8").label == "openvino-int8-hybrid"
    # auto, first or for a part: the build's to choose (and a part chosen like the base then runs the base)
    assert parse_mix("auto+vae=openvino-bf16").choose("", "openvino-fp32").label == "openvino-fp32+vae=openvino-bf16"
    mix = parse_mix("auto+vae=auto")
    assert mix.auto_parts() == ("", "vae") and mix.choose("", "openvino-fp32").auto_parts() == ("vae",)
    assert mix.choose("", "openvino-fp32").choose("vae", "openvino-fp32").label == "openvino-fp32"
    assert parse_mix("openvino-fp32+text_encoder=auto").auto_parts() == ("text_encoder",)
    for text, message in (("openvino-fp32+unet=openvino-bf16", "'unet=openvino-bf16' is not PART=VARIANT"),
                          ("openvino-fp32+vae", "'vae' is not PART=VARIANT"),
                          ("openvino-fp32+vae=fp8", "unknown variant 'fp8' for vae"),
                          ("openvino-fp32+vae=openvino-bf16+vae=openvino-fp16", "names vae twice"),
                          ("fp8+vae=openvino-bf16", "unknown SD variant 'fp8'")):
        with pytest.raises(ConfigError, match=message):
            parse_mix(text)
    with pytest.raises(ConfigError, match="unknown SD variant 'auto'"):
        parse_mix("auto", allow_auto=False)  # what the benchmark runs: a choice already made
    with pytest.raises(ConfigError, match="unknown variant 'auto' for vae"):
        parse_mix("openvino-fp32+vae=auto", allow_auto=False)
    code, _, err = kiln("build", "sd", "--weights", str(plain_checkpoint), "--repo", str(tmp_path), "--variant",
                        "openvino-fp32+vae=fp8")
    assert code == 2 and "unknown variant 'fp8' for vae" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before anything was built
    code, _, err = kiln("build", "sd", "--weights", str(plain_checkpoint), "--repo", str(tmp_path), "--torch-compile")
    assert code == 2 and "Traceback" not in err and "--torch-compile compiles the CUDA graphs of a torch.export " \
        "program on a GPU (--device gpu and the variant torch-cuda-fp16); the UNet serves onnxruntime-fp32" in err
    assert not any(tmp_path.iterdir())
    # A GPU build runs every model on the GPU: a torch part checked and compiled for the CPU would not load there.
    with pytest.raises(ConfigError, match="torch's CPU variants"):
        build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=tmp_path, progress=False, device="gpu",
                                variant="torch-cuda-fp16+vae=torch-aoti-fp32"), log=lambda _m: None)


def test_a_mixed_build_serves_each_part_in_its_own_runtime(plain_checkpoint, plain_repo, tmp_path):
    """A torch program UNet, an ONNX Runtime int8 text encoder and OpenVINO bf16 VAEs in one build: each checked
    against PyTorch in its own tolerance, each model's config naming its own runtime, the report and the contract
    naming the mix, and the image's trade against fp32 shown."""
    from kiln.contract import read_sd_contract

    label = "torch-fp32+text_encoder=onnxruntime-int8+vae=openvino-bf16"
    content = build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=tmp_path, images=IMAGES,
                                      progress=False, variant=label, image_check_steps=2), log=lambda _m: None)
    assert content["variant"] == read_sd_contract(tmp_path).variant == label
    assert content["components"] == {"text_encoder": "onnxruntime-int8", "unet": "torch-fp32",
                                     "vae_decoder": "openvino-bf16", "vae_encoder": "openvino-bf16"}
    expected = {"text_encoder": ("onnxruntime", "model-int8.onnx", "f32"), "unet": ("torch", "model.pt2", "f32"),
                "vae_decoder": ("openvino", "model.xml", "bf16"), "vae_encoder": ("openvino", "model.xml", "bf16")}
    for name, (runtime, artifact, precision) in expected.items():
        params = {k: v.string_value for k, v in read_config(tmp_path / f"sd_{name}" / "config.pbtxt")
                  .parameters.items()}
        assert (params["runtime"], params["artifact"], params["inference_precision"]) == (runtime, artifact,
                                                                                          precision), name
        assert (tmp_path / f"sd_{name}" / "1" / artifact).exists()
        entry = content["artifacts"][name]
        served = entry.get("served", entry)  # a derived file is checked beside the fp32 export it comes from
        assert served["runtime"] == runtime and served["parity"], name
        if "served" in entry:
            assert served["variant"] == content["components"][name]
    assert content["artifacts"]["unet"]["parity"]["noise_pred"]["max_abs"] == 0.0  # the module's own arithmetic
    assert not (tmp_path / "sd_unet" / "1" / "model.onnx").exists()  # no ONNX in between for the torch part
    image = content["image_parity"]  # int8 text and bf16 VAE: a trade, shown (the torch UNet in both images)
    assert 10 < float(image["psnr_db"]) < float("inf") and image["as_served"] == ["unet"]
    images = Pipeline.from_repository(tmp_path).generate(REQUEST).images
    onnx = Pipeline.from_repository(plain_repo).generate(REQUEST).images
    assert images.shape == onnx.shape and 10 < psnr(onnx, images) < float("inf")


@pytest.fixture(scope="module")
def int8_repo(plain_checkpoint, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("sd_int8_repo")
    build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=repo, images=IMAGES, progress=False,
                            variant="openvino-int8-hybrid", calibration_steps=2), log=lambda _m: None)
    return repo


def test_the_int8_unet_with_a_bf16_vae(plain_checkpoint, tmp_path):
    """openvino-int8-hybrid+vae=openvino-bf16: the UNet calibrated on inputs captured from the mixed build's fp32
    files, the VAE models in bf16, the text encoder int8 weights; the image's trade shown."""
    content = build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=tmp_path, images=IMAGES,
                                      progress=False, variant="openvino-int8-hybrid+vae=openvino-bf16",
                                      calibration_steps=2, image_check_steps=2), log=lambda _m: None)
    served = {name: content["artifacts"][name]["served"] for name in ("text_encoder", "unet", "vae_decoder",
                                                                      "vae_encoder")}
    assert (served["unet"]["quantization"], served["unet"]["calibration_samples"]) == ("static", 3 * 2)
    assert (served["text_encoder"]["quantization"], served["text_encoder"]["variant"]) == ("weights",
                                                                                           "openvino-int8-hybrid")
    for name in ("vae_decoder", "vae_encoder"):
        assert (served[name]["variant"], served[name]["inference_precision"], served[name]["file"]) == (
            "openvino-bf16", "bf16", f"sd_{name}/1/model.xml")
        assert not served[name]["upcast"]  # bf16 is what was asked for, not an upcast
    assert 10 < float(content["image_parity"]["psnr_db"]) < float("inf")
    assert "as_served" not in content["image_parity"]  # every component has its fp32 ONNX file to compare with


def test_hybrid_int8_build_is_served_and_reports_its_trade(int8_repo, tmp_path):
    """The UNet quantized with activations (calibrated on captured denoising inputs), the rest int8 weights."""
    report = read_report(int8_repo)["sd"]
    assert report["variant"] == "openvino-int8-hybrid"
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        entry = report["artifacts"][name]
        assert entry["precision"] == "fp32" and entry["parity"]  # the fp32 export, checked
        served = entry["served"]
        assert served["runtime"] == "openvino" and served["precision"] == "int8" and served["parity"]
        assert served["quantization"] == ("static" if name == "unet" else "weights")
        assert served["calibration_samples"] == (3 * 2 if name == "unet" else 0)  # 3 prompts x 2 steps
        assert (int8_repo / served["file"]).exists()
        config = read_config(int8_repo / f"sd_{name}" / "config.pbtxt")
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params["runtime"] == "openvino"
        assert params["artifact"] == ("model-int8-static.xml" if name == "unet" else "model-int8.xml")
    import openvino as ov

    unet = ov.Core().read_model(str(int8_repo / "sd_unet" / "1" / "model-int8-static.xml"))
    assert any(op.get_type_name() == "FakeQuantize" for op in unet.get_ops())  # activations quantized too
    image = report["image_parity"]
    assert image["against"] == "onnxruntime-fp32" and 15 < float(image["psnr_db"]) < float("inf")

    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=3, sampler="Euler a",
                             cfg_scale=7.0, seed=5, width=64, height=64)
    server = start_triton(int8_repo, tmp_path / "triton.log")
    try:
        served = Pipeline.from_triton(server.grpc_url).generate(request).images
    finally:
        code = server.stop()
    # Every OpenVINO model process ends (telemetry's fork used to hang one now and then: Triton's exit timeout).
    assert code == 0, server.explain()
    # The served OpenVINO models compiled into the cache beside the repository: a second start reads them back.
    assert len(list((int8_repo.parent / f"{int8_repo.name}.ov-cache").glob("*.blob"))) >= 4
    in_process = Pipeline.from_repository(int8_repo).generate(request).images
    assert served.shape == (1, 64, 64, 3)
    # The served int8 models and the same artifacts opened in-process give the same image.
    assert np.abs(served.astype(int) - in_process.astype(int)).max() <= 1


REQUEST = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=3, sampler="Euler a",
                         cfg_scale=7.0, seed=5, width=64, height=96, batch_size=2)


def _torch_artifacts(repo: Path, artifact: str) -> dict:
    content = read_report(repo)["sd"]
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        entry = content["artifacts"][name]
        assert entry["runtime"] == "torch" and entry["file"] == f"sd_{name}/1/{artifact}"
        assert not (repo / f"sd_{name}" / "1" / "model.onnx").exists()  # no ONNX in between
        params = read_config(repo / f"sd_{name}" / "config.pbtxt").parameters
        assert params["runtime"].string_value == "torch" and "graph_batches" not in params
    return content["artifacts"]


def test_torch_program_build_matches_the_modules_and_onnx(plain_checkpoint, plain_repo, tmp_path):
    """torch-fp32: torch.export programs, the modules' own arithmetic (exact parity), run without diffusers; the image
    is within rounding of the ONNX Runtime build's."""
    import torch

    build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=tmp_path, images=IMAGES, progress=False,
                            variant="torch-fp32"), log=lambda _m: None)
    for entry in _torch_artifacts(tmp_path, "model.pt2").values():
        assert entry["parity"][next(iter(entry["parity"]))]["max_abs"] == 0.0
    # The program with channels-last weights (SessionOptions.channels_last: NHWC convolutions, for cuDNN's fp16
    # kernels): the layout carries through the UNet's and the VAE's graphs, and the numbers stay within rounding.
    from kiln.errors import ConfigError
    from kiln.runtime import Session, SessionOptions

    specs = sd_specs(load_sd(str(plain_checkpoint), None, None), IMAGES)
    for component, output in (("unet", "noise_pred"), ("vae_decoder", "image")):
        path, feed = tmp_path / f"sd_{component}" / "1" / "model.pt2", specs[component].sample_inputs(0, batch=2)
        plain, nhwc = (Session(SessionOptions("torch", path, channels_last=layout)) for layout in (False, True))
        with pytest.raises(ConfigError, match="torch_compile compiles what a CUDA graph captures: .* not on cpu"):
            Session(SessionOptions("torch", path, torch_compile=True))  # no graphs on a CPU: AOTInductor is its plan
        kernels = [w for w in nhwc._torch.module.parameters() if w.dim() == 4 and min(w.shape[-2:]) > 1]
        assert kernels and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                               for w in kernels)
        assert plain.compile_s == 0  # torch.compile's seconds where it compiled (SessionOptions.torch_compile)
        outputs = plain.run(feed)[output], nhwc.run(feed)[output]
        assert outputs[1].flags.c_contiguous and np.abs(outputs[0] - outputs[1]).max() < 1e-4
    images = Pipeline.from_repository(tmp_path).generate(REQUEST).images
    onnx = Pipeline.from_repository(plain_repo).generate(REQUEST).images
    assert np.abs(images.astype(int) - onnx.astype(int)).max() <= 2
    # NVIDIA's image serves it with the torch that exported it (the Dockerfile's check, here with this torch).
    from kiln.repository import check_for_image

    assert check_for_image(tmp_path) == []
    program = tmp_path / "sd_vae_decoder" / "1" / "model.pt2"
    _with_metadata(program, tmp_path / "old.pt2", torch="2.5").replace(program)
    assert check_for_image(tmp_path) == [
        f"sd_vae_decoder: model.pt2 was exported by torch 2.5 and the image has {torch.__version__}: build the "
        "repository with the image's torch"]


def _with_metadata(package: Path, target: Path, **changes) -> Path:
    """A copy of a package whose kiln.json says something else (a file from another machine or torch)."""
    import zipfile

    with zipfile.ZipFile(package) as source, zipfile.ZipFile(target, "w") as copy:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("/extra/kiln.json"):
                data = json.dumps(json.loads(data) | changes).encode()
            copy.writestr(item, data)
    return target


@pytest.mark.slow
def test_aoti_build_is_compiled_cached_and_served_through_triton(plain_checkpoint, plain_repo, tmp_path,
                                                                   monkeypatch):
    """torch-aoti-fp32: every component compiled ahead of time by AOTInductor (side by side, one process each) into a
    package of native code that Triton's Python backend runs without diffusers; a rebuild of the same weights comes
    from the cache; the image through Triton is the in-process one, and within rounding of ONNX Runtime's. A package
    from another torch release or for vector instructions this CPU lacks is refused with the reason."""
    from kiln.errors import ConfigError
    from kiln.runtime import Session, SessionOptions

    monkeypatch.setenv("KILN_AOTI_CACHE", str(tmp_path / "cache"))  # a cold cache: this test compiles
    repo, again = tmp_path / "repo", tmp_path / "again"
    for target in (repo, again):
        build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=target, images=IMAGES, progress=False,
                                variant="torch-aoti-fp32"), log=lambda _m: None)
    first, second = _torch_artifacts(repo, "model-aoti.pt2"), _torch_artifacts(again, "model-aoti.pt2")
    for name, entry in first.items():
        assert not entry["compile_cached"] and entry["compile_seconds"] > 0
        assert second[name]["compile_cached"] and second[name]["sha256"] == entry["sha256"]
        reference = entry["parity"][next(iter(entry["parity"]))]
        assert 0 < reference["max_abs"] < 1e-4 and reference["cosine"] > 0.99999  # compiled: other summation order

    server = start_triton(repo, tmp_path / "triton.log", exit_timeout_s=30)
    try:
        served = Pipeline.from_triton(server.grpc_url).generate(REQUEST).images
    finally:
        assert server.stop() == 0, server.explain()
    assert np.array_equal(served, Pipeline.from_repository(repo).generate(REQUEST).images)
    onnx = Pipeline.from_repository(plain_repo).generate(REQUEST).images
    assert np.abs(served.astype(int) - onnx.astype(int)).max() <= 2

    package = repo / "sd_vae_decoder" / "1" / "model-aoti.pt2"
    for changes, reason in (({"torch": "2.5"}, "exported by torch 2.5"),
                            ({"cpu_isa": "avx1024_imaginary"}, "compiled by AOTInductor for avx1024_imaginary"),
                            ({"device": "cuda", "cpu_isa": ""}, "built for cuda and opened on cpu")):
        other = _with_metadata(package, tmp_path / "other.pt2", **changes)
        with pytest.raises(ConfigError, match=reason):
            Session(SessionOptions("torch", other))
    with pytest.raises(ConfigError, match="fixes its layouts when it is compiled"):  # channels_last: programs only
        Session(SessionOptions("torch", package, channels_last=True))


@pytest.mark.parametrize(("key", "artifact"), [("torch-cuda-fp16", "model-fp16.pt2"),
                                               ("torch-aoti-cuda-fp16", "model-aoti-fp16.pt2")])
def test_torch_cuda_variant_configs_and_its_gpu(plain_checkpoint, tmp_path, key, artifact):
    """torch-cuda-fp16: KIND_GPU Python-backend models, CUDA graphs for the step models' batches at the optimal
    sizes. It is exported and checked on the GPU it serves from, so a machine without one refuses to build it."""
    import torch

    from build.convert import SD_VARIANTS
    from build.sd.configs import sd_model_configs
    from kiln.contract import SDContract

    loaded = load_sd(str(plain_checkpoint), None, None)
    specs = sd_specs(loaded, IMAGES)
    variant = SD_VARIANTS[key]
    contract = SDContract(scheduler_config={}, vae_scale_factor=2, latent_channels=4, unet_in_channels=4,
                          scaling_factor=0.18, min_size=32, max_size=128, size_multiple=8)
    configs = {c.name: c for c in sd_model_configs(specs, contract, dict.fromkeys(specs, variant), device="gpu")}
    unet = configs["sd_unet"]
    assert unet.kind == "KIND_GPU" and unet.backend == "python" and unet.parameters["artifact"] == artifact
    assert unet.parameters["graph_batches"] == "2,4,8,16"
    assert json.loads(unet.parameters["graph_shapes"])["sample"] == [2, 4, 32, 32]  # opt: batch 2, 64 px / 2
    # the step models take a client's CUDA shared memory where it is (kiln.runtime.model.read_input); the others
    # keep Triton's default, every input copied to the host first
    assert unet.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in configs["sd_vae_decoder"].parameters
    assert configs["sd_vae_decoder"].kind == "KIND_GPU" and "graph_batches" not in configs["sd_vae_decoder"].parameters
    assert configs["sd_tokenizer"].kind == "KIND_CPU"
    # The fp16 program's UNet keeps its weights channels-last (kiln build sd --layout), which the session reads from
    # the config; a compiled package fixes its own layouts; the VAE (upcast: float32) is not measured that way
    nhwc = key == "torch-cuda-fp16"
    assert unet.parameters.get("channels_last") == ("1" if nhwc else None)
    assert "channels_last" not in configs["sd_vae_decoder"].parameters
    from kiln.runtime import session_device

    params = unet.parameters
    device = session_device("torch", True, params["graph_batches"], params["graph_shapes"], 0,
                            params.get("channels_last", ""))
    assert device["channels_last"] is nhwc and device["graph_batches"] == (2, 4, 8, 16)
    assert session_device("torch", False, channels_last="1") == {}  # a CPU instance: the layout as exported
    contiguous = sd_model_configs(specs, contract, dict.fromkeys(specs, variant), device="gpu", channels_last=False)
    assert all("channels_last" not in c.parameters for c in contiguous)
    # --torch-compile: a program's step models capture their graphs from torch.compile's kernels (read back from the
    # config by the served model and in process); a compiled package is refused it
    from kiln.errors import ConfigError
    from kiln.model_config import read_served
    from kiln.runtime import served_device

    compiled = sd_model_configs(specs, contract, dict.fromkeys(specs, variant), device="gpu", torch_compile=True)
    flagged = {c.name for c in compiled if c.parameters.get("torch_compile") == "1"}
    assert flagged == ({"sd_unet"} if nhwc else set())
    served = read_served(next(c for c in compiled if c.name == "sd_unet").write(tmp_path / "compiled"))
    assert served.torch_compile == ("1" if nhwc else "") and served_device(served)["torch_compile"] is nhwc
    if nhwc:
        variant.check_torch_compile(True, "the UNet", key)
    else:
        with pytest.raises(ConfigError, match="--torch-compile compiles the CUDA graphs of a torch.export program on "
                                              f"a GPU .*; the UNet serves {key}"):
            variant.check_torch_compile(True, "the UNet", key)
    if not torch.cuda.is_available():
        from kiln.errors import ExportError

        with pytest.raises(ExportError, match="exported and checked on the GPU they run on"):
            build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=tmp_path, images=IMAGES,
                                    progress=False, variant=key, device="gpu"), log=lambda _m: None)


def test_a_gpu_session_finds_nan_inputs_as_the_requests_fault():
    """On CUDA, TorchSession checks float inputs for NaN after the copy (RuntimeModel, on the CPU, before it): an
    InputError, which the model answers as the request's (INVALID_ARG, a 400), naming the input; ints are not
    checked. The check itself is device-agnostic, so it runs here on CPU tensors."""
    import torch

    from kiln.errors import InputError
    from kiln.runtime.torch_session import TorchSession

    with pytest.raises(InputError, match="^encoder_hidden_states contains NaN or infinity$"):
        TorchSession._check_finite({"sample": torch.ones(2, 3), "timestep": torch.ones(2),
                                    "encoder_hidden_states": torch.tensor([1.0, float("inf")]),
                                    "ids": torch.tensor([1, 2])})
    TorchSession._check_finite({"sample": torch.ones(2, 3), "ids": torch.tensor([1])})


class _Request(dict):
    """A stand-in for a Triton request: its inputs by name, every output asked for."""

    def requested_output_names(self):
        return []


def _runtime_model_with_stand_ins(monkeypatch, input_tensor):
    """kiln.runtime.model.RuntimeModel imported against a stand-in `triton_python_backend_utils` (the real one exists
    only inside Triton's stub process), whose get_input_tensor_by_name gives input_tensor(request, name). A response
    holds its outputs by name and its error; an error its message and code."""
    import sys
    import types

    class Error:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code):
            self.message, self.code = message, code

    class Response:
        def __init__(self, output_tensors=(), error=None):
            self.outputs, self.error = {t[0]: t[1] for t in output_tensors}, error

    stub = types.ModuleType("triton_python_backend_utils")
    stub.TritonError, stub.InferenceResponse, stub.Tensor = Error, Response, lambda name, value: (name, value)
    stub.get_input_tensor_by_name = input_tensor
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    sys.modules.pop("kiln.runtime.model", None)
    try:
        from kiln.runtime.model import RuntimeModel
    finally:
        sys.modules.pop("kiln.runtime.model", None)  # bound to the stand-in: not for other tests
    return RuntimeModel


def test_a_nan_request_in_a_merged_gpu_batch_fails_alone_as_invalid(monkeypatch):
    """RuntimeModel.execute with three requests merged into one batch, the middle one NaN, its session on a GPU
    (checks_finite: it raises InputError for the whole batch). Stand-ins, because neither can be had here for real:
    Triton's `triton_python_backend_utils` exists only inside its stub process, and a CUDA session needs a GPU (the
    real check is TorchSession._check_finite, tested above). The batch is retried one by one: the others answer, the
    culprit gets INVALID_ARG (HTTP 400). On the CPU (checks_finite False) prepare() refuses it first, the same way."""
    import types

    from kiln.errors import InputError

    RuntimeModel = _runtime_model_with_stand_ins(monkeypatch, lambda request, name: types.SimpleNamespace(
        is_cpu=lambda: True, as_numpy=lambda: request[name]) if name in request else None)

    class Session:  # what TorchSession does on CUDA: the check after the copy, for the whole batch
        def __init__(self, on_gpu):
            self.checks_finite, self.calls = on_gpu, 0

        def run(self, inputs, names):
            self.calls += 1
            if self.checks_finite and not np.isfinite(inputs["x"]).all():
                raise InputError("x contains NaN or infinity")
            return {"y": inputs["x"] * 2}

    for on_gpu in (True, False):
        model = RuntimeModel()
        model.session, model.loras, model.name, model.batching = Session(on_gpu), None, "m", True
        model.input_names, model.output_names = ["x"], ["y"]
        rows = [np.ones((1, 2), np.float32), np.full((1, 2), np.nan, np.float32), np.zeros((1, 2), np.float32)]
        responses = model.execute([_Request(x=r) for r in rows])
        assert responses[1].error.code == "INVALID_ARG" and "x contains NaN" in responses[1].error.message
        assert [r.outputs["y"].tolist() for r in (responses[0], responses[2])] == [[[2, 2]], [[0, 0]]]
        assert model.session.calls == (4 if on_gpu else 1)  # the GPU's merged batch, then each alone


def test_inputs_on_a_gpu_reach_the_session_as_tensors_and_merge(monkeypatch):
    """RuntimeModel.execute with inputs that Triton hands over on a GPU (a client's CUDA shared memory, on a model
    whose config sets FORCE_CPU_ONLY_INPUT_TENSORS to "no"). Stand-ins, because neither can be had here for real:
    Triton's `triton_python_backend_utils` exists only inside its stub, and no GPU tensor exists on this machine (the
    stand-in's tensors are on the CPU and say they are not: what read_input does with them is the same). Float inputs
    reach the session as torch tensors through DLPack, two requests' merged by torch.cat; an integer input (the
    ViT's `layer`) comes to the host as numpy; a request from host memory is numpy as before."""
    import types

    import torch
    from torch.utils.dlpack import to_dlpack

    def tensor(value, on_gpu: bool):
        return types.SimpleNamespace(is_cpu=lambda: not on_gpu, as_numpy=lambda: value,
                                     to_dlpack=lambda: to_dlpack(torch.from_numpy(value)))

    RuntimeModel = _runtime_model_with_stand_ins(monkeypatch, lambda request, name: request.get(name))

    class Session:  # what TorchSession does with either (tested with a real one in test_build_vit)
        checks_finite = True  # a GPU session checks NaN on the GPU
        seen: list = []

        def run(self, inputs, names):
            self.seen.append({name: type(value).__name__ for name, value in inputs.items()})
            x = inputs["x"] if isinstance(inputs["x"], np.ndarray) else inputs["x"].numpy()
            return {"y": x * 2 + inputs["k"]}

    model = RuntimeModel()
    model.session, model.loras, model.name, model.batching = Session(), None, "m", True
    model.input_names, model.output_names = ["x", "k"], ["y"]
    rows = [np.full((1, 2), i, np.float32) for i in range(3)]
    k = np.ones((1, 1), np.int64)
    requests = [_Request(x=tensor(row, i < 2), k=tensor(k, i < 2)) for i, row in enumerate(rows)]  # 2 on the GPU
    responses = model.execute(requests)
    assert [r.outputs["y"].tolist() for r in responses] == [[[1, 1]], [[3, 3]], [[5, 5]]]
    assert Session.seen == [{"x": "Tensor", "k": "ndarray"}, {"x": "ndarray", "k": "ndarray"}]  # 2 merged, 1 alone


def _prebuilt(tmp_path: Path, name: str, plain_checkpoint: Path, plain_repo: Path) -> None:
    """The tiny checkpoint and its fp32 build where a benchmark looks for its own (with skip_build, it reuses them)."""
    root = tmp_path / name
    root.mkdir()
    (root / "weights").symlink_to(plain_checkpoint)
    (root / "repo").symlink_to(plain_repo)


MIX = "onnxruntime-int8+vae=openvino-fp32"


def test_bench_sd_tiny(tmp_path, plain_checkpoint, plain_repo):
    from benchmarks.sd import SDBenchOptions, run_sd_benchmark

    _prebuilt(tmp_path, "bench_sd_tiny", plain_checkpoint, plain_repo)
    result = run_sd_benchmark(SDBenchOptions(out=tmp_path, pipeline="tiny", steps=2, repeats=1, skip_build=True,
                                             variants=("torch-fp32", "onnxruntime-fp32", "onnxruntime-int8", MIX)),
                              log=lambda _m: None)
    saved = json.loads((tmp_path / "sd-tiny-64.json").read_text())
    assert (tmp_path / "sd-tiny-64.png").stat().st_size > 10_000 and (tmp_path / "sd-tiny-64.md").exists()
    rows = {r["variant"]: r for r in saved["variants"]}
    assert list(rows) == ["torch-fp32", "onnxruntime-fp32", "onnxruntime-int8", MIX] and not saved["failed"]
    # A mix (build.sd.mix): its int8 parts are the int8 row's files (made once), its VAE OpenVINO on the fp32 ONNX.
    assert MIX not in saved["derive"]
    mix, int8 = rows[MIX], rows["onnxruntime-int8"]
    assert mix["parity"]["unet"] == int8["parity"]["unet"] and mix["parity"]["text_encoder"] == int8["parity"][
        "text_encoder"]
    assert mix["parity"]["vae_decoder"]["cosine"] > 0.99999 and mix["executed_precision"]["vae_decoder"] == "f32"
    assert f"| {MIX} | as stored, VAE f32 |" in (tmp_path / "sd-tiny-64.md").read_text()
    for row in rows.values():
        assert row["peak_rss_mb"] > 100 and row["image_s"] > 0
        assert all(row["components"][c]["median_s"] > 0 for c in ("text_encoder", "unet", "vae_decoder"))
    assert rows["torch-fp32"]["unet_speedup"] == 1.0
    # fp32 ONNX Runtime reproduces torch's image; int8 shows its trade as a finite PSNR.
    assert rows["onnxruntime-fp32"]["parity"]["unet"]["cosine"] > 0.99999
    assert rows["onnxruntime-fp32"]["parity"]["image_psnr_db"] > 40
    assert 10 < rows["onnxruntime-int8"]["parity"]["image_psnr_db"] < float("inf")
    assert rows["onnxruntime-int8"]["executed_precision"]["unet"] == "as stored"
    # Each component derived in its own process (its peak memory its own).
    assert set(saved["derive"]["onnxruntime-int8"]) == {"text_encoder", "unet", "vae_decoder"}
    triton = saved["triton"]
    assert triton["image_s"] > 0 and "overhead" in triton and triton["peak_rss_mb"] > 100
    # Where the time goes: each path's model time is inside its image time; Triton's compute inside its calls.
    direct = rows["onnxruntime-fp32"]
    assert 0 < direct["model_calls_s"] < direct["image_s"] and direct["model_calls"] >= 2 + 1 + 1  # text, 2 UNet, VAE
    # Triton's statistics are recorded as its models finish, the client's times as responses arrive: both are
    # positive, but their order is a race on models this small (only the client's lies inside the image's time).
    assert triton["triton_compute_s"] > 0 and 0 < triton["model_calls_s"] < triton["image_s"]
    assert triton["triton_models"]["sd_unet"]["executions"] == 2 and "Where the time goes" in (
        tmp_path / "sd-tiny-64.md").read_text()
    assert saved["triton_overhead"]["outside_compute"] == triton["overhead_outside_compute"]
    assert triton["image_psnr_vs_direct_db"] > 40  # json reads Infinity back as inf
    assert result["best_unet"]["variant"] in rows


def test_bench_serve_tiny(tmp_path, plain_checkpoint, plain_repo):
    from benchmarks.serve import ARMS, ServeBenchOptions, run_serve_benchmark

    _prebuilt(tmp_path, "bench_serve_tiny", plain_checkpoint, plain_repo)
    # Loops long enough (8 steps, 2 requests each) that the two clients' denoising loops overlap.
    result = run_serve_benchmark(ServeBenchOptions(out=tmp_path, concurrency=(1, 2), requests_per_client=2, steps=8,
                                                   size=32, skip_build=True), log=lambda _m: None)
    saved = json.loads((tmp_path / "serve-tiny-32.json").read_text())
    assert (tmp_path / "serve-tiny-32.png").exists() and (tmp_path / "serve-tiny-32.md").exists()
    rows = {(r["arm"], r["clients"]): r for r in saved["rows"]}
    assert set(rows) == {(arm, n) for arm in ARMS for n in (1, 2)}
    assert all(r["requests"] == 2 * r["clients"] for r in rows.values())  # nothing failed or was lost
    # No batching means one request's CFG pair per Triton execution; the step batcher merges the two clients.
    assert rows[("unbatched", 2)]["rows_per_execution"] == 2.0
    assert rows[("step", 2)]["mean_unet_rows"] > 2.0
    assert set(saved["unet_seconds_by_rows"]) == {"1", "2", "4"}
    assert result["ratios"][2]["ceiling"] > 0


def test_bench_transport_runs_both_modes_on_the_services_client(tmp_path, kiln):
    code, out, err = kiln("bench", "transport", "--calls", "3", "--out", tmp_path)
    assert code == 0, err
    saved = json.loads((tmp_path / "transport.json").read_text())
    assert (tmp_path / "transport.png").stat().st_size > 10_000 and "| SD 1.5 512px, 4 requests |" in out
    assert {(r["shape"], r["mode"]) for r in saved["rows"]} == {
        (s, m) for s in ("tiny 64px, 1 request", "SD 1.5 512px, 1 request", "SD 1.5 512px, 4 requests")
        for m in ("network", "shared memory")}
    for row in saved["rows"]:
        assert row["p50_ms"] > 0 and row["p95_ms"] >= row["p50_ms"] and row["p50_vs_network"] > 0
    assert saved["machine"]["isa"]
    assert kiln("bench", "transport", "--calls", "0", "--out", tmp_path)[0] == 2


def test_aoti_bf16_package_is_checked_against_the_bf16_tolerance(plain_checkpoint, tmp_path, monkeypatch):
    """torch-aoti-bf16 on one component (the text encoder: the shortest compile): bfloat16 weights and arithmetic,
    compiled for this CPU, checked against the float32 module with the bf16 tolerance. (Without AVX-512 BF16 the
    CPU converts in software: slower, same figures.)"""
    from build.torch_export import compile_packages, export_program

    monkeypatch.setenv("KILN_AOTI_CACHE", "off")
    loaded = load_sd(str(plain_checkpoint), None, None)
    spec, module = sd_specs(loaded, IMAGES)["text_encoder"], export_modules(loaded)["text_encoder"]
    variant = SD_VARIANTS["torch-aoti-bf16"]
    sizes = axis_sizes(loaded, batch=2, height=64, width=64)
    program, package = tmp_path / "program.pt2", tmp_path / variant.artifact
    export_program(module, spec, variant, program, sizes)
    compiled = compile_packages({program: package}, "cpu", log=lambda _m: None)
    assert not compiled[program].cached and package.name == "model-aoti-bf16.pt2"
    figures = check_component(module, spec, package, axis_sizes(loaded, batch=3, height=64, width=64, chunks=2),
                              variant=variant)  # raises ParityError outside bf16's tolerance
    reference = figures[spec.reference_output]
    assert reference.cosine >= spec.tolerance("bf16").min_cosine and reference.max_abs > 1e-4  # really bf16


def test_auto_builds_the_fastest_unet_measured_here(plain_checkpoint, tmp_path):
    """--variant auto: the UNet made, checked and timed in each candidate on one CFG step, the fastest served; the
    report keeps every candidate's figures and the reason."""
    candidates = ("onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32")
    content = build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=tmp_path, images=IMAGES,
                                      progress=False, variant="auto", auto_candidates=candidates), log=lambda _m: None)
    choice = content["auto"]
    assert set(choice["candidates"]) == set(candidates) and not choice["rejected"]
    speeds = {k: v["per_s"] for k, v in choice["candidates"].items()}
    assert choice["chosen"] == max(speeds, key=speeds.get) == content["variant"]
    assert "fastest of 3 within tolerance" in choice["reason"]
    assert all(v["parity"]["cosine"] > 0.98 for v in choice["candidates"].values())
    served = read_config(tmp_path / "sd_unet" / "config.pbtxt").parameters["artifact"].string_value
    assert served == SD_VARIANTS[choice["chosen"]].artifact and (tmp_path / "sd_unet" / "1" / served).exists()


def test_auto_for_a_part_times_that_part_on_its_own(plain_checkpoint, tmp_path):
    """auto+vae=auto: the UNet timed on a CFG step and the VAE decoder on one image decode, each the fastest of its
    own candidates; the encoder runs the decoder's choice, and the label names what was chosen."""
    from kiln.contract import read_sd_contract

    candidates = ("onnxruntime-fp32", "openvino-fp32")
    logs = []
    content = build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=tmp_path, images=IMAGES,
                                      progress=False, variant="auto+vae=auto", auto_candidates=candidates),
                       log=logs.append)
    unet, vae = content["auto"], content["auto_parts"]["vae"]
    assert set(unet["candidates"]) == set(vae["candidates"]) == set(candidates)
    assert "VAE decodes/s" in vae["reason"] and "UNet steps/s" in unet["reason"]
    assert any("ms per VAE decode" in line for line in logs)
    speeds = {k: v["per_s"] for k, v in vae["candidates"].items()}
    assert vae["chosen"] == max(speeds, key=speeds.get)
    assert content["variant"] == unet["chosen"] + (f"+vae={vae['chosen']}" if vae["chosen"] != unet["chosen"] else "")
    assert vae["measured_at"]["batch"] == 1 and unet["measured_at"]["batch"] == 2  # one decode, one CFG step
    assert read_sd_contract(tmp_path).variant == content["variant"]
    for name, key in (("unet", unet["chosen"]), ("vae_decoder", vae["chosen"]), ("vae_encoder", vae["chosen"])):
        assert content["components"][name] == key
        params = read_config(tmp_path / f"sd_{name}" / "config.pbtxt").parameters
        assert (params["runtime"].string_value, params["artifact"].string_value) == (
            SD_VARIANTS[key].runtime, SD_VARIANTS[key].artifact)


def test_auto_refuses_what_it_cannot_time(plain_checkpoint, tmp_path, kiln):
    import torch

    from kiln.errors import ConfigError

    def build(**fields):
        build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=tmp_path, images=IMAGES, progress=False,
                                **fields), log=lambda _m: None)

    from build.sd.auto import CPU_CANDIDATES, candidates

    assert candidates("cpu", None) == CPU_CANDIDATES and "torch-aoti-fp32" in CPU_CANDIDATES
    assert "torch-aoti-fp32" not in candidates("cpu", None, "native")  # NVIDIA's image runs no torch program natively
    with pytest.raises(ConfigError, match="goes with --variant auto .or a part.s =auto. only"):
        build(auto_candidates=("onnxruntime-int8",))
    with pytest.raises(ConfigError, match="needs calibration runs"):
        build(variant="auto", auto_candidates=("openvino-int8-hybrid",))
    with pytest.raises(ConfigError, match="cannot be timed on this machine with --device cpu"):
        build(variant="auto", auto_candidates=("onnxruntime-tensorrt-fp16",))
    if not torch.cuda.is_available():
        code, _, err = kiln("build", "sd", "--weights", str(plain_checkpoint), "--repo", str(tmp_path), "--variant",
                            "auto", "--device", "gpu")
        assert code == 2 and "this machine has none" in err and "Traceback" not in err


def test_a_call_between_cuda_graph_buckets_replays_the_next_one_padded():
    """TorchSession pads a call to the next captured bucket when that adds at most 8 rows (a CUDA graph's replay
    against a launch-bound call op by op; past that the padding's compute costs more); the choice and the padding
    are plain logic, checked here on shapes (the replay itself needs a GPU: the GPU check's unet_rows phase times 3
    rows there)."""
    from kiln.runtime import pad_rows
    from kiln.runtime.torch_session import graph_bucket

    def key(rows: int, side: int = 8) -> tuple:  # sample, timestep, text: SD's UNet inputs
        return ((rows, 4, side, side), (rows,), (rows, 77, 768))

    captured = {key(b): None for b in (2, 4, 8, 16)}
    assert graph_bucket(key(3), captured) == key(4) and graph_bucket(key(5), captured) == key(8)
    assert graph_bucket(key(9), captured) == key(16) and graph_bucket(key(1), captured) == key(2)
    assert graph_bucket(key(17), captured) is None  # above the largest bucket: op by op
    assert graph_bucket(key(3, side=16), captured) is None  # another size: no graph holds it
    assert graph_bucket(((3, 4, 8, 8), (2,), (3, 77, 768)), captured) is None  # rows that disagree
    assert graph_bucket(key(4), captured) == key(8)  # a caller looks up exact shapes first (TorchSession.run)
    vit = {((b, 3, 224, 224),): None for b in (1, 8, 64, 256)}
    assert graph_bucket(((200, 3, 224, 224),), vit) is None  # 56 rows of padding: compute-bound, op by op is cheaper
    assert graph_bucket(((40, 3, 224, 224),), vit) is None
    assert graph_bucket(((250, 3, 224, 224),), vit) == ((256, 3, 224, 224),)
    assert graph_bucket(((5, 3, 224, 224),), vit) == ((8, 3, 224, 224),)
    assert graph_bucket(((2, 3, 224, 224),), vit) == ((8, 3, 224, 224),)  # small batches are launch-bound
    value = np.arange(6, dtype=np.float32).reshape(3, 2)
    padded = pad_rows(value, 4)
    assert padded.shape == (4, 2) and (padded[:3] == value).all() and (padded[3] == value[2]).all()
