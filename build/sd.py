"""Stable Diffusion components as compiled artifacts: one spec per component, ONNX export, parity with PyTorch.

The specs are derived from the loaded checkpoint's own configs (latent channels, hidden size,
VAE scale factor, the number of ControlNet residuals), never retyped. Every component takes a
per-sample `timestep` (and ControlNet a per-sample `conditioning_scale`), so that denoising steps
of different requests can share one batch later.

`build_sd` exports and checks the components of txt2img and img2img and writes their Triton models
(sd_tokenizer, sd_text_encoder, sd_unet, sd_vae_decoder, sd_vae_postprocess, sd_vae_encoder,
sd_image_preprocess and the ensembles sd_text_encode, sd_vae_decode, sd_vae_encode);
orchestrator/diffusion.py runs the denoising loop over them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable


from build import parity
from build.errors import ExportError
from build.specs import ComponentSpec, TensorSpec, Tolerance
from build.vit import DEFAULT_REPOSITORY, install_python_model

MAX_PROMPT_CHUNKS = 8  # 8 x 75 = 600 prompt tokens per request
FP32_TOLERANCE = {
    "fp32": Tolerance(min_cosine=0.99999, max_abs=1e-3,
                      why="same arithmetic as PyTorch in float32; only summation order differs"),
    "fp16": Tolerance(min_cosine=0.999, why="weights rounded to float16, computed in float32"),
    "bf16": Tolerance(min_cosine=0.99, why="bfloat16 arithmetic (8-bit mantissa) where the CPU has it"),
    "int8": Tolerance(min_cosine=0.98, why="int8 weights (per channel); activations in float"),
}


@dataclass(frozen=True)
class SDVariant:
    """How the served SD components are compiled: a runtime, an artifact derived from the fp32 ONNX file, a precision."""

    runtime: str  # onnxruntime or openvino
    artifact: str  # file name in each model's version folder
    inference_precision: str  # OpenVINO's INFERENCE_PRECISION_HINT
    precision: str  # the tolerance it is checked against


SD_VARIANTS = {
    "onnxruntime-fp32": SDVariant("onnxruntime", "model.onnx", "f32", "fp32"),
    "onnxruntime-int8": SDVariant("onnxruntime", "model-int8.onnx", "f32", "int8"),
    "openvino-fp32": SDVariant("openvino", "model.xml", "f32", "fp32"),
    "openvino-bf16": SDVariant("openvino", "model.xml", "bf16", "bf16"),
    "openvino-fp16": SDVariant("openvino", "model-fp16.xml", "f32", "fp16"),
    "openvino-int8": SDVariant("openvino", "model-int8.xml", "f32", "int8"),
    # The UNet's weights and activations in int8 (NNCF post-training quantization, calibrated on UNet inputs
    # captured from real denoising runs of the fp32 build); the other components int8 weights as above.
    "openvino-int8-hybrid": SDVariant("openvino", "model-int8h.xml", "f32", "int8"),
}
CALIBRATED = {("openvino-int8-hybrid", "unet")}  # (variant, component) pairs that need captured inputs
CALIBRATION_PROMPTS = ("a photo of a cat", "a watercolor landscape with mountains, a lake and a boat at sunset",
                       "portrait of an old man, studio lighting, detailed")


def derive_artifact(variant: str, source: Path, target: Path, calibration: list[dict] | None = None) -> None:
    """The variant's artifact from a component's fp32 ONNX file (OpenVINO IR, or a quantized ONNX file).

    With `calibration` (inputs captured from denoising runs), an OpenVINO int8 variant quantizes
    activations too: NNCF post-training quantization, transformer preset, SmoothQuant off.
    """
    kind = SD_VARIANTS[variant]
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind.runtime == "openvino":
        import openvino as ov

        model = ov.convert_model(str(source))
        if kind.precision == "int8" and calibration:
            import nncf
            from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                               AdvancedSmoothQuantParameters)

            model = nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED,
                                  advanced_parameters=AdvancedQuantizationParameters(
                                      smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))
        elif kind.precision == "int8":
            import nncf

            # int8 weights (asymmetric, per output channel); activations stay in float: no calibration set needed.
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        ov.save_model(model, str(target), compress_to_fp16=kind.precision == "fp16")
    elif kind.precision == "int8":
        import onnx
        from onnx.external_data_helper import uses_external_data
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # A source past 2 GB keeps its weights outside the .onnx file; so must the quantized one.
        header = onnx.load(str(source), load_external_data=False)
        external = any(uses_external_data(t) for t in header.graph.initializer)
        # MatMul only: ONNX Runtime's ConvInteger kernels are slower than its float convolutions on CPU.
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], use_external_data_format=external)
    elif source != target:
        raise ExportError(f"{variant}: nothing to derive from {source}")


@dataclass(frozen=True)
class ImageRange:
    """Image sizes (pixels, multiples of 8) a build supports: (min, opt, max) per side."""

    min: int = 64
    opt: int = 512
    max: int = 1024


def sd_specs(loaded, images: ImageRange = ImageRange()) -> dict[str, ComponentSpec]:
    """Specs of text_encoder, unet, unet_control, controlnet (when present), vae_encoder and vae_decoder."""
    unet_cfg, vae_cfg, text_cfg = loaded.unet.config, loaded.vae.config, loaded.text_encoder.config
    scale = vae_scale_factor(loaded)
    latent = unet_cfg.in_channels
    hidden = text_cfg.hidden_size
    max_len = text_cfg.max_position_embeddings
    multiple = size_multiple(loaded)
    if not images.min <= images.opt <= images.max:
        raise ExportError(f"image sizes must satisfy min <= opt <= max, got {images.min}, {images.opt}, {images.max}")
    for side in (images.min, images.opt, images.max):
        if side % multiple:
            raise ExportError(f"image size {side} must be a multiple of {multiple} (8, the VAE scale factor, and the "
                              f"UNet's {loaded.unet.num_upsamplers} upsamplers)")
    image_axes = {"height": (images.min, images.opt, images.max), "width": (images.min, images.opt, images.max)}
    latent_axes = {"latent_height": tuple(s // scale for s in image_axes["height"]),
                   "latent_width": tuple(s // scale for s in image_axes["width"])}
    batch = {"batch": (1, 2, 16)}
    # Prompts past 75 tokens are several 77-token chunks concatenated: the sequence axis is dynamic.
    sequence = {"sequence": (max_len, max_len, max_len * MAX_PROMPT_CHUNKS)}

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
    for index, (label, control) in enumerate(loaded.controlnets.items()):
        _check_controlnet_fits(label, control, loaded.unet, scale)
        control_sample = TensorSpec("sample", "FP32", ("batch", control.config.in_channels, "latent_height",
                                                       "latent_width"), value_range=(-2, 2))
        name = controlnet_component(index)
        specs[name] = ComponentSpec(
            name=name,
            inputs=(control_sample, timestep, context,
                    TensorSpec("controlnet_cond", "FP32", ("batch", 3, "height", "width"), value_range=(0, 1)),
                    TensorSpec("conditioning_scale", "FP32", ("batch",), value_range=(0, 1))),
            outputs=tuple(TensorSpec(r.name, r.dtype, r.shape) for r in residuals),
            profile=batch | image_axes | latent_axes | sequence, tolerances=FP32_TOLERANCE,
            reference_output=residuals[-1].name)
    return specs


def controlnet_component(index: int) -> str:
    """The component (and, with "sd_", Triton model) name of the index-th ControlNet: controlnet, controlnet_2, ..."""
    return "controlnet" if index == 0 else f"controlnet_{index + 1}"


def _check_controlnet_fits(label: str, control, unet, vae_scale: int) -> None:
    """A ControlNet's residuals are added inside this UNet: its blocks and cross-attention must be the UNet's, and
    its conditioning embedding must bring the control image down to the latents' size."""
    def plain(value):
        return tuple(value) if isinstance(value, (list, tuple)) else value

    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types"):
        mine, theirs = plain(control.config.get(key)), plain(unet.config.get(key))
        if mine != theirs:
            raise ExportError(f"ControlNet {label!r} does not fit this UNet: its {key} is {mine}, the UNet's {theirs} "
                              "(a ControlNet is trained for one base architecture, e.g. SD 1.5)")
    down = 2 ** (len(control.config.conditioning_embedding_out_channels) - 1)
    if down != vae_scale:
        raise ExportError(f"ControlNet {label!r} does not fit this checkpoint: its conditioning embedding scales the "
                          f"control image down {down}x, the VAE's latents are {vae_scale}x smaller than the image")


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


def size_multiple(loaded) -> int:
    """Image sides must be multiples of this: the exported UNet's graph fixes the upsampling sizes, so the
    latents must divide by 2 per upsampler (diffusers' eager UNet handles other sizes, the graph does not)."""
    return math.lcm(8, vae_scale_factor(loaded) * 2 ** loaded.unet.num_upsamplers)


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
    for index, control in enumerate(loaded.controlnets.values()):
        modules[controlnet_component(index)] = ControlNet(control)
    return {name: module.eval() for name, module in modules.items()}


def export_component(module, spec: ComponentSpec, path: Path, sizes: dict[str, int]) -> None:
    """ONNX export with every named axis dynamic (legacy exporter, opset 17; tiny components take seconds).

    A model past protobuf's 2 GB (the full-size UNet) keeps its weights in one `model.onnx.data`
    beside it; the exporter's own one-file-per-tensor output stays in a scratch folder.
    """
    import shutil
    import tempfile
    import warnings

    import onnx
    import torch

    sample = spec.sample_inputs(seed=0, **sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        exported = Path(scratch) / path.name
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.onnx.export(module, tuple(torch.from_numpy(sample[n]) for n in spec.input_names), str(exported),
                                  input_names=spec.input_names, output_names=spec.output_names,
                                  dynamic_axes=spec.dynamic_axes(), opset_version=spec.opset, dynamo=False)
        except Exception as exc:
            raise ExportError(f"ONNX export of {spec.name} failed: {exc}") from exc
        if len(list(Path(scratch).iterdir())) == 1:  # everything inline
            shutil.move(str(exported), path)
        else:
            model = onnx.load(str(exported))  # pulls the per-tensor files back in
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
            del model
    onnx.checker.check_model(str(path))


def check_component(module, spec: ComponentSpec, path: Path, sizes: dict[str, int], seed: int = 1,
                    variant: str = "onnxruntime-fp32") -> dict[str, parity.Parity]:
    """Run the artifact and PyTorch on the same fresh inputs; raise ParityError outside the variant's tolerance."""
    import torch

    from build.runtime import Session, SessionOptions

    kind = SD_VARIANTS[variant]
    precision = kind.precision
    inputs = spec.sample_inputs(seed=seed, **sizes)
    with torch.inference_mode():
        expected = module(*(torch.from_numpy(inputs[n]) for n in spec.input_names))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = Session(SessionOptions(kind.runtime, path, inference_precision=kind.inference_precision)).run(
        inputs, spec.output_names)
    figures = {name: parity.compare(ref.numpy(), got[name]) for name, ref in zip(spec.output_names, expected)}
    parity.check(f"{spec.name} ({spec.reference_output})", figures[spec.reference_output], spec.tolerance(precision))
    return figures


# -- the build: export, check, write the Triton repository --------------------------------------

SERVED = ("text_encoder", "unet", "vae_decoder", "vae_encoder")  # txt2img and img2img


@dataclass(frozen=True)
class SDBuildOptions:
    """What `kiln build sd` was asked to do."""

    weights: str  # diffusers-format folder, original-layout .safetensors file, or hub id (where a network exists)
    # ControlNets: PATH or NAME=PATH each (build.sd_weights.controlnet_sources); default: <weights>/controlnet
    controlnet: str | tuple[str, ...] | None = None
    config: str | None = None  # a single file's architecture (a diffusers-format folder); default: SD 1.5's
    repository: Path = DEFAULT_REPOSITORY
    images: ImageRange = ImageRange()
    max_queue_delay_us: int = 2000
    threads: int = 0
    progress: bool = True
    variant: str = "onnxruntime-fp32"  # what the served models run: a key of SD_VARIANTS
    image_check_steps: int = 4  # steps of the image a lower-precision variant is compared on (PSNR against fp32)
    calibration_steps: int = 8  # steps per calibration run (x 3 prompts: UNet inputs for calibrated variants)


def sd_model_configs(specs: dict[str, ComponentSpec], scheduler_config: dict, options: SDBuildOptions,
                     extra: dict[str, str]) -> list:
    """Triton configs: tokenizer, text encoder, UNet, VAE decoder and encoder, ControlNet when built, ensembles."""
    from build.triton_config import DynamicBatching, EnsembleStep, ModelConfig, Tensor

    text, unet, decoder, encoder = specs["text_encoder"], specs["unet"], specs["vae_decoder"], specs["vae_encoder"]
    batching = DynamicBatching(max_queue_delay_microseconds=options.max_queue_delay_us)

    served = SD_VARIANTS[options.variant]

    def runtime_params() -> dict[str, str]:
        return {"runtime": served.runtime, "artifact": served.artifact, "inference_precision": served.inference_precision,
                "threads": str(options.threads)}

    hidden = text.outputs[0].shape[-1]
    tokenizer = ModelConfig(
        name="sd_tokenizer", inputs=(Tensor("prompt", "BYTES", (-1,)),),
        outputs=(Tensor("input_ids", "INT64", (-1, text.inputs[0].shape[1])), Tensor("chunks", "INT32", (1,))),
        parameters={"max_chunks": str(MAX_PROMPT_CHUNKS)})
    text_encoder = ModelConfig(
        name="sd_text_encoder", inputs=text.triton_inputs(batched=False), outputs=text.triton_outputs(batched=False),
        parameters=runtime_params())
    unet_model = ModelConfig(
        name="sd_unet", inputs=unet.triton_inputs(), outputs=unet.triton_outputs(), max_batch_size=unet.max_batch_size,
        dynamic_batching=batching,
        # The orchestrator reads what it needs to drive the loop from here: it holds no weights and no files.
        parameters=runtime_params() | {"scheduler_config": json.dumps(scheduler_config, default=str)} | extra)
    decoder_model = ModelConfig(
        name="sd_vae_decoder", inputs=decoder.triton_inputs(), outputs=decoder.triton_outputs(),
        max_batch_size=decoder.max_batch_size, dynamic_batching=batching, parameters=runtime_params())
    postprocess = ModelConfig(
        name="sd_vae_postprocess", inputs=(Tensor("decoded", "FP32", (3, -1, -1)),),
        outputs=(Tensor("image", "UINT8", (-1, -1, 3)),), max_batch_size=decoder.max_batch_size,
        dynamic_batching=batching)
    text_encode = ModelConfig(
        name="sd_text_encode", backend=None, platform="ensemble",
        inputs=(Tensor("prompt", "BYTES", (-1,)),),
        outputs=(Tensor("embeddings", "FP32", (-1, text.inputs[0].shape[1], hidden)), Tensor("chunks", "INT32", (1,))),
        steps=(EnsembleStep("sd_tokenizer", {"prompt": "prompt"}, {"input_ids": "input_ids", "chunks": "chunks"}),
               EnsembleStep("sd_text_encoder", {"input_ids": "input_ids"}, {"last_hidden_state": "embeddings"})))
    vae_decode = ModelConfig(
        name="sd_vae_decode", backend=None, platform="ensemble", max_batch_size=decoder.max_batch_size,
        inputs=(Tensor("latent", "FP32", decoder.inputs[0].triton_tensor().dims),),
        outputs=(Tensor("image", "UINT8", (-1, -1, 3)),),
        steps=(EnsembleStep("sd_vae_decoder", {"latent": "latent"}, {"image": "decoded"}),
               EnsembleStep("sd_vae_postprocess", {"decoded": "decoded"}, {"image": "image"})))
    encoder_model = ModelConfig(
        name="sd_vae_encoder", inputs=encoder.triton_inputs(), outputs=encoder.triton_outputs(),
        max_batch_size=encoder.max_batch_size, dynamic_batching=batching, parameters=runtime_params())
    image_preprocess = ModelConfig(
        name="sd_image_preprocess", inputs=(Tensor("image", "BYTES", (1,)), Tensor("size", "INT32", (2,))),
        outputs=(Tensor("pixels", "FP32", (3, -1, -1)),), max_batch_size=encoder.max_batch_size,
        parameters={"min_size": str(options.images.min), "max_size": str(options.images.max)})
    vae_encode = ModelConfig(
        name="sd_vae_encode", backend=None, platform="ensemble", max_batch_size=encoder.max_batch_size,
        inputs=(Tensor("image", "BYTES", (1,)), Tensor("size", "INT32", (2,))),
        outputs=(Tensor("moments", "FP32", encoder.outputs[0].triton_tensor().dims),),
        steps=(EnsembleStep("sd_image_preprocess", {"image": "image", "size": "size"}, {"pixels": "pixels"}),
               EnsembleStep("sd_vae_encoder", {"image": "pixels"}, {"moments": "moments"})))
    configs = [tokenizer, text_encoder, unet_model, decoder_model, postprocess, encoder_model, image_preprocess,
               text_encode, vae_decode, vae_encode]
    controls = controlnet_components(specs)
    if controls:
        unet_control = specs["unet_control"]
        configs.append(ModelConfig(
            name="sd_unet_control", inputs=unet_control.triton_inputs(), outputs=unet_control.triton_outputs(),
            max_batch_size=unet_control.max_batch_size, dynamic_batching=batching, parameters=runtime_params()))
    for name in controls:  # every ControlNet feeds the one sd_unet_control
        control = specs[name]
        residuals = [t.name for t in control.outputs]
        configs.append(
            ModelConfig(name=f"sd_{name}", inputs=control.triton_inputs(), outputs=control.triton_outputs(),
                        max_batch_size=control.max_batch_size, dynamic_batching=batching, parameters=runtime_params()))
        if not has_ensemble(specs, name):
            continue
        configs += [
            # ControlNet -> UNet: a fixed graph, so an ensemble; the residuals never leave Triton.
            ModelConfig(name=ensemble_name(name), backend=None, platform="ensemble",
                        max_batch_size=unet_control.max_batch_size,
                        inputs=tuple(replace(t, reshape=None) for t in control.triton_inputs()),
                        outputs=unet_control.triton_outputs(),
                        steps=(EnsembleStep(f"sd_{name}", {t.name: t.name for t in control.inputs},
                                            {r: r for r in residuals}),
                               EnsembleStep("sd_unet_control", {t.name: t.name for t in unet_control.inputs},
                                            {"noise_pred": "noise_pred"}))),
        ]
    return configs


def controlnet_components(specs) -> list[str]:
    """The ControlNet components of a build, in order: controlnet, controlnet_2, ..."""
    return [name for name in specs if name == "controlnet" or name.startswith("controlnet_")]


def has_ensemble(specs, component: str) -> bool:
    """Whether ControlNet and UNet take the same sample, so one ensemble can feed both. A 9-channel inpainting UNet
    takes the latents plus mask and masked image, its ControlNet only the latents: the orchestrator calls the two."""
    return specs[component].inputs[0].shape == specs["unet_control"].inputs[0].shape


def ensemble_name(component: str) -> str:
    """sd_controlnet_unet for the first ControlNet (its name since the first build), sd_controlnet_unet_N after."""
    return "sd_controlnet_unet" + component.removeprefix("controlnet")


def _model_name(source: str) -> str:
    path = Path(source.rstrip("/"))
    return (path.stem if path.is_file() else path.name) or source


def build_sd(options: SDBuildOptions, log: Callable[[str], None] = print):
    """Export the served components, check each against PyTorch, write the txt2img models; return the report section."""
    import time

    from tqdm import tqdm

    from build import report
    from build.sd_weights import load_sd

    # 1. Load and derive the specs.
    if options.variant not in SD_VARIANTS:
        raise ExportError(f"unknown SD variant {options.variant!r}; valid: {', '.join(SD_VARIANTS)}")
    variant = SD_VARIANTS[options.variant]
    loaded = load_sd(options.weights, options.controlnet, options.config)
    if loaded.random:
        log(f"!! RANDOM WEIGHTS: {options.weights} holds seeded random weights; images are noise-like, not art.")
    specs = sd_specs(loaded, options.images)
    modules = export_modules(loaded)
    repository = Path(options.repository)
    opt = options.images.opt
    export_sizes = axis_sizes(loaded, batch=2, height=min(opt, 256), width=min(opt, 256))
    check_sizes = axis_sizes(loaded, batch=3, height=min(opt, 256) + 8 * vae_scale_factor(loaded),
                             width=min(opt, 256), chunks=2)

    # 2. Export and check each served component: the fp32 ONNX file, then the served variant derived from it.
    artifacts = {}

    def serve_variant(name: str, calibration: list[dict] | None = None) -> None:
        """Derive the served variant of a component from its fp32 ONNX file, check it, record it."""
        start = time.perf_counter()
        version = repository / f"sd_{name}" / "1"
        served_path = version / variant.artifact
        if served_path.name != "model.onnx":
            derive_artifact(options.variant, version / "model.onnx", served_path, calibration)
        figures = check_component(modules[name], specs[name], served_path, check_sizes, variant=options.variant)
        artifacts[name]["served"] = {
            "variant": options.variant, "file": str(served_path.relative_to(repository)),
            "runtime": variant.runtime, "precision": variant.precision,
            "inference_precision": variant.inference_precision, "calibration_samples": len(calibration or ()),
            "size_bytes": report.artifact_size(served_path), "sha256": report.sha256(served_path),
            "parity": {k: v.as_dict() for k, v in figures.items()},
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        reference = figures[specs[name].reference_output]
        log(f"  sd_{name:13s} {options.variant}: cosine {reference.cosine:.6f}  max|diff| {reference.max_abs:.2e}"
            + (f"  ({len(calibration)} calibration samples)" if calibration else ""))

    controls = controlnet_components(specs)
    served = SERVED + (("unet_control", *controls) if controls else ())
    for name in tqdm(served, desc=f"build sd ({options.variant})", unit="component", disable=not options.progress):
        version = repository / f"sd_{name}" / "1"
        path = version / "model.onnx"
        for stale in {v.artifact for v in SD_VARIANTS.values()} - {"model.onnx"}:
            report.remove_artifact(version / stale)  # a previous build's variant must not linger beside this one
        start = time.perf_counter()
        export_component(modules[name], specs[name], path, export_sizes)
        try:
            figures = check_component(modules[name], specs[name], path, check_sizes)
        except Exception:
            path.unlink(missing_ok=True)
            raise
        entry = {
            "file": str(path.relative_to(repository)), "runtime": "onnxruntime", "precision": "fp32",
            "size_bytes": report.artifact_size(path), "sha256": report.sha256(path),
            "parity": {k: v.as_dict() for k, v in figures.items()},
            "parity_shapes": dict(check_sizes),
        }
        reference = figures[specs[name].reference_output]
        log(f"  sd_{name:13s} cosine {reference.cosine:.6f}  max|diff| {reference.max_abs:.2e}")
        entry["build_seconds"] = round(time.perf_counter() - start, 2)
        artifacts[name] = entry
        if options.variant != "onnxruntime-fp32" and (options.variant, name) not in CALIBRATED:
            serve_variant(name)

    # 3. Triton models.
    scale = vae_scale_factor(loaded)
    extra = {"vae_scale_factor": str(scale), "latent_channels": str(loaded.vae.config.latent_channels),
             "unet_in_channels": str(loaded.unet.config.in_channels),
             "scaling_factor": str(float(loaded.vae.config.scaling_factor)),
             "min_size": str(options.images.min), "max_size": str(options.images.max),
             "size_multiple": str(size_multiple(loaded)),
             # What the API's /sdapi/v1/sd-models lists: the checkpoint's name (a file's without its
             # extension, as AUTOMATIC1111 names it) and its UNet's hash.
             "model_name": _model_name(loaded.source),
             "model_sha256": artifacts["unet"]["sha256"], "variant": options.variant,
             # The ControlNets requests select by name (sd-webui-controlnet's unit `model`), in order.
             "controlnets": json.dumps([{"name": label, "model": f"sd_{name}", "ensemble": ensemble_name(name) if has_ensemble(specs, name) else "",
                                         "sha256": artifacts[name]["sha256"]}
                                        for label, name in zip(loaded.controlnets, controls)])}
    configs = sd_model_configs(specs, loaded.scheduler_config, options, extra)
    # A rebuild with fewer ControlNets (or none) must not keep serving the previous build's.
    import shutil

    written = {c.name for c in configs}
    for stale in repository.glob("sd_*control*"):
        if stale.is_dir() and stale.name not in written:
            shutil.rmtree(stale, ignore_errors=True)
    for config in configs:
        config.write(repository)
        if config.backend == "python":  # a second ControlNet runs sd_controlnet's model.py
            install_python_model(config.name, repository,
                                 "sd_controlnet" if config.name.startswith("sd_controlnet_") else None)
    loaded.tokenizer.save_pretrained(str(repository / "sd_tokenizer" / "1" / "tokenizer"))

    # Calibrated variants: UNet inputs captured from denoising runs of the fp32 models just written.
    for name in (n for n in served if (options.variant, n) in CALIBRATED):
        log(f"  capturing sd_{name} inputs from {len(CALIBRATION_PROMPTS)} txt2img runs of "
            f"{options.calibration_steps} steps for calibration ...")
        serve_variant(name, capture_unet_inputs(repository, min(opt, 256), options.calibration_steps))

    # 4. A lower precision is a trade we show: its image against the fp32 build's, same seed.
    image_parity = None
    if options.variant != "onnxruntime-fp32":
        image_parity = variant_image_parity(repository, options, log)

    # 5. Report.
    content = {"created": report.now(), "weights": {"source": loaded.source, "random": loaded.random},
               "image_range": asdict(options.images), "variant": options.variant,
               "vae_scale_factor": scale, "versions": report.tool_versions(), "machine": report.machine(),
               "artifacts": artifacts, "models": [c.name for c in configs]}
    if image_parity is not None:
        content["image_parity"] = image_parity
    report.update_report(repository, "sd", content)
    log(f"wrote {len(configs)} Triton models to {repository}")
    return content


def capture_unet_inputs(repository: Path, side: int, steps: int, prompts=CALIBRATION_PROMPTS) -> list[dict]:
    """The UNet's inputs (CFG pairs) at every step of real txt2img runs of the fp32 ONNX files: calibration data."""
    from orchestrator.diffusion import Txt2ImgRequest
    from orchestrator.direct import DirectDiffusion, session_runners

    runners, _ = session_runners(repository, runtime="onnxruntime", artifact="model.onnx", inference_precision="f32")
    unet, captured = runners["unet"], []

    def recording(inputs: dict):
        captured.append({name: value.copy() for name, value in inputs.items()})
        return unet(inputs)

    runners["unet"] = recording
    pipeline = DirectDiffusion(repository, runners)
    for seed, prompt in enumerate(prompts):
        pipeline.generate(Txt2ImgRequest(prompt=prompt, negative_prompt="blurry", steps=steps, sampler="Euler a",
                                         cfg_scale=7.0, seed=seed, width=side, height=side))
    return captured


def variant_image_parity(repository: Path, options: SDBuildOptions, log: Callable[[str], None] = print) -> dict:
    """PSNR of a txt2img image from the served variant against the fp32 ONNX files' image (same seed and loop)."""
    from build.parity import psnr
    from orchestrator.diffusion import Txt2ImgRequest
    from orchestrator.direct import DirectDiffusion, session_runners

    side = min(options.images.opt, 256)
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=options.image_check_steps,
                             sampler="Euler a", cfg_scale=7.0, seed=0, width=side, height=side)
    images = {}
    for name, artifact in (("fp32", "model.onnx"), ("served", None)):
        runtime = "onnxruntime" if artifact else None
        runners, _ = session_runners(repository, runtime=runtime, artifact=artifact,
                                     inference_precision="f32" if artifact else None)
        images[name] = DirectDiffusion(repository, runners).generate(request).images[0]
        del runners
    value = psnr(images["fp32"], images["served"])
    log(f"  image ({side}x{side}, {request.steps} steps, Euler a): {options.variant} vs fp32 PSNR "
        + ("identical" if value == float("inf") else f"{value:.1f} dB"))
    return {"against": "onnxruntime-fp32", "psnr_db": value if value != float("inf") else "inf",
            "width": side, "height": side, "steps": request.steps, "sampler": request.sampler, "seed": request.seed}
