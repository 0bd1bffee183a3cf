"""What ControlNet's inpaint_only costs beside the inpaint module: the restore at every UNet call (the clean latents
outside the mask replaced by the image's encoding, the noise that implies mixed in; orchestrator.pipeline.restore)
against the linear blend plain inpainting does at each call, both on CFG's two rows; and the paste-back once an image
(its mask dilated and box-blurred by 7 pixels, the composite; the unit's map is fitted once a pass, and cached)
against the plain composite by a mask already made. At 512, 768 and 1024 pixels a side (latents of 64, 96 and 128),
random latents, one torch thread. The paste-back's mask is checked against scipy's filters (OpenCV's dilate and
blur, as the extension calls them).

    python -m benchmarks.inpaint_only [--sides 512 768 1024] [--repeats 5] [--out benchmarks/results]

Prints a table and writes inpaint_only.json in --out; each ratio is against the baseline of its kind measured in the
same run. (The one VAE encode a pass adds is one encoder call, as img2img's init image costs.)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("per call: linear blend (plain inpainting)", "per call: restore (inpaint_only)",
        "per image: composite by a given mask",
        "per image: paste-back (dilate, blur, composite; its map fitted already, as in a pass)")


def _inputs(side: int):
    """A unit (a photo-sized noise image with a box masked), one CFG call's latents and prediction, a decoded image."""
    import torch
    from PIL import Image

    from kiln.imaging import encode_png
    from orchestrator.pipeline import ControlNetUnit

    rng = np.random.default_rng(side)
    mask = np.zeros((side, side), np.uint8)
    mask[side // 4: side // 2, side // 3: side * 2 // 3] = 255
    unit = ControlNetUnit(image=encode_png(Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8))),
                          module="inpaint_only", mask=encode_png(Image.fromarray(mask)), resize_mode=0)
    generator = torch.Generator().manual_seed(side)
    latent = side // 8
    sample, output, z0 = (torch.randn(n, 4, latent, latent, generator=generator) for n in (1, 2, 1))
    decoded = rng.integers(0, 256, (1, side, side, 3), np.uint8)
    return unit, sample, output, z0, decoded


def _time(run, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls


def _arms(side: int) -> dict[str, float]:
    """Seconds for each arm at `side`, the paste-back's mask checked against scipy's."""
    from scipy.ndimage import maximum_filter, uniform_filter

    from orchestrator.pipeline.restore import Restore, latent_mask, model_alphas, paste_back, paste_mask, unit_map

    unit, sample, output, z0, decoded = _inputs(side)
    pixels = unit_map(unit, side, side)
    binary = (pixels[..., 3] > 127).astype(np.float32)
    mask = paste_mask(binary, 7)
    expected = uniform_filter(maximum_filter(binary, size=7, mode="constant"), size=7, mode="mirror")
    gap = float(np.abs(mask - expected).max())
    assert gap < 1e-5, f"the paste-back's mask is {gap} from scipy's at {side}"
    pooled = latent_mask(pixels[..., 3], 8)  # SD's VAE factor and DDPM tables
    restore = Restore(z0, pooled, 1.0, model_alphas(1000, 0.00085, 0.012, "scaled_linear"))
    kept = mask[None, ..., None]
    return {ARMS[0]: _time(lambda: output * pooled + sample * (1 - pooled), 20),
            ARMS[1]: _time(lambda: restore.prediction(sample, 500.0, output), 20),
            ARMS[2]: _time(lambda: np.round(kept * decoded + (1 - kept) * pixels[..., :3]).astype(np.uint8), 3),
            ARMS[3]: _time(lambda: paste_back(decoded, (unit,)), 3)}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.load import by_size

    return by_size(argv, __doc__, ARMS, _arms, lambda index: index - index % 2, "inpaint_only", RESULTS)


if __name__ == "__main__":
    main()
