"""OpenCV's Gaussian blur and its 8-bit Lab lightness, in numpy, as sd-webui-controlnet's model-free preprocessors
call them (cv2.GaussianBlur(image, (0, 0), sigma), cv2.cvtColor(image, cv2.COLOR_BGR2LAB)), following OpenCV's own
arithmetic so that the maps are its pixels (kiln.cvimage has its resizes and morphology):

- the kernel: OpenCV's bit-exact Gaussian (getGaussianKernelBitExact: exp(-x^2 / 2 sigma^2) in double, normalized
  by the reciprocal of the sum), 6 sigma + 1 taps wide for 8-bit images and 8 sigma + 1 for float ones (odd);
- 8-bit images: its bit-exact fixed point (GaussianBlurFixedPoint): the kernel as 8-bit fractions, rounded with
  error diffusion from the outer taps in and the centre taking the remainder, rows then columns summed exactly, the
  result rounded half up;
- float images: the float kernel, rows then columns (in double here; OpenCV sums in float, so the last bits may
  differ);
- the border reflected without repeating the edge (BORDER_REFLECT_101), repeatedly where the kernel is wider than
  the image;
- the lightness: OpenCV's 8-bit sRGB Lab tables (gamma, and its softfloat cube root, which truncates) and fixed
  point, exact for all 2^24 colours against OpenCV 5.1.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

_DIRECT_TAPS = 64  # wider kernels are applied as one matrix per axis (every tap folded onto its reflected pixel)


def gaussian_kernel(taps: int, sigma: float) -> np.ndarray:
    """OpenCV's getGaussianKernelBitExact (float64, `taps` odd): the outer values first, in its order of operations."""
    scale = -0.125 / (sigma * sigma)
    half = (taps - 1) // 2
    values = [math.exp(float((1 - taps + 2 * i) ** 2) * scale) for i in range(half)]
    total = 0.0
    for value in values:
        total += value
    multiplier = 1.0 / (total * 2.0 + 1.0)
    kernel = np.empty(taps)
    for i, value in enumerate(values):
        kernel[i] = kernel[taps - 1 - i] = value * multiplier
    kernel[half] = multiplier
    return kernel


def fixed_point_kernel(kernel: np.ndarray, bits: int = 8) -> np.ndarray:
    """OpenCV's getGaussianKernelFixedPoint_ED: each outer value x 2^bits plus the error carried so far, rounded half
    to even; the centre is what makes the sum exactly 2^bits."""
    taps, unit = len(kernel), 1 << bits
    fixed, error, total = np.empty(taps, np.int64), 0.0, 0
    for i in range(taps // 2):
        adjusted = kernel[i] * float(unit) + error
        value = int(np.rint(adjusted))
        error = adjusted - value
        fixed[i] = fixed[taps - 1 - i] = value
        total += value
    fixed[taps // 2] = unit - 2 * total
    return fixed


def kernel_taps(sigma: float, eight_bit: bool) -> int:
    """OpenCV's automatic kernel size: cvRound(sigma x (3 for 8-bit, 4 otherwise) x 2 + 1), made odd."""
    return int(np.rint(sigma * (3 if eight_bit else 4) * 2 + 1)) | 1


def _reflected(index: np.ndarray, length: int) -> np.ndarray:
    """OpenCV's borderInterpolate for BORDER_REFLECT_101, applied until the index is inside (any distance)."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = np.mod(index, period)
    return np.where(index >= length, period - index, index)


def _filter_axis(values: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """The kernel's weighted sum along `axis` (float64), the border reflected 101."""
    length, taps = values.shape[axis], len(kernel)
    if length == 1:  # OpenCV drops the kernel along a side of one pixel
        return values * float(kernel.sum())
    moved = np.moveaxis(values, axis, 0)
    half = taps // 2
    if taps <= _DIRECT_TAPS:
        rows = _reflected(np.arange(-half, length + half), length)
        padded = moved[rows]
        result = np.zeros(moved.shape)
        for tap in range(taps):
            result += kernel[tap] * padded[tap:tap + length]
    else:  # fold the taps onto the pixels they land on: one length x length matrix, a row at a time
        offsets = np.arange(taps) - half
        weights = np.stack([np.bincount(_reflected(offsets + row, length), kernel, minlength=length)
                            for row in range(length)])
        result = np.tensordot(weights, moved, axes=([1], [0]))
    return np.moveaxis(result, 0, axis)


def gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur(pixels, (0, 0), sigma) for uint8 (bit-exact: OpenCV's fixed point) or float32 images (H, W)
    or (H, W, C)."""
    eight_bit = pixels.dtype == np.uint8
    taps = kernel_taps(sigma, eight_bit)
    if taps == 1:
        return pixels.copy()
    kernel = gaussian_kernel(taps, sigma)
    if eight_bit:  # exact: every sum is an integer below 2^53
        fixed = fixed_point_kernel(kernel).astype(np.float64)
        summed = _filter_axis(_filter_axis(pixels.astype(np.float64), fixed, 1), fixed, 0)
        return np.clip((summed.astype(np.int64) + (1 << 15)) >> 16, 0, 255).astype(np.uint8)
    kernel32 = kernel.astype(np.float32).astype(np.float64)
    rows = _filter_axis(pixels.astype(np.float64), kernel32, 1).astype(np.float32).astype(np.float64)
    return _filter_axis(rows, kernel32, 0).astype(np.float32)


# -- 8-bit Lab lightness -------------------------------------------------------------------------------------------
_CBRT_RATIONAL = (0x4046a09e6653ba70, 0x406808f46c6116e0, 0x405dca97439cae14, 0x402add70d2827500, 0x3fc4f15f83f55d2d,
                  0x402d9e20660edb21, 0x4062ff15c0285815, 0x406510d06a8112ce, 0x4040fecbc9e2c375)  # its raw doubles


def softfloat_cbrt(x: np.ndarray) -> np.ndarray:
    """OpenCV's softfloat cube root of positive float32 values (Turkowski's): the mantissa scaled into [0.125, 1),
    a quartic rational in double, its mantissa truncated (not rounded) to float32's 23 bits."""
    a = np.array(_CBRT_RATIONAL, np.uint64).view(np.float64)
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.int64)
    exponent = ((bits >> 23) & 0xFF) - 127
    shift = np.fmod(exponent, 3)
    shift = np.where(shift >= 0, shift - 3, shift)
    fraction = (1.0 + (bits & 0x7FFFFF) / float(1 << 23)) * np.exp2(shift.astype(np.float64))
    root = ((((a[0] * fraction + a[1]) * fraction + a[2]) * fraction + a[3]) * fraction + a[4]) / (
        (((a[5] * fraction + a[6]) * fraction + a[7]) * fraction + a[8]) * fraction + 1.0)
    mantissa = (root.view(np.uint64) & np.uint64((1 << 52) - 1)) >> np.uint64(29)
    value = (1.0 + mantissa.astype(np.float64) / float(1 << 23)) * np.exp2(((exponent - shift) // 3 - 1).astype(float))
    return np.where(bits & 0x7FFFFFFF, value, 0.0).astype(np.float32)


@lru_cache(maxsize=1)
def lab_tables() -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's sRGBGammaTab_b (x 255 x 8) and LabCbrtTab_b (x 2^15), from its softfloat constants (made once; only
    read)."""
    f32 = np.float32
    x = np.arange(256, dtype=np.float32) / f32(255)
    wide = x.astype(np.float64)
    threshold, low, offset, power = (float(f32(a) / f32(b)) for a, b in ((809, 20000), (323, 25), (11, 200), (12, 5)))
    linear = np.where(wide <= threshold, wide / low, np.power((wide + offset) / (1.0 + offset), power))
    gamma = np.rint(f32(255 * 8) * linear.astype(np.float32)).astype(np.int64)
    cube = (f32(1) / (f32(255) * f32(8))) * np.arange(3072).astype(np.float32)
    below = f32(216) / f32(24389)
    line = (cube.astype(np.float64) * float(f32(841) / f32(108)) + float(f32(16) / f32(116))).astype(np.float32)
    root = np.where(cube < below, line, softfloat_cbrt(cube))
    return gamma, np.rint(f32(1 << 15) * root).astype(np.int64)


def lab_lightness(bgr: np.ndarray) -> np.ndarray:
    """The L channel of cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB) for uint8 (H, W, 3): Y from the gamma table with
    OpenCV's 12-bit coefficients (rounded from sRGB's D65 row), its cube-root table, L = (296 fY - 1336934) / 2^15
    rounded half up."""
    gamma, cube_root = lab_tables()
    blue, green, red = (int(np.rint(4096 * c)) for c in (0.072169, 0.715160, 0.212671))
    linear = [gamma[bgr[..., channel]] for channel in range(3)]
    y = (linear[0] * blue + linear[1] * green + linear[2] * red + (1 << 11)) >> 12
    scale, offset = (116 * 255 + 50) // 100, -((16 * 255 * (1 << 15) + 50) // 100)
    return np.clip((scale * cube_root[y] + offset + (1 << 14)) >> 15, 0, 255).astype(np.uint8)
