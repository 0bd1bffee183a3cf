"""The ViT as a compiled component: its spec (names, shapes, profile, tolerances), derived from the timm model.

`VIT_SPEC` is the stock classifier's (ViT-B/16, 224, 1000 classes); `spec_for(model)` is any timm
VisionTransformer's (Tiny/Small/Base/Large, patch 14/16, 224/384, the user's own classes): depth,
width, token count, image size and class count are read from the model, never assumed.
"""

from __future__ import annotations

from dataclasses import replace

from build.specs import ComponentSpec, TensorSpec, Tolerance
from kiln.errors import ConfigError

VIT_MODEL_NAME = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
NUM_BLOCKS = 12  # ViT-B/16's depth
NUM_CLASSES = 1000
DEFAULT_TOP_K = 5
MAX_TOP_K = 1000
EXTRA_EXPORTS = ("safetensors", "torchscript")  # non-served exports a build also writes


def vit_tensors(blocks: int, classes: int, width: int, tokens: int, size: int) -> dict:
    """The inputs and outputs of a ViT of this depth, class count, width, token count and image size."""
    return {
        "inputs": (
            TensorSpec("pixel_values", "FP32", ("batch", 3, size, size)),
            # Which block's tokens to return (0 = first, blocks-1 = last); optional: classification leaves it out.
            TensorSpec("layer", "INT64", ("batch", 1), optional=True, value_range=(0, blocks)),
        ),
        "outputs": (
            TensorSpec("logits", "FP32", ("batch", classes)),
            TensorSpec("pooled", "FP32", ("batch", width)),  # CLS token after the final norm (timm's pre-logits)
            TensorSpec("tokens", "FP32", ("batch", tokens, width)),  # output of block `layer`, before the final norm
        ),
    }


VIT_SPEC = ComponentSpec(
    name="vit",
    **vit_tensors(NUM_BLOCKS, NUM_CLASSES, 768, 197, 224),
    profile={"batch": (1, 8, 32)},
    reference_output="logits",
    tolerances={
        "fp32": Tolerance(min_cosine=0.99999, max_abs=1e-3, min_top1=1.0,
                          why="same arithmetic as PyTorch in float32; only summation order differs"),
        "fp16": Tolerance(min_cosine=0.9995, min_top1=0.9,
                          why="weights rounded to float16 (11-bit mantissa), computed in float32"),
        "fp16-compute": Tolerance(min_cosine=0.999, min_top1=0.9,
                                  why="float16 weights and arithmetic on CUDA (float32 accumulation in the GEMMs)"),
        "bf16": Tolerance(min_cosine=0.995, min_top1=0.75,
                          why="activations and matmuls in bfloat16 (8-bit mantissa); ~1e-2 logit error is expected"),
        "int8": Tolerance(min_cosine=0.98, min_top1=0.5,
                          why="8-bit weights and activations; calibration on in-distribution images; "
                              "the stricter 0.998 goal on real images is tested separately"),
    },
)


def spec_for(model, base: ComponentSpec = VIT_SPEC) -> ComponentSpec:
    """`base` (profile, tolerances) with the shapes of this timm model; refuse what the served graph cannot run."""
    blocks = getattr(model, "blocks", None)
    patch_embed = getattr(model, "patch_embed", None)
    if blocks is None or patch_embed is None or not hasattr(model, "_pos_embed") or not hasattr(model, "head"):
        raise ConfigError(f"{type(model).__name__} is not one of timm's VisionTransformer models (vit_*, deit_*, "
                          "eva_* ...): kiln serves those (blocks, patch_embed and a head)")
    size = patch_embed.img_size
    if size[0] != size[1]:
        raise ConfigError(f"only square inputs are served; this model takes {size[0]}x{size[1]}")
    if model.num_classes < 1:
        raise ConfigError("this model has no classifier head (num_classes 0): give it one (kiln finetune vit)")
    tokens = patch_embed.num_patches + model.num_prefix_tokens
    return replace(base, **vit_tensors(len(blocks), model.num_classes, model.embed_dim, tokens, size[0]))


def spec_facts(spec: ComponentSpec) -> dict[str, int]:
    """Depth, classes, width, tokens and image size of a ViT spec (what configs and reports need)."""
    pixels, layer = spec.inputs
    logits, pooled, tokens = spec.outputs
    return {"blocks": int(layer.value_range[1]), "classes": logits.shape[1], "width": pooled.shape[1],
            "tokens": tokens.shape[1], "size": pixels.shape[2]}
