"""What Outpainting mk2's matched noise (kiln.outpaint_noise) costs one pass against encoding the pass's canvas as
PNG, which every pass's request does, measured in the same run. The canvas is side x side: a photograph
(astronaut.jpg) on its left three quarters, the right quarter the new border (AUTOMATIC1111's default 128 pixels at
512), one thread.

    python -m benchmarks.outpaint_noise [--sides 512 768 1024] [--repeats 5] [--out benchmarks/results]

Prints a table and writes outpaint_noise.json in --out; each ratio is against the PNG encode of its size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("PNG encode (every pass's)", "matched noise (a pass's)")


def _arms(side: int) -> dict[str, float]:
    from PIL import Image

    from benchmarks.load import time_each
    from kiln.imaging import encode_png
    from kiln.outpaint_noise import matched_noise
    from kiln.paths import SAMPLE_IMAGES

    known = side * 3 // 4
    canvas = np.zeros((side, side, 3), np.uint8)
    canvas[:, :known] = np.asarray(Image.open(SAMPLE_IMAGES / "astronaut.jpg").convert("RGB").resize((known, side)))
    mask = np.zeros((side, side))
    mask[:, known:] = 1.0
    calls = (lambda: encode_png(Image.fromarray(canvas)), lambda: matched_noise(canvas / 255.0, mask))
    return time_each(ARMS, calls)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.load import by_size

    return by_size(argv, __doc__, ARMS, _arms, lambda _index: 0, "outpaint_noise", RESULTS)


if __name__ == "__main__":
    main()
