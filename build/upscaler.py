"""Upscaler networks for AUTOMATIC1111's upscalers (the extras, the hires fix's image upscalers, SD upscale): an
ESRGAN-family file read by spandrel (the SD front ends' loader: ESRGAN, Real-ESRGAN, its Compact, SwinIR, HAT, DAT,
SPAN, ...), exported to ONNX with every image axis dynamic, checked against PyTorch, and served as a Triton model.

`kiln build upscaler --weights FILE [--name NAME]`: FILE is a .safetensors file or a .pth state dict (read with
torch's weights-only loader: no code runs); its name (what `upscaler_1`, `hr_upscaler` and SD upscale's upscaler
take) is the file's stem, as AUTOMATIC1111 lists ESRGAN models. The model `upscaler_<slug>` takes (N, 3, H, W)
pixels in [0, 1] and returns (N, 3, sH, sW) clamped to [0, 1]; its parameters name the upscaler and its scale, which
the service reads (orchestrator.pipeline.components.triton). Only single-image super-resolution networks of RGB in
and out are taken; others (face restoration, inpainting, denoising) are refused by their architecture's name.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from build import parity, report
from build.sd.specs import FP32_TOLERANCE
from build.triton_config import DynamicBatching, ModelConfig, Tensor
from kiln.errors import ExportError, WeightsError, first_line
from kiln.paths import DEFAULT_REPOSITORY

PREFIX = "upscaler_"
NAME = re.compile(r"^[\w.+ ()\[\]-]{1,64}$")
MAX_BATCH = 4


def slug(name: str) -> str:
    return PREFIX + re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def load_upscaler(path: Path):
    """spandrel's descriptor of the network in `path`; WeightsError for a file it cannot serve as an upscaler."""
    import torch
    from spandrel import ModelLoader, UnsupportedModelError, canonicalize_state_dict

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix == ".pth":
            state = torch.load(str(path), map_location="cpu", weights_only=True)  # tensors only: no code runs
        else:
            raise WeightsError(f"--weights {path}: an upscaler is a .safetensors or .pth file")
        descriptor = ModelLoader().load_from_state_dict(canonicalize_state_dict(state))
    except (UnsupportedModelError, ValueError, RuntimeError, OSError) as exc:
        raise WeightsError(f"--weights {path}: not an upscaler spandrel knows: {first_line(exc)}") from None
    if descriptor.purpose != "SR" or descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise WeightsError(f"--weights {path}: {descriptor.architecture.name} is a {descriptor.purpose} network of "
                           f"{descriptor.input_channels} -> {descriptor.output_channels} channels; an upscaler is "
                           "super-resolution of RGB images")
    return descriptor.eval()


def random_esrgan(seed: int = 0, filters: int = 16, blocks: int = 2, scale: int = 4) -> dict:
    """A seeded random ESRGAN (RRDBNet) state dict in the original ESRGAN key layout (what 4x-UltraSharp.pth and
    AUTOMATIC1111's ESRGAN folder hold), tiny by default."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in ESRGAN(num_filters=filters, num_blocks=blocks, scale=scale).state_dict()
            .items()}


def build_upscaler(weights: Path, repository: Path = DEFAULT_REPOSITORY, name: str | None = None,
                   threads: int = 0, log: Callable[[str], None] = print) -> dict:
    """Export, check and serve one upscaler network; returns its report entry."""
    import torch

    from build.convert import FP32, check_threads, open_session
    from build.repository import write_model

    name = name or Path(weights).stem
    if not NAME.match(name) or name in ("None", "Lanczos", "Nearest") or name.startswith("Latent"):
        raise WeightsError(f"--name {name!r}: 1-64 letters, digits, space, _ . + - ( ) [ ], and not one of "
                           "AUTOMATIC1111's built-in upscalers")
    check_threads(threads)
    start = time.perf_counter()
    descriptor = load_upscaler(weights)

    class Upscale(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, image):
            return self.model(image).clamp(0, 1)  # AUTOMATIC1111 clamps the network's output to [0, 1]

    module = Upscale(descriptor.model).eval()
    model_name = slug(name)
    version = Path(repository) / model_name / "1"
    version.mkdir(parents=True, exist_ok=True)
    path = version / "model.onnx"
    sample = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            torch.onnx.export(module, (sample,), str(path), input_names=["image"], output_names=["upscaled"],
                              dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                            "upscaled": {0: "batch", 2: "out_height", 3: "out_width"}},
                              opset_version=17, dynamo=False)
    except Exception as exc:
        raise ExportError(f"ONNX export of {name} ({descriptor.architecture.name}) failed: {first_line(exc)}") from exc
    check = torch.rand(2, 3, 32, 28, generator=torch.Generator().manual_seed(1))  # another size than the export's
    with torch.inference_mode():
        expected = module(check).numpy()
    got = open_session(FP32, path).run({"image": check.numpy()}, ["upscaled"])["upscaled"]
    figures = parity.compare(expected, got)
    parity.check(f"upscaler {name} (upscaled)", figures, FP32_TOLERANCE["fp32"])  # ParityError outside it
    image = Tensor("image", "FP32", (3, -1, -1))
    upscaled = Tensor("upscaled", "FP32", (3, -1, -1))
    write_model(ModelConfig(name=model_name, inputs=(image,), outputs=(upscaled,), max_batch_size=MAX_BATCH,
                            dynamic_batching=DynamicBatching(max_queue_delay_microseconds=0),
                            parameters={"runtime": "onnxruntime", "artifact": path.name, "threads": str(threads),
                                        "upscaler_name": name, "scale": str(int(descriptor.scale)),
                                        "architecture": descriptor.architecture.name}), repository)
    entry = {"name": name, "model": model_name, "architecture": descriptor.architecture.name,
             "scale": int(descriptor.scale), "source": str(weights), "file": str(path.relative_to(repository)),
             "size_bytes": report.artifact_size(path), "sha256": report.sha256(path),
             "parity": figures.as_dict(), "build_seconds": round(time.perf_counter() - start, 2)}
    content = report.read_report(repository).get("upscalers", {}) | {name: entry}
    report.update_report(repository, "upscalers", content)
    log(f"  {model_name}: {descriptor.architecture.name} x{int(descriptor.scale)}, cosine {figures.cosine:.6f}  "
        f"max|diff| {figures.max_abs:.2e}")
    return entry
