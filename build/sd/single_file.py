"""Single-file SD 1.x, 2.x and SDXL checkpoints: the original (LDM; SGM for SDXL) layout AUTOMATIC1111 and SD.Next load.

Reading is diffusers' own `from_single_file`, offline: the architecture comes from a diffusers-format config folder
(`--config`), or, by default, the family's released configs written here (SD 1.5's, SD 2.1's or SDXL base's; the
family told by the text encoders' tensors, the UNet's input channels read from the file, so inpainting files work
too). An SD 2.x file's prediction type is what its kiln metadata says, else found as AUTOMATIC1111 finds it: the UNet
run once on a constant input at t=999 (v-prediction if its output minus the input averages below -1).
sd-webui-controlnet's ControlNet files are read with `ControlNetModel.from_single_file` for the checkpoint's UNet.

Writing (`ldm_state_dict`, `write_single_file`, `controlnet_ldm_state_dict`) renames a diffusers checkpoint's
tensors to the original layout. diffusers ships that direction only as a repository script, so it is written here
from the layout itself; a test loads the result back through diffusers and requires every tensor to come back equal.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.errors import WeightsError, first_line

if TYPE_CHECKING:
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x's text encoder, in OpenCLIP's layout
XL_TEXT_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's CLIP ViT-L (transformers' layout) ...
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # ... and its OpenCLIP ViT-bigG (OpenCLIP's, with projection)
CONTROLNET_PREFIX = "control_model."
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
METADATA_KEY = "kiln-weights"  # safetensors metadata: the kiln-weights.json of a random checkpoint

_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _split(key: str, depth: int) -> tuple[list[str], str]:
    parts = key.split(".")
    return parts[:depth], ".".join(parts[depth:])


def unet_key(key: str, layers_per_block: int, attention_up_blocks: set[int]) -> str:
    """The original name of one diffusers UNet tensor (`attention_up_blocks`: up blocks with attentions)."""
    per_block = layers_per_block + 1
    for new, old in _UNET_FIXED.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    head, rest = _split(key, 4)
    if head[0] in ("down_blocks", "up_blocks"):
        block, kind, index = int(head[1]), head[2], int(head[3])
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.X
            return f"input_blocks.{per_block * (block + 1)}.0.op.{rest.removeprefix('conv.')}"
        if kind == "upsamplers":  # after the block's last resnet (and its attention, when the block has them)
            slot = 2 if block in attention_up_blocks else 1
            return f"output_blocks.{per_block * block + layers_per_block}.{slot}.{rest}"
        layer = (f"input_blocks.{per_block * block + index + 1}" if head[0] == "down_blocks"
                 else f"output_blocks.{per_block * block + index}")
        if kind == "resnets":
            return f"{layer}.0.{_resnet_part(rest)}"
        return f"{layer}.1.{rest}"  # attentions: the same names inside a spatial transformer
    head, rest = _split(key, 3)
    if head[0] == "mid_block":  # resnet, attention, resnet
        index = int(head[2])
        if head[1] == "resnets":
            return f"middle_block.{2 * index}.{_resnet_part(rest)}"
        return f"middle_block.1.{rest}"
    raise WeightsError(f"UNet tensor {key!r} has no place in the original layout")


def _resnet_part(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_UNET_RESNET.get(name, name)}.{tail}"


def vae_key(key: str, up_blocks: int) -> tuple[str, bool]:
    """The original name of one diffusers VAE tensor, and whether it is an attention projection (a 1x1 conv there)."""
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):  # quant_conv, post_quant_conv
        return key, False
    head, tail = _split(rest, 3)
    if head[0] in _VAE_FIXED:
        return f"{coder}.{_VAE_FIXED[head[0]]}.{'.'.join(rest.split('.')[1:])}", False
    if head[0] == "mid_block":
        index = int(head[2])
        if head[1] == "resnets":
            return f"{coder}.mid.block_{index + 1}.{_vae_resnet(tail)}", False
        name, _, param = tail.rpartition(".")
        return f"{coder}.mid.attn_1.{_VAE_ATTENTION[name]}.{param}", name != "group_norm"
    if head[0] in ("down_blocks", "up_blocks"):
        block = int(head[1])
        level = block if head[0] == "down_blocks" else up_blocks - 1 - block  # the original counts up from the bottom
        stage = "down" if head[0] == "down_blocks" else "up"
        if head[2] in ("downsamplers", "upsamplers"):  # X.0.conv.param
            return f"{coder}.{stage}.{level}.{stage}sample.{tail.split('.', 1)[1]}", False
        index, _, inner = tail.partition(".")
        return f"{coder}.{stage}.{level}.block.{index}.{_vae_resnet(inner)}", False
    return key, False  # conv_in, conv_out: the same names


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def ldm_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                   text_encoder_2: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One state dict in the original layout, the tensors shared (not copied) with the modules (SDXL's: both text
    encoders under conditioner.embedders)."""
    config = unet.config
    attention_up = {i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind}
    out = {UNET_PREFIX + unet_key(k, config.layers_per_block, attention_up): v for k, v in unet.state_dict().items()}
    from build.sd.vae import vae_ldm_state_dict

    out |= {VAE_PREFIX + key: tensor for key, tensor in vae_ldm_state_dict(vae).items()}
    # transformers' layout of a CLIP text model (>= 5.6 drops the text_model. level)
    clip = {(name if name.startswith("text_model.") else "text_model." + name): tensor
            for name, tensor in text_encoder.state_dict().items()}
    if text_encoder_2 is not None:  # SDXL: its projection is real (OpenCLIP's x @ P: the transposed weight)
        second = open_clip_state_dict(text_encoder_2, text_encoder_2.text_projection.weight.T)
        return out | {XL_OPEN_CLIP_PREFIX + key: tensor for key, tensor in second.items()} | {
            XL_TEXT_PREFIX + key: tensor for key, tensor in clip.items()}
    if getattr(getattr(text_encoder, "config", None), "hidden_act", "") == "gelu":  # SD 2.x: OpenCLIP layout
        return out | {OPEN_CLIP_PREFIX + key: tensor for key, tensor in open_clip_state_dict(text_encoder).items()}
    return out | {TEXT_PREFIX + key: tensor for key, tensor in clip.items()}


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_state_dict(text_encoder: torch.nn.Module,
                         projection: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A CLIPTextModel in OpenCLIP's layout (SD 2.x files): q, k and v joined into in_proj, and a text projection
    (hidden x projection_dim: SDXL's own, or seeded: OpenCLIP has one, SD 2.x never uses it). Stability's SD 2.x files
    hold a 24th layer that SD 2.x skips (diffusers drops it); these hold the encoder's layers alone."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
           "positional_embedding": state["embeddings.position_embedding.weight"],
           "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"]}
    for index in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{index}.", f"transformer.resblocks.{index}."
        for param in ("weight", "bias"):
            out[block + f"attn.in_proj_{param}"] = torch.cat(
                [state[layer + f"self_attn.{p}_proj.{param}"] for p in "qkv"])
            for new, old in _OPEN_CLIP_LAYER.items():
                out[block + f"{old}.{param}"] = state[layer + f"{new}.{param}"]
    if projection is None:
        generator = torch.Generator().manual_seed(0)
        projection = torch.randn(text_encoder.config.hidden_size, text_encoder.config.projection_dim,
                                 generator=generator) * text_encoder.config.hidden_size ** -0.5
    out["text_projection"] = projection
    return out


def controlnet_ldm_state_dict(control: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet in the original layout (sd-webui-controlnet's files), under "control_model."."""
    config = control.config
    blocks = len(config.conditioning_embedding_out_channels) * 2 - 2  # two convolutions per level change
    out = {}
    for key, tensor in control.state_dict().items():
        head, _, rest = key.partition(".")
        if key.startswith("controlnet_cond_embedding."):  # convolutions at the even indices, SiLU between
            part, _, tail = key.removeprefix("controlnet_cond_embedding.").partition(".")
            if part == "blocks":
                index, _, tail = tail.partition(".")
                name = f"input_hint_block.{2 * (int(index) + 1)}.{tail}"
            else:
                name = f"input_hint_block.{0 if part == 'conv_in' else 2 * (blocks + 1)}.{tail}"
        elif head == "controlnet_down_blocks":
            index, _, tail = rest.partition(".")
            name = f"zero_convs.{index}.0.{tail}"
        elif head == "controlnet_mid_block":
            name = f"middle_block_out.0.{rest}"
        else:  # the UNet encoder's copy: the UNet's own names
            name = unet_key(key, config.layers_per_block, set())
        out[CONTROLNET_PREFIX + name] = tensor
    return out


def write_controlnet_single_file(control: torch.nn.Module, out: Path) -> Path:
    """Write a diffusers ControlNet as one original-layout .safetensors file."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in controlnet_ldm_state_dict(control).items()}, str(out),
              metadata={"format": "pt"})
    return out


def write_single_file(folder: Path, out: Path) -> Path:
    """Write the diffusers-format SD 1.x, 2.x or SDXL checkpoint in `folder` as one original-layout .safetensors
    file."""
    from safetensors.torch import save_file

    from build.sd.weights import load_sd

    out = Path(out)
    if out.suffix != ".safetensors":
        raise WeightsError(f"{out}: a single-file checkpoint is written as .safetensors")
    loaded = load_sd(folder)
    tensors = {k: v.contiguous() for k, v in ldm_state_dict(loaded.unet, loaded.vae, loaded.text_encoder,
                                                            loaded.text_encoder_2).items()}
    marker = Path(folder) / "kiln-weights.json"
    metadata = {"format": "pt"} | ({METADATA_KEY: marker.read_text()} if marker.exists() else {})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


# -- reading ------------------------------------------------------------------------------------

def read_header(path: Path, kind: str, shape_of=lambda _key: False) -> tuple[set[str], dict, dict[str, list[int]]]:
    """A .safetensors file's tensor names, metadata and the shapes of the tensors `shape_of` picks, from its
    header alone; a pickle or an unreadable file is a WeightsError (`kind`: what the caller reads, for the message)."""
    from safetensors import safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: pickle checkpoints ({path.suffix}) can run code when loaded; "
                           f"only .safetensors {kind} are read (convert it to .safetensors first)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            return keys, handle.metadata() or {}, {k: handle.get_slice(k).get_shape() for k in keys if shape_of(k)}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise WeightsError(f"{path}: not a readable .safetensors file ({first_line(exc)})") from None


def inspect_single_file(path: Path) -> dict:
    """Check a file is an SD 1.x, 2.x or SDXL original-layout .safetensors checkpoint, from its header alone: returns
    {"family", "in_channels", "cross_attention_dim", "metadata"}; anything else is a WeightsError naming the problem."""
    path = Path(path)
    keys, metadata, shapes = read_header(path, "single files",
                                         lambda k: k == CONV_IN or k.endswith("attn2.to_k.weight"))
    if CONV_IN not in keys:
        raise WeightsError(f"{path}: not a Stable Diffusion checkpoint in the original layout (no {CONV_IN})")
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise WeightsError(f"{path}: the file has no VAE ({VAE_PREFIX}*); a full SD checkpoint is needed")
    has = {p: any(k.startswith(p) for k in keys) for p in (XL_TEXT_PREFIX, XL_OPEN_CLIP_PREFIX, OPEN_CLIP_PREFIX,
                                                           TEXT_PREFIX, "conditioner.")}
    if has[XL_TEXT_PREFIX] and has[XL_OPEN_CLIP_PREFIX]:
        family = "sdxl"
    elif has["conditioner."]:
        raise WeightsError(f"{path}: an SDXL refiner (the OpenCLIP text encoder alone under conditioner.); kiln reads "
                           "refiners as diffusers folders, not single files yet")
    elif has[OPEN_CLIP_PREFIX]:
        family = "sd2"
    elif has[TEXT_PREFIX]:
        family = "sd1"
    else:
        raise WeightsError(f"{path}: a checkpoint without a text encoder ({TEXT_PREFIX}* for SD 1.x, "
                           f"{OPEN_CLIP_PREFIX}* for SD 2.x)")
    cross = {shape[1] for k, shape in shapes.items() if k != CONV_IN}
    return {"family": family, "in_channels": shapes[CONV_IN][1], "cross_attention_dim": min(cross) if cross else None,
            "metadata": metadata}


def write_family_config(out: Path, family_name: str = "sd1", in_channels: int = 4,
                        prediction: str | None = None) -> Path:
    """A family's released diffusers configs (no weights): model_index.json, each component's config, tokenizer,
    scheduler (SD 1.5's; SD 2.1's 768-v, or 2.1-base's 512 with `prediction` epsilon; SDXL base 1.0's)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from build.sd.families import family
    from build.sd.weights import clip_text_config, clip_tokenizer

    out = Path(out)
    kind = family(family_name)
    arch = kind.architecture("full")
    scheduler = kind.scheduler_config(prediction)
    side = kind.native_side if scheduler["prediction_type"] == kind.prediction else 512
    with torch.device("meta"):  # configs only: nothing is allocated
        UNet2DConditionModel(**(arch.unet | {"in_channels": in_channels, "sample_size": side // 8})).save_config(
            str(out / "unet"))
        AutoencoderKL(**arch.vae).save_config(str(out / "vae"))
    tokenizer = clip_tokenizer(kind.pad_token)
    clip_text_config(arch.text_encoder, tokenizer.pad_token_id).save_pretrained(str(out / "text_encoder"))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    components = {"scheduler": ["diffusers", scheduler["_class_name"]],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if arch.text_encoder_2 is None:
        components |= {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
                       "safety_checker": [None, None], "requires_safety_checker": False}
    else:  # SDXL: its OpenCLIP ViT-bigG (with projection) and tokenizer padding with "!"
        second = clip_tokenizer(kind.pad_token_2)
        config = clip_text_config(arch.text_encoder_2, second.pad_token_id)
        config.architectures = ["CLIPTextModelWithProjection"]
        config.save_pretrained(str(out / "text_encoder_2"))
        second.save_pretrained(str(out / "tokenizer_2"))
        components |= {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                       "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                       "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    (out / "model_index.json").write_text(json.dumps(components, indent=2))
    return out


def predicts_v(unet) -> bool:
    """AUTOMATIC1111's test for an SD 2.x UNet trained for v-prediction: at t=999 on a constant latent (0.5) and
    context (0.5), a v-prediction UNet's output minus its input averages below -1 (it predicts about -x0)."""
    import torch

    with torch.inference_mode():
        sample = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
        context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5)
        out = unet(sample, torch.tensor([999]), encoder_hidden_states=context).sample
    return float((out[:, :4] - sample[:, :4]).mean()) < -1


@contextmanager
def _config_folder(config: str | Path | None, family_name: str, in_channels: int, prediction: str | None):
    if config is not None:
        if not (Path(config) / "model_index.json").is_file():
            raise WeightsError(f"--config {config}: not a diffusers-format folder (no model_index.json)")
        yield Path(config)
        return
    with tempfile.TemporaryDirectory(prefix="kiln-sd-config-") as scratch:
        yield write_family_config(Path(scratch), family_name, in_channels, prediction)


def load_single_file(path: Path, config: str | Path | None = None):
    """A StableDiffusion(XL)Pipeline (fp32) from an original-layout .safetensors file, offline; and its metadata."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from build.sd.families import family

    info = inspect_single_file(path)
    kind = family(info["family"])
    width = kind.architecture("full").unet["cross_attention_dim"]
    if config is None and info["cross_attention_dim"] not in (None, width):
        raise WeightsError(f"{path}: cross-attention width {info['cross_attention_dim']} is not {kind.title}'s "
                           f"{width}; pass --config with a diffusers folder describing this architecture")
    marker = json.loads(info["metadata"].get(METADATA_KEY, "{}"))
    prediction = marker.get("prediction_type")
    with _config_folder(config, kind.name, info["in_channels"], prediction) as folder:
        try:
            if kind.two_encoders:
                pipeline = StableDiffusionXLPipeline.from_single_file(
                    str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32)
            else:
                pipeline = StableDiffusionPipeline.from_single_file(
                    str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32,
                    safety_checker=None, requires_safety_checker=False)
        except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/RuntimeError/SingleFileComponentError variants
            raise WeightsError(f"cannot load the single-file checkpoint {path} with the configs of "
                               f"{config or kind.title}: {first_line(exc)}") from None
    if config is None and prediction is None and kind.name == "sd2" and not predicts_v(pipeline.unet):
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config,
                                                                  prediction_type="epsilon")
        pipeline.unet.register_to_config(sample_size=64)  # SD 2.x's epsilon models are the 512 ones
    return pipeline, info["metadata"]


def controlnet_config(unet, latent_channels: int = 4):
    """The config of a ControlNet for this UNet (as ControlNets are made: a copy of its encoder), on no memory."""
    import torch
    from diffusers import ControlNetModel

    with torch.device("meta"):
        control = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return dict(control.config) | {"in_channels": latent_channels}


def load_controlnet_single_file(path: Path, unet, latent_channels: int = 4):
    """A ControlNet from one .safetensors file (original layout, with or without "control_model.", or diffusers'),
    its architecture that of a ControlNet for `unet`; offline, through diffusers' ControlNetModel.from_single_file."""
    import torch
    from diffusers import ControlNetModel
    path = Path(path)
    keys, _metadata, _shapes = read_header(path, "ControlNet files")
    markers = ("input_hint_block.0.weight", CONTROLNET_PREFIX + "input_hint_block.0.weight",
               "controlnet_cond_embedding.conv_in.weight")
    if not keys & set(markers):
        raise WeightsError(f"{path}: not a ControlNet (no input_hint_block or controlnet_cond_embedding tensors)")
    with tempfile.TemporaryDirectory(prefix="kiln-controlnet-config-") as scratch:
        (Path(scratch) / "config.json").write_text(json.dumps(controlnet_config(unet, latent_channels), default=list))
        try:
            control = ControlNetModel.from_single_file(str(path), config=scratch, local_files_only=True,
                                                       torch_dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/RuntimeError variants
            raise WeightsError(f"cannot load the ControlNet file {path} for this UNet: {first_line(exc)}") from None
    return control.eval()
