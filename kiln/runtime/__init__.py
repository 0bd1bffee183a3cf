"""Runtime sessions over built artifacts: ONNX Runtime, OpenVINO and torch.export programs behind one interface.

Used by the Triton Python-backend models, by the parity checks and by the benchmarks, so the
served path and the measured path are the same code.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import ConfigError
from kiln.machine import threads as machine_threads

RUNTIMES = ("onnxruntime", "openvino", "torch")


def model_config(args: Mapping[str, str]) -> tuple[dict, dict[str, str]]:
    """A Triton Python-backend model's config (from initialize's args) and its string parameters."""
    import json

    config = json.loads(args["model_config"])
    return config, {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


@dataclass(frozen=True)
class ByteScale:
    """An input that may arrive as uint8 pixels (channels on axis 1) and becomes the program's floats as
    (pixels / 255 - mean) / std per channel: the ViT's eval transform, with a quarter of float32's bytes on the wire,
    through Triton and over PCIe (a torch session on a GPU scales after the copy, there)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def numpy(self, pixels: np.ndarray) -> np.ndarray:
        from kiln.imaging import normalize_pixels

        return normalize_pixels(pixels, self.mean, self.std)

    @staticmethod
    def parse(text: str) -> dict[str, ByteScale]:
        """A config's `byte_inputs` parameter, JSON {input: {"mean": [...], "std": [...]}} ("": none)."""
        import json

        return {name: ByteScale(tuple(v["mean"]), tuple(v["std"])) for name, v in json.loads(text or "{}").items()}

    @staticmethod
    def dump(scales: Mapping[str, ByteScale]) -> str:
        import json

        return json.dumps({name: {"mean": list(s.mean), "std": list(s.std)} for name, s in scales.items()})


@dataclass(frozen=True)
class SessionOptions:
    """How to open an artifact."""

    runtime: str  # onnxruntime or openvino
    path: Path  # .onnx or .xml
    inference_precision: str = "f32"  # OpenVINO's INFERENCE_PRECISION_HINT: f32 or bf16 (this CPU defaults to bf16)
    threads: int = 0  # 0: kiln.machine.threads (OMP_NUM_THREADS where set, else every core it may use)
    performance_hint: str = "LATENCY"  # OpenVINO; on 2 cores LATENCY beats THROUGHPUT for synchronous calls
    device: str = "cpu"  # torch: cpu or cuda:N (the Triton instance's GPU)
    graph_batches: tuple[int, ...] = ()  # torch on CUDA: batch sizes that replay a CUDA graph ...
    graph_shapes: Mapping[str, tuple[int, ...]] | None = None  # ... captured at these input shapes (the build's opt)
    channels_last: bool = False  # torch.export programs: 4-d weights in channels-last layout (NHWC convolutions)
    torch_compile: bool = False  # torch.export programs on CUDA: torch.compile's kernels in the captured graphs
    cache_dir: Path | None = None  # OpenVINO: its model cache (CACHE_DIR), so a second start skips compiling
    ov_device: str = "CPU"  # OpenVINO: CPU, GPU[.N], NPU, or AUTO (its plugin chooses among what the machine has)
    static_shapes: str = ""  # OpenVINO: a kiln.runtime.static plan (JSON); "": the IR's dynamic shapes
    byte_inputs: Mapping[str, ByteScale] | None = None  # inputs that may arrive as uint8 pixels, scaled on the way in


OV_DEVICES = ("CPU", "GPU", "NPU", "AUTO")  # the OpenVINO targets a build may name (GPU.1, AUTO:GPU,CPU too)


def check_ov_device(name: str) -> str:
    """An OpenVINO device name a build may write (CPU, GPU, GPU.1, NPU, AUTO, AUTO:GPU,CPU); a ConfigError naming
    the valid ones otherwise. Whether this machine has it is ov_device_here's question."""
    base, _, candidates = name.partition(":")
    family = base.split(".")[0]
    if family not in OV_DEVICES or (candidates and family != "AUTO") or \
            (base != family and not base[len(family) + 1:].isdigit()):
        raise ConfigError(f"--ov-device {name!r} is not an OpenVINO device; valid: CPU, GPU, GPU.N, NPU, AUTO, "
                          "AUTO:GPU,CPU")
    for candidate in filter(None, candidates.split(",")):
        check_ov_device(candidate)
    return name


def ov_device_here(name: str, core=None) -> tuple[bool, list[str]]:
    """Whether OpenVINO on this machine can run on `name` (AUTO: on some device it has), and the devices it has
    (`core`: an OpenVINO Core the caller already holds)."""
    if core is None:
        import openvino as ov

        core = ov.Core()
    available = list(core.available_devices)
    base, _, candidates = name.partition(":")
    if base == "AUTO":
        wanted = [c for c in candidates.split(",") if c] or available
        return any(c in available or c.split(".")[0] in available for c in wanted), available
    return name in available or (name == "GPU" and "GPU.0" in available), available


def ov_cache_dir(repository: Path) -> Path | None:
    """Where OpenVINO keeps compiled models for a repository: KILN_OV_CACHE (a folder, or "off"), else a folder beside
    the repository, <repository>.ov-cache (inside it, Triton would take the folder for a model)."""
    chosen = os.environ.get("KILN_OV_CACHE", "")
    if chosen.lower() in ("off", "none", "0"):
        return None
    return Path(chosen) if chosen else repository.parent / f"{repository.name}.ov-cache"


def _usable_cache(folder: Path | None) -> str | None:
    """The cache folder as OpenVINO takes it, or None (with a warning) where it cannot be written: serving goes on."""
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        import warnings

        warnings.warn(f"OpenVINO model cache {folder} is not writable ({exc.strerror or exc}): compiling without it",
                      stacklevel=3)
        return None
    return str(folder)


def session_device(runtime: str, gpu: bool, graph_batches: str = "", graph_shapes: str = "",
                   device_id: int = 0, channels_last: str = "", torch_compile: str = "") -> dict:
    """SessionOptions' device fields from a model's config: a KIND_GPU torch model runs on GPU `device_id`, replaying
    CUDA graphs at the batches its build captured ("2,4,8,16") at the shapes it names (JSON), with its weights
    channels-last, and its graphs captured from torch.compile's kernels, where the config says "1"."""
    if not gpu or runtime != "torch":
        return {}
    import json

    return {"device": f"cuda:{device_id}", "graph_batches": tuple(int(b) for b in graph_batches.split(",") if b),
            "graph_shapes": json.loads(graph_shapes) if graph_shapes else None, "channels_last": channels_last == "1",
            "torch_compile": torch_compile == "1"}


def pad_rows(value: np.ndarray, rows: int) -> np.ndarray:
    """`value` with copies of its last row up to `rows` (real values: nothing a model would treat otherwise), to fill
    a CUDA graph's batch (the step batcher's buckets, and a torch session's own)."""
    return np.concatenate([value, np.repeat(value[-1:], rows - len(value), axis=0)])


def served_device(served) -> dict:
    """session_device for a kiln.model_config.ServedArtifact (what a runtime model's config serves), on the first GPU:
    its artifact opened in another process as its Triton model opens it."""
    return session_device(served.runtime, served.gpu, served.graph_batches, served.graph_shapes,
                          channels_last=served.channels_last, torch_compile=served.torch_compile)


class Session:
    """run(inputs, output_names) -> {name: array}; thread-safe (ONNX Runtime runs concurrent calls; OpenVINO's one
    infer request takes them in turn)."""

    def __init__(self, options: SessionOptions, overrides: Mapping[str, np.ndarray] | None = None) -> None:
        """`overrides`: constants of the artifact replaced by these values, by name (kiln.runtime.lora's merged
        weights); ONNX Runtime and OpenVINO only."""
        self.options = options
        path = Path(options.path)
        if not path.exists():
            raise ConfigError(f"artifact {path} does not exist")
        threads = options.threads or machine_threads()
        if options.runtime == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            # Replaced constants: ONNX Runtime's level-3 layout transforms (NCHWc convolutions) read the file's weights
            # before session initializers replace them (measured: 1x1 convolutions kept their old weights), so a LoRA
            # session stops at the extended level. With KILN_LORA_ORT_LEVEL=all, weights kept in external data (a
            # file past 2 GB: the full-size UNet) are replaced as the file loads, before any transform, and the
            # session runs at every level, for more memory per held set (benchmarks/RESULTS.md, LoRA: 4.1 GB against
            # 2.4 GB for a full-size UNet set, and no faster on an AVX2 CPU).
            on_load = False
            if overrides:  # LoRA only (kiln.runtime.lora: NVIDIA's image, which has no LoRA, lacks what it imports)
                from kiln.runtime.lora import external_initializers, lora_ort_level

                on_load = lora_ort_level() == "all" and set(overrides) <= external_initializers(path)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED \
                if overrides and not on_load else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # ONNX Runtime uses these buffers without a copy: they live as long as the session
            self._held = [ort.OrtValue.ortvalue_from_numpy(v) for v in (overrides or {}).values()]
            if on_load:
                so.add_external_initializers(list(overrides), self._held)
            else:
                for name, value in zip(overrides or {}, self._held):
                    so.add_initializer(name, value)
            self._ort = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self._ort.get_inputs()]
            self.output_names = [o.name for o in self._ort.get_outputs()]
        elif options.runtime == "openvino":
            import openvino as ov

            core = ov.Core()
            config = {
                "INFERENCE_PRECISION_HINT": options.inference_precision,
                "PERFORMANCE_HINT": options.performance_hint,
                "INFERENCE_NUM_THREADS": threads,
            }
            cache = None if overrides else _usable_cache(options.cache_dir)  # a LoRA set's weights: never cached
            if cache:
                config["CACHE_DIR"] = cache
            runs, available = ov_device_here(options.ov_device, core)
            if not runs:
                raise ConfigError(f"OpenVINO device {options.ov_device!r} is not on this machine; it has: "
                                  f"{', '.join(available)} (rebuild with --ov-device naming one of them, or AUTO)")
            if options.ov_device.split(".")[0] in ("GPU", "NPU"):  # the thread count is the CPU plugin's alone
                config.pop("INFERENCE_NUM_THREADS")
            self._static = None
            if options.static_shapes:  # one compiled model per built shape set (kiln.runtime.static)
                from kiln.runtime.static import StaticModels, StaticPlan

                self._static = StaticModels(core, _with_constants(core, path, overrides or {}), options.ov_device,
                                            config, StaticPlan.from_json(options.static_shapes))
                self._compiled = self._static.compiled[0]
            else:
                self._compiled = core.compile_model(_with_constants(core, path, overrides) if overrides else
                                                    str(path), options.ov_device, config)
                self._request = self._compiled.create_infer_request()
            self._lock = threading.Lock()
            # A port can carry several names (ONNX's and OpenVINO's own); index every one.
            self._ports = {name: port for port in self._compiled.outputs for name in port.get_names()}
            self.input_names = [name for port in self._compiled.inputs for name in port.get_names()]
            self.output_names = [_preferred_name(port) for port in self._compiled.outputs]
        elif options.runtime == "torch":
            if overrides:
                raise ConfigError("the torch runtime takes no replaced weights (LoRA)")
            from kiln.runtime.torch_session import TorchSession  # the one module of kiln that needs torch

            self._torch = TorchSession(path, options.device, options.threads, options.graph_batches,
                                       options.graph_shapes, options.channels_last, options.byte_inputs,
                                       options.torch_compile)
            self.input_names, self.output_names = self._torch.input_names, self._torch.output_names
        else:
            raise ConfigError(f"unknown runtime {options.runtime!r}; valid: {', '.join(RUNTIMES)}")

    @property
    def last_split(self) -> dict | None:
        """The torch runtime's split of its last call into copy in, compute and copy out, where KILN_EXECUTE_TIMING
        is set (kiln.runtime.torch_session); None otherwise."""
        torch_session = getattr(self, "_torch", None)
        return torch_session.last_split if torch_session is not None else None

    @property
    def execution_precision(self) -> str:
        """The precision the runtime really computes in ("f32", "bf16"; "as stored" for ONNX Runtime; "int8+f32"
        where OpenVINO runs some convolutions or matrix products in int8, the rest in f32).

        OpenVINO silently falls back to f32 for a bf16 hint on CPUs without bf16 instructions; its hint says nothing
        of a quantized model's int8 layers, which its compiled graph shows.
        """
        if self.options.runtime == "onnxruntime":
            return "as stored"
        if self.options.runtime == "torch":
            return self._torch.execution_precision
        value = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        value = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
        return f"int8+{value}" if _runs_int8(self._compiled) else value

    @property
    def checks_finite(self) -> bool:
        """Whether run() itself refuses NaN and infinity in float inputs (torch on a GPU, where it is cheap)."""
        return self.options.runtime == "torch" and self._torch.checks_finite

    @property
    def compile_s(self) -> float:
        """The seconds torch.compile took when this session opened (SessionOptions.torch_compile), else 0."""
        return self._torch.compile_s if self.options.runtime == "torch" else 0.0

    def replays_graph(self, inputs: Mapping[str, np.ndarray]) -> bool:
        """Whether run(inputs) replays a CUDA graph (torch on CUDA, at the shapes its build captured)."""
        return self.options.runtime == "torch" and self._torch.replays_graph(inputs)

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else self.output_names
        feed = {k: v for k, v in inputs.items() if k in self.input_names}
        if self.options.runtime == "torch":  # it scales uint8 pixels itself (on a GPU, after the copy)
            return self._torch.run(feed, names)
        scales = self.options.byte_inputs or {}
        feed = {k: scales[k].numpy(v) if k in scales and v.dtype == np.uint8 else v for k, v in feed.items()}
        if self.options.runtime == "onnxruntime":
            return dict(zip(names, self._ort.run(names, feed)))
        with self._lock:
            if self._static is not None:
                return self._static.run(feed, names)
            self._request.infer(feed)
            return {name: np.array(self._request.get_tensor(self._ports[name]).data, copy=True) for name in names}


def _with_constants(core, path: Path, values: Mapping[str, np.ndarray]):
    """The OpenVINO model at `path` with the named constants replaced by `values` (same shapes and types)."""
    import openvino as ov

    model = core.read_model(str(path))
    found = 0
    for node in model.get_ops():
        if node.get_type_name() == "Constant" and node.get_friendly_name() in values:
            constant = ov.op.Constant(np.ascontiguousarray(values[node.get_friendly_name()]))
            constant.set_friendly_name(node.get_friendly_name())
            node.output(0).replace(constant.output(0))
            found += 1
    if found != len(values):
        raise ConfigError(f"{path.name}: {len(values) - found} of the constants to replace are not in it")
    return model


def _preferred_name(port) -> str:
    names = port.get_names()
    any_name = port.get_any_name()
    # Prefer a name without OpenVINO's ":0"/"/sink_port" decorations when there is one.
    plain = sorted(n for n in names if ":" not in n and "/" not in n)
    return plain[0] if plain and any_name not in plain else any_name


def _runs_int8(compiled) -> bool:
    """Whether a compiled OpenVINO model runs a convolution or a matrix product in 8-bit integers (its execution
    graph's runtimePrecision; a plugin without that graph says nothing: False)."""
    try:
        infos = [op.get_rt_info() for op in compiled.get_runtime_model().get_ops()]
        return any(info["runtimePrecision"].astype(str) in ("u8", "i8") and
                   info["layerType"].astype(str) in ("Convolution", "FullyConnected", "MatMul", "Deconvolution")
                   for info in infos)
    except (RuntimeError, KeyError, AttributeError):
        return False
