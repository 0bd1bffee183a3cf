"""Regenerate tests/golden/cv/: what OpenCV and sd-webui-controlnet's map handling make, the reference that
kiln.cvimage and kiln.controlmaps are compared with (tests/test_cvimage.py). OpenCV is not a dependency of kiln;
install it beside the project for this script only:

    .venv/bin/pip install --target /tmp/cv2lib opencv-python-headless && rm -rf /tmp/cv2lib/numpy*
    PYTHONPATH=/tmp/cv2lib .venv/bin/python scripts/make_cv_golden.py

Four parts:
- ops.npz: seeded random images and what cv2.resize (INTER_AREA, INTER_CUBIC, INTER_NEAREST), cv2.erode/dilate,
  MORPH_HITMISS and THRESH_OTSU make of them;
- filters.npz: what cv2.GaussianBlur makes of seeded uint8 and float32 images (sigmas from 0.3 to 512, kernels
  wider than the image among them), and the L of cv2.cvtColor(..., COLOR_BGR2LAB) for seeded colours;
- maps/: the extension's steps on the sample photographs and on two drawn maps, written out here with OpenCV as the
  extension runs them (scripts/processor.py resize_image_with_pad + canny; detectmap_proc with high_quality_resize,
  nake_nms and lvmin_thin): the processor's map of each image, and that map fitted to a generation's size;
- modules/: the extension's model-free preprocessors (threshold, scribble_xdog, lineart_standard, blur_gaussian,
  tile_resample, recolor_luminance, recolor_intensity, t2ia_color_grid, shuffle with numpy seeded as it seeds it)
  on the sample photographs, as its code runs them (its scripts/preprocessor/model_free_preprocessors.py,
  legacy/processor.py, annotator/color and annotator/shuffle, with OpenCV and numpy).

The files in the repository were made by opencv-python-headless 5.1.0 on x86-64 (IPP on, OpenCV's default; the
cubic cases depend on it), and agree with 4.14, but for shuffle: OpenCV 4.x's remap mixes pixels in fixed point at
1/32-pixel positions, 5.x's in float, and kiln follows the newer (4.14's maps of the sample photos differ by up to
3 levels in about 6% of their values).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGES, OUT = ROOT / "assets" / "images", ROOT / "tests" / "golden" / "cv"
# (source, processor resolution, canny thresholds, resize mode, generation width x height)
MAP_CASES = [("coffee.png", 256, 100, 200, 1, 96, 64),  # shrunk by area for canny; fitted smaller: area
             ("camera_gray.png", 200, 50, 150, 0, 320, 256),  # shrunk; fitted larger: cubic, thinned and pruned
             ("coffee.png", 512, 100, 200, 2, 448, 256),  # enlarged by cubic (IPP) for canny; resize and fill
             ("segments.png", 0, 0, 0, 1, 200, 120),  # 6 colours: nearest
             ("strokes.png", 0, 0, 0, 0, 150, 90)]  # a binary map of thick strokes: Otsu, no thinning


def _ops() -> dict:
    rng = np.random.default_rng(20261203)
    cases = {}
    for index in range(48):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        shape = (height, width, 3) if index % 2 else (height, width)
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        if index % 3 == 0:  # smooth images too (their values near each other, where rounding matters)
            smooth = np.cumsum(np.cumsum(rng.normal(0, 4, shape), 0), 1)
            image = np.clip(smooth - smooth.mean() + 128, 0, 255).astype(np.uint8)
        kind = ("area", "area_grow", "cubic", "nearest", "morph", "otsu")[index % 6]
        cases[f"{index}_{kind}_in"] = image
        if kind == "area":
            whole = int(rng.integers(1, 4))
            if index % 4 == 0:  # a whole factor (OpenCV's block average)
                image = cases[f"{index}_{kind}_in"] = np.resize(image, (height * whole, width * whole) + shape[2:])
                size = (width, height)
            else:
                size = (int(rng.integers(1, width + 1)), int(rng.integers(1, height + 1)))
            cases[f"{index}_{kind}_out"] = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        elif kind == "area_grow":
            size = (int(rng.integers(1, width + 1)), int(rng.integers(height, 3 * height + 2)))
            cases[f"{index}_{kind}_out"] = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        elif kind == "cubic":
            factor = 3 if index % 4 == 2 else rng.uniform(1, 3)
            size = (max(1, int(width * factor)), max(1, int(height * factor)))
            cases[f"{index}_{kind}_out"] = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
        elif kind == "nearest":
            size = (int(rng.integers(1, 3 * width + 2)), int(rng.integers(1, 3 * height + 2)))
            cases[f"{index}_{kind}_out"] = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST)
        elif kind == "morph":
            gray = image if image.ndim == 2 else image[..., 0]
            binary = np.where(gray > 127, 255, 0).astype(np.uint8)
            pattern = rng.integers(-1, 2, (3, 3)).astype(np.int32)
            element = (rng.random((3, 3)) < 0.6).astype(np.uint8)
            cases |= {f"{index}_{kind}_binary": binary, f"{index}_{kind}_pattern": pattern,
                      f"{index}_{kind}_element": element,
                      f"{index}_{kind}_hitmiss": cv2.morphologyEx(binary, cv2.MORPH_HITMISS, pattern),
                      f"{index}_{kind}_erode": cv2.erode(image, element),
                      f"{index}_{kind}_dilate": cv2.dilate(image, element)}
        else:
            gray = image if image.ndim == 2 else image[..., 0]
            cases[f"{index}_{kind}_out"] = np.array(cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0])
    return cases


# -- sd-webui-controlnet's steps, with OpenCV ------------------------------------------------------------------------
def _processor_map(pixels: np.ndarray, resolution: int, low: int, high: int) -> np.ndarray:
    """resize_image_with_pad (short side to the resolution, cubic up or area down, edges repeated out to
    multiples of 64), cv2.Canny, the padding cut off."""
    padded, remove_pad = _resize_with_pad(pixels, resolution)
    return np.repeat(remove_pad(cv2.Canny(padded, low, high))[..., None], 3, axis=2)


_THIN = [np.rot90(np.array(k, np.int32), t) for t in range(4)
         for k in ([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])]
_PRUNE = [np.rot90(np.array(k, np.int32), t) for t in range(4)
          for k in ([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])]


def _thin(binary: np.ndarray, prune: bool) -> np.ndarray:
    def sweep(patterns) -> bool:
        changed = False
        for pattern in patterns:
            hits = cv2.morphologyEx(binary, cv2.MORPH_HITMISS, pattern) > 127
            changed |= bool(hits.any())
            binary[hits] = 0
        return changed

    for _ in range(32):
        if not sweep(_THIN):
            break
    if prune:
        sweep(_PRUNE)
    return binary


def _quality_resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    if x.shape[:2] == (height, width):
        return x
    area, old = width * height, x.shape[0] * x.shape[1]
    colours = len(np.unique(x.reshape(-1, 3), axis=0))
    binary = colours == 2 and x.min() < 16 and x.max() > 240
    one_pixel = False
    if binary:
        opened = cv2.dilate(cv2.erode(x, np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8))
        one_pixel = np.count_nonzero(opened < x) * 2 > np.count_nonzero(x > 127)
    inter = cv2.INTER_NEAREST if 2 < colours < 200 else cv2.INTER_AREA if area < old else cv2.INTER_CUBIC
    y = cv2.resize(x, (width, height), interpolation=inter)
    if binary:
        y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        if one_pixel:
            lines = [np.array(k, np.uint8) for k in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0]] * 3,
                                                     np.eye(3), np.fliplr(np.eye(3)))]
            kept = np.zeros_like(y)
            for line in lines:
                np.putmask(kept, cv2.dilate(y, kernel=line) == y, y)
            y = _thin(cv2.threshold(kept, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1], area > old)
        else:
            y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
        y = np.stack([y] * 3, axis=2)
    return y


def _fit(x: np.ndarray, mode: int, width: int, height: int) -> np.ndarray:
    """detectmap_proc's geometry: 0 just resize, 1 crop and resize, 2 resize and fill."""
    if mode == 0:
        return _quality_resize(x, width, height)
    old_h, old_w = x.shape[:2]
    k = (max if mode == 1 else min)(height / old_h, width / old_w)
    y = _quality_resize(x, int(np.round(old_w * k)), int(np.round(old_h * k)))
    new_h, new_w = y.shape[:2]
    if mode == 1:
        top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
        return y[top:top + height, left:left + width]
    edges = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], axis=0)
    canvas = np.tile(np.median(edges, axis=0).astype(np.uint8)[None, None], [height, width, 1])
    top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
    canvas[top:top + new_h, left:left + new_w] = y
    return canvas


def _filters() -> dict:
    rng = np.random.default_rng(20261204)
    cases = {}
    for index in range(40):
        height, width = (int(v) for v in rng.integers(1, 32, 2))
        sigma = float(rng.choice([0.3, 0.5, 1.0, 2.5, 5.0, 6.0, 9.0, 20.0, 64.0, 512.0]))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if index % 2:
            image = image.astype(np.float32)
        cases[f"{index}_blur_in"], cases[f"{index}_blur_sigma"] = image, np.array(sigma)
        cases[f"{index}_blur_out"] = cv2.GaussianBlur(image, (0, 0), sigma)
    colours = rng.integers(0, 256, (1, 16384, 3), dtype=np.uint8)
    cases["lab_in"], cases["lab_out"] = colours, cv2.cvtColor(colours, cv2.COLOR_BGR2LAB)[..., 0]
    return cases


# (module, source, processor resolution, threshold_a): the extension's model-free modules
MODULE_CASES = [("threshold", "coffee.png", 160, 127), ("threshold", "camera_gray.png", 100, 60.5),
                ("scribble_xdog", "coffee.png", 160, 32), ("scribble_xdog", "chelsea.jpg", 192, 10),
                ("lineart_standard", "coffee.png", 160, -1), ("lineart_standard", "camera_gray.png", 128, -1),
                ("blur_gaussian", "coffee.png", 128, 9.0), ("blur_gaussian", "astronaut.jpg", 96, 512),
                ("tile_resample", "coffee.png", 0, 3.7), ("tile_resample", "astronaut.jpg", 0, 1.5),
                ("recolor_luminance", "astronaut.jpg", 0, 1.0), ("recolor_luminance", "astronaut.jpg", 0, 0.6),
                ("recolor_intensity", "astronaut.jpg", 0, 1.0), ("recolor_intensity", "astronaut.jpg", 0, 1.7),
                ("color", "coffee.png", 256, -1), ("color", "astronaut.jpg", 700, -1)]
SHUFFLE_SEEDS = [("coffee.png", 5), ("astronaut.jpg", 2**31 + 7)]  # the job's seed (doubled wraps past 2^32)


def _shuffle(image: np.ndarray, seed: int) -> np.ndarray:
    """The extension's shuffle: numpy seeded as its set_numpy_seed seeds it, the image resized to its fixed 512, then
    annotator/shuffle's ContentShuffleDetector with make_noise_disk."""
    np.random.seed((seed + seed) & 0xFFFFFFFF)
    img, remove_pad = _resize_with_pad(image, 512)
    img = remove_pad(img)
    h, w = img.shape[:2]
    fields = []
    for scale in (w - 1, h - 1):
        noise = np.random.uniform(low=0, high=1, size=(h // 256 + 2, w // 256 + 2, 1))
        noise = cv2.resize(noise, (w + 512, h + 512), interpolation=cv2.INTER_CUBIC)[256:256 + h, 256:256 + w]
        noise -= np.min(noise)
        noise /= np.max(noise)
        fields.append(noise[:, :, None] * float(scale))
    return cv2.remap(img, np.concatenate(fields, axis=2).astype(np.float32), None, cv2.INTER_LINEAR)


def _resize_with_pad(image: np.ndarray, resolution: int):
    """The extension's resize_image_with_pad: the padded image and its remove_pad."""
    h, w = image.shape[:2]
    k = resolution / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    resized = cv2.resize(image, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    return np.pad(resized, [[0, -th % 64], [0, -tw % 64], [0, 0]], mode="edge"), lambda x: x[:th, :tw]


def _module(name: str, image: np.ndarray, resolution: int, a: float) -> np.ndarray:
    """The extension's code for each module (HWC3 makes gray maps three channels)."""
    if name == "threshold":
        img, remove_pad = _resize_with_pad(image, resolution)
        result = np.zeros_like(img, dtype=np.uint8)
        result[np.min(img, axis=2) > a] = 255
        return remove_pad(result)
    if name == "scribble_xdog":
        img, remove_pad = _resize_with_pad(image, resolution)
        g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
        g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
        dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
        result = np.zeros_like(img, dtype=np.uint8)
        result[2 * (255 - dog) > a] = 255
        return remove_pad(result)
    if name == "lineart_standard":
        img, remove_pad = _resize_with_pad(image, resolution)
        x = img.astype(np.float32)
        g = cv2.GaussianBlur(x, (0, 0), 6.0)
        intensity = np.min(g - x, axis=2).clip(0, 255)
        intensity /= max(16, np.median(intensity[intensity > 8]))
        intensity *= 127
        return np.stack([remove_pad(intensity.clip(0, 255).astype(np.uint8))] * 3, axis=2)
    if name == "blur_gaussian":
        img, remove_pad = _resize_with_pad(image, resolution)
        return cv2.GaussianBlur(remove_pad(img), (0, 0), float(a))
    if name == "color":  # annotator/color: cv2_resize_shortest_edge, then apply_color
        h, w = image.shape[:2]
        size = (int(round(w / h * resolution)), resolution) if h < w else (resolution, int(round(h / w * resolution)))
        img = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
        grid = cv2.resize(img, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)
        return cv2.resize(grid, (w, h), interpolation=cv2.INTER_NEAREST)
    if name == "tile_resample":
        if a < 1.1:
            return image
        h, w = int(image.shape[0] / a), int(image.shape[1] / a)
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    code = cv2.COLOR_BGR2LAB if name == "recolor_luminance" else cv2.COLOR_BGR2HSV
    result = cv2.cvtColor(image, code)[:, :, 0 if name == "recolor_luminance" else 2].astype(np.float32) / 255.0
    result = result ** a
    result = (result * 255.0).clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(result, cv2.COLOR_GRAY2RGB)


def _drawn_maps(out: Path) -> None:
    """A segmentation-like map of six colours, and thick white strokes on black."""
    rng = np.random.default_rng(7)
    seeds, palette = rng.integers(0, 160, (6, 2)), rng.integers(0, 256, (6, 3)).astype(np.uint8)
    ys, xs = np.mgrid[:90, :160]
    nearest = np.argmin((ys[..., None] - seeds[:, 0]) ** 2 + (xs[..., None] - seeds[:, 1]) ** 2, axis=2)
    Image.fromarray(palette[nearest]).save(out / "segments.png")
    strokes = np.zeros((60, 100), np.uint8)
    for _ in range(6):
        y0, x0 = rng.integers(5, 55), rng.integers(5, 95)
        strokes[max(0, y0 - 3):y0 + 3, max(0, x0 - 20):x0 + 20] = 255
    Image.fromarray(np.repeat(strokes[..., None], 3, axis=2)).save(out / "strokes.png")


def main() -> None:
    (OUT / "maps").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "ops.npz", **_ops())
    _drawn_maps(OUT / "maps")
    index = []
    for number, (name, resolution, low, high, mode, width, height) in enumerate(MAP_CASES):
        folder = IMAGES if (IMAGES / name).exists() else OUT / "maps"
        pixels = np.asarray(Image.open(folder / name).convert("RGB"))
        detected = _processor_map(pixels, resolution, low, high) if resolution else pixels
        case = {"image": name, "resolution": resolution, "low": low, "high": high, "mode": mode, "width": width,
                "height": height, "fitted": f"{number}-fitted.png"}
        if resolution:
            case["detected"] = f"{number}-detected.png"
            Image.fromarray(detected[..., 0]).save(OUT / "maps" / case["detected"], optimize=True)
        Image.fromarray(_fit(detected, mode, width, height)).save(OUT / "maps" / case["fitted"], optimize=True)
        index.append(case)
    (OUT / "maps" / "cases.json").write_text(json.dumps({"opencv": cv2.__version__, "cases": index}, indent=1) + "\n")
    np.savez_compressed(OUT / "filters.npz", **_filters())
    (OUT / "modules").mkdir(exist_ok=True)
    modules = []
    for number, (name, source, resolution, a) in enumerate(MODULE_CASES):
        pixels = np.asarray(Image.open(IMAGES / source).convert("RGB"))
        made = _module(name, pixels, resolution, a if a != -1 else 0)
        case = {"module": name, "image": source, "resolution": resolution, "threshold_a": a,
                "map": f"{number}-{name}.png"}
        Image.fromarray(made[..., 0] if (made == made[..., :1]).all() else made).save(
            OUT / "modules" / case["map"], optimize=True)
        modules.append(case)
    for number, (source, seed) in enumerate(SHUFFLE_SEEDS, start=len(modules)):
        case = {"module": "shuffle", "image": source, "resolution": 512, "threshold_a": -1, "seed": seed,
                "map": f"{number}-shuffle.png"}
        Image.fromarray(_shuffle(np.asarray(Image.open(IMAGES / source).convert("RGB")), seed)).save(
            OUT / "modules" / case["map"], optimize=True)
        modules.append(case)
    (OUT / "modules" / "cases.json").write_text(json.dumps({"opencv": cv2.__version__, "numpy": np.__version__,
                                                             "cases": modules}, indent=1) + "\n")


if __name__ == "__main__":
    main()
