"""`kiln bench sd`'s derive step, in its own process (its peak memory its own): a variant's artifact of one
component, made as the build makes it (from the fp32 ONNX file, or for torch variants from the checkpoint's module)."""

from __future__ import annotations

import time
from pathlib import Path


def derive_component(served, config: dict, image_range: tuple[int, int, int]) -> dict:
    """Make config["target"] for the served variant of config["component"]; its seconds (and a compile's)."""
    start = time.perf_counter()
    if served.runtime == "torch":
        from build.sd import ImageRange, axis_sizes, sd_specs
        from build.sd.export import export_modules
        from build.sd.weights import load_sd
        from build.torch_export import export_artifact

        loaded, side = load_sd(config["weights"]), config["side"]
        compiled = export_artifact(export_modules(loaded)[config["component"]],
                                   sd_specs(loaded, ImageRange(*image_range))[config["component"]], served,
                                   Path(config["target"]), axis_sizes(loaded, batch=2, height=side, width=side),
                                   log=lambda _m: None)
        return {"seconds": time.perf_counter() - start, "compile_s": compiled.seconds if compiled else 0.0}
    from build.convert import derive
    from build.sd.calibration import capture_unet_inputs

    calibration = None
    if served.calibrated:  # UNet inputs of real runs, as the build does
        calibration = capture_unet_inputs(Path(config["repo"]), (min(256, config["side"]),) * 2, 8)
    derive(served, Path(config["source"]), Path(config["target"]), calibration)
    return {"seconds": time.perf_counter() - start}
