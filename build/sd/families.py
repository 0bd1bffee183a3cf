"""The Stable Diffusion families kiln builds: SD 1.x, SD 2.x and SDXL, their architectures (tiny and full size),
scheduler configs and tokenizer padding, and how a loaded checkpoint tells which family it is.

SD 2.x differs from SD 1.x in its text encoder (OpenCLIP ViT-H/14, which diffusers holds as a 23-layer
CLIPTextModel with GELU; SD 1.x has OpenAI's CLIP ViT-L/14 with QuickGELU), its UNet (linear attention projections,
heads of 64 channels, 1024-wide cross-attention), the padding after a prompt ("!" instead of the end token: what
OpenCLIP's tokenizer pads with, and diffusers and AUTOMATIC1111 follow) and, for the 768 models, v-prediction.

SDXL has two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, the second with a projection: its pooled output
conditions the UNet beside six "time ids", the image's original size, crop and target size), reads both from their
penultimate layer without the final layer norm, and has a 3-level UNet with 10-deep transformers at 1024 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.errors import WeightsError

# SD 1.5's scheduler config (PNDM, as the original checkpoint ships it); samplers are chosen per request later.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "prediction_type": "epsilon", "trained_betas": None,
}
PREDICTIONS = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class SDArchitecture:
    """Constructor arguments of each component; `tiny` follows diffusers' own fast tests, `full` the released model."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    controlnet: dict[str, Any] | None
    text_encoder_2: dict[str, Any] | None = None  # SDXL's OpenCLIP ViT-bigG (CLIPTextModelWithProjection)


_TINY_VAE = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                 down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                 up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32)
_FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
                 sample_size=512, layers_per_block=2, scaling_factor=0.18215,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
_TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32)
_TINY_CONTROLNET = dict(block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                        conditioning_embedding_out_channels=(16, 32), norm_num_groups=32)
_FULL_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_FULL_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_FULL_CONTROL_EMBEDDING = (16, 32, 96, 256)

ARCHITECTURES = {  # SD 1.x
    "tiny": SDArchitecture(
        unet=_TINY_UNET, vae=_TINY_VAE,
        text_encoder=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                          projection_dim=32, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
        controlnet=_TINY_CONTROLNET),
    "full": SDArchitecture(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, in_channels=4,
                  out_channels=4, attention_head_dim=8, cross_attention_dim=768, down_block_types=_FULL_DOWN,
                  up_block_types=_FULL_UP),
        vae=_FULL_VAE,
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          projection_dim=768, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
        controlnet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, in_channels=4,
                        attention_head_dim=8, cross_attention_dim=768,
                        conditioning_embedding_out_channels=_FULL_CONTROL_EMBEDDING, down_block_types=_FULL_DOWN)),
}

# SD 2.x: diffusers' SD 2 fast tests (tiny) and stabilityai/stable-diffusion-2-1 (full; sample_size 96: 768 px)
_SD2_ATTENTION = dict(use_linear_projection=True)
SD2_ARCHITECTURES = {
    "tiny": SDArchitecture(
        unet=_TINY_UNET | _SD2_ATTENTION | dict(attention_head_dim=(2, 4)), vae=_TINY_VAE,
        text_encoder=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                          projection_dim=512, layer_norm_eps=1e-5, hidden_act="gelu"),
        controlnet=_TINY_CONTROLNET | _SD2_ATTENTION | dict(attention_head_dim=(2, 4))),
    "full": SDArchitecture(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=96, in_channels=4,
                  out_channels=4, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                  down_block_types=_FULL_DOWN, up_block_types=_FULL_UP, upcast_attention=True, **_SD2_ATTENTION),
        vae=_FULL_VAE,
        text_encoder=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                          projection_dim=512, layer_norm_eps=1e-5, hidden_act="gelu"),
        controlnet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, in_channels=4,
                        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                        conditioning_embedding_out_channels=_FULL_CONTROL_EMBEDDING, down_block_types=_FULL_DOWN,
                        **_SD2_ATTENTION)),
}


# SDXL: diffusers' SDXL fast tests (tiny) and stabilityai/stable-diffusion-xl-base-1.0 (full; 1024 px). The UNet's
# added embedding takes the pooled text (the second encoder's projection) and 6 time ids of addition_time_embed_dim.
_TINY_XL_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                     projection_dim=32, layer_norm_eps=1e-5, hidden_act="gelu")
SDXL_ARCHITECTURES = {
    "tiny": SDArchitecture(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                  transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
                  cross_attention_dim=32 + 48, norm_num_groups=32),
        vae=_TINY_VAE | dict(sample_size=128),
        # The second encoder wider than the first (48, not diffusers' tests' 32): single files tell them apart by
        # width, as diffusers' from_single_file does (SDXL's are 768 and 1280)
        text_encoder=_TINY_XL_TEXT | dict(hidden_act="quick_gelu"), text_encoder_2=_TINY_XL_TEXT | dict(hidden_size=48),
        controlnet=dict(block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=(2, 4),
                        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
                        conditioning_embedding_out_channels=(16, 32), cross_attention_dim=32 + 48,
                        norm_num_groups=32)),
    "full": SDArchitecture(
        unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128, in_channels=4,
                  out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
                  projection_class_embeddings_input_dim=2816, cross_attention_dim=2048),
        vae=_FULL_VAE | dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          projection_dim=768, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
        text_encoder_2=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                            projection_dim=1280, layer_norm_eps=1e-5, hidden_act="gelu"),
        controlnet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2, in_channels=4,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                        addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
                        projection_class_embeddings_input_dim=2816, cross_attention_dim=2048,
                        conditioning_embedding_out_channels=_FULL_CONTROL_EMBEDDING)),
}
# SDXL's refiner: OpenCLIP ViT-bigG alone (with its projection), 5 time ids (the 6th, the target size, becomes the
# aesthetic score), cross-attention 1280 wide; stabilityai/stable-diffusion-xl-refiner-1.0 (full) and tiny ones
SDXL_REFINER_ARCHITECTURES = {
    "tiny": SDArchitecture(
        unet=SDXL_ARCHITECTURES["tiny"].unet | dict(projection_class_embeddings_input_dim=5 * 8 + 32,
                                                    cross_attention_dim=48),
        vae=_TINY_VAE | dict(sample_size=128), text_encoder=_TINY_XL_TEXT | dict(hidden_size=48), controlnet=None),
    "full": SDArchitecture(
        unet=dict(block_out_channels=(384, 768, 1536, 1536), layers_per_block=2, sample_size=128, in_channels=4,
                  out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(6, 12, 24, 24), use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, transformer_layers_per_block=4,
                  projection_class_embeddings_input_dim=2560, cross_attention_dim=1280),
        vae=SDXL_ARCHITECTURES["full"].vae, text_encoder=SDXL_ARCHITECTURES["full"].text_encoder_2, controlnet=None),
}
# SDXL base's scheduler: Euler over the same training schedule, "leading" timesteps
SDXL_SCHEDULER_CONFIG = SCHEDULER_CONFIG | {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading",
                                            "interpolation_type": "linear", "use_karras_sigmas": False}


@dataclass(frozen=True)
class Family:
    """One model family: what its checkpoints share."""

    name: str  # sd1, sd2: what the contract, the report and the API say
    title: str  # SD 1.x: what messages say
    architectures: dict[str, SDArchitecture]
    prediction: str  # the released model's: epsilon or v_prediction
    pad_token: str  # what the tokenizer pads a prompt with after its end token
    native_side: int  # the released model's image side (pixels)
    scheduler: dict | None = None  # the released model's scheduler config (default: SCHEDULER_CONFIG)
    pad_token_2: str = ""  # what the second text encoder's tokenizer pads with (SDXL); "": one text encoder
    refiner: bool = False  # SDXL's refiner: its one text encoder has a projection (the pooled text), no first one

    def architecture(self, size: str) -> SDArchitecture:
        if size not in self.architectures:
            raise WeightsError(f"unknown architecture size {size!r}; valid: {', '.join(self.architectures)}")
        return self.architectures[size]

    def scheduler_config(self, prediction: str | None = None) -> dict:
        prediction = prediction or self.prediction
        if prediction not in PREDICTIONS:
            raise WeightsError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        return (self.scheduler or SCHEDULER_CONFIG) | {"prediction_type": prediction}

    @property
    def two_encoders(self) -> bool:
        return bool(self.pad_token_2)


FAMILIES = {
    "sd1": Family("sd1", "SD 1.x", ARCHITECTURES, "epsilon", "<|endoftext|>", 512),
    "sd2": Family("sd2", "SD 2.x", SD2_ARCHITECTURES, "v_prediction", "!", 768),
    "sdxl": Family("sdxl", "SDXL", SDXL_ARCHITECTURES, "epsilon", "<|endoftext|>", 1024, SDXL_SCHEDULER_CONFIG, "!"),
    "sdxl-refiner": Family("sdxl-refiner", "SDXL refiner", SDXL_REFINER_ARCHITECTURES, "epsilon", "!", 1024,
                           SDXL_SCHEDULER_CONFIG, refiner=True),
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise WeightsError(f"unknown model family {name!r}; valid: {', '.join(FAMILIES)}") from None


def family_of(text_encoder_config, marker: dict | None = None, text_encoder_2=None) -> Family:
    """The family of a loaded checkpoint: what its kiln-weights.json says, else a second text encoder (SDXL), else its
    text encoder's activation (GELU: OpenCLIP, SD 2.x; QuickGELU: OpenAI's CLIP, SD 1.x)."""
    if marker and marker.get("family"):
        return family(marker["family"])
    if text_encoder_2 is not None:
        return FAMILIES["sdxl"]
    if getattr(text_encoder_config, "architectures", None) == ["CLIPTextModelWithProjection"]:
        return FAMILIES["sdxl-refiner"]
    return FAMILIES["sd2" if getattr(text_encoder_config, "hidden_act", "quick_gelu") == "gelu" else "sd1"]
