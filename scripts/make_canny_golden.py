"""Regenerate tests/golden/canny/: OpenCV's own Canny edge maps of the sample photographs, the reference that
kiln.control.canny is compared with (tests/test_control_units.py). OpenCV is not a dependency of kiln; install it
beside the project for this script only:

    .venv/bin/pip install --target /tmp/cv2lib opencv-python-headless && rm -rf /tmp/cv2lib/numpy*
    PYTHONPATH=/tmp/cv2lib .venv/bin/python scripts/make_canny_golden.py

The maps in the repository were made by opencv-python-headless 5.1.0 (cv2.Canny(pixels, low, high), the RGB
pixels as sd-webui-controlnet passes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGES, OUT = ROOT / "assets" / "images", ROOT / "tests" / "golden" / "canny"
# (image, thresholds): the extension's defaults, low ones (long weak chains), fractional and swapped ones; PNG
# photographs only (a JPEG's pixels could depend on the decoder's build)
CASES = [("coffee.png", 100, 200), ("coffee.png", 50, 150), ("camera_gray.png", 20, 60.5),
         ("rocket_alpha.png", 180, 90)]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    index = []
    for name, low, high in CASES:
        pixels = np.asarray(Image.open(IMAGES / name).convert("RGB"))
        edges = cv2.Canny(pixels, low, high)
        target = f"{Path(name).stem}-{low}-{high}.png"
        Image.fromarray(edges).save(OUT / target, optimize=True)
        index.append({"image": name, "low": low, "high": high, "edges": target})
    (OUT / "cases.json").write_text(json.dumps({"opencv": cv2.__version__, "cases": index}, indent=1) + "\n")


if __name__ == "__main__":
    main()
