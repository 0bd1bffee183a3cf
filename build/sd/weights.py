"""Stable Diffusion 1.x checkpoints without a hub: seeded random weights of the real architectures, and the real
CLIP tokenizer.

`write_sd_checkpoint` writes a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/, and controlnet/) that `load_sd` — and diffusers itself — read exactly like a
user's checkpoint: one code path. The tokenizer is the real one SD 1.x uses, built from the BPE
vocabulary that ships inside the open-clip-torch wheel (49,408 tokens).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import WeightsError, first_line
from kiln.prompts import CLIP_VOCAB_SIZE, check_tokenizer

if TYPE_CHECKING:
    import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# SD 1.5's scheduler config (PNDM, as the original checkpoint ships it); samplers are chosen per request later.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "prediction_type": "epsilon", "trained_betas": None,
}


@dataclass(frozen=True)
class SDArchitecture:
    """Constructor arguments of each component; `tiny` follows diffusers' own fast tests, `full` is SD 1.5."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    controlnet: dict[str, Any]


ARCHITECTURES = {
    "tiny": SDArchitecture(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32),
        vae=dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                 down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                 up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32),
        text_encoder=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                          projection_dim=32, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
        controlnet=dict(block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                        conditioning_embedding_out_channels=(16, 32), norm_num_groups=32),
    ),
    "full": SDArchitecture(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, in_channels=4,
                  out_channels=4, attention_head_dim=8, cross_attention_dim=768,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        vae=dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
                 sample_size=512, layers_per_block=2, scaling_factor=0.18215,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          projection_dim=768, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
        controlnet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, in_channels=4,
                        attention_head_dim=8, cross_attention_dim=768,
                        conditioning_embedding_out_channels=(16, 32, 96, 256),
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D")),
    ),
}


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's byte-level BPE vocabulary and merges, from the file in the open-clip-torch wheel (found, not imported:
    open_clip's own imports are many, and the GPU check carries the wheel alone)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - pinned dependency
        raise WeightsError("open-clip-torch is not installed; run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # CLIP uses the first 49152 - 256 - 2 merges of the file (its first line is a header).
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise WeightsError(f"{path}: built a vocabulary of {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def clip_tokenizer():
    """The SD 1.x CLIP tokenizer (transformers' CLIPTokenizer), built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH,
                              bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    check_tokenizer(tokenizer, "the open-clip vocabulary")
    return tokenizer


def clip_text_config(sizes: dict[str, Any]):
    """A CLIPTextConfig of SD 1.x's vocabulary and 77 positions with the given sizes."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=MODEL_MAX_LENGTH,
                          bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1,
                          pad_token_id=CLIP_VOCAB_SIZE - 1, **sizes)


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def build_components(size: str = "tiny", seed: int = 0, controlnet: bool = True, inpainting: bool = False) -> dict:
    """Seeded random components of the `size` architecture ("tiny" or "full"), each from its own seed.

    `inpainting` makes the UNet a 9-channel inpainting UNet (latents + mask + masked-image latents).
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if size not in ARCHITECTURES:
        raise WeightsError(f"unknown architecture size {size!r}; valid: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[size]
    _seeded(seed)
    unet = UNet2DConditionModel(**(arch.unet | ({"in_channels": 9} if inpainting else {})))
    _seeded(seed + 1)
    vae = AutoencoderKL(**arch.vae)
    _seeded(seed + 2)
    text_encoder = CLIPTextModel(clip_text_config(arch.text_encoder))
    components = {
        "unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": clip_tokenizer(),
        "scheduler": PNDMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if k != "_class_name"}),
    }
    if controlnet:
        components["controlnet"] = random_controlnet(size, seed + 3)
    return components


def random_controlnet(size: str = "tiny", seed: int = 3):
    """A seeded random ControlNet of the `size` architecture (fits that size's UNet)."""
    import torch
    from diffusers import ControlNetModel

    _seeded(seed)
    control = ControlNetModel(**ARCHITECTURES[size].controlnet)
    # ControlNet's output convolutions start at zero (so training starts from the plain UNet); random ones
    # make its residuals non-zero, as a trained ControlNet's are (diffusers' own pipeline tests do the same). The
    # control image's embedding ends in a zero convolution too: random, or the image would not matter at all.
    for conv in [*control.controlnet_down_blocks, control.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.1)
        torch.nn.init.constant_(conv.bias, 0.1)
    torch.nn.init.normal_(control.controlnet_cond_embedding.conv_out.weight, std=0.1)
    return control.eval()


def random_embedding(size: str = "tiny", vectors: int = 2, seed: int = 0):
    """Seeded random textual-inversion vectors (vectors, hidden) for the `size` architecture's text encoder: normal,
    std 0.05 (wider than CLIP's token embeddings at initialisation, 0.02, as trained embeddings' vectors are)."""
    import numpy as np

    if size not in ARCHITECTURES:
        raise WeightsError(f"unknown architecture size {size!r}; valid: {', '.join(ARCHITECTURES)}")
    hidden = ARCHITECTURES[size].text_encoder["hidden_size"]
    return np.random.default_rng(seed).normal(0.0, 0.05, (vectors, hidden)).astype(np.float32)


def write_sd_checkpoint(out: Path, size: str = "tiny", seed: int = 0, controlnet: bool = True,
                        inpainting: bool = False) -> Path:
    """Write a diffusers-format SD 1.x folder of seeded random weights; a ControlNet goes in controlnet/."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    components = build_components(size, seed, controlnet, inpainting)
    control = components.pop("controlnet", None)
    pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(str(out), safe_serialization=True)
    if control is not None:
        control.save_pretrained(str(out / "controlnet"), safe_serialization=True)
    (out / "kiln-weights.json").write_text(json.dumps(
        {"random": True, "seed": seed, "architecture": size, "inpainting": inpainting,
         "note": "seeded random weights of the real architecture: images are noise-like, not art"}, indent=2))
    return out


@dataclass
class LoadedSD:
    """The PyTorch components of a checkpoint, in eval mode, and where they came from."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict
    controlnets: dict[str, torch.nn.Module]  # by name, in the order given; the first is the default
    source: str
    random: bool
    vaes: dict = field(default_factory=dict)  # more VAEs (build.sd.vae.ExtraVAE) by name, in the order given

    @property
    def controlnet(self) -> torch.nn.Module | None:
        """The first (default) ControlNet, or None."""
        return next(iter(self.controlnets.values()), None)


CONTROLNET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def named_paths(specs: str | Path | Sequence[str | Path] | None) -> list[tuple[str, str, Path]]:
    """Repeatable PATH or NAME=PATH options (--controlnet, --vae) as (the option's text, NAME or "", PATH); a path
    that happens to contain "=" stays a path."""
    found = []
    for spec in [specs] if isinstance(specs, (str, Path)) else (specs or ()):
        text = str(spec)
        name, sep, location = text.partition("=")
        if not sep or Path(text).exists():
            name, location = "", text
        found.append((text, name, Path(location)))
    return found


def controlnet_sources(specs: str | Path | Sequence[str | Path] | None, weights: Path) -> dict[str, Path]:
    """`--controlnet` values (PATH or NAME=PATH, repeatable) as {name: path}; none given: <weights>/controlnet.

    A ControlNet's name is what requests select it by (sd-webui-controlnet's unit `model`): NAME, or else
    the folder's name.
    """
    if specs is None or (not isinstance(specs, (str, Path)) and not specs):
        default = weights / "controlnet"
        return {"controlnet": default} if default.is_dir() else {}
    sources: dict[str, Path] = {}
    for text, name, path in named_paths(specs):
        name = name or (path.stem if path.is_file() else path.name)
        if not CONTROLNET_NAME.match(name):
            raise WeightsError(f"--controlnet {text}: the name {name!r} must be 1-64 letters, digits, _ . + - "
                               "(give one as NAME=PATH)")
        if name in sources:
            raise WeightsError(f"--controlnet {text}: two ControlNets named {name!r}; name them with NAME=PATH")
        sources[name] = path
    return sources


def load_controlnet(source: Path, unet=None, latent_channels: int = 4):
    """A ControlNet from a diffusers-format folder, a single .safetensors file (its architecture that of a ControlNet
    for `unet`), or a hub id (where a network exists)."""
    from diffusers import ControlNetModel

    if Path(source).is_file():
        from build.sd.single_file import load_controlnet_single_file

        return load_controlnet_single_file(Path(source), unet, latent_channels)
    try:
        return ControlNetModel.from_pretrained(str(source), use_safetensors=True).eval()
    except Exception as exc:  # noqa: BLE001 - diffusers raises OSError/ValueError/EnvironmentError variants
        raise WeightsError(f"cannot load a ControlNet from {str(source)!r}: {first_line(exc)}") from None


def load_sd(weights: str | Path, controlnet: str | Path | Sequence[str | Path] | None = None,
            config: str | Path | None = None) -> LoadedSD:
    """Load a diffusers-format folder, a single-file original-layout .safetensors, or a hub id (where a network exists).

    A single file takes its architecture from `config` (a diffusers-format folder; default: SD 1.5's). ControlNets
    come from `controlnet` (see `controlnet_sources`), or a folder checkpoint's controlnet/.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(weights)
    if not path.exists() and not (str(weights).count("/") == 1 and not str(weights).startswith((".", "/"))):
        raise WeightsError(f"{weights}: no such file or folder, and not a hub id of the form owner/name")
    if config is not None and not path.is_file():
        raise WeightsError(f"--config {config}: only a single-file checkpoint takes a config folder; "
                           f"{weights} carries its own")
    marker: dict = {}
    if path.is_file():
        from build.sd.single_file import METADATA_KEY, load_single_file

        pipeline, metadata = load_single_file(path, config)
        marker = json.loads(metadata.get(METADATA_KEY, "{}"))
    else:
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(str(weights), safety_checker=None,
                                                               requires_safety_checker=False, use_safetensors=True)
        except Exception as exc:  # noqa: BLE001 - diffusers raises OSError/ValueError/EnvironmentError variants
            raise WeightsError(f"cannot load a Stable Diffusion checkpoint from {weights!r}: "
                               f"{first_line(exc)}") from None
        if (path / "kiln-weights.json").exists():
            marker = json.loads((path / "kiln-weights.json").read_text())
    check_tokenizer(pipeline.tokenizer, str(weights))
    controlnets = {name: load_controlnet(source, pipeline.unet, pipeline.vae.config.latent_channels)
                   for name, source in controlnet_sources(controlnet, path).items()}
    random = marker.get("random", False)
    return LoadedSD(unet=pipeline.unet.eval(), vae=pipeline.vae.eval(), text_encoder=pipeline.text_encoder.eval(),
                    tokenizer=pipeline.tokenizer, scheduler_config=dict(pipeline.scheduler.config),
                    controlnets=controlnets, source=str(weights), random=bool(random))
