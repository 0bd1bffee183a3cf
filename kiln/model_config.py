"""A model's config.pbtxt read as Triton reads it (its model-config protobuf), and what a runtime model's config
serves (ServedArtifact): the build writes these files (build.triton_config), the runtime models, the orchestrator's
local components and the checks read them."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from pathlib import Path

from kiln.errors import ConfigError


@functools.cache
def model_config_messages():
    """Triton's model-config protobuf module (tritonclient.grpc.model_config_pb2). Where grpcio is missing (a machine
    that reads and writes configs but calls Triton otherwise), its file is loaded alone: it needs protobuf only."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        import importlib.util

        found = importlib.util.find_spec("tritonclient")
        if found is None or not found.submodule_search_locations:
            raise
        path = Path(list(found.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location("kiln_model_config_pb2", path)
        model_config_pb2 = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(model_config_pb2)
    return model_config_pb2


def read_config(config_path: Path):
    """A config.pbtxt as Triton's own protobuf message."""
    from google.protobuf import text_format

    model_config_pb2 = model_config_messages()
    path = Path(config_path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; build the repository first")
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def read_parameters(config_path: Path) -> tuple[dict[str, str], int]:
    """A config.pbtxt's string parameters and max_batch_size."""
    config = read_config(config_path)
    return {k: v.string_value for k, v in config.parameters.items()}, int(config.max_batch_size)


@dataclass(frozen=True)
class ServedArtifact:
    """The artifact a runtime model serves, and how it runs it."""

    runtime: str  # onnxruntime, openvino or torch
    artifact: str  # file name in the version folder
    inference_precision: str = "f32"
    gpu: bool = False  # a KIND_GPU instance (in process: the first GPU)
    graph_batches: str = ""  # torch on CUDA: the batch sizes replayed from CUDA graphs ...
    graph_shapes: str = ""  # ... captured at these input shapes (JSON)
    static_shapes: str = ""  # OpenVINO: a static build's plan (kiln.runtime.static)
    channels_last: str = ""  # torch on CUDA: "1", the program's 4-d weights channels-last (NHWC) ...
    torch_compile: str = ""  # ... and "1", its CUDA graphs captured from torch.compile's kernels


def read_served(config_path: Path) -> ServedArtifact:
    """What a runtime model's config serves: a Python-backend model's parameters, or a native backend's file."""
    config = read_config(config_path)
    params = {k: v.string_value for k, v in config.parameters.items()}
    if config.backend == "python":
        if "runtime" not in params:
            raise ConfigError(f"{config_path}: {config.name} serves no artifact")
        extra = {f.name: params.get(f.name, "") for f in fields(ServedArtifact)[4:]}  # after gpu: its parameters
        return ServedArtifact(params["runtime"], params["artifact"], params.get("inference_precision", "f32"),
                              any(group.kind == group.KIND_GPU for group in config.instance_group), **extra)
    if config.backend in ("onnxruntime", "openvino") and config.default_model_filename:
        return ServedArtifact(config.backend, config.default_model_filename,
                              "bf16" if params.get("HINT_BF16") == "YES" else "f32")
    raise ConfigError(f"{config_path}: {config.name} serves no artifact kiln can open")
