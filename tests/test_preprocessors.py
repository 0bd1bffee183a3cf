"""sd-webui-controlnet's model-free preprocessors (kiln.preprocessors) against the extension's code run on OpenCV
(tests/golden/cv, scripts/make_cv_golden.py says how: no OpenCV here, the goldens hold its output), their registry
(names, labels, order, sliders) and how the API and the pipeline take them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln.cvfilter import gaussian_blur, lab_lightness, softfloat_cbrt
from kiln.detect import map_of
from kiln.errors import InputError
from kiln.paths import SAMPLE_IMAGES
from kiln.preprocessors import CONTROL_MODULES, PREPROCESSORS, numpy_seed, preprocessor
from orchestrator.pipeline.control import soft
from orchestrator.pipeline.requests import ControlNetUnit

GOLDEN = Path(__file__).resolve().parent / "golden" / "cv"
FILTERS = np.load(GOLDEN / "filters.npz")
BLURS = sorted({k.split("_")[0] for k in FILTERS.files if k.endswith("_blur_in")}, key=int)
MODULES = json.loads((GOLDEN / "modules" / "cases.json").read_text())["cases"]
# float32 blurs (OpenCV sums in float32, kiln in double): the maps may differ where a value sits on a rounding edge
FLOAT_PATH = {"scribble_xdog", "lineart_standard"}


@pytest.mark.parametrize("case", BLURS)
def test_gaussian_blur_is_opencvs(case):
    """cv2.GaussianBlur(image, (0, 0), sigma): uint8 exactly (OpenCV's bit-exact fixed point; kernels wider than the
    image reflect again and again), float32 to its rounding."""
    image, sigma, expected = (FILTERS[f"{case}_blur_{k}"] for k in ("in", "sigma", "out"))
    got = gaussian_blur(image, float(sigma))
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if image.dtype == np.uint8:
        assert np.array_equal(got, expected)
    else:
        assert np.abs(got - expected).max() <= 2e-4


def test_lab_lightness_is_opencvs():
    """The L of cv2.cvtColor(..., COLOR_BGR2LAB) for 16,384 seeded colours (all 2^24 agreed when this was written);
    OpenCV's softfloat cube root truncates where a correctly rounded one would not, which one table entry shows."""
    assert np.array_equal(lab_lightness(FILTERS["lab_in"]), FILTERS["lab_out"])
    x = (np.float32(1) / np.float32(2040)) * np.float32(324)
    assert softfloat_cbrt(np.array([x]))[0] < np.float32(np.cbrt(np.float64(x)))  # truncated, one ulp below


@pytest.mark.parametrize("case", MODULES, ids=lambda c: f"{c['module']}-{c['image']}-{c['threshold_a']}")
def test_modules_are_the_extensions(case):
    """Each module's map as the extension makes it (its processor resolution, resize_image_with_pad where it pads):
    exactly, but for the float blurs' rounding edges (at most 1 pixel in 10,000, and lineart by one level)."""
    image = Image.open(SAMPLE_IMAGES / case["image"]).convert("RGB")
    pre = preprocessor(case["module"])
    a, b = pre.slider_values(case["threshold_a"], -1, ("threshold_a", "threshold_b"))
    seed = numpy_seed(case["seed"]) if "seed" in case else None  # shuffle's: numpy seeded from the job's seed
    got = np.asarray(map_of(image, pre.name, case["resolution"] or 512, a, b, 1 << 24, seed=seed))
    expected = np.asarray(Image.open(GOLDEN / "modules" / case["map"]))
    expected = np.repeat(expected[..., None], 3, axis=2) if expected.ndim == 2 else expected
    assert got.shape == expected.shape
    if pre.name not in FLOAT_PATH:
        assert np.array_equal(got, expected)
    else:
        differ = np.abs(got.astype(int) - expected).max(axis=2)
        assert differ.mean() <= 1e-4 * 255 and (pre.name != "lineart_standard" or differ.max() <= 1)
    if pre.name == "recolor_luminance":  # the extension converts RGB as if it were BGR: the order matters
        reversed_channels = Image.fromarray(np.ascontiguousarray(np.asarray(image)[..., ::-1]))
        assert not np.array_equal(np.asarray(map_of(reversed_channels, pre.name, 512, a, b, 1 << 24)), got)


def test_the_registry_is_the_extensions():
    """Names in the extension's order (none, then priority and label descending), labels accepted as names (any
    case), each module's sliders and the defaults -1 asks for; what a module lacks is -1; bad values named."""
    assert CONTROL_MODULES == ("none", "tile_resample", "recolor_luminance", "lineart_standard", "inpaint_only",
                               "canny", "invert", "threshold", "color", "shuffle", "scribble_xdog", "recolor_intensity",
                               "inpaint", "blur_gaussian")
    assert preprocessor("inpaint_global_harmonious").name == "inpaint"  # its label; "inpaint" its name
    assert preprocessor("t2ia_color_grid").name == "color"
    assert preprocessor("Invert (From White BG & Black Line)").name == "invert"
    assert preprocessor("CANNY").name == "canny"
    with pytest.raises(InputError, match="module 'depth' is unknown"):
        preprocessor("depth")
    canny, blur, invert = PREPROCESSORS["canny"], PREPROCESSORS["blur_gaussian"], PREPROCESSORS["invert"]
    names = ("threshold_a", "threshold_b")
    assert canny.slider_values(-1, -1, names) == (100, 200) and blur.slider_values(-1, 7, names) == (512, -1)
    assert invert.slider_values(300, 4096, names) == (-1, -1)  # ignored, as the extension ignores them
    assert PREPROCESSORS["tile_resample"].slider_values(2.5, -1, names) == (2.5, -1)
    for pre, a, b, words in [(canny, 10.5, 20, "threshold_a must be an integer"),
                             (canny, 50, 40, "canny thresholds must satisfy 0 <= threshold_a < threshold_b"),
                             (blur, float("nan"), -1, "threshold_a must be a number"),
                             (PREPROCESSORS["scribble_xdog"], 0, -1, "threshold_a must be 1 to 64 (or -1: 32)"),
                             (PREPROCESSORS["recolor_luminance"], 3, -1, "must be 0.1 to 2 (or -1: 1)")]:
        with pytest.raises(InputError, match=words.replace("(", "\\(").replace(")", "\\)")):
            pre.slider_values(a, b, names)
    assert [p.name for p in PREPROCESSORS.values() if p.soft_in_hires] == ["canny"]
    assert soft(ControlNetUnit(image=b"", module="canny", second_pass=True))
    assert not soft(ControlNetUnit(image=b"", module="scribble_xdog", second_pass=True))


def test_modules_at_their_own_size():
    """tile_resample keeps the image below 1.1, shrinks by area otherwise (int(side / rate)), and refuses a rate that
    leaves nothing; lineart_standard of a flat image is black (the extension's max(16, median of nothing) is 16);
    threshold compares the darkest channel."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (50, 37, 3), dtype=np.uint8))
    tile = PREPROCESSORS["tile_resample"]
    assert np.array_equal(np.asarray(map_of(photo, "tile_resample", 512, 1.05, -1, 1 << 20)), np.asarray(photo))
    assert map_of(photo, "tile_resample", 512, 3.0, -1, 1 << 20).size == (12, 16)
    with pytest.raises(InputError, match="tile_resample's down sampling rate 8 leaves nothing of the 5x50 image"):
        tile.apply(np.zeros((50, 5, 3), np.uint8), 8.0, -1)
    with pytest.raises(InputError, match="t2ia_color_grid makes one cell per 64 pixels: the 100x40 image has none"):
        PREPROCESSORS["color"].apply(np.zeros((40, 100, 3), np.uint8), -1, -1)
    flat = Image.new("RGB", (70, 70), (90, 120, 200))
    with np.errstate(all="raise"):
        assert not np.asarray(map_of(flat, "lineart_standard", 64, -1, -1, 1 << 20)).any()
    pixels = np.array([[[200, 130, 140], [128, 128, 128]]], np.uint8)
    assert PREPROCESSORS["threshold"].apply(pixels, 127, -1)[0, :, 0].tolist() == [255, 255]
    assert PREPROCESSORS["threshold"].apply(pixels, 130, -1)[0, :, 0].tolist() == [0, 0]


def test_kiln_generate_passes_each_units_sliders():
    """--control-threshold-a/b: once for all units or once per unit; absent, -1 (the module's defaults)."""
    from kiln.cli import build_parser
    from kiln.cli.generate import _units

    files = {"a.png": b"A", "b.png": b"B"}
    args = build_parser().parse_args(["generate", "x", "--control-image", "a.png", "--control-image", "b.png",
                                      "--control-module", "canny", "--control-module", "blur_gaussian",
                                      "--control-threshold-a", "50", "--control-threshold-a", "9.5"])
    units = _units(args, files)
    assert [(u["module"], u["threshold_a"], u["threshold_b"]) for u in units] == [("canny", 50, -1),
                                                                                  ("blur_gaussian", 9.5, -1)]
    assert [ControlNetUnit(**u).threshold_a for u in units] == [50, 9.5]
