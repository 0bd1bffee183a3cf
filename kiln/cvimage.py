"""The OpenCV image operations that sd-webui-controlnet runs on control images, in numpy (kiln has no OpenCV):
cv2.resize with INTER_AREA, INTER_CUBIC and INTER_NEAREST on uint8 images (and INTER_CUBIC on float64 noise),
cv2.remap with INTER_LINEAR, 3x3 erosion and dilation, the hit-or-miss transform, and Otsu's threshold. Each follows
OpenCV's own arithmetic (its coordinate maps, coefficient tables, fixed point and float rounding), checked against
OpenCV 4.14 and 5.1 (tests/test_cvimage.py, against images OpenCV made; scripts/make_cv_golden.py):

- area and nearest give OpenCV's pixels exactly;
- cubic: OpenCV's x86 builds hand INTER_CUBIC of images whose sides are all 4 or more to Intel IPP (the default, so
  what the extension's users get), which filters in floating point with the unquantized weights; kiln does the same.
  The result is OpenCV's except for values within about 1e-4 of a rounding tie (about 1 pixel in 100,000), and for
  exact 3x enlargements (0.5% of the pixels), where IPP's weights differ from the formula: there too one level at
  most. Smaller images take OpenCV's own fixed-point path, which kiln reproduces exactly."""

from __future__ import annotations

import numpy as np

F32 = np.float32
RESIZE_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: the fixed point of its uint8 filters
VECTOR_LANES = 8  # int16 lanes of OpenCV's baseline SIMD: its fixed-point cubic rounds these in float
IPP_MIN_SIDE = 4  # the smallest source side OpenCV gives to IPP's cubic resize
FLT_EPSILON = float(np.finfo(np.float32).eps)


def resize(pixels: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    """cv2.resize(pixels, (width, height), interpolation=INTER_<interpolation>) of uint8 pixels (h, w) or
    (h, w, channels); interpolation: "area", "cubic" or "nearest"."""
    if pixels.dtype != np.uint8 or width < 1 or height < 1:
        raise ValueError(f"resize: uint8 pixels to a size of at least 1x1, got {pixels.dtype} to {width}x{height}")
    if pixels.shape[:2] == (height, width):
        return pixels.copy()
    source = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)
    if interpolation == "nearest":
        out = _nearest(source, width, height)
    elif interpolation == "area":
        out = _area(source, width, height) if width <= pixels.shape[1] and height <= pixels.shape[0] \
            else _area_enlarging(source, width, height)
    elif interpolation == "cubic":
        out = _cubic_float(source, width, height) if min(source.shape[:2]) >= IPP_MIN_SIDE \
            else _cubic_fixed(source, width, height)
    else:
        raise ValueError(f"resize: interpolation {interpolation!r} is not one of area, cubic, nearest")
    return out.reshape((height, width) + pixels.shape[2:])


def _scale(source: int, target: int) -> float:
    """OpenCV's source pixels per target pixel: 1 / (target / source), in double, as it computes it."""
    return 1.0 / (target / source)


def _nearest(source: np.ndarray, width: int, height: int) -> np.ndarray:
    xs = np.minimum(np.floor(np.arange(width) * _scale(source.shape[1], width)).astype(np.int64), source.shape[1] - 1)
    ys = np.minimum(np.floor(np.arange(height) * _scale(source.shape[0], height)).astype(np.int64),
                    source.shape[0] - 1)
    return source[ys][:, xs]


def _area_table(source: int, target: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's computeResizeAreaTab: each target pixel's source pixels and their float weights, in its order
    (padded with weight 0, which adds nothing)."""
    rows = []
    for index in range(target):
        start, stop = index * scale, index * scale + scale
        cell = min(scale, source - start)
        first, last = int(np.ceil(start)), min(int(np.floor(stop)), source - 1)
        first = min(first, last)
        row = [(first - 1, (first - start) / cell)] if first - start > 1e-3 else []
        row += [(s, 1.0 / cell) for s in range(first, last)]
        if stop - last > 1e-3:
            row.append((last, min(min(stop - last, 1.0), cell) / cell))
        rows.append(row)
    taps = np.zeros((target, max(len(row) for row in rows)), np.int64)
    weights = np.zeros(taps.shape, F32)
    for index, row in enumerate(rows):
        for k, (tap, weight) in enumerate(row):
            taps[index, k], weights[index, k] = tap, weight
    return taps, weights


def _area(source: np.ndarray, width: int, height: int) -> np.ndarray:
    scale_x, scale_y = _scale(source.shape[1], width), _scale(source.shape[0], height)
    whole_x, whole_y = int(round(scale_x)), int(round(scale_y))
    eps = np.finfo(float).eps
    if abs(scale_x - whole_x) < eps and abs(scale_y - whole_y) < eps:  # whole blocks: OpenCV's resizeAreaFast
        blocks = source[:height * whole_y, :width * whole_x].astype(np.int64)
        sums = blocks.reshape(height, whole_y, width, whole_x, -1).sum(axis=(1, 3))
        out = (sums + 2) >> 2 if whole_x == whole_y == 2 else np.rint(sums.astype(F32) * F32(1 / (whole_x * whole_y)))
        return np.clip(out, 0, 255).astype(np.uint8)
    taps_x, weights_x = _area_table(source.shape[1], width, scale_x)
    taps_y, weights_y = _area_table(source.shape[0], height, scale_y)
    pixels = source.astype(F32)
    rows = np.zeros((source.shape[0], width, source.shape[2]), F32)
    for k in range(taps_x.shape[1]):  # float sums in OpenCV's order: across, then down
        rows = rows + pixels[:, taps_x[:, k]] * weights_x[None, :, k, None]
    total = np.zeros((height, width, source.shape[2]), F32)
    for k in range(taps_y.shape[1]):
        total = total + weights_y[:, k, None, None] * rows[taps_y[:, k]]
    return np.clip(np.rint(total), 0, 255).astype(np.uint8)


def _area_linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """INTER_AREA's taps and 11-bit weights along an axis where it enlarges (its bilinear variant): the two source
    pixels of each target pixel, the second weighted by how far the target cell reaches into it."""
    scale, inverse = _scale(source, target), target / source
    index = np.arange(target)
    whole = np.floor(index * scale).astype(np.int64)
    fraction = ((index + 1) - (whole + 1) * inverse).astype(F32)
    fraction = np.where(fraction <= 0, F32(0), fraction - np.floor(fraction)).astype(F32)
    beyond = whole >= source - 1  # OpenCV: past the last pixel, the last pixel alone
    whole, fraction = np.where(beyond, source - 1, whole), np.where(beyond, F32(0), fraction)
    one = 1 << RESIZE_COEF_BITS
    weights = np.rint(np.stack([F32(1) - fraction, fraction], axis=1) * F32(one)).astype(np.int64)
    return np.stack([whole, np.minimum(whole + 1, source - 1)], axis=1), weights


def _area_enlarging(source: np.ndarray, width: int, height: int) -> np.ndarray:
    """INTER_AREA where a side grows (OpenCV's "area mode" of its fixed-point bilinear resize): integer sums across,
    then down in its uint8 rows' shortened arithmetic."""
    taps_x, weights_x = _area_linear_taps(source.shape[1], width)
    taps_y, weights_y = _area_linear_taps(source.shape[0], height)
    pixels = source.astype(np.int64)
    rows = sum(pixels[:, taps_x[:, k]] * weights_x[None, :, k, None] for k in range(2)).reshape(source.shape[0], -1)
    top, bottom = rows[taps_y[:, 0]], rows[taps_y[:, 1]]  # (height, width * channels)
    b0, b1 = weights_y[:, 0, None], weights_y[:, 1, None]
    # OpenCV's uint8 rows, vector and scalar alike: ((b0 (top >> 4)) >> 16) + ((b1 (bottom >> 4)) >> 16), then + 2 >> 2
    out = np.clip(((b0 * (top >> 4) >> 16) + (b1 * (bottom >> 4) >> 16) + 2) >> 2, 0, 255)
    return out.reshape(height, width, -1).astype(np.uint8)


def _cubic_positions(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Each target pixel's source position, split as OpenCV splits it (float): the four taps (border replicated)
    and the fraction."""
    position = ((np.arange(target) + 0.5) * _scale(source, target) - 0.5).astype(F32)
    whole = np.floor(position).astype(np.int64)
    return np.clip(whole[:, None] + np.arange(-1, 3)[None], 0, source - 1), (position - whole.astype(F32)).astype(F32)


def _cubic_weights_float(fraction: np.ndarray) -> np.ndarray:
    """Keys' cubic (a = -0.75) at the four taps, in float32 as OpenCV's interpolateCubic evaluates it."""
    x, one = fraction.astype(F32), F32(1)
    x1, y = x + one, one - x
    c0 = ((F32(-0.75) * x1 - F32(-3.75)) * x1 + F32(-6)) * x1 - F32(-3)
    c1 = ((F32(1.25) * x - F32(2.25)) * x) * x + one
    c2 = ((F32(1.25) * y - F32(2.25)) * y) * y + one
    return np.stack([c0, c1, c2, ((one - c0) - c1) - c2], axis=1)


def _cubic_fixed(source: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's own INTER_CUBIC for uint8: weights in 11-bit fixed point, integer sums across, then down; each row's
    first whole groups of VECTOR_LANES values summed in float32 (its SIMD), the rest in integers."""
    taps_x, fraction_x = _cubic_positions(source.shape[1], width)
    taps_y, fraction_y = _cubic_positions(source.shape[0], height)
    one = 1 << RESIZE_COEF_BITS
    weights_x = np.rint(_cubic_weights_float(fraction_x) * F32(one)).astype(np.int64)
    weights_y = np.rint(_cubic_weights_float(fraction_y) * F32(one)).astype(np.int64)
    rows = (source.astype(np.int64)[:, taps_x] * weights_x[None, :, :, None]).sum(axis=2)
    taps = rows[taps_y]  # (height, 4, width, channels)
    shift = 2 * RESIZE_COEF_BITS
    out = np.clip(((taps * weights_y[:, :, None, None]).sum(axis=1) + (1 << (shift - 1))) >> shift, 0, 255)
    out = out.reshape(height, -1)
    vector = out.shape[1] // VECTOR_LANES * VECTOR_LANES
    if vector:
        beta = (weights_y.astype(F32) * F32(1 / (one * one))).astype(F32)
        values = taps.reshape(height, 4, -1)[:, :, :vector].astype(F32)
        total = values[:, 3] * beta[:, 3, None]
        for k in (2, 1, 0):
            total = values[:, k] * beta[:, k, None] + total
        out[:, :vector] = np.clip(np.rint(total), 0, 255)
    return out.reshape(height, width, -1).astype(np.uint8)


def _cubic_exact(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """The four taps (border replicated) of each target pixel and Keys' weights at them, in double."""
    position = (np.arange(target) + 0.5) * (source / target) - 0.5
    whole = np.floor(position)
    d = np.abs(position[:, None] - whole[:, None] - np.arange(-1, 3)[None])
    weights = np.where(d <= 1, (1.25 * d - 2.25) * d * d + 1, np.where(d < 2, ((-0.75 * d + 3.75) * d - 6) * d + 3, 0))
    return np.clip(whole.astype(np.int64)[:, None] + np.arange(-1, 3)[None], 0, source - 1), weights


def _cubic_float(source: np.ndarray, width: int, height: int) -> np.ndarray:
    """IPP's cubic (B 0, C 0.75: Keys' a = -0.75) as OpenCV calls it: the same taps, unquantized weights, float sums
    across then down, rounded to nearest."""
    out = _four_taps(source, *_cubic_exact(source.shape[1], width), *_cubic_exact(source.shape[0], height))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _four_taps(values: np.ndarray, taps_x: np.ndarray, weights_x: np.ndarray, taps_y: np.ndarray,
               weights_y: np.ndarray) -> np.ndarray:
    """A separable four-tap filter in double, across then down, summed tap by tap in order (no 4x copies)."""
    values, trailing = values.astype(np.float64), (1,) * (values.ndim - 2)
    rows = sum(values[:, taps_x[:, k]] * weights_x[:, k].reshape(1, -1, *trailing) for k in range(4))
    return sum(rows[taps_y[:, k]] * weights_y[:, k].reshape(-1, 1, *trailing) for k in range(4))


def resize_cubic_float(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(values, (width, height), interpolation=INTER_CUBIC) of a float64 array (h, w): OpenCV's generic
    path for doubles (IPP takes none), Keys' weights in float32 as for uint8, the sums in double, across then down,
    tap by tap in order. Exact: checked against OpenCV's output."""
    taps_x, fraction_x = _cubic_positions(values.shape[1], width)
    taps_y, fraction_y = _cubic_positions(values.shape[0], height)
    return _four_taps(values, taps_x, _cubic_weights_float(fraction_x).astype(np.float64), taps_y,
                      _cubic_weights_float(fraction_y).astype(np.float64))


def remap_linear(pixels: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """cv2.remap(pixels, map, None, INTER_LINEAR) of uint8 pixels (h, w, channels) with a float32 map (x, y): each
    output pixel the bilinear mix of the four around (x, y), pixels outside the image 0 (BORDER_CONSTANT). OpenCV 5
    computes it in float32 with fused multiply-adds, p00 + fx (p01 - p00) across, then the same down, rounded to
    nearest even; each fused step is emulated in double here (the float32 product is exact there). OpenCV 4.x mixed
    in fixed point at 1/32-pixel positions instead: up to 3 levels off in 6% of a photo's values
    (scripts/make_cv_golden.py)."""
    height, width = pixels.shape[:2]
    x, y = map_x.astype(F32), map_y.astype(F32)
    left, top = np.floor(x), np.floor(y)
    fx, fy = (x - left).astype(np.float64)[..., None], (y - top).astype(np.float64)[..., None]
    left, top = left.astype(np.int64), top.astype(np.int64)
    source = pixels.astype(F32)

    def at(row: np.ndarray, column: np.ndarray) -> np.ndarray:
        inside = (row >= 0) & (row < height) & (column >= 0) & (column < width)
        return source[row.clip(0, height - 1), column.clip(0, width - 1)] * inside[..., None]

    def fused(fraction: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:  # start + fraction (end - start)
        return (fraction * (end - start).astype(np.float64) + start.astype(np.float64)).astype(F32)

    upper = fused(fx, at(top, left), at(top, left + 1))
    lower = fused(fx, at(top + 1, left), at(top + 1, left + 1))
    return np.clip(np.rint(fused(fy, upper, lower)), 0, 255).astype(np.uint8)


# -- morphology and thresholds ---------------------------------------------------------------------------------------
def _neighbours(pixels: np.ndarray, kernel: np.ndarray, fill: int):
    """Each pixel's 3x3 neighbours where `kernel` is set, as views (outside the image: `fill`)."""
    padded = np.pad(pixels, ((1, 1), (1, 1)) + ((0, 0),) * (pixels.ndim - 2), constant_values=fill)
    height, width = pixels.shape[:2]
    for row, column in zip(*np.nonzero(kernel)):
        yield padded[row:row + height, column:column + width]


def dilate(pixels: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.dilate with a 3x3 structuring element: each pixel the largest of its neighbours where the element is set
    (anchor at its centre, the element not mirrored, as OpenCV; outside the image adds nothing)."""
    out = np.zeros_like(pixels)
    for view in _neighbours(pixels, kernel, 0):
        np.maximum(out, view, out=out)
    return out


def erode(pixels: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.erode with a 3x3 structuring element (outside the image takes nothing away)."""
    out = np.full_like(pixels, 255)
    for view in _neighbours(pixels, kernel, 255):
        np.minimum(out, view, out=out)
    return out


def hit_or_miss(binary: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.morphologyEx(binary, MORPH_HITMISS, kernel) of a uint8 map: where the 1s of `kernel` are all set and its
    -1s all clear (outside the image matches both)."""
    hits = erode(binary, (kernel == 1).astype(np.uint8)) if (kernel == 1).any() else np.full_like(binary, 255)
    misses = erode(255 - binary, (kernel == -1).astype(np.uint8)) if (kernel == -1).any() \
        else np.full_like(binary, 255)
    return hits & misses


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu's threshold of uint8 values as cv2.threshold(THRESH_OTSU) finds it (its running sums, in double, in its
    order): the t that maximizes the variance between the classes <= t and > t, the first where several do."""
    counts = np.bincount(gray.ravel(), minlength=256).tolist()
    scale = 1.0 / gray.size
    mean = sum(i * float(n) for i, n in enumerate(counts)) * scale
    mean_below = weight_below = best = 0.0
    threshold = 0
    for i, n in enumerate(counts):
        share = n * scale
        mean_below *= weight_below
        weight_below += share
        weight_above = 1.0 - weight_below
        if min(weight_below, weight_above) < FLT_EPSILON or max(weight_below, weight_above) > 1.0 - FLT_EPSILON:
            continue
        mean_below = (mean_below + i * share) / weight_below
        mean_above = (mean - weight_below * mean_below) / weight_above
        between = weight_below * weight_above * (mean_below - mean_above) * (mean_below - mean_above)
        if between > best:
            best, threshold = between, i
    return threshold
