"""An API ControlNet unit's image as sd-webui-controlnet makes it: the preprocessor's map at the processor
resolution (processor_res, or pixel perfect's), then fitted by the resize mode (kiln.controlmaps; tests/test_cvimage.py
compares both steps with the extension's on OpenCV).

No server: `control_units.controlnet_units` is what the txt2img/img2img routes call on alwayson_scripts.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln.canny import _hysteresis, canny
from kiln.control import control_image, resize_control
from kiln.controlmaps import fit_map
from kiln.cvimage import otsu_threshold
from kiln.detect import detect_map, pixel_perfect_resolution
from kiln.errors import InputError
from kiln.paths import SAMPLE_IMAGES
from orchestrator.pipeline.info import unit_text
from orchestrator.pipeline.requests import ControlNetUnit
from orchestrator.server.control_units import controlnet_units
from tests.conftest import encode

MAX_PIXELS = 4096 * 4096


def _photo(size: tuple[int, int]) -> bytes:
    return encode(Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize(size, Image.Resampling.LANCZOS))


def _unit_image(data: bytes, width: int = 64, height: int = 64, **unit) -> np.ndarray:
    """The unit's control image as the pipeline's first pass feeds it (uint8)."""
    args = [{"image": base64.b64encode(data).decode(), "module": "canny"} | unit]
    (made,) = controlnet_units({"controlnet": {"args": args}}, MAX_PIXELS, width, height)
    assert made.resize_mode is not None and made.preprocessor == "none" and made.module == "canny"
    pixels = control_image(made.image, width, height, made.preprocessor, fit=made.resize_mode)
    return np.round(pixels.transpose(1, 2, 0) * 255).astype(np.uint8)


def test_resize_and_fill_detects_before_it_fills():
    """A wide image into a square by Resize and Fill: the map is made of the image and then centred on the map's edge
    colour (black), so the bands are empty and the image's border is no line of edges. Fitting first (kiln's order
    before) gave canny the boundary between the photo and its fill: a line of edges along it."""
    halves = np.full((48, 128, 3), 230, np.uint8)
    halves[24:] = 30  # light above, dark below: the edges' median colour (130) is neither
    wide = encode(Image.fromarray(halves))
    fill = _unit_image(wide, resize_mode="Resize and Fill", pixel_perfect=True)
    assert fill.shape == (64, 64, 3) and fill[20:44].any()  # the map is in the middle band
    assert not fill[:20].any() and not fill[44:].any()  # 48 x 64/128 = 24 rows, centred: 20..44
    assert (fill[20, :, 0] == 255).mean() < 0.5 and (fill[43, :, 0] == 255).mean() < 0.5
    fitted_first = np.asarray(canny(Image.fromarray(fit_map(halves, 64, 64, 2)), 100, 200))
    assert max((fitted_first[row, :, 0] == 255).mean() for row in (19, 20, 43, 44)) > 0.8  # the line it had


@pytest.mark.parametrize(("mode", "name"), [(0, "Just Resize"), (1, "Crop and Resize"), (2, "Resize and Fill")])
def test_the_map_is_made_at_the_processor_resolution_then_fitted(mode, name):
    """processor_res (-1 its default, 512) or pixel perfect's: the unit's image is that map fitted by the mode."""
    tall = _photo((40, 90))
    for unit, resolution in (({"processor_res": 96}, 96), ({"processor_res": -1}, 512), ({}, 512),
                             ({"pixel_perfect": True, "processor_res": 96}, pixel_perfect_resolution(40, 90, 64, 64,
                                                                                                  mode))):
        made = detect_map(tall, "canny", resolution, 100, 200, MAX_PIXELS)
        expected = fit_map(np.asarray(made), 64, 64, mode)
        assert np.array_equal(_unit_image(tall, resize_mode=name, **unit), expected), (name, unit)
    at_96, at_512 = _unit_image(tall, resize_mode=name, processor_res=96), _unit_image(tall, resize_mode=name)
    assert not np.array_equal(at_96, at_512)


def test_pixel_perfect_resolution_is_the_extensions():
    """sd-webui-controlnet's pixel_perfect_resolution written out: the short side times the larger ratio (the smaller
    for its outer fit, Resize and Fill), np.round."""
    def theirs(raw_h, raw_w, target_h, target_w, outer):
        k0, k1 = target_h / raw_h, target_w / raw_w
        return int(np.round((min(k0, k1) if outer else max(k0, k1)) * min(raw_h, raw_w)))

    rng = np.random.default_rng(0)
    for _ in range(200):
        raw_w, raw_h, width, height = (int(v) for v in rng.integers(16, 2048, 4))
        for mode in (0, 1, 2):
            assert pixel_perfect_resolution(raw_w, raw_h, width, height, mode) == max(1, theirs(raw_h, raw_w, height,
                                                                                                 width, mode == 2))
    assert pixel_perfect_resolution(4000, 10, 64, 64, 2) == 1  # theirs: 0, a map of no pixels (kiln: at least 1)
    assert pixel_perfect_resolution(1024, 768, 512, 512, 1) == 512 and pixel_perfect_resolution(1024, 768, 512, 512,
                                                                                                2) == 384


def test_kiln_units_resize_as_diffusers_and_keep_binary_maps_binary():
    """kiln's own units (kiln generate, the library): an edge map scaled up or down keeps two values (Otsu's threshold
    of the channels' mean); a photo is plain Lanczos, as diffusers resizes it."""
    rng = np.random.default_rng(1)
    edges = np.where(rng.random((50, 70)) > 0.9, 255, 0).astype(np.uint8)
    for size in ((160, 90), (33, 21)):
        resized = np.asarray(resize_control(Image.fromarray(np.repeat(edges[..., None], 3, axis=2)), size))
        assert resized.shape == (size[1], size[0], 3) and set(np.unique(resized)) <= {0, 255}
        lanczos = np.asarray(Image.fromarray(edges).resize(size, Image.Resampling.LANCZOS)).astype(np.uint8)
        assert np.array_equal(resized[..., 0], np.where(lanczos > otsu_threshold(lanczos), 255, 0))
    photo = Image.open(io.BytesIO(_photo((50, 70))))
    assert np.array_equal(np.asarray(resize_control(photo, (33, 21))),
                          np.asarray(photo.resize((33, 21), Image.Resampling.LANCZOS)))


@pytest.mark.parametrize(("unit", "words"), [
    ({"processor_res": 4096}, "processor_res must be 64 to 2048 (or -1: 512), got 4096"),
    ({"processor_res": 32}, "processor_res must be 64 to 2048"),
    ({"threshold_a": 200, "threshold_b": 100}, "canny thresholds must satisfy 0 <= threshold_a < threshold_b <= 255"),
    ({"threshold_b": 300}, "threshold_b must be 0 to 255 (or -1: 200), canny's High Threshold; got 300"),
    ({"threshold_b": 150.5}, "threshold_b must be an integer (canny's High Threshold), got 150.5"),
    ({"module": "depth"}, "module 'depth' is unknown; valid: none, tile_resample, recolor_luminance, lineart_standard, "
                          "inpaint_only, canny, invert, threshold, color, shuffle, scribble_xdog, recolor_intensity, "
                          "inpaint, blur_gaussian"),
    ({"module": "blur_gaussian", "threshold_a": 0}, "threshold_a must be 0.01 to 2048 (or -1: 512), blur_gaussian's "
                                                    "Sigma; got 0"),
    ({"module": "tile_resample", "threshold_a": 9}, "threshold_a must be 1 to 8 (or -1: 1)"),
])
def test_bad_unit_settings_are_refused_by_name(unit, words):
    with pytest.raises(InputError, match="alwayson_scripts.controlnet.args\\[0\\]") as info:
        _unit_image(_photo((64, 64)), **unit)
    assert words in str(info.value)


def test_an_image_given_as_a_dict_takes_its_image_and_refuses_a_mask():
    """The extension's {"image", "mask"} pair: the image is the unit's image; a mask outside the inpaint modules, or
    another key, is refused by name, never dropped."""
    photo = base64.b64encode(_photo((64, 64))).decode()
    plain = controlnet_units({"controlnet": {"args": [{"module": "canny", "image": photo}]}}, MAX_PIXELS, 64, 64)
    paired = controlnet_units({"controlnet": {"args": [{"module": "canny", "image": {"image": photo, "mask": None}}]}},
                              MAX_PIXELS, 64, 64)
    assert paired[0].image == plain[0].image
    for image, words in (({"image": photo, "mask": photo}, "mask: only the inpaint modules"),
                         ({"image": photo, "alpha": photo}, "image: alpha is not supported")):
        with pytest.raises(InputError, match="alwayson_scripts.controlnet.args\\[0\\]") as info:
            controlnet_units({"controlnet": {"args": [{"module": "canny", "image": image}]}}, MAX_PIXELS, 64, 64)
        assert words in str(info.value)


GOLDEN = Path(__file__).resolve().parent / "golden" / "canny"


@pytest.mark.parametrize("case", json.loads((GOLDEN / "cases.json").read_text())["cases"],
                         ids=lambda case: case["edges"])
def test_canny_is_opencvs(case):
    """kiln's canny gives OpenCV's pixels: maps cv2.Canny made of the sample photographs (scripts/
    make_canny_golden.py, opencv-python-headless 5.1, not a dependency), at the extension's default thresholds, low
    ones, fractional and swapped ones."""
    photo = Image.open(SAMPLE_IMAGES / case["image"])
    edges = np.asarray(canny(photo, case["low"], case["high"]))
    theirs = np.asarray(Image.open(GOLDEN / case["edges"]))
    assert edges.shape == (*theirs.shape, 3) and (edges == edges[..., :1]).all()
    assert theirs.any() and np.array_equal(edges[..., 0], theirs), f"{(edges[..., 0] != theirs).sum()} pixels differ"


def test_each_pass_fits_the_units_map_to_its_own_size():
    """As the extension's hires option "Both": the second pass's control image is the unit's map fitted to that
    pass's size by the unit's resize mode, not the first pass's image enlarged; the response's detected map is the
    first pass's."""
    from orchestrator.pipeline.control import control_images
    from orchestrator.pipeline.requests import Txt2ImgRequest
    from orchestrator.server.control_units import detect_map as detected_map

    args = [{"image": base64.b64encode(_photo((40, 90))).decode(), "module": "canny", "processor_res": 96,
             "resize_mode": "Resize and Fill"}]
    (unit,) = controlnet_units({"controlnet": {"args": args}}, MAX_PIXELS, 64, 64)
    request = Txt2ImgRequest(prompt="a cat", width=64, height=64, controlnet=unit)
    made = np.asarray(Image.open(io.BytesIO(unit.image)).convert("RGB"))
    assert made.shape == (216, 96, 3)  # the map at the processor resolution, as the extension keeps it

    def uint8(pixels: np.ndarray) -> np.ndarray:
        return np.round(pixels[0].transpose(1, 2, 0) * 255).astype(np.uint8)

    first, second = (uint8(control_images(request, side, side, 2, 0)[0]) for side in (64, 160))
    assert np.array_equal(first, fit_map(made, 64, 64, 2)) and np.array_equal(second, fit_map(made, 160, 160, 2))
    assert not np.array_equal(second, fit_map(first, 160, 160, 2))
    assert np.array_equal(detected_map(unit, request), first)


def _flood(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Hysteresis as a flood fill from the strong pixels: the definition the vectorized one must equal."""
    edges, todo = strong.copy(), list(zip(*np.nonzero(strong)))
    while todo:
        row, column = todo.pop()
        for r in range(max(row - 1, 0), min(row + 2, edges.shape[0])):
            for c in range(max(column - 1, 0), min(column + 2, edges.shape[1])):
                if candidates[r, c] and not edges[r, c]:
                    edges[r, c] = True
                    todo.append((r, c))
    return np.where(edges, 255, 0).astype(np.uint8)


def test_hysteresis_is_the_flood_fill():
    rng = np.random.default_rng(3)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        candidates = rng.random((height, width)) < rng.uniform(0.05, 0.95)
        strong = candidates & (rng.random((height, width)) < rng.uniform(0, 0.3))
        assert np.array_equal(_hysteresis(candidates, strong), _flood(candidates, strong))
    spiral = np.zeros((64, 64), bool)  # one long path: the labels must meet from end to end
    for ring in range(0, 32, 2):
        spiral[ring, ring:64 - ring] = spiral[ring:64 - ring, 63 - ring] = spiral[63 - ring, ring:64 - ring] = True
        spiral[ring + 2:64 - ring, ring] = True
        spiral[ring + 2, ring:ring + 3] = True
    strong = np.zeros_like(spiral)
    strong[32, 32] = spiral[32, 32]
    strong[0, 0] = True
    assert np.array_equal(_hysteresis(spiral, strong), _flood(spiral, strong))


def test_invert_units_take_the_negative_at_the_images_size_and_ignore_the_canny_fields():
    """sd-webui-controlnet's invert (from white bg & black line): 255 minus the image, no processor resolution (a
    processor_res outside canny's range, thresholds of -1 or 300: ignored, as there), then fitted like any map."""
    drawing = np.full((90, 40, 3), 255, np.uint8)
    drawing[20:22, 5:35] = 0  # a black line on white
    args = [{"image": base64.b64encode(encode(Image.fromarray(drawing))).decode(), "module": "invert",
             "processor_res": 4096, "threshold_a": -1, "threshold_b": 300, "resize_mode": "Just Resize"}]
    (unit,) = controlnet_units({"controlnet": {"args": args}}, MAX_PIXELS, 64, 64)
    assert unit.module == "invert" and unit.preprocessor == "none"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(unit.image)).convert("RGB")), 255 - drawing)
    fed = control_image(unit.image, 64, 64, unit.preprocessor, fit=unit.resize_mode)
    assert np.array_equal(np.round(fed.transpose(1, 2, 0) * 255).astype(np.uint8), fit_map(255 - drawing, 64, 64, 0))
    own = control_image(encode(Image.fromarray(drawing)), 40, 90, "invert")  # kiln's own units: resized, inverted
    assert np.array_equal(np.round(own.transpose(1, 2, 0) * 255).astype(np.uint8), 255 - drawing)


def test_canny_thresholds_of_minus_one_are_the_defaults():
    """The extension's bound check: a threshold of -1 is its slider's default (100 low, 200 high)."""
    photo = _photo((64, 64))
    assert np.array_equal(_unit_image(photo, threshold_a=-1, threshold_b=-1), _unit_image(photo))
    args = [{"image": base64.b64encode(photo).decode(), "module": "canny", "threshold_a": -1, "threshold_b": -1}]
    (unit,) = controlnet_units({"controlnet": {"args": args}}, MAX_PIXELS, 64, 64)
    assert (unit.threshold_a, unit.threshold_b) == (100, 200)


def test_the_infotext_writes_each_unit_as_the_extension_does():
    """sd-webui-controlnet's serialize_unit: its fields in its order, those at -1 left out (a module's missing
    sliders, a resolution it does not use); kiln's own units have no resize mode or resolution."""
    photo = base64.b64encode(_photo((64, 64))).decode()
    args = [{"image": photo, "module": "canny", "threshold_a": 50, "resize_mode": "Just Resize", "processor_res": 96},
            {"image": photo, "module": "invert", "pixel_perfect": True, "weight": 0.5, "control_mode": 2},
            {"image": photo, "module": "blur_gaussian", "pixel_perfect": True, "threshold_a": 3.5}]
    canny_unit, invert_unit, blur_unit = controlnet_units({"controlnet": {"args": args}}, MAX_PIXELS, 64, 64)
    assert unit_text(canny_unit, "m [1a2b]") == (
        '"Module: canny, Model: m [1a2b], Weight: 1.0, Resize Mode: Just Resize, Processor Res: 96, Threshold A: 50, '
        'Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"')
    assert unit_text(invert_unit, "m") == (
        '"Module: invert, Model: m, Weight: 0.5, Resize Mode: Crop and Resize, Guidance Start: 0.0, Guidance End: 1.0, '
        'Pixel Perfect: False, Control Mode: ControlNet is more important"')
    assert "Processor Res: 64, Threshold A: 3.5, Guidance Start" in unit_text(blur_unit, "m")  # pixel perfect's
    assert "Pixel Perfect: True" in unit_text(blur_unit, "m")
    assert unit_text(ControlNetUnit(image=b"", module="canny"), "m") == (
        '"Module: canny, Model: m, Weight: 1.0, Guidance Start: 0.0, Guidance End: 1.0, Control Mode: Balanced"')


def test_shuffle_is_drawn_from_the_jobs_seed():
    """shuffle draws its noise: an API unit's map comes from numpy seeded as the extension seeds it (the job's seed
    plus the variation seed, or itself again), so a seed gives the same map and another seed another; it runs at its
    fixed resolution (512, which the extension hides: processor_res is not used; pixel perfect's overrides it, as
    there) and /controlnet/detect draws afresh each call."""
    from kiln.detect import map_of
    from kiln.preprocessors import numpy_seed, preprocessor

    assert numpy_seed(5) == 10 and numpy_seed(5, 7) == 12 and numpy_seed(2**32 - 1) == 2**32 - 2
    photo = _photo((300, 200))
    args = [{"image": base64.b64encode(photo).decode(), "module": "shuffle", "processor_res": 128}]
    maps = [controlnet_units({"controlnet": {"args": args}}, MAX_PIXELS, 64, 64, seed)[0] for seed in (5, 5, 6)]
    first, again, other = (np.asarray(Image.open(io.BytesIO(unit.image))) for unit in maps)
    assert first.shape == (512, 768, 3) and maps[0].processor_res == 512  # its own 512, whatever processor_res says
    perfect = [args[0] | {"pixel_perfect": True, "resize_mode": "Just Resize"}]
    (unit,) = controlnet_units({"controlnet": {"args": perfect}}, MAX_PIXELS, 96, 64, 5)
    assert unit.processor_res == 64 and Image.open(io.BytesIO(unit.image)).size == (96, 64)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    image = Image.open(io.BytesIO(photo))
    assert np.array_equal(np.asarray(map_of(image, "shuffle", 512, -1, -1, MAX_PIXELS, seed=5)), first)
    assert sorted(np.unique(first.reshape(-1, 3), axis=0).tolist()) != sorted(
        np.unique(np.asarray(image.resize((768, 512))).reshape(-1, 3), axis=0).tolist())  # moved and mixed
    drawn = [np.asarray(detect_map(photo, "shuffle", 512, -1, -1, MAX_PIXELS)) for _ in range(2)]
    assert not np.array_equal(*drawn)
    assert preprocessor("shuffle").detail() == {"model_free": False, "sliders": []}  # nothing to set, as there
    own = control_image(photo, 64, 64, "shuffle", seed=5)  # kiln's own units: at the pass's size, seeded alike
    assert np.array_equal(own, control_image(photo, 64, 64, "shuffle", seed=5))
    assert not np.array_equal(own, control_image(photo, 64, 64, "shuffle", seed=7))
