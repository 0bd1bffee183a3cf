"""NVIDIA's image: native-backend builds, and exactly what the Dockerfile copies, checked without Docker.

Docker and NVIDIA's native backends are not on these machines (../shared/ENVIRONMENT.md). What can be checked here
is: the builds write configs Triton's own protobuf parses; the folder the Dockerfile assembles holds a config for
every model, and every Python model's imports are in it or in what the image installs; the image's own build check
(`python -m kiln.repository`) passes it with the system Python alone; the same repository still runs in process.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from build import report
from build.native import native_config, precision_caveat
from build.triton_config import ModelConfig, Tensor
from kiln.contract import read_sd_contract
from kiln.errors import ConfigError, ServerError
from kiln.model_config import read_config, read_served
from kiln.repository import check_for_image, native_models
from kiln.triton_server import TritonOptions, TritonServer
from tests.conftest import IMAGES

ROOT = Path(__file__).resolve().parent.parent
# Imported only by kiln.runtime.Session, which only a Python-backend runtime model opens: the image refuses those.
RUNTIME_ENGINES = {"onnxruntime", "openvino"}


@pytest.fixture(scope="module")
def native_repo(tmp_path_factory, plain_checkpoint, tiny_vit) -> Path:
    """The tiny SD (ONNX Runtime with TensorRT, on the GPU) and the tests' ViT (OpenVINO bf16) built for the native
    backends, as the Dockerfile's comment says, into one folder."""
    repo = tmp_path_factory.mktemp("native") / "repos" / "native"
    _build_sd(plain_checkpoint, repo, "onnxruntime-tensorrt-fp16")
    from kiln.cli import main

    assert main(["build", "vit", "--weights", str(tiny_vit), "--triton-backend", "native", "--backend", "openvino",
                 "--precision", "bf16", "--variants", "served", "--no-extra-exports", "--repo", str(repo)]) == 0
    return repo


@pytest.fixture(scope="module")
def cuda_repo(tmp_path_factory, plain_checkpoint) -> Path:
    """The tiny SD for ONNX Runtime's CUDA provider: float16 ONNX files, on the GPU."""
    repo = tmp_path_factory.mktemp("native_cuda") / "repo"
    _build_sd(plain_checkpoint, repo, "onnxruntime-cuda-fp16")
    return repo


def _build_sd(checkpoint: Path, repo: Path, variant: str) -> None:
    from kiln.cli import main

    assert main(["build", "sd", "--weights", str(checkpoint), "--triton-backend", "native", "--device", "gpu",
                 "--variant", variant, "--min-size", str(IMAGES.min), "--opt-size", str(IMAGES.opt),
                 "--max-size", str(IMAGES.max), "--repo", str(repo)]) == 0


def _dockerfile_lines() -> list[str]:
    """The lines of the Dockerfile's last stage: Triton's image, its default target (the orchestrator's stage comes
    first)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    last = max(index for index, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last:]


def _assemble_image(repo: Path, image: Path) -> None:
    """Copy what the Dockerfile's COPY lines copy, with REPO=`repo`, leaving out what .dockerignore leaves out."""
    ignored = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]

    def ignore(_folder, names):
        return [n for n in names if any(Path(n).match(p.split("/")[-1]) for p in ignored)]

    for line in _dockerfile_lines():
        if not line.startswith("COPY "):
            continue
        source, target = line.split()[1:]
        source_path = Path(source.replace("${REPO}", str(repo)))
        source_path = source_path if source_path.is_absolute() else ROOT / source_path
        target_path = image / target.lstrip("/")
        assert not any(source.rstrip("/").startswith(p) for p in ignored), f".dockerignore leaves out {source}"
        if source_path.is_dir():
            shutil.copytree(source_path, target_path, ignore=ignore, dirs_exist_ok=True)
        else:
            target_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source_path, target_path if not target.endswith("/") else target_path / source_path.name)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any level (absolute names)."""
    tree = ast.parse(path.read_text(), feature_version=(3, 10))  # the image's Python is 3.10
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _installed_top_levels(requirements: Path) -> set[str]:
    """The import names the image's `pip install -r requirements-serving.txt` provides (read from this venv's
    installed distributions of the same names)."""
    wanted = {re.split(r"[=<>]", line)[0].strip().lower().replace("_", "-")
              for line in requirements.read_text().splitlines() if line.strip() and not line.startswith("#")}
    provided = set()
    for module, distributions in importlib.metadata.packages_distributions().items():
        if any(d.lower().replace("_", "-") in wanted for d in distributions):
            provided.add(module)
    return provided


@pytest.mark.slow
def test_native_builds_write_configs_triton_parses(native_repo):
    models = {p.name: read_config(p / "config.pbtxt") for p in native_repo.iterdir() if p.is_dir()}
    assert {"sd_unet", "sd_text_encoder", "sd_vae_decoder", "vit", "vit_classify", "sd_tokenizer"} <= set(models)
    for name in ("sd_unet", "sd_text_encoder", "sd_vae_decoder", "sd_vae_encoder"):
        assert models[name].backend == "onnxruntime" and models[name].default_model_filename == "model.onnx"
        assert models[name].instance_group[0].kind == models[name].instance_group[0].KIND_GPU
        assert "runtime" not in models[name].parameters
    unet = models["sd_unet"]
    assert unet.max_batch_size > 0 and unet.HasField("dynamic_batching")
    # TensorRT: fp16 from the fp32 graph, one profile from the spec (batch 1-2-16, 32-64-128 pixels, which the tiny
    # VAE halves), an engine cache, and a warmup at the optimal sizes so the engine is built before the model is ready.
    (tensorrt,) = unet.optimization.execution_accelerators.gpu_execution_accelerator
    assert tensorrt.name == "tensorrt" and tensorrt.parameters["precision_mode"] == "FP16"
    assert tensorrt.parameters["trt_engine_cache_path"] == "/var/cache/kiln/tensorrt/sd_unet"
    assert tensorrt.parameters["trt_profile_min_shapes"] == \
        "sample:1x4x16x16,timestep:1,encoder_hidden_states:1x77x32"
    assert tensorrt.parameters["trt_profile_max_shapes"].startswith("sample:16x4x64x64,timestep:16,")
    (warmup,) = unet.model_warmup
    assert warmup.batch_size == 2 and list(warmup.inputs["sample"].dims) == [4, 32, 32]
    assert list(warmup.inputs["timestep"].dims) == [1] and warmup.inputs["timestep"].zero_data
    text = models["sd_text_encoder"]  # does not batch: full shapes, batch_size 1
    assert text.model_warmup[0].batch_size == 1 and list(text.model_warmup[0].inputs["input_ids"].dims) == [2, 77]
    assert not models["vit"].HasField("optimization")
    vit = models["vit"]
    assert vit.backend == "openvino" and vit.default_model_filename == "model.xml"
    # OpenVINO's backend refuses any batch but max_batch_size unless it is 0: the batch axis is explicit.
    assert vit.max_batch_size == 0 and list(vit.input[0].dims) == [-1, 3, 224, 224]
    assert vit.parameters["HINT_BF16"].string_value == "YES"
    assert models["vit_classify"].max_batch_size > 0  # a batching ensemble may hold a model that does not batch
    assert all(not i.optional for m in models.values() if m.backend in ("onnxruntime", "openvino") for i in m.input)
    assert native_models(native_repo)["vit"] == "openvino"
    assert read_served(native_repo / "vit" / "config.pbtxt").inference_precision == "bf16"
    assert report.read_report(native_repo)["sd"]["device"] == "gpu"
    assert report.read_report(native_repo)["vit"]["served"]["caveat"] is None  # bf16 is asked for: HINT_BF16
    # The contract carries the UNet's batch limit itself (an OpenVINO sd_unet would have max_batch_size 0).
    assert read_sd_contract(native_repo).unet_max_batch == unet.max_batch_size


@pytest.mark.slow
def test_the_image_holds_every_model_and_every_import(native_repo, tmp_path):
    image = tmp_path / "image"
    _assemble_image(native_repo, image)
    models = image / "models"
    assert {p.name for p in models.iterdir()} == {p.name for p in native_repo.iterdir()}
    assert check_for_image(models) == []
    # The Dockerfile's own check, with the system Python and nothing but the image's copy of kiln on its path.
    python = shutil.which("python3", path="/usr/bin") or sys.executable
    run = subprocess.run([python, "-m", "kiln.repository", str(models)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(image / "opt" / "kiln")}, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "ready for tritonserver" in run.stdout

    site = image / "opt" / "kiln"
    installed = _installed_top_levels(image / "opt" / "kiln" / "requirements-serving.txt")
    python_models = [p for p in models.iterdir() if p.is_dir() and read_config(p / "config.pbtxt").backend == "python"]
    assert {p.name for p in python_models} == {"sd_tokenizer", "sd_image_preprocess", "sd_vae_postprocess",
                                               "vit_preprocess", "vit_postprocess"}
    for model in python_models:
        pending, seen, missing = [model / "1" / "model.py"], set(), set()
        while pending:
            path = pending.pop()
            if path in seen:
                continue
            seen.add(path)
            for name in _imports(path):
                top = name.split(".")[0]
                if name.startswith("kiln.runtime.torch_session"):
                    continue  # opened for a torch program only, which kiln.repository refuses where torch is absent
                if name.startswith("kiln.runtime.torch_decode"):
                    continue  # opened for --decode torch only, which kiln.repository refuses where torch is absent
                if name.startswith("kiln.runtime.lora"):
                    continue  # opened by a Python-backend runtime model with a lora input only; the image has none
                if top == "kiln":
                    module = _module_file(site, name)
                    if module is None and _module_file(site, name.rsplit(".", 1)[0]) is None:
                        missing.add(name)
                    elif module is not None:
                        pending.append(module)
                elif top not in sys.stdlib_module_names | {"triton_python_backend_utils"} | installed | \
                        RUNTIME_ENGINES:
                    missing.add(name)
        assert not missing, f"{model.name} imports what the image lacks: {sorted(missing)}"


@pytest.mark.slow
def test_the_image_check_names_what_would_stop_tritonserver(tmp_path, plain_repo):
    assert check_for_image(tmp_path / "none") == [f"{tmp_path / 'none'} is not a folder"]
    (tmp_path / "empty").mkdir()
    assert "holds no models" in check_for_image(tmp_path / "empty")[0]
    # The source tree's model folders (model.py, no config) and a Python-backend build: both refused, by name.
    problems = check_for_image(ROOT / "model_repository") if not (ROOT / "model_repository" / "vit" /
                                                                  "config.pbtxt").exists() else []
    assert all("no config.pbtxt" in p for p in problems)
    problems = check_for_image(plain_repo)
    assert any(p.startswith("sd_unet: runs ONNX Runtime or OpenVINO inside the Python backend") for p in problems)
    assert not any(p.startswith("sd_tokenizer") for p in problems)


@pytest.mark.slow
def test_the_embedded_triton_refuses_a_native_repository_by_name(native_repo):
    with pytest.raises(ServerError, match=r"built for NVIDIA's tritonserver image: .*sd_unet \(onnxruntime\).*"
                                          r"vit \(openvino\)"):
        TritonServer(TritonOptions(repository=native_repo)).start()


@pytest.mark.slow
def test_a_native_build_runs_in_process_as_its_python_twin(native_repo, plain_repo):
    """Same checkpoint, same export, other configs: the in-process loop reads the native configs and gets the same
    image bit for bit."""
    from orchestrator.pipeline import Pipeline, Txt2ImgRequest

    request = Txt2ImgRequest(prompt="a red barn", width=64, height=64, steps=3, seed=5)
    native = Pipeline.from_repository(native_repo).generate(request)
    python = Pipeline.from_repository(plain_repo).generate(request)
    assert np.array_equal(np.asarray(native.images[0]), np.asarray(python.images[0]))


def test_what_a_native_target_cannot_load_is_refused_before_building(kiln, tmp_path):
    code, _, err = kiln("build", "vit", "--random-weights", "--triton-backend", "native", "--device", "gpu",
                        "--backend", "openvino", "--repo", tmp_path)
    assert code == 2 and "OpenVINO's Triton backend runs on the CPU only" in err and "Traceback" not in err
    code, _, err = kiln("build", "sd", "--weights", tmp_path, "--device", "gpu", "--repo", tmp_path)
    assert code == 2 and "--device gpu needs --triton-backend native" in err
    code, _, err = kiln("build", "sd", "--weights", tmp_path, "--variant", "onnxruntime-tensorrt-fp16",
                        "--repo", tmp_path)
    assert code == 2 and "tensorrt variant runs on NVIDIA GPUs only" in err
    code, _, err = kiln("build", "vit", "--random-weights", "--backend", "onnxruntime-cuda", "--precision", "fp16",
                        "--triton-backend", "native", "--repo", tmp_path)
    assert code == 2 and "cuda variant runs on NVIDIA GPUs only" in err and "--device gpu" in err
    assert not any(tmp_path.iterdir())


def test_native_config_rules():
    python = ModelConfig("m", (Tensor("t", "FP32", (1,), reshape=()), Tensor("x", "FP32", (4,), optional=True)),
                         (Tensor("y", "FP32", (4,)),), max_batch_size=8,
                         parameters={"runtime": "openvino", "artifact": "model.xml", "keep": "1"})
    from build.convert import SD_VARIANTS

    ov = native_config(python, SD_VARIANTS["openvino-bf16"], threads=2)
    assert ov.max_batch_size == 0 and ov.dynamic_batching is None
    # A per-sample scalar keeps its wire shape (batch, 1), reshaped to the model's (batch,).
    assert ov.inputs[0].dims == (-1, 1) and ov.inputs[0].reshape == (-1,)
    assert ov.inputs[1].dims == (-1, 4) and not ov.inputs[1].optional
    assert dict(ov.parameters) == {"keep": "1", "PERFORMANCE_HINT": "LATENCY", "HINT_BF16": "YES",
                                   "INFERENCE_NUM_THREADS": "2"}
    ort = native_config(python, SD_VARIANTS["onnxruntime-fp32"], "gpu")
    assert ort.max_batch_size == 8 and ort.kind == "KIND_GPU" and dict(ort.parameters) == {"keep": "1"}
    assert ort.inputs[0].reshape == () and ort.to_proto()
    with pytest.raises(ConfigError, match="CPU only"):
        native_config(python, SD_VARIANTS["openvino-fp32"], "gpu")
    # fp32 on OpenVINO's backend may run in bf16 (it cannot be told otherwise): said, not hidden.
    assert "runs this IR in bf16" in precision_caveat(SD_VARIANTS["openvino-fp32"], "native")
    assert precision_caveat(SD_VARIANTS["openvino-fp32"], "python") is None


IMAGE_ORT = "onnxruntime==1.19.2"  # the version inside tritonserver 24.10 (../shared/ENVIRONMENT.md)
_RUN_IN_IMAGE_ORT = """
import sys, numpy as np, onnxruntime as ort
feeds = np.load(sys.argv[2])
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
outputs = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
np.savez(sys.argv[3], **{o.name: v for o, v in zip(session.get_outputs(), outputs)})
"""


@pytest.fixture(scope="module")
def image_ort() -> Path:
    """A scratch venv with the image's ONNX Runtime, made once per machine (PyPI is reachable here)."""
    venv = ROOT / ".kiln" / "onnxruntime-1.19.2"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", IMAGE_ORT, "numpy<2"], check=True,
                       timeout=600)
    return python


def _feeds(session, rng) -> dict[str, np.ndarray]:
    sizes = {"batch": 2, "latent_height": 8, "latent_width": 8, "height": 64, "width": 64, "sequence": 77,
             "vectors": 3}
    feeds = {}
    for tensor in session.get_inputs():
        shape = [d if isinstance(d, int) else sizes[d] for d in tensor.shape]
        if tensor.type == "tensor(int64)":
            feeds[tensor.name] = rng.integers(0, 12 if tensor.name == "layer" else 100, size=shape).astype(np.int64)
        else:
            feeds[tensor.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
    return feeds


@pytest.mark.slow
def test_the_images_onnx_runtime_loads_and_agrees_on_every_onnx_artifact(native_repo, cuda_repo, all_variants_repo,
                                                                          image_ort, tmp_path):
    """Every ONNX file a native build serves, and the ViT's ONNX Runtime variants, load in the image's ONNX Runtime
    (1.19.2: an export with a newer IR or opset would not) and give this venv's ONNX Runtime's outputs."""
    import onnxruntime as ort

    vit_repo, _ = all_variants_repo
    artifacts = sorted(native_repo.glob("sd_*/1/model.onnx")) + sorted(vit_repo.glob("vit/1/*.onnx")) + \
        sorted(cuda_repo.glob("sd_*/1/model-fp16.onnx")) + sorted(cuda_repo.glob("sd_vae_*/1/model.onnx"))
    assert len(artifacts) >= 10
    rng = np.random.default_rng(0)
    for path in artifacts:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = _feeds(session, rng)
        np.savez(tmp_path / "in.npz", **feeds)
        run = subprocess.run([str(image_ort), "-c", _RUN_IN_IMAGE_ORT, str(path), str(tmp_path / "in.npz"),
                              str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{path}: {IMAGE_ORT} cannot run it:\n{run.stderr[-2000:]}"
        theirs = np.load(tmp_path / "out.npz")
        ours = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        for name, value in ours.items():
            if "int8" in path.name or "fp16" in path.name:
                # Dynamic int8 quantizes activations per call, and the two versions' int8 kernels round differently
                # (ViT logits: up to 0.07 apart, both at cosine 0.9993 to fp32); the versions place float16's casts
                # differently: agreement in direction.
                a, b = theirs[name].ravel().astype(np.float64), value.ravel().astype(np.float64)
                assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.999, f"{path} {name}"
            else:
                scale = float(np.abs(value).max()) or 1.0
                assert np.abs(theirs[name] - value).max() <= 1e-4 * scale, f"{path} {name}"


@pytest.mark.slow
def test_a_cuda_build_is_float16_and_says_what_was_not_measured(cuda_repo, plain_repo):
    """float16 on the GPU, but the VAE: its config says force_upcast (diffusers' default), so it is served in float32
    on the same provider, as diffusers upcasts it (SDXL's VAE overflows float16)."""
    content = report.read_report(cuda_repo)["sd"]
    for component in ("text_encoder", "unet"):
        served = content["artifacts"][component]["served"]
        assert served["file"].endswith("/1/model-fp16.onnx") and served["precision"] == "fp16"
        assert "not run on a GPU here" in served["parity_note"] and not served["upcast"]
        assert served["parity"][next(iter(served["parity"]))]["cosine"] >= 0.999
        assert served["size_bytes"] < content["artifacts"][component]["size_bytes"] * 0.6  # half the weights' bytes
        assert read_config(cuda_repo / f"sd_{component}" / "config.pbtxt").default_model_filename == "model-fp16.onnx"
    for component in ("vae_decoder", "vae_encoder"):
        served = content["artifacts"][component]["served"]
        assert served["file"].endswith("/1/model.onnx") and served["precision"] == "fp32" and served["upcast"]
        config = read_config(cuda_repo / f"sd_{component}" / "config.pbtxt")
        assert config.default_model_filename == "model.onnx" and config.backend == "onnxruntime"
    assert content["image_parity"]["psnr_db"] > 30  # the image against fp32's, same seed (CPU arithmetic)
