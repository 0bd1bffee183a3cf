"""What AUTOMATIC1111's img2img colour correction costs an image (kiln.color_correction: Lab both ways, the
histograms matched, the luminosity blend) against encoding that image as PNG, which every response does, measured
in the same run; and each of its parts. At 512, 768 and 1024 pixels a side, on a photograph (astronaut.jpg resized)
corrected towards another (coffee.png), one thread.

    python -m benchmarks.color_correction [--sides 512 768 1024] [--repeats 5] [--out benchmarks/results]

Prints a table and writes color_correction.json in --out; each ratio is against the PNG encode of its size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("PNG encode (every response's)", "colour correction (all of it)", "  RGB -> Lab", "  Lab -> RGB",
        "  histograms matched", "  luminosity blend")


def _arms(side: int) -> dict[str, float]:
    from PIL import Image

    from benchmarks.load import time_each
    from kiln.color_correction import color_target, correct, luminosity_blend, match_histograms
    from kiln.cvlab import lab_to_rgb, rgb_to_lab
    from kiln.imaging import encode_png
    from kiln.paths import SAMPLE_IMAGES

    image, other = (np.asarray(Image.open(SAMPLE_IMAGES / name).convert("RGB").resize((side, side)))
                    for name in ("astronaut.jpg", "coffee.png"))
    target, lab = color_target(other), rgb_to_lab(image)
    calls = (lambda: encode_png(Image.fromarray(image)), lambda: correct(image, target), lambda: rgb_to_lab(image),
             lambda: lab_to_rgb(lab), lambda: match_histograms(lab, target), lambda: luminosity_blend(other, image))
    return time_each(ARMS, calls)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.load import by_size

    return by_size(argv, __doc__, ARMS, _arms, lambda _index: 0, "color_correction", RESULTS)


if __name__ == "__main__":
    main()
