"""The ViT-B/16 as a compiled component: its one spec (names, shapes, profile, tolerances) and served constants."""

from __future__ import annotations

from build.specs import ComponentSpec, TensorSpec, Tolerance
from kiln.contract import VIT_BLOCKS

VIT_MODEL_NAME = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
NUM_BLOCKS = VIT_BLOCKS  # ViT-B/16 depth; checked against the loaded model
NUM_CLASSES = 1000
DEFAULT_TOP_K = 5
MAX_TOP_K = 1000
EXTRA_EXPORTS = ("safetensors", "torchscript")  # non-served exports a build also writes

VIT_SPEC = ComponentSpec(
    name="vit",
    inputs=(
        TensorSpec("pixel_values", "FP32", ("batch", 3, 224, 224)),
        # Which block's tokens to return (0 = first, 11 = last); optional: classification leaves it out.
        TensorSpec("layer", "INT64", ("batch", 1), optional=True, value_range=(0, NUM_BLOCKS)),
    ),
    outputs=(
        TensorSpec("logits", "FP32", ("batch", NUM_CLASSES)),
        TensorSpec("pooled", "FP32", ("batch", 768)),  # CLS token after the final norm (timm's pre-logits)
        TensorSpec("tokens", "FP32", ("batch", 197, 768)),  # output of block `layer`, before the final norm
    ),
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
