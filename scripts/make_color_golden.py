"""Regenerate tests/golden/cv/color_correction.npz: what AUTOMATIC1111's img2img colour correction makes, with the
libraries it pins; kiln.color_correction and kiln.cvlab are compared with it (tests/test_color_correction.py). None
of them is a dependency of kiln; install them beside the project for this script only:

    python3 -m venv /tmp/ccvenv && /tmp/ccvenv/bin/pip install numpy pillow opencv-python-headless==4.10.0.84 \\
        scikit-image==0.21.0 blendmodes==2022
    /tmp/ccvenv/bin/python scripts/make_color_golden.py

It holds:
- lab: 2^14 seeded colours, and what cv2.cvtColor makes of them each way (COLOR_RGB2LAB, COLOR_LAB2RGB: the second
  from the colours read as Lab, most of them outside sRGB);
- cases: a target (the init image) and a generated image, and AUTOMATIC1111 1.10's apply_color_correction of them:
  the photographs in assets/images, one with a colour cast, and seeded noise (which drives the luminosity blend's
  clipping both ways).

And match_histograms_float.npz: scikit-image 0.21's float path of match_histograms (channel_axis=1 on (N, 3)
arrays, as AUTOMATIC1111's Outpainting mk2 matches its noise to the known pixels), on seeded values with ties.

The file in the repository was made by opencv-python-headless 4.10.0.84, scikit-image 0.21.0 and blendmodes 2022 on
x86-64; kiln matches it exactly, and matches all 2^24 colours each way.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from blendmodes.blend import BlendType, blendLayers
from PIL import Image
from skimage import exposure

ROOT = Path(__file__).resolve().parent.parent
IMAGES, OUT = ROOT / "assets" / "images", ROOT / "tests" / "golden" / "cv"


def apply_color_correction(correction: np.ndarray, original_image: Image.Image) -> np.ndarray:
    """AUTOMATIC1111 1.10's modules/processing.py, as it runs it."""
    image = Image.fromarray(cv2.cvtColor(exposure.match_histograms(
        cv2.cvtColor(np.asarray(original_image), cv2.COLOR_RGB2LAB), correction, channel_axis=2),
        cv2.COLOR_LAB2RGB).astype("uint8"))
    return np.asarray(blendLayers(image, original_image, BlendType.LUMINOSITY).convert("RGB"))


def main() -> None:
    rng = np.random.default_rng(20261207)
    colours = rng.integers(0, 256, (128, 128, 3), np.uint8)
    out = {"lab_in": colours, "rgb_to_lab": cv2.cvtColor(colours, cv2.COLOR_RGB2LAB),
           "lab_to_rgb": cv2.cvtColor(colours, cv2.COLOR_LAB2RGB)}
    photos = [Image.open(IMAGES / name).convert("RGB").resize((80, 64), Image.LANCZOS)
              for name in ("chelsea.jpg", "coffee.png", "astronaut.jpg")]
    cast = np.clip(np.asarray(photos[0]).astype(int) * [1.2, 0.8, 1.25] + [20, -10, 30], 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, (64, 80, 3), np.uint8)
    pairs = [(photos[0], Image.fromarray(cast)), (photos[1], photos[0]), (Image.fromarray(noise), photos[1]),
             (photos[2], Image.fromarray(noise)), (photos[1].resize((48, 40)), photos[2])]  # another size too
    for index, (target, generated) in enumerate(pairs):
        correction = cv2.cvtColor(np.asarray(target), cv2.COLOR_RGB2LAB)  # setup_color_correction
        out[f"{index}_target"], out[f"{index}_generated"] = np.asarray(target), np.asarray(generated)
        out[f"{index}_corrected"] = apply_color_correction(correction, generated)
    np.savez_compressed(OUT / "color_correction.npz", **out)
    floats = np.random.default_rng(20261208)
    source = np.round(floats.random((600, 3)) ** 2, 3)  # rounded: ties in both, as the image's flat areas have
    reference = np.round(floats.random((900, 3)), 2)
    np.savez_compressed(OUT / "match_histograms_float.npz", source=source, reference=reference,
                        matched=exposure.match_histograms(source, reference, channel_axis=1))


if __name__ == "__main__":
    main()
