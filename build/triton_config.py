"""Triton model configurations as typed data, rendered through Triton's own protobuf message.

Nothing here formats config.pbtxt by hand: a `ModelConfig` becomes a dict in the shape of
`inference.ModelConfig`, `json_format.ParseDict` validates it against the protobuf schema (an
unknown field or a wrong enum is an error at build time, not at server start), and
`text_format` writes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format, text_format

from kiln.errors import ConfigError
from kiln.model_config import model_config_messages

model_config_pb2 = model_config_messages()

# Triton's wire dtype names (as tritonclient uses them) -> the model-config enum.
_CONFIG_DTYPE = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "INT8": "TYPE_INT8",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "BF16": "TYPE_BF16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


@dataclass(frozen=True)
class Tensor:
    """One input or output of a model."""

    name: str  # the tensor name requests use
    dtype: str  # Triton wire dtype: FP32, INT64, BYTES, ...
    dims: tuple[int, ...]  # without the batch dimension when the model batches; -1 = any size
    optional: bool = False  # inputs only: a request may leave it out
    # The shape the model sees, when it differs from dims (e.g. () for a per-sample scalar).
    reshape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _CONFIG_DTYPE:
            raise ConfigError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}; valid: {sorted(_CONFIG_DTYPE)}")


@dataclass(frozen=True)
class DynamicBatching:
    """Server-side batching of requests that arrive close together."""

    max_queue_delay_microseconds: int = 2000  # how long a request may wait for others to join its batch
    preferred_batch_size: tuple[int, ...] = ()  # batch sizes the scheduler tries to form first


@dataclass(frozen=True)
class EnsembleStep:
    """One model call inside an ensemble; maps are model tensor name -> ensemble tensor name."""

    model_name: str
    input_map: Mapping[str, str]
    output_map: Mapping[str, str]
    model_version: int = -1  # -1: the latest version


@dataclass(frozen=True)
class Accelerator:
    """An execution accelerator of the onnxruntime backend (`optimization.execution_accelerators`)."""

    name: str  # tensorrt or cuda (GPU)
    parameters: Mapping[str, str] = field(default_factory=dict)  # the backend's keys; values are plain strings


@dataclass(frozen=True)
class Warmup:
    """A request Triton runs (zeros) before the model reports ready: a TensorRT engine is built then, not on the first
    user's request."""

    name: str
    batch_size: int  # 1 for a model that does not batch
    inputs: Mapping[str, tuple[str, tuple[int, ...]]]  # tensor name -> (wire dtype, dims without the batch axis)


@dataclass(frozen=True)
class ModelConfig:
    """Everything Triton needs to know about one model; `platform="ensemble"` for ensembles."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    backend: str | None = "python"  # python, onnxruntime, openvino, tensorrt; None for an ensemble
    platform: str | None = None  # "ensemble" for ensembles
    max_batch_size: int = 0  # 0: the model does not batch and dims are full shapes
    dynamic_batching: DynamicBatching | None = None
    instance_count: int = 1  # copies of the model, each with its own runtime session
    kind: str = "KIND_CPU"  # KIND_CPU or KIND_GPU
    parameters: Mapping[str, str] = field(default_factory=dict)  # read by the model in initialize()
    steps: tuple[EnsembleStep, ...] = ()  # ensembles only
    default_model_filename: str | None = None  # native backends: artifact path inside the version folder
    gpu_accelerators: tuple[Accelerator, ...] = ()  # the onnxruntime backend on KIND_GPU
    warmup: tuple[Warmup, ...] = ()

    def __post_init__(self) -> None:
        is_ensemble = self.platform == "ensemble"
        if is_ensemble and (self.backend is not None or not self.steps):
            raise ConfigError(f"{self.name}: an ensemble has steps and no backend")
        if not is_ensemble and self.steps:
            raise ConfigError(f"{self.name}: only an ensemble has steps")
        if self.dynamic_batching is not None and self.max_batch_size < 1:
            raise ConfigError(f"{self.name}: dynamic batching needs max_batch_size >= 1")

    def to_dict(self) -> dict:
        """The config as a dict in the JSON form of `inference.ModelConfig`."""
        config: dict = {"name": self.name, "max_batch_size": self.max_batch_size}
        if self.backend is not None:
            config["backend"] = self.backend
        if self.platform is not None:
            config["platform"] = self.platform
        config["input"] = [_tensor_dict(t, is_input=True) for t in self.inputs]
        config["output"] = [_tensor_dict(t, is_input=False) for t in self.outputs]
        if self.platform != "ensemble":
            config["instance_group"] = [{"count": self.instance_count, "kind": self.kind}]
        if self.dynamic_batching is not None:
            batching: dict = {"max_queue_delay_microseconds": self.dynamic_batching.max_queue_delay_microseconds}
            if self.dynamic_batching.preferred_batch_size:
                batching["preferred_batch_size"] = list(self.dynamic_batching.preferred_batch_size)
            config["dynamic_batching"] = batching
        if self.parameters:
            config["parameters"] = {k: {"string_value": str(v)} for k, v in sorted(self.parameters.items())}
        if self.default_model_filename:
            config["default_model_filename"] = self.default_model_filename
        if self.gpu_accelerators:
            config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
                {"name": a.name, "parameters": dict(a.parameters)} for a in self.gpu_accelerators]}}
        if self.warmup:
            config["model_warmup"] = [
                {"name": w.name, "batch_size": w.batch_size, "count": 1,
                 "inputs": {n: {"data_type": _CONFIG_DTYPE[dtype], "dims": list(dims), "zero_data": True}
                            for n, (dtype, dims) in w.inputs.items()}}
                for w in self.warmup]
        if self.steps:
            config["ensemble_scheduling"] = {
                "step": [
                    {
                        "model_name": s.model_name,
                        "model_version": s.model_version,
                        "input_map": dict(s.input_map),
                        "output_map": dict(s.output_map),
                    }
                    for s in self.steps
                ]
            }
        return config

    def to_proto(self) -> model_config_pb2.ModelConfig:
        """Validate against Triton's protobuf schema and return the message."""
        try:
            return json_format.ParseDict(self.to_dict(), model_config_pb2.ModelConfig())
        except json_format.ParseError as exc:
            raise ConfigError(f"{self.name}: invalid model config: {exc}") from exc

    def to_pbtxt(self) -> str:
        return text_format.MessageToString(self.to_proto())

    def write(self, repository: Path) -> Path:
        """Write `<repository>/<name>/config.pbtxt` and make sure the version folder `1/` exists."""
        model_dir = Path(repository) / self.name
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        path = model_dir / "config.pbtxt"
        path.write_text(self.to_pbtxt())
        return path


def _tensor_dict(tensor: Tensor, *, is_input: bool) -> dict:
    entry: dict = {"name": tensor.name, "data_type": _CONFIG_DTYPE[tensor.dtype], "dims": list(tensor.dims)}
    if tensor.reshape is not None:
        entry["reshape"] = {"shape": list(tensor.reshape)}
    if tensor.optional:
        if not is_input:
            raise ConfigError(f"output {tensor.name!r} cannot be optional")
        entry["optional"] = True
    return entry
