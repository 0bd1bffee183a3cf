"""Regenerate assets/images/ from the photographs that ship in scikit-image's wheel (CC0 / public domain).

Run once by a developer (`.venv/bin/python scripts/make_sample_images.py`); the results are committed.
"""

from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "assets" / "images"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    Image.fromarray(skimage.data.chelsea()).save(OUT / "chelsea.jpg", quality=90)  # 451x300 RGB JPEG
    Image.fromarray(skimage.data.coffee()).resize((480, 320), Image.LANCZOS).save(OUT / "coffee.png", optimize=True)
    Image.fromarray(skimage.data.astronaut()).resize((256, 256), Image.LANCZOS).save(OUT / "astronaut.jpg", quality=90)
    camera = Image.fromarray(skimage.data.camera()).resize((300, 300), Image.LANCZOS)
    camera.save(OUT / "camera_gray.png", optimize=True)
    rocket = Image.fromarray(skimage.data.rocket()).resize((320, 214), Image.LANCZOS).convert("RGBA")
    yy, xx = np.mgrid[0:214, 0:320]
    alpha = np.clip(255 - 2.0 * np.hypot(xx - 160, yy - 107), 0, 255).astype(np.uint8)  # soft round vignette
    rocket.putalpha(Image.fromarray(alpha))
    rocket.save(OUT / "rocket_alpha.png", optimize=True)
    Image.fromarray(skimage.data.coffee()).resize((600, 400), Image.LANCZOS).save(OUT / "coffee_large.webp", quality=85)


if __name__ == "__main__":
    main()
