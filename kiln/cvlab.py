"""OpenCV's 8-bit sRGB <-> CIE Lab conversions in numpy (cv2.cvtColor(image, cv2.COLOR_RGB2LAB) and COLOR_LAB2RGB on
uint8 images), following its fixed-point arithmetic and lookup tables (color_lab.cpp: RGB2Lab_b, Lab2RGBinteger and
initLabTabs), so that the pixels are its pixels: AUTOMATIC1111's img2img colour correction runs through both
(kiln.color_correction). Lab is OpenCV's 8-bit encoding: L x 255 / 100, a + 128, b + 128.

Exact for all 2^24 inputs each way against opencv-python-headless 4.10 (tests/golden/cv/color_correction.npz keeps
a sample of them; scripts/make_color_golden.py makes it).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from kiln.cvfilter import lab_tables

_SRGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]], np.float32).astype(np.float64)
_XYZ_TO_SRGB = np.array([[3.240479, -1.53715, -0.498535], [-0.969256, 1.875991, 0.041556],
                         [0.055648, -0.204043, 1.057311]], np.float32).astype(np.float64)
_D65 = np.array([0.950456, 1.0, 1.088754], np.float32).astype(np.float64)
_BASE = 1 << 14  # Lab2RGBinteger's fixed point
_MIN_AB = -8145  # its abToXZ_b table starts here


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB) for uint8 (..., 3): the gamma table, the XYZ rows (divided by the white
    point) in 12-bit fixed point, the cube-root table, then L, a and b in 15-bit fixed point rounded half up."""
    gamma, cube_root = lab_tables()
    coefficients = np.rint(4096 * _SRGB_TO_XYZ / _D65[:, None]).astype(np.int64)
    linear = [gamma[rgb[..., channel]] for channel in range(3)]
    fx, fy, fz = (cube_root[(linear[0] * row[0] + linear[1] * row[1] + linear[2] * row[2] + (1 << 11)) >> 12]
                  for row in coefficients)
    scale, offset, half, centre = (116 * 255 + 50) // 100, -((16 * 255 * (1 << 15) + 50) // 100), 1 << 14, 128 << 15
    lab = ((scale * fy + offset + half) >> 15, (500 * (fx - fy) + centre + half) >> 15,
           (200 * (fy - fz) + centre + half) >> 15)
    return np.clip(np.stack(lab, axis=-1), 0, 255).astype(np.uint8)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) for uint8 (..., 3): L's y and f(y) from a table, a / 500 and b / 200 in
    fixed point, f^-1 from a table, the sRGB rows (times the white point) in 12-bit fixed point, then the inverse
    gamma table."""
    y_table, fy_table, xz_table, inverse_gamma = _inverse_tables()
    light, a, b = (lab[..., channel].astype(np.int64) for channel in range(3))
    y, fy = y_table[light], fy_table[light]
    a_part = ((5 * a * 53687 + (1 << 7)) >> 13) - 128 * _BASE // 500
    b_part = ((b * 41943 + (1 << 4)) >> 9) - 128 * _BASE // 200 + 1
    x, z = xz_table[fy + a_part - _MIN_AB], xz_table[fy - b_part - _MIN_AB]
    coefficients = np.rint(4096 * _XYZ_TO_SRGB * _D65[None, :]).astype(np.int64)
    shift = 14  # lab_shift + base_shift - inv_gamma_shift
    channels = [np.clip((row[0] * x + row[1] * y + row[2] * z + (1 << (shift - 1))) >> shift, 0, 4095)
                for row in coefficients]
    return np.stack([inverse_gamma[c] for c in channels], axis=-1).astype(np.uint8)


@lru_cache(maxsize=1)
def _inverse_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's LabToYF_b (as its y and f(y) halves), abToXZ_b and sRGBInvGammaTab_b, computed as initLabTabs computes
    them: float32 steps (its softfloat) rounded half to even, C's truncating integer division (made once; read only)."""
    f32 = np.float32
    light = np.arange(256)
    with np.errstate(over="ignore"):
        low_y = np.rint((light * _BASE * 20 * 9).astype(f32) / f32(17 * 29 * 29 * 29))
        low_fy = np.rint(f32(_BASE) * (f32(16) / f32(116) + (light * 5).astype(f32) / f32(3 * 17 * 29)))
        fy = (light * 100 * _BASE).astype(f32) / f32(255 * 116) + f32(16 * _BASE) / f32(116)
        high_y = np.rint(fy * fy * fy / f32(_BASE * _BASE))
    y = np.where(light <= 20, low_y, high_y).astype(np.int64)
    fy_table = np.where(light <= 20, low_fy, np.rint(fy)).astype(np.int64)
    index = np.arange(_MIN_AB, _BASE * 9 // 4 + _MIN_AB, dtype=np.int64)
    scaled = index * 108
    linear = np.sign(scaled) * (np.abs(scaled) // 841) - _BASE * 16 // 116 * 108 // 841  # C's division: toward 0
    cubed = index * index // _BASE * index // _BASE
    xz = np.where(index <= 3390, linear, cubed)
    x = np.arange(4096, dtype=f32) * (f32(1) / f32(4096))
    wide = x.astype(np.float64)
    threshold, low_scale, power, offset = 7827 / 2500000, 323 / 25, 12 / 5, 11 / 200
    inverse = np.where(wide <= threshold, wide * low_scale,
                       np.power(wide, 1.0 / power) * (1.0 + offset) - offset).astype(f32)
    return y, fy_table, xz, np.rint(f32(255) * inverse).astype(np.int64)
