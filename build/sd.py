"""Stable Diffusion components as compiled artifacts: one spec per component, ONNX export, parity with PyTorch.

The specs are derived from the loaded checkpoint's own configs (latent channels, hidden size,
VAE scale factor, the number of ControlNet residuals), never retyped. Every component takes a
per-sample `timestep` (and ControlNet a per-sample `conditioning_scale`), so that denoising steps
of different requests can share one batch later.

What is here: specs, export wrappers, `export_component` and `check_component`. The Triton
configs, ensembles and the denoising loop build on these (issue 3, in progress).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from build import parity
from build.errors import ExportError
from build.specs import ComponentSpec, TensorSpec, Tolerance

FP32_TOLERANCE = {"fp32": Tolerance(min_cosine=0.99999, max_abs=1e-3,
                                    why="same arithmetic as PyTorch in float32; only summation order differs")}


@dataclass(frozen=True)
class ImageRange:
    """Image sizes (pixels, multiples of 8) a build supports: (min, opt, max) per side."""

    min: int = 64
    opt: int = 512
    max: int = 1024


def sd_specs(loaded, images: ImageRange = ImageRange()) -> dict[str, ComponentSpec]:
    """Specs of text_encoder, unet, unet_control, controlnet (when present), vae_encoder and vae_decoder."""
    unet_cfg, vae_cfg, text_cfg = loaded.unet.config, loaded.vae.config, loaded.text_encoder.config
    scale = 2 ** (len(vae_cfg.block_out_channels) - 1)
    latent = unet_cfg.in_channels
    hidden = text_cfg.hidden_size
    max_len = text_cfg.max_position_embeddings
    for side in (images.min, images.opt, images.max):
        if side % 8 or side % scale:
            raise ExportError(f"image size {side} must be a multiple of 8 and of the VAE scale factor {scale}")
    image_axes = {"height": (images.min, images.opt, images.max), "width": (images.min, images.opt, images.max)}
    latent_axes = {"latent_height": tuple(s // scale for s in image_axes["height"]),
                   "latent_width": tuple(s // scale for s in image_axes["width"])}
    batch = {"batch": (1, 2, 16)}
    # Prompts past 75 tokens are several 77-token chunks concatenated: the sequence axis is dynamic.
    sequence = {"sequence": (max_len, max_len, max_len * 4)}

    sample = TensorSpec("sample", "FP32", ("batch", latent, "latent_height", "latent_width"), value_range=(-2, 2))
    timestep = TensorSpec("timestep", "FP32", ("batch",), value_range=(0, 999))
    context = TensorSpec("encoder_hidden_states", "FP32", ("batch", "sequence", hidden))
    noise = TensorSpec("noise_pred", "FP32", ("batch", unet_cfg.out_channels, "latent_height", "latent_width"))
    residuals = _residual_specs(loaded.unet)

    specs = {
        "text_encoder": ComponentSpec(
            name="text_encoder",
            inputs=(TensorSpec("input_ids", "INT64", ("batch", max_len), value_range=(0, text_cfg.vocab_size)),),
            outputs=(TensorSpec("last_hidden_state", "FP32", ("batch", max_len, hidden)),
                     TensorSpec("pooler_output", "FP32", ("batch", hidden))),
            profile=batch, tolerances=FP32_TOLERANCE, reference_output="last_hidden_state"),
        "unet": ComponentSpec(
            name="unet", inputs=(sample, timestep, context), outputs=(noise,),
            profile=batch | latent_axes | sequence, tolerances=FP32_TOLERANCE, reference_output="noise_pred"),
        "unet_control": ComponentSpec(
            name="unet_control", inputs=(sample, timestep, context, *residuals), outputs=(noise,),
            profile=batch | latent_axes | sequence, tolerances=FP32_TOLERANCE, reference_output="noise_pred"),
        "vae_encoder": ComponentSpec(
            name="vae_encoder",
            inputs=(TensorSpec("image", "FP32", ("batch", vae_cfg.in_channels, "height", "width")),),
            # Mean and log-variance of the latent distribution; the orchestrator samples with its own generator.
            outputs=(TensorSpec("moments", "FP32", ("batch", 2 * vae_cfg.latent_channels, "latent_height", "latent_width")),),
            profile=batch | image_axes | latent_axes, tolerances=FP32_TOLERANCE, reference_output="moments"),
        "vae_decoder": ComponentSpec(
            name="vae_decoder",
            inputs=(TensorSpec("latent", "FP32", ("batch", vae_cfg.latent_channels, "latent_height", "latent_width"),
                               value_range=(-3, 3)),),
            outputs=(TensorSpec("image", "FP32", ("batch", vae_cfg.out_channels, "height", "width")),),
            profile=batch | image_axes | latent_axes, tolerances=FP32_TOLERANCE, reference_output="image"),
    }
    if loaded.controlnet is not None:
        specs["controlnet"] = ComponentSpec(
            name="controlnet",
            inputs=(sample, timestep, context,
                    TensorSpec("controlnet_cond", "FP32", ("batch", 3, "height", "width"), value_range=(0, 1)),
                    TensorSpec("conditioning_scale", "FP32", ("batch",), value_range=(0, 1))),
            outputs=tuple(TensorSpec(r.name, r.dtype, r.shape) for r in residuals),
            profile=batch | image_axes | latent_axes | sequence, tolerances=FP32_TOLERANCE,
            reference_output=residuals[-1].name)
    return specs


def _residual_specs(unet) -> tuple[TensorSpec, ...]:
    """ControlNet's residuals in the order the UNet's down path makes them, read from the UNet's own blocks.

    A dim written "latent_height/4" is the latent height divided by 4 (after two downsamplers).
    """
    cfg = unet.config
    shapes = [(cfg.block_out_channels[0], 1)]  # conv_in
    factor = 1
    for i, block in enumerate(unet.down_blocks):
        shapes += [(cfg.block_out_channels[i], factor)] * len(block.resnets)
        if block.downsamplers is not None:
            factor *= 2
            shapes.append((cfg.block_out_channels[i], factor))

    def dims(channels: int, f: int) -> tuple:
        return ("batch", channels, "latent_height" if f == 1 else f"latent_height/{f}",
                "latent_width" if f == 1 else f"latent_width/{f}")

    specs = [TensorSpec(f"down_residual_{i}", "FP32", dims(c, f)) for i, (c, f) in enumerate(shapes)]
    specs.append(TensorSpec("mid_residual", "FP32", dims(cfg.block_out_channels[-1], factor)))
    return tuple(specs)


def vae_scale_factor(loaded) -> int:
    return 2 ** (len(loaded.vae.config.block_out_channels) - 1)


def axis_sizes(loaded, *, batch: int = 2, height: int = 64, width: int = 64, chunks: int = 1) -> dict[str, int]:
    """Concrete sizes of every named axis for an image of height x width and a prompt of `chunks` chunks."""
    scale = vae_scale_factor(loaded)
    return {"batch": batch, "height": height, "width": width, "latent_height": height // scale,
            "latent_width": width // scale, "sequence": loaded.text_encoder.config.max_position_embeddings * chunks}


def export_modules(loaded) -> dict[str, Callable]:
    """Small nn.Module wrappers, one per spec, taking the spec's inputs in order (no monkeypatched forward)."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            out = self.model(input_ids, return_dict=False)
            return out[0], out[1]

    class UNet(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sample, timestep, encoder_hidden_states, *residuals):
            if residuals:
                return self.model(sample, timestep, encoder_hidden_states, return_dict=False,
                                  down_block_additional_residuals=list(residuals[:-1]),
                                  mid_block_additional_residual=residuals[-1])[0]
            return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class ControlNet(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
            down, mid = self.model(sample, timestep, encoder_hidden_states, controlnet_cond, return_dict=False)
            scale = conditioning_scale.reshape(-1, 1, 1, 1)  # per sample: requests with different scales share a batch
            return (*[d * scale for d in down], mid * scale)

    class VaeEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, image):
            return self.model.encode(image).latent_dist.parameters

    class VaeDecoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.scaling_factor = float(model.config.scaling_factor)  # from the checkpoint, not a constant here

        def forward(self, latent):
            return self.model.decode(latent / self.scaling_factor, return_dict=False)[0]

    modules = {
        "text_encoder": TextEncoder(loaded.text_encoder), "unet": UNet(loaded.unet), "unet_control": UNet(loaded.unet),
        "vae_encoder": VaeEncoder(loaded.vae), "vae_decoder": VaeDecoder(loaded.vae),
    }
    if loaded.controlnet is not None:
        modules["controlnet"] = ControlNet(loaded.controlnet)
    return {name: module.eval() for name, module in modules.items()}


def _sample(spec: ComponentSpec, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: t.sample(sizes, rng) for t in spec.inputs}


def export_component(module, spec: ComponentSpec, path: Path, sizes: dict[str, int]) -> None:
    """ONNX export with every named axis dynamic (legacy exporter, opset 17; tiny components take seconds)."""
    import warnings

    import onnx
    import torch

    sample = _sample(spec, sizes, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module, tuple(torch.from_numpy(sample[n]) for n in spec.input_names), str(path),
                              input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes(), opset_version=spec.opset, dynamo=False)
    except Exception as exc:
        raise ExportError(f"ONNX export of {spec.name} failed: {exc}") from exc
    onnx.checker.check_model(str(path))


def check_component(module, spec: ComponentSpec, path: Path, sizes: dict[str, int], seed: int = 1,
                    precision: str = "fp32") -> dict[str, parity.Parity]:
    """Run the ONNX file with ONNX Runtime and PyTorch on the same fresh inputs; raise ParityError outside tolerance."""
    import torch

    from build.runtime import Session, SessionOptions

    inputs = _sample(spec, sizes, seed)
    with torch.inference_mode():
        expected = module(*(torch.from_numpy(inputs[n]) for n in spec.input_names))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = Session(SessionOptions("onnxruntime", path)).run(inputs, spec.output_names)
    figures = {name: parity.compare(ref.numpy(), got[name]) for name, ref in zip(spec.output_names, expected)}
    parity.check(f"{spec.name} ({spec.reference_output})", figures[spec.reference_output], spec.tolerance(precision))
    return figures
