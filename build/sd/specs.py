"""Stable Diffusion components as compiled artifacts: one spec per component, derived from the checkpoint.

The specs are derived from the loaded checkpoint's own configs (latent channels, hidden size,
VAE scale factor, the number of ControlNet residuals), never retyped. Every component takes a
per-sample `timestep` (and ControlNet a per-sample `conditioning_scale`), so that denoising steps
of different requests can share one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from build.specs import ComponentSpec, TensorSpec, Tolerance
from kiln.contract import TILING, ServedVAE, controlnet_component
from kiln.errors import ExportError
from kiln.prompts import CHUNK_TOKENS, MAX_CHUNKS, token_vector_id

FP32_TOLERANCE = {
    "fp32": Tolerance(min_cosine=0.99999, max_abs=1e-3,
                      why="same arithmetic as PyTorch in float32; only summation order differs"),
    "fp16": Tolerance(min_cosine=0.999, why="weights rounded to float16, computed in float32"),
    "fp16-compute": Tolerance(min_cosine=0.995, why="float16 weights and arithmetic (torch on CUDA; 10-bit mantissa, "
                                                    "float32 accumulation in the GEMMs)"),
    "tf32-compute": Tolerance(min_cosine=0.9999, why="float32 on CUDA, whose cuDNN convolutions round their inputs to "
                                                    "TF32 (10-bit mantissa) by default; float32 accumulation"),
    "bf16": Tolerance(min_cosine=0.99, why="bfloat16 arithmetic (8-bit mantissa) where the CPU has it"),
    "int8": Tolerance(min_cosine=0.98, why="int8 weights (per channel); activations in float"),
    "int4": Tolerance(min_cosine=0.95, why="int4 MatMul weights (groups of 64), int8 convolutions; activations in "
                                           "float"),
}


@dataclass(frozen=True)
class ImageRange:
    """Image sizes (pixels, multiples of 8) a build supports: (min, opt, max) per side; opt 0: the checkpoint's own
    (its UNet's sample size: 512 for SD 1.x, 768 for SD 2.x's v models), within min and max."""

    min: int = 64
    opt: int = 0
    max: int = 1024

    def resolved(self, native: int) -> ImageRange:
        return self if self.opt else replace(self, opt=min(max(native, self.min), self.max))


def native_side(loaded) -> int:
    """The image side the checkpoint was trained at: its UNet's sample size in pixels."""
    return int(loaded.unet.config.sample_size) * vae_scale_factor(loaded)


def sd_specs(loaded, images: ImageRange = ImageRange()) -> dict[str, ComponentSpec]:
    """Specs of text_encoder, unet, unet_control, controlnet (when present), vae_encoder and vae_decoder."""
    images = images.resolved(native_side(loaded))
    unet_cfg, vae_cfg, text_cfg = loaded.unet.config, loaded.vae.config, loaded.text_encoder.config
    scale = vae_scale_factor(loaded)
    latent = unet_cfg.in_channels
    hidden, pooled, layers = text_widths(loaded)
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
    sequence = {"sequence": (max_len, max_len, max_len * MAX_CHUNKS)}
    # Textual-inversion vectors one text-encoder call takes: at least one row (a zero row when none is used), at most
    # one per text position of its rows
    vectors = {"vectors": (1, 4, batch["batch"][2] * CHUNK_TOKENS)}

    sample = TensorSpec("sample", "FP32", ("batch", latent, "latent_height", "latent_width"), value_range=(-2, 2))
    timestep = TensorSpec("timestep", "FP32", ("batch",), value_range=(0, 999))
    context = TensorSpec("encoder_hidden_states", "FP32", ("batch", "sequence", hidden))
    noise = TensorSpec("noise_pred", "FP32", ("batch", unet_cfg.out_channels, "latent_height", "latent_width"))
    residuals = _residual_specs(loaded.unet)
    # SDXL's added conditions: the pooled text (the second encoder's projection) and the six time ids (original
    # size, crop top-left, target size), per row
    added = (TensorSpec("text_embeds", "FP32", ("batch", pooled)),
             TensorSpec("time_ids", "FP32", ("batch", time_ids(loaded)), value_range=(0, 1024))) \
        if time_ids(loaded) else ()

    specs = {
        "text_encoder": ComponentSpec(
            name="text_encoder",
            inputs=(TensorSpec("input_ids", "INT64", ("batch", max_len), value_range=(0, text_cfg.vocab_size)),
                    # AUTOMATIC1111's CLIP_stop_at_last_layers per row: 1 (the last layer) to every layer
                    TensorSpec("clip_skip", "INT64", ("batch",), value_range=(1, layers + 1)),
                    # textual inversion: an id token_vector_id(k) (-1 - k) takes row k instead of a token's embedding
                    TensorSpec("token_vectors", "FP32", ("vectors", hidden), value_range=(-0.1, 0.1))),
            outputs=(TensorSpec("last_hidden_state", "FP32", ("batch", max_len, hidden)),
                     TensorSpec("pooler_output", "FP32", ("batch", pooled))),
            profile=batch | vectors, tolerances=FP32_TOLERANCE, reference_output="last_hidden_state",
            link_samples=_point_at_token_vectors),
        "unet": ComponentSpec(
            name="unet", inputs=(sample, timestep, context, *added), outputs=(noise,),
            profile=batch | latent_axes | sequence, tolerances=FP32_TOLERANCE, reference_output="noise_pred"),
        "unet_control": ComponentSpec(
            name="unet_control", inputs=(sample, timestep, context, *added, *residuals), outputs=(noise,),
            profile=batch | latent_axes | sequence, tolerances=FP32_TOLERANCE, reference_output="noise_pred"),
        "vae_encoder": ComponentSpec(
            name="vae_encoder",
            inputs=(TensorSpec("image", "FP32", ("batch", vae_cfg.in_channels, "height", "width")),),
            # Mean and log-variance of the latent distribution; the orchestrator samples with its own generator.
            outputs=(TensorSpec("moments", "FP32",
                                ("batch", 2 * vae_cfg.latent_channels, "latent_height", "latent_width")),),
            profile=batch | image_axes | latent_axes, tolerances=FP32_TOLERANCE, reference_output="moments"),
        "vae_decoder": ComponentSpec(
            name="vae_decoder",
            inputs=(TensorSpec("latent", "FP32", ("batch", vae_cfg.latent_channels, "latent_height", "latent_width"),
                               value_range=(-3, 3)),),
            outputs=(TensorSpec("image", "FP32", ("batch", vae_cfg.out_channels, "height", "width")),),
            profile=batch | image_axes | latent_axes, tolerances=FP32_TOLERANCE, reference_output="image"),
    }
    suffixes = [served.suffix for served in extra_vaes(loaded)]  # the same architecture, other weights
    for part in ("unet", "vae_decoder", "vae_encoder"):  # ... and the seamless models: other padding
        for suffix in (suffixes if part != "unet" else []) + ([TILING] if getattr(loaded, "tiling", False) else []):
            specs[part + suffix] = replace(specs[part], name=part + suffix)
    for index, (label, control) in enumerate(loaded.controlnets.items()):
        _check_controlnet_fits(label, control, loaded.unet, scale)
        control_sample = TensorSpec("sample", "FP32", ("batch", control.config.in_channels, "latent_height",
                                                       "latent_width"), value_range=(-2, 2))
        name = controlnet_component(index)
        specs[name] = ComponentSpec(
            name=name,
            inputs=(control_sample, timestep, context, *added,
                    TensorSpec("controlnet_cond", "FP32", ("batch", 3, "height", "width"), value_range=(0, 1)),
                    TensorSpec("conditioning_scale", "FP32", ("batch",), value_range=(0, 1))),
            outputs=tuple(TensorSpec(r.name, r.dtype, r.shape) for r in residuals),
            profile=batch | image_axes | latent_axes | sequence, tolerances=FP32_TOLERANCE,
            reference_output=residuals[-1].name)
    return specs


def two_encoders(loaded) -> bool:
    """SDXL: a second text encoder, whose pooled projection and the time ids condition the UNet too."""
    return getattr(loaded, "text_encoder_2", None) is not None


def time_ids(loaded) -> int:
    """How many time ids the UNet's added conditions take beside the pooled text: 6 for SDXL base (original size,
    crop, target size), 5 for its refiner (the aesthetic score for the target size); 0: no added conditions."""
    config = loaded.unet.config
    if config.get("addition_embed_type") != "text_time":
        return 0
    return (config.projection_class_embeddings_input_dim - text_widths(loaded)[1]) // config.addition_time_embed_dim


def text_widths(loaded) -> tuple[int, int, int]:
    """The text encoding's width (both encoders' hidden states side by side for SDXL), the pooled text's width (the
    second encoder's projection for SDXL, the one encoder's for its refiner; the hidden size otherwise), and the
    layers clip skip may count back."""
    first = loaded.text_encoder.config
    if getattr(loaded, "family", "") == "sdxl-refiner":  # from its penultimate layer, as SDXL's
        return first.hidden_size, first.projection_dim, first.num_hidden_layers - 1
    if not two_encoders(loaded):
        return first.hidden_size, first.hidden_size, first.num_hidden_layers
    second = loaded.text_encoder_2.config
    # SDXL starts at the penultimate layer: clip skip goes back from there, as far as the shallower encoder allows
    return (first.hidden_size + second.hidden_size, second.projection_dim,
            min(first.num_hidden_layers, second.num_hidden_layers) - 1)


def _point_at_token_vectors(sample: dict, rng) -> None:
    """A quarter of the sampled positions take a row of token_vectors: parity checks cover both paths."""
    ids, rows = sample["input_ids"], len(sample["token_vectors"])
    chosen = rng.random(ids.shape) < 0.25
    ids[chosen] = token_vector_id(rng.integers(0, rows, size=int(chosen.sum())))


def _check_controlnet_fits(label: str, control, unet, vae_scale: int) -> None:
    """A ControlNet's residuals are added inside this UNet: its blocks and cross-attention must be the UNet's, and
    its conditioning embedding must bring the control image down to the latents' size."""
    def plain(value):
        return tuple(value) if isinstance(value, (list, tuple)) else value

    def family(config) -> str:  # SD 2.x's attention projects linearly, SD 1.x's through 1x1 convolutions
        if config.get("addition_embed_type") == "text_time":
            return "SDXL"
        return "SD 2.x" if config.get("use_linear_projection") else "SD 1.x"

    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
                "use_linear_projection", "addition_embed_type"):
        mine, theirs = plain(control.config.get(key)), plain(unet.config.get(key))
        if bool(mine) != bool(theirs) if key == "use_linear_projection" else mine != theirs:
            raise ExportError(f"ControlNet {label!r} does not fit this UNet: its {key} is {mine}, the UNet's {theirs} "
                              f"(a ControlNet is trained for one base architecture: this one looks like "
                              f"{family(control.config)}'s, the checkpoint {family(unet.config)})")
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


def vae_tile(loaded) -> int:
    """The side of the VAE's tiles in pixels: its sample size, as diffusers' enable_tiling() cuts them."""
    size = loaded.vae.config.sample_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def size_multiple(loaded) -> int:
    """Image sides must be multiples of this: the exported UNet's graph fixes the upsampling sizes, so the
    latents must divide by 2 per upsampler (diffusers' eager UNet handles other sizes, the graph does not)."""
    return math.lcm(8, vae_scale_factor(loaded) * 2 ** loaded.unet.num_upsamplers)


def axis_sizes(loaded, *, batch: int = 2, height: int = 64, width: int = 64, chunks: int = 1,
               vectors: int = 3) -> dict[str, int]:
    """Concrete sizes of every named axis for an image of height x width, a prompt of `chunks` chunks and
    `vectors` textual-inversion vectors."""
    scale = vae_scale_factor(loaded)
    return {"batch": batch, "height": height, "width": width, "latent_height": height // scale,
            "latent_width": width // scale, "sequence": loaded.text_encoder.config.max_position_embeddings * chunks,
            "vectors": vectors}


def extra_vaes(loaded) -> tuple:
    """The build's VAEs besides the checkpoint's own, as the contract lists them (suffixes _2, _3, ...)."""
    return tuple(ServedVAE(name, f"_{index + 2}", extra.sha256)
                 for index, (name, extra) in enumerate(getattr(loaded, "vaes", {}).items()))


def controlnet_components(specs) -> list[str]:
    """The ControlNet components of a build, in order: controlnet, controlnet_2, ..."""
    return [name for name in specs if name == "controlnet" or name.startswith("controlnet_")]


def has_ensemble(specs, component: str) -> bool:
    """Whether ControlNet and UNet take the same sample, so one ensemble can feed both. A 9-channel inpainting UNet
    takes the latents plus mask and masked image, its ControlNet only the latents: the orchestrator calls the two."""
    return specs[component].inputs[0].shape == specs["unet_control"].inputs[0].shape
