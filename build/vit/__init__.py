"""The ViT-B/16 classifier: spec, weights, export, Triton configs and `build_vit`."""

from build.vit.build import BuildResult, ViTBuildOptions, build_vit, calibration_samples, parity_batch
from build.vit.configs import vit_model_configs
from build.vit.spec import EXTRA_EXPORTS, NUM_BLOCKS, VIT_MODEL_NAME, VIT_SPEC

__all__ = ["EXTRA_EXPORTS", "NUM_BLOCKS", "VIT_MODEL_NAME", "VIT_SPEC", "BuildResult", "ViTBuildOptions", "build_vit",
           "calibration_samples", "parity_batch", "vit_model_configs"]
