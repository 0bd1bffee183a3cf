"""What AUTOMATIC1111's img2img colour correction costs an image (kiln.color_correction: Lab both ways, the
histograms matched, the luminosity blend) against encoding that image as PNG, which every response does, measured
in the same run; and each of its parts. At 512, 768 and 1024 pixels a side, on a photograph (astronaut.jpg resized)
corrected towards another (coffee.png), one thread.

    python -m benchmarks.color_correction [--sides 512 768 1024] [--repeats 5] [--out benchmarks/results]

Prints a table and writes color_correction.json in --out; each ratio is against the PNG encode of its size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("PNG encode (every response's)", "colour correction (all of it)", "  RGB -> Lab", "  Lab -> RGB",
        "  histograms matched", "  luminosity blend")


def _arms(side: int) -> dict[str, float]:
    from PIL import Image

    from kiln.color_correction import color_target, correct, luminosity_blend, match_histograms
    from kiln.cvlab import lab_to_rgb, rgb_to_lab
    from kiln.imaging import encode_png
    from kiln.paths import SAMPLE_IMAGES

    image, other = (np.asarray(Image.open(SAMPLE_IMAGES / name).convert("RGB").resize((side, side)))
                    for name in ("astronaut.jpg", "coffee.png"))
    target, lab = color_target(other), rgb_to_lab(image)
    calls = (lambda: encode_png(Image.fromarray(image)), lambda: correct(image, target), lambda: rgb_to_lab(image),
             lambda: lab_to_rgb(lab), lambda: match_histograms(lab, target), lambda: luminosity_blend(other, image))
    seconds = {}
    for arm, call in zip(ARMS, calls):
        start = time.perf_counter()
        call()
        seconds[arm] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm

    from benchmarks.load import ratio_row, write_ratio_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    with tqdm(total=len(args.sides) * args.repeats, desc="color correction", unit="run") as bar:
        for side in args.sides:
            times: dict[str, list[float]] = {arm: [] for arm in ARMS}
            for _ in range(args.repeats):  # interleaved: drift hits every arm alike
                for arm, seconds in _arms(side).items():
                    times[arm].append(seconds)
                bar.update()
            rows += [ratio_row(side, arm, times[arm], times[ARMS[0]]) for arm in ARMS]
    return write_ratio_table(rows, args.out / "color_correction.json", args.repeats)


if __name__ == "__main__":
    main()
