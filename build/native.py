"""The same models for NVIDIA's tritonserver image: Triton's own onnxruntime and openvino backends serve the artifacts.

A build writes every runtime model as a Python-backend model (`RuntimeModel`, what the embedded Triton here runs);
`--triton-backend native` turns each into a config of the backend that runs its artifact natively, from facts read
in Triton r24.10's sources (../shared/ENVIRONMENT.md):
- native backends have no optional inputs: a model's inputs become required (the ensembles feed them);
- the OpenVINO backend calls `set_batch(max_batch_size)` and then refuses any other batch size, so its models are
  written with max_batch_size 0 and the batch as an explicit -1 axis (ensembles that batch may contain models that
  do not, as long as the shapes agree); it runs on the CPU only (KIND_GPU does not load), and of the precision
  options it reads only HINT_BF16: an fp32 IR runs in bf16 where the CPU has bf16, which the build reports;
- the onnxruntime backend runs KIND_GPU models with its CUDA provider, or TensorRT as an execution accelerator
  (`optimization.execution_accelerators`: fp16, an engine cache, the optimization profile from the spec, and a
  warmup request so the engine is built before the model reports ready).
"""

from __future__ import annotations

from dataclasses import replace

from build.convert import Variant
from build.specs import ComponentSpec
from build.triton_config import Accelerator, ModelConfig, Tensor, Warmup
from kiln.errors import ConfigError

TRITON_BACKENDS = ("python", "native")
DEVICES = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
RUNTIME_PARAMETERS = ("runtime", "artifact", "inference_precision", "threads", "ov_device")  # RuntimeModel's own


def ov_target(ov_device: str, triton_backend: str, variants: list[Variant]) -> dict:
    """Check an OpenVINO target device (--ov-device) before anything is built; its report entry. Parity is checked on
    this machine's CPU either way (the IR does not depend on the device); a device this machine lacks is said."""
    from kiln.runtime import check_ov_device, ov_device_here

    check_ov_device(ov_device)
    if ov_device != "CPU":
        if triton_backend == "native":
            raise ConfigError("--ov-device is the embedded Python backend's: NVIDIA's image runs OpenVINO on its CPU")
        others = sorted({v.runtime for v in variants if v.runtime != "openvino"})
        if others:
            raise ConfigError(f"--ov-device {ov_device} targets OpenVINO variants; this build serves "
                              f"{', '.join(others)}")
    if not any(v.runtime == "openvino" for v in variants):  # nothing to ask OpenVINO (a GPU machine may lack it)
        return {"ov_device": ov_device, "available_here": None, "note": None}
    runs, available = ov_device_here(ov_device)
    note = None if runs else (f"not run on this device here (this machine's OpenVINO has {', '.join(available)}); "
                              "parity was checked on its CPU, and serving here refuses to load")
    return {"ov_device": ov_device, "available_here": available, "note": note}


def check_target(triton_backend: str, device: str, variants: list[Variant]) -> None:
    """Refuse, before anything is built, what the chosen Triton cannot load."""
    if triton_backend not in TRITON_BACKENDS:
        raise ConfigError(f"unknown Triton backend mode {triton_backend!r}; valid: {', '.join(TRITON_BACKENDS)}")
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    for variant in variants:
        if variant.runtime == "torch" and triton_backend == "native":
            raise ConfigError("torch variants run inside Triton's Python backend: build them with "
                              "--triton-backend python")
        if variant.gpu_only and device != "gpu":
            raise ConfigError(f"{variant.runtime}'s {variant.accelerator} variant runs on NVIDIA GPUs only: build it "
                              "with --device gpu" + (" --triton-backend native" if variant.runtime == "onnxruntime"
                                                     else ""))
        if variant.runtime == "onnxruntime" and variant.gpu_only and triton_backend != "native":
            raise ConfigError(f"ONNX Runtime's {variant.accelerator} variant runs on the onnxruntime backend of "
                              "NVIDIA's image: build it with --triton-backend native --device gpu")
    if device == "gpu" and any(v.runtime == "torch" and not v.accelerator for v in variants):
        raise ConfigError("--device gpu runs the served models on the GPU, and torch's CPU variants (torch-fp32, "
                          "torch-aoti-fp32, torch-aoti-bf16) are checked and compiled for the CPU: choose a CUDA one "
                          "(torch-cuda-fp16, torch-aoti-cuda-fp16) for every torch model")
    if device == "gpu" and triton_backend == "python" and any(v.runtime != "torch" for v in variants):
        raise ConfigError("--device gpu needs --triton-backend native, or a torch variant: the embedded Python-backend "
                          "runtimes ONNX Runtime and OpenVINO are CPU builds")
    if device == "gpu" and any(v.runtime == "openvino" for v in variants):
        raise ConfigError("OpenVINO's Triton backend runs on the CPU only (a KIND_GPU model does not load): build "
                          "an onnxruntime variant for --device gpu, or --device cpu")


def native_config(config: ModelConfig, variant: Variant, device: str = "cpu", threads: int = 0,
                  spec: ComponentSpec | None = None) -> ModelConfig:
    """`config` (a runtime model as the Python backend serves it) for the native backend of `variant`'s runtime.
    A TensorRT variant needs the component's `spec`: its shape profile becomes TensorRT's (min, opt, max)."""
    kept = {k: v for k, v in config.parameters.items() if k not in RUNTIME_PARAMETERS}
    inputs = tuple(replace(t, optional=False) for t in config.inputs)
    outputs = config.outputs
    max_batch, batching = config.max_batch_size, config.dynamic_batching
    if variant.runtime == "openvino":
        if device != "cpu":
            raise ConfigError(f"{config.name}: OpenVINO's Triton backend runs on the CPU only")
        options = {"PERFORMANCE_HINT": "LATENCY"}
        if variant.inference_precision == "bf16":
            options["HINT_BF16"] = "YES"
        if threads:
            options["INFERENCE_NUM_THREADS"] = str(threads)
        if max_batch > 0:
            inputs = tuple(_explicit_batch(t) for t in inputs)
            outputs = tuple(_explicit_batch(t) for t in outputs)
            max_batch, batching = 0, None
    elif variant.runtime == "onnxruntime":
        options = {"intra_op_thread_count": str(threads)} if threads else {}
    else:
        raise ConfigError(f"{config.name}: no native Triton backend runs {variant.runtime}")
    accelerators, warmup = (), ()
    if variant.gpu_only and device != "gpu":
        raise ConfigError(f"{config.name}: ONNX Runtime's {variant.accelerator} variant runs on NVIDIA GPUs only")
    if variant.accelerator == "tensorrt":
        if spec is None:
            raise ConfigError(f"{config.name}: a TensorRT variant needs the component's shape profile")
        accelerators = (tensorrt_accelerator(config.name, spec),)
        warmup = (opt_warmup(config, spec),)
    return replace(config, backend=variant.runtime, inputs=inputs, outputs=outputs, max_batch_size=max_batch,
                   dynamic_batching=batching, kind=DEVICES[device], default_model_filename=variant.artifact,
                   parameters=kept | options, gpu_accelerators=accelerators, warmup=warmup)


TENSORRT_CACHE = "/var/cache/kiln/tensorrt"  # mount a volume here: engines survive restarts (README)
TENSORRT_WORKSPACE_BYTES = 4 << 30


def tensorrt_accelerator(name: str, spec: ComponentSpec) -> Accelerator:
    """TensorRT in fp16 through ONNX Runtime, one optimization profile from the spec's (min, opt, max) sizes, the
    engine cached per model (building one takes minutes for a UNet)."""
    def shapes(which: str) -> str:
        sizes = spec.sizes(which)
        return ",".join(f"{t.name}:" + "x".join(str(d) for d in t.concrete_shape(sizes)) for t in spec.inputs)

    return Accelerator("tensorrt", {
        "precision_mode": "FP16", "max_workspace_size_bytes": str(TENSORRT_WORKSPACE_BYTES),
        "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"{TENSORRT_CACHE}/{name}",
        "trt_profile_min_shapes": shapes("min"), "trt_profile_opt_shapes": shapes("opt"),
        "trt_profile_max_shapes": shapes("max")})


def opt_warmup(config: ModelConfig, spec: ComponentSpec) -> Warmup:
    """One request of zeros at the spec's optimal sizes, in the config's own dims."""
    sizes = spec.sizes("opt")
    shapes = {t.name: t.concrete_shape(sizes) for t in spec.inputs}
    batching = config.max_batch_size > 0
    inputs = {t.name: (t.dtype, (shapes[t.name][1:] or (1,)) if batching else shapes[t.name]) for t in config.inputs}
    return Warmup(f"{config.name}_opt", sizes["batch"] if batching else 1, inputs)


def _explicit_batch(tensor: Tensor) -> Tensor:
    """A batching model's tensor with its batch axis written out (for a model with max_batch_size 0)."""
    dims = (-1, *tensor.dims)
    reshape = None if tensor.reshape is None else (-1, *tensor.reshape)
    return replace(tensor, dims=dims, reshape=None if reshape == dims else reshape)


def precision_caveat(variant: Variant, triton_backend: str) -> str | None:
    """What a native build computes in that its parity figures do not show, or None."""
    if triton_backend == "native" and variant.runtime == "openvino" and variant.inference_precision == "f32":
        return ("OpenVINO's Triton backend cannot set INFERENCE_PRECISION_HINT: on a CPU with bf16 (AVX-512 BF16 or "
                "AMX) it runs this IR in bf16, not the f32 the parity figures were measured in; serve it through "
                "the Python backend (--triton-backend python) where f32 matters")
    return None


def parity_note(variant: Variant) -> str | None:
    """What a GPU variant's parity figures, measured on this machine's CPU, do not show (torch's on CUDA are measured
    on the GPU: nothing to say)."""
    if variant.accelerator == "cuda" and variant.runtime == "onnxruntime":
        return ("measured with ONNX Runtime's CPU provider, which computes most float16 nodes in float32: the error "
                "of the float16 weights, not of the GPU's float16 arithmetic (not run on a GPU here)")
    if variant.accelerator == "tensorrt":
        return ("TensorRT builds its fp16 engine from this fp32 graph when the model loads in NVIDIA's image: the "
                "figures are the fp32 graph's on the CPU (not run on a GPU here)")
    return None


# A torch model on a GPU takes its float and uint8 inputs where the client put them: from a client's CUDA shared memory
# on the GPU, through DLPack, with no copy through the host (kiln.runtime.model.read_input). Triton's Python backend
# otherwise copies every input to the host first.
GPU_INPUTS = {"FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
GRAPH_BATCHES = (2, 4, 8, 16)  # rows: one request with CFG, and 2, 4, 8 of them merged by the step batcher


def cuda_graph_parameters(spec: ComponentSpec, batches: tuple[int, ...] = GRAPH_BATCHES,
                          max_batch: int = 0) -> dict[str, str]:
    """A model's CUDA graphs (torch on CUDA): the batch sizes captured at load, at the spec's optimal sizes."""
    import json

    sizes = spec.sizes("opt")
    return {"graph_batches": ",".join(str(b) for b in batches if b <= (max_batch or spec.max_batch_size)),
            "graph_shapes": json.dumps({t.name: list(t.concrete_shape(sizes)) for t in spec.inputs})}
