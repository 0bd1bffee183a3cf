"""Stable Diffusion 1.x, 2.x and SDXL checkpoints without a hub: seeded random weights of the real architectures, and
the real CLIP tokenizer.

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

from build.sd.families import family, family_of
from kiln.errors import WeightsError, first_line
from kiln.prompts import CLIP_VOCAB_SIZE, check_tokenizer

if TYPE_CHECKING:
    import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77

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


def clip_tokenizer(pad_token: str = EOS):
    """SD's CLIP tokenizer (transformers' CLIPTokenizer), built offline; SD 2.x's pads with "!" (its family's)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH,
                              bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token)
    check_tokenizer(tokenizer, "the open-clip vocabulary")
    return tokenizer


def clip_text_config(sizes: dict[str, Any], pad_token_id: int = CLIP_VOCAB_SIZE - 1):
    """A CLIPTextConfig of CLIP's vocabulary and 77 positions with the given sizes."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=MODEL_MAX_LENGTH,
                          bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1,
                          pad_token_id=pad_token_id, **sizes)


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def build_components(size: str = "tiny", seed: int = 0, controlnet: bool = True, inpainting: bool = False,
                     family_name: str = "sd1", prediction: str | None = None, edit: bool = False) -> dict:
    """Seeded random components of the family's `size` architecture ("tiny" or "full"), each from its own seed.

    `inpainting` makes the UNet a 9-channel inpainting UNet (latents + mask + masked-image latents), `edit` an
    8-channel instruct-pix2pix UNet (latents + the edited image's); `prediction` (epsilon, v_prediction) defaults to
    the family's released model's.
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kind = family(family_name)
    arch = kind.architecture(size)
    scheduler = kind.scheduler_config(prediction)
    tokenizer = clip_tokenizer(kind.pad_token)
    _seeded(seed)
    latent = arch.vae["latent_channels"]
    unet = UNet2DConditionModel(**(arch.unet | ({"in_channels": 2 * latent + 1} if inpainting else
                                                {"in_channels": 2 * latent} if edit else {})))
    _seeded(seed + 1)
    vae = AutoencoderKL(**arch.vae)
    _seeded(seed + 2)
    # (SDXL's refiner: OpenCLIP ViT-bigG alone, with its projection)
    text_encoder = (CLIPTextModelWithProjection if kind.refiner else CLIPTextModel)(
        clip_text_config(arch.text_encoder, tokenizer.pad_token_id))
    components = {
        "unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
        "scheduler": getattr(diffusers, scheduler["_class_name"]).from_config(
            {k: v for k, v in scheduler.items() if k != "_class_name"}),
    }
    if arch.text_encoder_2 is not None:  # SDXL's OpenCLIP ViT-bigG, with its projection (the pooled text)
        components["tokenizer_2"] = clip_tokenizer(kind.pad_token_2)
        _seeded(seed + 4)
        components["text_encoder_2"] = CLIPTextModelWithProjection(
            clip_text_config(arch.text_encoder_2, components["tokenizer_2"].pad_token_id)).eval()
    if controlnet and arch.controlnet is not None:  # (none for the refiner)
        components["controlnet"] = random_controlnet(size, seed + 3, family_name)
    return components


def random_controlnet(size: str = "tiny", seed: int = 3, family_name: str = "sd1"):
    """A seeded random ControlNet of the family's `size` architecture (fits that size's UNet)."""
    import torch
    from diffusers import ControlNetModel

    arch = family(family_name).architecture(size)
    _seeded(seed)
    control = ControlNetModel(**arch.controlnet)
    # ControlNet's output convolutions start at zero (so training starts from the plain UNet); random ones
    # make its residuals non-zero, as a trained ControlNet's are (diffusers' own pipeline tests do the same). The
    # control image's embedding ends in a zero convolution too: random, or the image would not matter at all.
    for conv in [*control.controlnet_down_blocks, control.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.1)
        torch.nn.init.constant_(conv.bias, 0.1)
    torch.nn.init.normal_(control.controlnet_cond_embedding.conv_out.weight, std=0.1)
    return control.eval()


def random_embedding(size: str = "tiny", vectors: int = 2, seed: int = 0, family_name: str = "sd1"):
    """Seeded random textual-inversion vectors (vectors, hidden) for the `size` architecture's text encoder: normal,
    std 0.05 (wider than CLIP's token embeddings at initialisation, 0.02, as trained embeddings' vectors are)."""
    import numpy as np

    arch = family(family_name).architecture(size)  # SDXL's: both encoders' vectors side by side
    hidden = arch.text_encoder["hidden_size"] + (arch.text_encoder_2 or {}).get("hidden_size", 0)
    return np.random.default_rng(seed).normal(0.0, 0.05, (vectors, hidden)).astype(np.float32)


def write_sd_checkpoint(out: Path, size: str = "tiny", seed: int = 0, controlnet: bool = True,
                        inpainting: bool = False, family_name: str = "sd1", prediction: str | None = None,
                        edit: bool = False) -> Path:
    """Write a diffusers-format SD 1.x, 2.x or SDXL folder of seeded random weights; a ControlNet goes in
    controlnet/. `edit`: an SD 1.x instruct-pix2pix checkpoint (diffusers' StableDiffusionInstructPix2PixPipeline)."""
    from diffusers import (
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    out = Path(out)
    if edit and (inpainting or family_name != "sd1"):
        raise WeightsError("an instruct-pix2pix checkpoint is an SD 1.x one, not an inpainting one")
    components = build_components(size, seed, controlnet, inpainting, family_name, prediction, edit)
    control = components.pop("controlnet", None)
    if family(family_name).refiner:  # as diffusers holds SDXL's refiner: its one encoder is the "second"
        pipeline = StableDiffusionXLImg2ImgPipeline(
            vae=components["vae"], text_encoder=None, tokenizer=None, text_encoder_2=components["text_encoder"],
            tokenizer_2=components["tokenizer"], unet=components["unet"], scheduler=components["scheduler"],
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    elif "text_encoder_2" in components:
        pipeline = StableDiffusionXLPipeline(**components)
    else:
        pipeline = (StableDiffusionInstructPix2PixPipeline if edit else StableDiffusionPipeline)(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(str(out), safe_serialization=True)
    if control is not None:
        control.save_pretrained(str(out / "controlnet"), safe_serialization=True)
    (out / "kiln-weights.json").write_text(json.dumps(
        {"random": True, "seed": seed, "architecture": size, "family": family_name, "inpainting": inpainting,
         "instruct_pix2pix": edit,
         "prediction_type": components["scheduler"].config.prediction_type,
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
    family: str = "sd1"  # build.sd.families: sd1, sd2, sdxl
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder (with its projection) ...
    tokenizer_2: Any = None  # ... and its tokenizer (the same vocabulary, its own padding)

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

        control = load_controlnet_single_file(Path(source), unet, latent_channels)
        # A file holds no config: sd-webui-controlnet pools the residuals of SD 1.x/2.x files named *shuffle*, and so
        # does kiln (diffusers' from_single_file ignores global_pool_conditions in a config; the forward reads it).
        pooled = "shuffle" in Path(source).stem.lower() and unet.config.addition_embed_type != "text_time"
        control.register_to_config(global_pool_conditions=pooled)
        return control
    try:
        return ControlNetModel.from_pretrained(str(source), use_safetensors=True).eval()
    except Exception as exc:  # noqa: BLE001 - diffusers raises OSError/ValueError/EnvironmentError variants
        raise WeightsError(f"cannot load a ControlNet from {str(source)!r}: {first_line(exc)}") from None


def load_sd(weights: str | Path, controlnet: str | Path | Sequence[str | Path] | None = None,
            config: str | Path | None = None) -> LoadedSD:
    """Load a diffusers-format folder (SD 1.x, 2.x or SDXL base), a single-file original-layout .safetensors, or a hub
    id (where a network exists).

    A single file takes its architecture from `config` (a diffusers-format folder; default: SD 1.5's). ControlNets
    come from `controlnet` (see `controlnet_sources`), or a folder checkpoint's controlnet/.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

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
            kind = _sdxl_folder(path)
            if kind:
                pipeline = (StableDiffusionXLImg2ImgPipeline if kind == "refiner" else StableDiffusionXLPipeline
                            ).from_pretrained(str(weights), use_safetensors=True)
            else:
                pipeline = StableDiffusionPipeline.from_pretrained(str(weights), safety_checker=None,
                                                                   requires_safety_checker=False, use_safetensors=True)
        except Exception as exc:  # noqa: BLE001 - diffusers raises OSError/ValueError/EnvironmentError variants
            raise WeightsError(f"cannot load a Stable Diffusion checkpoint from {weights!r}: "
                               f"{first_line(exc)}") from None
        if (path / "kiln-weights.json").exists():
            marker = json.loads((path / "kiln-weights.json").read_text())
    text_encoder, tokenizer = pipeline.text_encoder, pipeline.tokenizer
    text_encoder_2, tokenizer_2 = getattr(pipeline, "text_encoder_2", None), getattr(pipeline, "tokenizer_2", None)
    if text_encoder is None:  # SDXL's refiner: its one text encoder, with its projection, is diffusers' "second"
        text_encoder, tokenizer, text_encoder_2, tokenizer_2 = text_encoder_2, tokenizer_2, None, None
    check_tokenizer(tokenizer, str(weights))
    kind = family_of(text_encoder.config, marker, text_encoder_2)
    latent, channels = pipeline.vae.config.latent_channels, pipeline.unet.config.in_channels
    if channels not in (latent, 2 * latent, 2 * latent + 1):
        raise WeightsError(f"{weights}: its UNet takes {channels} input channels; kiln serves UNets of {latent} (the "
                           f"latents), {2 * latent + 1} (inpainting) and {2 * latent} (instruct-pix2pix)")
    controlnets = {name: load_controlnet(source, pipeline.unet, pipeline.vae.config.latent_channels)
                   for name, source in controlnet_sources(controlnet, path).items()}
    random = marker.get("random", False)
    return LoadedSD(unet=pipeline.unet.eval(), vae=pipeline.vae.eval(), text_encoder=text_encoder.eval(),
                    tokenizer=tokenizer, scheduler_config=dict(pipeline.scheduler.config),
                    controlnets=controlnets, source=str(weights), random=bool(random), family=kind.name,
                    text_encoder_2=text_encoder_2.eval() if text_encoder_2 is not None else None,
                    tokenizer_2=tokenizer_2)


def _sdxl_folder(path: Path) -> str:
    """"base" for a diffusers folder of an SDXL pipeline (its model_index.json names a second text encoder),
    "refiner" for SDXL's refiner (the second alone), "" for another."""
    index = path / "model_index.json"
    if not index.is_file():
        return ""
    components = json.loads(index.read_text())
    if not (components.get("text_encoder_2") or [None])[0]:
        return ""
    return "base" if (components.get("text_encoder") or [None])[0] else "refiner"
