"""The build -> serve contract: every Triton model name, and what an SD build tells the service.

`kiln build` writes models under these names and the facts of an SD build (`SDContract`) into
`sd_unet`'s config parameters; the service reads them back from Triton (or from the repository,
in process). It holds no weights and reads no other file. No model name is written anywhere else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from kiln.errors import ConfigError, InputError
from kiln.model_config import read_parameters

# -- model names ---------------------------------------------------------------------------------
VIT = "vit"  # the classifier itself: pixels -> logits, pooled features, one block's tokens
VIT_PREPROCESS = "vit_preprocess"  # image bytes -> pixels (timm's eval transform)
VIT_POSTPROCESS = "vit_postprocess"  # logits -> top-k labels
VIT_CLASSIFY = "vit_classify"  # ensemble: bytes -> labels
VIT_EMBED = "vit_embed"  # ensemble: bytes -> features

SD_TOKENIZER = "sd_tokenizer"  # prompts -> token ids in 77-token chunks
SD_TEXT_ENCODER = "sd_text_encoder"
SD_TEXT_ENCODE = "sd_text_encode"  # ensemble: prompts -> embeddings
SD_UNET = "sd_unet"  # carries the SDContract in its parameters
SD_UNET_CONTROL = "sd_unet_control"  # the UNet taking ControlNet residuals
SD_VAE_DECODER = "sd_vae_decoder"
SD_VAE_POSTPROCESS = "sd_vae_postprocess"  # decoder output -> uint8 pixels
SD_VAE_DECODE = "sd_vae_decode"  # ensemble: latents -> uint8 images
SD_VAE_ENCODER = "sd_vae_encoder"
SD_IMAGE_PREPROCESS = "sd_image_preprocess"  # image bytes + size -> the encoder's pixels
SD_VAE_ENCODE = "sd_vae_encode"  # ensemble: image bytes -> latent distribution
SD_READY = (SD_TEXT_ENCODE, SD_UNET, SD_VAE_DECODE)  # what a generation needs: the service's readiness


def sd_model(component: str) -> str:
    """The Triton model serving an SD component (a build spec's name: text_encoder, unet, controlnet_2, ...)."""
    return f"sd_{component}"


def controlnet_component(index: int) -> str:
    """The component name of the index-th ControlNet of a build: controlnet, controlnet_2, ..."""
    return "controlnet" if index == 0 else f"controlnet_{index + 1}"


TILING = "_tiling"  # the suffix of the seamless models (sd_unet_tiling, sd_vae_decoder_tiling, ...; SDContract.tiling)


def vae_models(suffix: str = "") -> dict[str, str]:
    """A VAE's Triton models: the checkpoint's own ("") or an extra VAE's (suffix "_2", "_3", ...)."""
    return {"decoder": SD_VAE_DECODER + suffix, "decode": SD_VAE_DECODE + suffix, "encoder": SD_VAE_ENCODER + suffix,
            "encode": SD_VAE_ENCODE + suffix}


def controlnet_ensemble(index: int) -> str:
    """Its ControlNet -> UNet ensemble: sd_controlnet_unet for the first (its name since the first build), then _N."""
    return "sd_controlnet_unet" + controlnet_component(index).removeprefix("controlnet")


# -- several checkpoints in one repository -----------------------------------------------------------
CHECKPOINT_SEPARATOR = "--"  # NAME--sd_unet: the models of the checkpoint built with `kiln build sd --checkpoint NAME`
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.+]|-(?!-)){0,63}$")


def check_checkpoint_name(name: str) -> str:
    if not CHECKPOINT_NAME.match(name) or name.endswith("-"):
        raise ConfigError(f"checkpoint name {name!r}: 1-64 letters, digits, _ . + and single hyphens, starting with a "
                          "letter or digit")
    return name


@dataclass(frozen=True)
class SDModels:
    """The Triton model names of one checkpoint's SD build: as above for the repository's default checkpoint
    (`checkpoint` ""), NAME--sd_* for one built beside it with `kiln build sd --checkpoint NAME`. Every SD model of a
    build, ensembles and pre/post-processing included, is its checkpoint's own: an ensemble never crosses them."""

    checkpoint: str = ""

    def __call__(self, name: str) -> str:
        return f"{self.checkpoint}{CHECKPOINT_SEPARATOR}{name}" if self.checkpoint else name

    def component(self, component: str) -> str:
        return self(sd_model(component))

    def vae(self, suffix: str = "") -> dict[str, str]:
        return {kind: self(name) for kind, name in vae_models(suffix).items()}

    def controlnet_ensemble(self, index: int) -> str:
        return self(controlnet_ensemble(index))

    @property
    def report_section(self) -> str:
        """Its section of the repository's build-report.json."""
        return f"sd{CHECKPOINT_SEPARATOR}{self.checkpoint}" if self.checkpoint else "sd"

    @staticmethod
    def of(model: str) -> SDModels:
        """The checkpoint a model name belongs to (NAME--sd_unet: NAME; sd_unet: the default)."""
        checkpoint, sep, _ = model.rpartition(CHECKPOINT_SEPARATOR)
        return SDModels(checkpoint if sep else "")


DEFAULT_MODELS = SDModels()  # the repository's default checkpoint: sd_unet, sd_tokenizer, ...


def base_name(model: str) -> str:
    """A model's name without its checkpoint's prefix (NAME--sd_tokenizer: sd_tokenizer)."""
    return model.rpartition(CHECKPOINT_SEPARATOR)[2]


# -- the SD build's facts ------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedControlNet:
    """One ControlNet of the build: the name requests select it by, its Triton model and its ensemble."""

    name: str
    model: str = "sd_controlnet"
    ensemble: str = "sd_controlnet_unet"  # "": none (a 9-channel UNet's ControlNet takes other inputs than it)
    sha256: str = ""
    global_pool: bool = False  # pools its residuals, for the prompt's rows alone (shuffle's: global_pool_conditions)

    @property
    def component(self) -> str:
        """The build's component name of its model (controlnet, controlnet_2, ...)."""
        return base_name(self.model).removeprefix("sd_")

    @property
    def title(self) -> str:
        """sd-webui-controlnet's model title: name [first 8 hex digits of the hash]."""
        return f"{self.name} [{self.sha256[:8]}]" if self.sha256 else self.name


@dataclass(frozen=True)
class ServedUpscaler:
    """An upscaler network the repository serves (`kiln build upscaler`): its name (what upscaler_1, hr_upscaler and
    SD upscale take), its Triton model, its native scale, its architecture."""

    name: str
    model: str
    scale: int
    architecture: str = ""

    @classmethod
    def from_parameters(cls, model: str, params: Mapping[str, str]) -> ServedUpscaler:
        return cls(params.get("upscaler_name", model), model, int(params.get("scale", "1")),
                   params.get("architecture", ""))


UPSCALER_PREFIX = "upscaler_"  # the upscaler networks' Triton models


@dataclass(frozen=True)
class ServedVAE:
    """A VAE of the build besides the checkpoint's own (AUTOMATIC1111's sd_vae): its name (the file's), the suffix of
    its Triton models (kiln.contract.vae_models), its file's sha256."""

    name: str
    suffix: str
    sha256: str = ""

    @property
    def short_hash(self) -> str:
        """AUTOMATIC1111's "VAE hash": the first 10 hex digits."""
        return self.sha256[:10]


@dataclass(frozen=True)
class SDContract:
    """What the service needs to drive the loop over an SD build, written by `kiln build sd`."""

    scheduler_config: dict  # the checkpoint's scheduler config: its training noise schedule
    vae_scale_factor: int  # image side / latent side
    latent_channels: int  # the VAE's latent channels
    # 9 for an inpainting UNet (latents + mask + masked-image latents), 8 for instruct-pix2pix's (latents + image's)
    unet_in_channels: int
    scaling_factor: float  # the VAE's latent scaling factor
    min_size: int  # image sides the build's profiles cover, in pixels
    max_size: int
    size_multiple: int  # image sides must be multiples of this (the exported UNet's upsamplers)
    model_name: str = "sd"  # what /sdapi/v1/sd-models lists: the checkpoint's name
    family: str = "sd1"  # the model family (build.sd.families): sd1, sd2, sdxl; a build before families is SD 1.x
    model_sha256: str = ""  # the UNet artifact's hash
    variant: str = "onnxruntime-fp32"  # what the served models run
    controlnets: tuple[ServedControlNet, ...] = ()  # in build order; the first is the default
    vaes: tuple[ServedVAE, ...] = ()  # VAEs a request may choose instead of the checkpoint's own (sd_vae)
    # AUTOMATIC1111's tiling: the build serves the UNet and the VAE with circular padding too (the _tiling models)
    tiling: bool = False
    vae_tile: int = 0  # the VAE's sample size, diffusers' tile side in pixels (VAE tiling); 0: a build before it
    # The upscaler networks beside the build (kiln build upscaler), found when the service connects (not the build's)
    upscalers: tuple[ServedUpscaler, ...] = field(default=(), metadata={"parameter": False})
    max_prompt_chunks: int = 8  # 75-token chunks a prompt may have
    # Layers the text encoder serves for AUTOMATIC1111's clip skip (CLIP_stop_at_last_layers 1..this); 0: a build
    # before clip skip, whose text encoder serves its last layer only
    clip_skip_layers: int = 0
    # Hidden size of the textual-inversion vectors the text encoder takes per request (its token embeddings'); 0: a
    # build before embeddings, whose text encoder takes token ids only
    textual_inversion_dim: int = 0
    # SDXL: the first text encoder's width in the encoding (the second's follows; emphasis restores each one's mean on
    # its own, as AUTOMATIC1111); 0: one text encoder
    text_split: int = 0
    # SDXL: the UNet takes the pooled text and this many time ids (6 for the base: original size, crop, target size;
    # 5 for the refiner: the aesthetic score last); 0: no added conditions
    time_ids: int = 0
    # Layers of the UNet a LoRA can change in this build (its artifacts' kiln.runtime.lora maps); 0: the models take
    # no LoRA (a build before LoRA, a quantized or torch variant, or NVIDIA's native backends)
    lora_layers: int = 0
    unet_max_batch: int = 16  # rows one sd_unet call may take (a native OpenVINO sd_unet has max_batch_size 0)
    # Row counts sd_unet replays from CUDA graphs ("2,4,8,16"; torch on CUDA), captured at these input shapes (JSON,
    # the build's optimal size): the step batcher pads a call of those per-row shapes to the next bucket
    graph_batches: str = ""
    graph_shapes: str = ""
    static_sizes: str = ""  # a static build (--static-size): the only sizes its models run, "512x512,768x512" (w x h)

    def check_built_size(self, width: int, height: int, what: str) -> None:
        """An InputError where a static build has no models for width x height (`what`: what runs at that size)."""
        built = self.static_sizes.split(",")
        if self.static_sizes and f"{width}x{height}" not in built:
            raise InputError(f"{what} is {width}x{height}; this static build runs {', '.join(built)} only (build "
                             f"with --static-size {width}x{height}, or without --static-size)")

    @property
    def upscaler_names(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.upscalers)

    @property
    def row_buckets(self) -> tuple[int, ...]:
        return tuple(sorted(int(b) for b in self.graph_batches.split(",") if b))

    @property
    def bucket_row_shapes(self) -> dict[str, tuple[int, ...]]:
        """{input: its shape without the batch axis} of the captured graphs."""
        return {k: tuple(v[1:]) for k, v in json.loads(self.graph_shapes).items()} if self.graph_shapes else {}

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's short hash: the first 10 hex digits."""
        return self.model_sha256[:10]

    @property
    def title(self) -> str:
        """AUTOMATIC1111's checkpoint title: name [hash]."""
        return f"{self.model_name} [{self.model_hash}]" if self.model_hash else self.model_name

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def a1111_config(self) -> str:
        """The config file AUTOMATIC1111 would load this checkpoint with (its sd-models "config")."""
        if self.family.startswith("sdxl"):
            return "sd_xl_refiner.yaml" if self.family == "sdxl-refiner" else \
                "sd_xl_inpaint.yaml" if self.inpainting_unet else "sd_xl_base.yaml"
        version = "v2" if self.family == "sd2" else "v1"
        if self.edit_unet and version == "v1":
            return "instruct-pix2pix.yaml"
        if self.inpainting_unet:
            return f"{version}-inpainting-inference.yaml"
        return f"{version}-inference{'-v' if self.prediction_type == 'v_prediction' else ''}.yaml"

    @property
    def inpainting_unet(self) -> bool:
        """A UNet that also takes the inpainting mask and the masked image's latents."""
        return self.unet_in_channels == 2 * self.latent_channels + 1

    @property
    def edit_unet(self) -> bool:
        """instruct-pix2pix's UNet: it also takes the latents of the image it edits (orchestrator.pipeline.edit)."""
        return self.unet_in_channels == 2 * self.latent_channels

    def vae(self, name: str | None) -> ServedVAE | None:
        """The VAE AUTOMATIC1111's sd_vae names: None, "Automatic" or "None" the checkpoint's own (None here), else one
        of the build's by its file name (with or without the extension); InputError for another."""
        if name is None or name.strip() in ("", "Automatic", "None"):
            return None
        for candidate in self.vaes:
            if name.strip() in (candidate.name, Path(candidate.name).stem):
                return candidate
        known = ", ".join(["Automatic", "None", *(v.name for v in self.vaes)])
        raise InputError(f"sd_vae: unknown VAE {name!r}; this build serves: {known} (build more: kiln build sd --vae)")

    def controlnet(self, model: str | None) -> ServedControlNet:
        """The ControlNet a unit's `model` names: its name, or its title "name [hash]"; None/"None": the first."""
        if not self.controlnets:
            raise InputError("controlnet: this build has no ControlNet "
                             "(build with --controlnet or a controlnet/ folder)")
        if model is None or model.strip() in ("", "None"):
            return self.controlnets[0]
        wanted = model.strip()
        for candidate in self.controlnets:
            if wanted in (candidate.name, candidate.title) or wanted.rsplit(" [", 1)[0] == candidate.name:
                return candidate
        raise InputError(f"unknown ControlNet model {model!r}; this build serves: "
                         f"{', '.join(c.title for c in self.controlnets)}")

    # -- as Triton config parameters (strings) -----------------------------------------------------
    def to_parameters(self) -> dict[str, str]:
        params = {}
        for item in fields(self):
            if item.metadata.get("parameter", True):
                value = getattr(self, item.name)
                if item.name in ("graph_batches", "graph_shapes", "static_sizes") and not value:
                    continue  # written where they apply (CUDA graphs, a static build): Triton leaves "" out
                if item.name in ("controlnets", "vaes"):
                    value = json.dumps([c.__dict__ for c in value])
                elif isinstance(value, dict):
                    value = json.dumps(value, default=str)
                params[item.name] = str(value)
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], unet_max_batch: int) -> SDContract:
        """`unet_max_batch`: sd_unet's max_batch_size, for builds that did not write it as a parameter."""
        values: dict = {"unet_max_batch": unet_max_batch}
        for item in fields(cls):
            if not item.metadata.get("parameter", True) or item.name not in params:
                continue  # a missing required field is the TypeError below
            text = params[item.name]
            if item.name in ("controlnets", "vaes"):
                kind = ServedControlNet if item.name == "controlnets" else ServedVAE
                values[item.name] = tuple(kind(**entry) for entry in json.loads(text))
            elif item.name == "scheduler_config":
                values[item.name] = json.loads(text)
            else:
                kind = {"int": int, "float": float, "bool": lambda text: text == "True"}.get(str(item.type), str)
                values[item.name] = kind(text)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{SD_UNET}'s config lacks what the service needs ({exc}); rebuild the repository "
                              "with `kiln build sd`") from None


def read_sd_contract(repository: Path, models: SDModels = DEFAULT_MODELS) -> SDContract:
    """The contract of a checkpoint's SD build in a repository (what Triton would report for its sd_unet)."""
    params, max_batch = read_parameters(Path(repository) / models(SD_UNET) / "config.pbtxt")
    return SDContract.from_parameters(params, max_batch)
