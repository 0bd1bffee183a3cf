"""`kiln build sd --variant auto`: the UNet, where a denoising run spends its time, made in every candidate variant
this machine can run, checked against PyTorch, and timed on one CFG step at the build's optimal size (the same
inputs for all); the build then serves the fastest candidate inside its tolerance, and its report keeps every
candidate's figures and the reason (build.auto.choose). On the CPU the candidates are the ONNX Runtime, OpenVINO
and AOTInductor variants; with --device gpu, on a machine with a CUDA GPU, the torch CUDA ones (ONNX Runtime's GPU
variants run only in NVIDIA's image, where nothing of this build can time them).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from build import auto
from build.convert import SD_VARIANTS, derive, open_session
from kiln.errors import ConfigError, ExportError, ParityError

CPU_CANDIDATES = ("onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-bf16", "openvino-fp16",
                  "openvino-int8", "torch-aoti-fp32")
GPU_CANDIDATES = ("torch-cuda-fp16", "torch-aoti-cuda-fp16")


def candidates(device: str, asked: Sequence[str] | None, triton_backend: str = "python") -> tuple[str, ...]:
    """The variants `--variant auto` measures: those asked for, or every one this device can time here (for NVIDIA's
    image, --triton-backend native, not the torch ones: they run inside the Python backend)."""
    if device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--variant auto with --device gpu times the candidates on the GPU they will run on, and "
                              "this machine has none: name the variant (--variant torch-cuda-fp16, say)")
    keys = tuple(asked) if asked else tuple(k for k in (GPU_CANDIDATES if device == "gpu" else CPU_CANDIDATES)
                                            if triton_backend == "python" or SD_VARIANTS[k].runtime != "torch")
    if not keys:
        raise ConfigError("--variant auto has no candidate this machine can time for --triton-backend native "
                          "--device gpu (ONNX Runtime's GPU variants run only in NVIDIA's image): name the variant")
    for key in keys:
        variant = SD_VARIANTS.get(key)
        if variant is None:
            raise ConfigError(f"unknown candidate {key!r}; valid: {', '.join(CPU_CANDIDATES + GPU_CANDIDATES)}")
        if variant.calibrated:
            raise ConfigError(f"{key} needs calibration runs of a built pipeline; it is not an --variant auto "
                              "candidate (build it by name)")
        if variant.gpu_only != (device == "gpu") or (variant.gpu_only and variant.runtime != "torch"):
            raise ConfigError(f"{key} cannot be timed on this machine with --device {device}")
    return keys


# What `auto` times for each part of a mix (build.sd.mix; "": the UNet's): the component, the rows of one call (a CFG
# pair for the text encoder and the UNet, one image for the VAE decoder), and what a call is. A part's other
# components (the VAE encoder, the ControlNets) run the variant chosen for it.
TIMED = {"": ("unet", 2, "UNet step"), "text_encoder": ("text_encoder", 2, "text encoding"),
         "vae": ("vae_decoder", 1, "VAE decode")}


def choose_variant(keys: Sequence[str], module, spec, export_sizes: dict[str, int], check_sizes: dict[str, int],
                   timing_sizes: dict[str, int], log: Callable[[str], None], what: str = "UNet step",
                   upcast: bool = False, graphs: bool = True, channels_last: bool = True) -> tuple[str, dict]:
    """Make, check and time a component (the UNet: one CFG step; `what` one call is) in each candidate variant at
    the build's optimal size, `timing_sizes`, the same inputs for all; with `graphs` (the step models: their configs
    carry CUDA graph buckets), torch's CUDA variants replay the CUDA graph they would serve with, and run eagerly
    otherwise, as served, in the weights' layout they would serve (`channels_last`: the build's --layout); `upcast`:
    each as a VAE serves it (Variant.upcast). The fastest inside its tolerance, and the record."""
    from build.sd.export import check_component, export_component
    from build.torch_export import export_artifact
    from kiln.runtime import Session, SessionOptions

    measured, rejected, figures = {}, {}, {}
    inputs = spec.sample_inputs(seed=2, **timing_sizes)
    with tempfile.TemporaryDirectory(prefix="kiln-auto-") as scratch:
        onnx = Path(scratch) / "model.onnx"
        if any(SD_VARIANTS[k].runtime != "torch" for k in keys):  # the file the other runtimes' variants come from
            export_component(module, spec, onnx, export_sizes)
        for key in keys:
            variant = SD_VARIANTS[key].upcast() if upcast else SD_VARIANTS[key]
            path = onnx if key == "onnxruntime-fp32" else Path(scratch) / key / variant.artifact
            try:
                if variant.runtime == "torch":
                    export_artifact(module, spec, variant, path, export_sizes, log=log)
                elif path != onnx:
                    derive(variant, onnx, path)
                parity = check_component(module, spec, path, check_sizes, variant=variant)[spec.reference_output]
            except (ParityError, ExportError) as exc:  # a candidate that cannot be made or is outside: not served
                rejected[key] = str(exc)
                log(f"  auto: {key:22s} not a candidate: {str(exc).splitlines()[0]}")
                continue
            if variant.accelerator == "cuda" and graphs:  # the graph it would replay when served, at these sizes
                shapes = {t.name: tuple(t.concrete_shape(timing_sizes)) for t in spec.inputs}
                session = Session(SessionOptions("torch", path, device="cuda:0", graph_batches=(timing_sizes["batch"],),
                                                 graph_shapes=shapes,
                                                 channels_last=channels_last and variant.channels_last))
            else:
                session = open_session(variant, path)
            measured[key] = auto.throughput(lambda s=session: s.run(inputs, spec.output_names), 1)
            figures[key] = {"cosine": parity.cosine, "max_abs": parity.max_abs}
            log(f"  auto: {key:22s} {1000 / measured[key]['per_s']:8.1f} ms per {what}  "
                f"(cosine {parity.cosine:.6f})")
    chosen, reason = auto.choose(measured, rejected, f"{what}s/s")
    log(f"auto: serving {chosen} for the {what}: {reason}")
    return chosen, {"chosen": chosen, "reason": reason, "measured_at": dict(timing_sizes),
                    "candidates": {k: measured[k] | {"parity": figures[k]} for k in measured},
                    "rejected": rejected}
