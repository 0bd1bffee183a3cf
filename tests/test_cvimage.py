"""kiln.cvimage against OpenCV, and kiln.controlmaps against sd-webui-controlnet's map handling run on OpenCV: the
images both made (tests/golden/cv, scripts/make_cv_golden.py says how). No OpenCV here: the goldens hold its output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln import cvimage
from kiln.controlmaps import fit_map, high_quality_resize
from kiln.detect import map_of
from kiln.paths import SAMPLE_IMAGES

GOLDEN = Path(__file__).resolve().parent / "golden" / "cv"
OPS = np.load(GOLDEN / "ops.npz")
CASES = sorted({key.rsplit("_", 1)[0] for key in OPS.files if key.endswith("_in")}, key=lambda k: int(k.split("_")[0]))
MAPS = json.loads((GOLDEN / "maps" / "cases.json").read_text())["cases"]


@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith(("_cubic", "_morph", "_otsu"))])
def test_area_and_nearest_resize_are_opencvs_exactly(case):
    source, expected = OPS[f"{case}_in"], OPS[f"{case}_out"]
    interpolation = "nearest" if case.endswith("nearest") else "area"
    got = cvimage.resize(source, expected.shape[1], expected.shape[0], interpolation)
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_cubic_resize_is_opencvs_to_a_level_at_near_ties():
    """Sources with a side under 4 take OpenCV's own fixed point: exact. The rest go to IPP in OpenCV, whose float
    sums kiln follows: one level at most, on few pixels (values a hair from a rounding tie; exact 3x enlargements)."""
    differing, total = {False: 0, True: 0}, {False: 0, True: 0}
    for case in (c for c in CASES if c.endswith("_cubic")):
        source, expected = OPS[f"{case}_in"], OPS[f"{case}_out"]
        got = cvimage.resize(source, expected.shape[1], expected.shape[0], "cubic")
        difference = np.abs(got.astype(int) - expected)
        if min(source.shape[:2]) < cvimage.IPP_MIN_SIDE:
            assert not difference.any(), case
        assert difference.max(initial=0) <= 1, case
        threefold = expected.shape[:2] == (3 * source.shape[0], 3 * source.shape[1])
        differing[threefold] += np.count_nonzero(difference)
        total[threefold] += difference.size
    assert total[True] and total[False]
    assert differing[False] <= total[False] * 0.001 and differing[True] <= total[True] * 0.01, (differing, total)


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("_morph")])
def test_erode_dilate_and_hit_or_miss_are_opencvs(case):
    image, binary = OPS[f"{case}_in"], OPS[f"{case}_binary"]
    element, pattern = OPS[f"{case}_element"], OPS[f"{case}_pattern"]
    assert np.array_equal(cvimage.erode(image, element), OPS[f"{case}_erode"])
    assert np.array_equal(cvimage.dilate(image, element), OPS[f"{case}_dilate"])
    assert np.array_equal(cvimage.hit_or_miss(binary, pattern), OPS[f"{case}_hitmiss"])


def test_otsu_threshold_is_opencvs():
    for case in (c for c in CASES if c.endswith("_otsu")):
        gray = OPS[f"{case}_in"] if OPS[f"{case}_in"].ndim == 2 else OPS[f"{case}_in"][..., 0]
        assert cvimage.otsu_threshold(gray) == int(OPS[f"{case}_out"]), case
    values = np.array([10] * 30 + [12] * 10 + [200] * 5 + [220] * 20, dtype=np.uint8)
    assert 12 <= cvimage.otsu_threshold(values) < 200
    assert cvimage.otsu_threshold(np.full((4, 4), 9, np.uint8)) == 0  # one value: no split (OpenCV's 0)


@pytest.mark.parametrize("case", MAPS, ids=lambda c: f"{c['image']}-{c['resolution']}-mode{c['mode']}")
def test_maps_are_the_extensions(case):
    """The processor's map (canny at the processor resolution, the image resized by cubic or area and padded to
    multiples of 64 as resize_image_with_pad pads it) and that map fitted by the resize mode (high_quality_resize:
    nearest for colour maps, area or cubic, Otsu and the thinning for one-pixel lines), as the extension makes them."""
    folder = SAMPLE_IMAGES if (SAMPLE_IMAGES / case["image"]).exists() else GOLDEN / "maps"
    image = Image.open(folder / case["image"]).convert("RGB")
    if case["resolution"]:
        detected = np.asarray(map_of(image, "canny", case["resolution"], case["low"], case["high"], 1 << 24))
        expected = np.asarray(Image.open(GOLDEN / "maps" / case["detected"]))
        assert np.array_equal(detected[..., 0], expected)
    else:
        detected = np.asarray(image)
    fitted = fit_map(detected, case["width"], case["height"], case["mode"])
    assert np.array_equal(fitted, np.asarray(Image.open(GOLDEN / "maps" / case["fitted"]).convert("RGB")))


def test_thinning_keeps_lines_one_pixel_wide():
    """An enlarged one-pixel line map comes back as one-pixel lines (without the thinning, cubic makes them 3 or 4
    wide); a thick stroke map is only thresholded."""
    lines = np.zeros((40, 40, 3), np.uint8)
    lines[10, 5:35], lines[5:35, 30] = 255, 255
    big = high_quality_resize(lines, 120, 120)
    assert set(np.unique(big)) == {0, 255}
    assert (big[..., 0] == 255).sum(axis=0)[20:80].max() <= 2  # the horizontal line, column by column
    cubic = cvimage.resize(lines, 120, 120, "cubic")
    assert (cubic[..., 0] > 127).sum(axis=0)[20:80].max() >= 3
    strokes = np.zeros((40, 40, 3), np.uint8)
    strokes[10:20, 5:35] = 255
    assert (high_quality_resize(strokes, 80, 80)[..., 0] == 255).sum() > 1000
