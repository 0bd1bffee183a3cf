"""Stable Diffusion 1.x: weights, specs, export, Triton configs, calibration and `build_sd`."""

from build.sd.build import SDBuildOptions, build_sd
from build.sd.specs import ImageRange, axis_sizes, sd_specs

__all__ = ["ImageRange", "SDBuildOptions", "axis_sizes", "build_sd", "sd_specs"]
