"""AUTOMATIC1111's img2img colour correction (kiln.color_correction, kiln.cvlab) against what OpenCV 4.10,
scikit-image 0.21 and blendmodes 2022 make, the libraries AUTOMATIC1111 pins (tests/golden/cv/color_correction.npz,
made by scripts/make_color_golden.py: none of them is installed here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.color_correction import color_target, correct, luminosity_blend, match_histograms
from kiln.cvlab import lab_to_rgb, rgb_to_lab

GOLDEN = np.load(Path(__file__).resolve().parent / "golden" / "cv" / "color_correction.npz")


def test_opencvs_8_bit_lab_both_ways_exactly():
    colours = GOLDEN["lab_in"]
    np.testing.assert_array_equal(rgb_to_lab(colours), GOLDEN["rgb_to_lab"])
    np.testing.assert_array_equal(lab_to_rgb(colours), GOLDEN["lab_to_rgb"])  # most of them outside sRGB
    grey = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    assert (np.abs(rgb_to_lab(grey)[:, 1:].astype(int) - 128) <= 1).all()  # neutral: a and b at 128
    assert np.abs(lab_to_rgb(rgb_to_lab(grey)).astype(int) - grey).max() <= 1


def test_the_correction_is_automatic1111s_pixel_for_pixel():
    cases = sorted({key.split("_")[0] for key in GOLDEN.files if key.endswith("_corrected")})
    assert len(cases) == 5
    for case in cases:
        generated, expected = GOLDEN[f"{case}_generated"], GOLDEN[f"{case}_corrected"]
        corrected = correct(generated, color_target(GOLDEN[f"{case}_target"]))
        np.testing.assert_array_equal(corrected, expected, err_msg=f"case {case}")
        assert np.abs(expected.astype(int) - generated).mean() > 5  # each case corrects something


def test_its_parts_keep_what_needs_no_correction():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (24, 32, 3), np.uint8)
    np.testing.assert_array_equal(match_histograms(image, image), image)
    flat = np.full((8, 8, 3), (200, 30, 90), np.uint8)
    assert (match_histograms(image, flat) == flat[0, 0]).all()  # one colour to match: every value becomes it
    blended = luminosity_blend(image, image)  # its own luminosity: the image, to a truncation
    assert np.abs(blended.astype(int) - image).max() <= 1


def test_img2img_and_inpainting_correct_towards_the_start_before_the_overlay(local, init_image_png):
    """img2img's images are matched to the init image as its start encodes it (inpainting: after its fill painted
    the masked area), or to a color_target given (the Loopback script's); then the overlay pastes the init image
    back outside the mask, untouched."""
    from dataclasses import replace

    from PIL import Image

    from kiln.errors import InputError
    from kiln.imaging import resized_rgb
    from kiln.masks import fill_masked, soft_mask
    from orchestrator.pipeline import Img2ImgRequest
    from tests.conftest import encode

    base = Img2ImgRequest(prompt="a cat", steps=3, seed=5, width=64, height=64, init_image=init_image_png,
                          denoising_strength=0.7, batch_size=2)
    plain = local.img2img(base).images
    corrected = local.img2img(replace(base, color_correction=True)).images
    target = color_target(np.asarray(resized_rgb(init_image_png, 64, 64)))
    assert np.array_equal(corrected, np.stack([correct(image, target) for image in plain]))
    assert np.abs(corrected.astype(int) - plain).mean() > 1
    other = encode(Image.new("RGB", (32, 32), (200, 40, 90)))
    towards = local.img2img(replace(base, color_correction=True, color_target=other)).images
    assert np.array_equal(towards, np.stack([correct(image, color_target(np.asarray(resized_rgb(other, 32, 32))))
                                             for image in plain]))
    with pytest.raises(InputError, match="color_target is what color_correction matches"):
        local.img2img(replace(base, color_target=other))

    box = Image.new("L", (64, 64), 0)
    box.paste(255, (16, 16, 48, 48))
    inpainting = replace(base, mask=encode(box), mask_blur=0, inpainting_fill=0, batch_size=1)
    raw = local.img2img(inpainting).images
    filled = fill_masked(resized_rgb(init_image_png, 64, 64), soft_mask(encode(box), 64, 64, 0, False, 0, True))
    fixed = local.img2img(replace(inpainting, color_correction=True)).images
    assert np.array_equal(fixed, correct(raw[0], color_target(np.asarray(filled)))[None])
    overlaid = local.img2img(replace(inpainting, color_correction=True, overlay=True)).images[0]
    init = np.asarray(resized_rgb(init_image_png, 64, 64))
    assert np.array_equal(overlaid[:8], init[:8]) and np.array_equal(overlaid[20:44, 20:44], fixed[0, 20:44, 20:44])


def test_the_benchmark_runs(tmp_path):
    """benchmarks/color_correction.py at a small side: every arm timed, the table written."""
    from benchmarks.color_correction import ARMS
    from benchmarks.color_correction import main as bench_main

    rows = bench_main(["--sides", "32", "--repeats", "1", "--out", str(tmp_path)])["rows"]
    assert [row["arm"] for row in rows] == list(ARMS) and all(row["ms"] > 0 for row in rows)
    assert (tmp_path / "color_correction.json").exists()
