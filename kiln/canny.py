"""OpenCV's Canny edge detector in numpy (cv2.Canny(pixels, low, high) on an RGB image, as sd-webui-controlnet's
canny preprocessor runs it): the serving install has it without OpenCV."""

from __future__ import annotations

import numpy as np
from PIL import Image


def canny(image: Image.Image, low: float, high: float) -> Image.Image:
    """Canny edges (white on black, 3 channels) of an image, as OpenCV's cv2.Canny(pixels, low, high) makes them
    (which sd-webui-controlnet's canny runs on the RGB image): no blur; 3x3 Sobel gradients (replicated border) of
    each channel, the L1 magnitude |dx| + |dy| of the channel where it is largest; non-maximum suppression along the
    gradient's direction sector in OpenCV's fixed point (tan 22.5 deg as 13573 / 2^15), ties kept on one side; then
    the pixels above `low` (thresholds floored, swapped when low > high) 8-connected to one above `high`. Numpy
    only, so the serving install has it too; the same pixels as OpenCV 5.1's on every case compared
    (tests/test_control_units.py, against maps OpenCV made)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    low, high = int(np.floor(min(low, high))), int(np.floor(max(low, high)))
    gradients = [_sobel(pixels[..., channel]) for channel in range(3)]
    magnitudes = np.stack([np.abs(dx) + np.abs(dy) for dx, dy in gradients])
    strongest = np.argmax(magnitudes, axis=0)[None]  # the first channel of the largest magnitude, as OpenCV
    magnitude = np.take_along_axis(magnitudes, strongest, 0)[0]
    dx = np.take_along_axis(np.stack([g[0] for g in gradients]), strongest, 0)[0].astype(np.int64)
    dy = np.take_along_axis(np.stack([g[1] for g in gradients]), strongest, 0)[0].astype(np.int64)
    candidates = _local_maxima(magnitude, dx, dy) & (magnitude > low)
    return Image.fromarray(np.repeat(_hysteresis(candidates, candidates & (magnitude > high))[..., None], 3, axis=2))


def _sobel(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (x, y) of one channel, its border replicated."""
    padded = np.pad(channel, 1, mode="edge")
    height, width = channel.shape

    def at(row: int, column: int) -> np.ndarray:  # the neighbour at (row, column) of every pixel
        return padded[1 + row:1 + row + height, 1 + column:1 + column + width]

    dx = at(-1, 1) + 2 * at(0, 1) + at(1, 1) - at(-1, -1) - 2 * at(0, -1) - at(1, -1)
    dy = at(1, -1) + 2 * at(1, 0) + at(1, 1) - at(-1, -1) - 2 * at(-1, 0) - at(-1, 1)
    return dx, dy


def _local_maxima(magnitude: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """OpenCV's non-maximum suppression: horizontal gradients (|dy| < tan 22.5 |dx|) against the left and right
    neighbours, vertical ones (|dy| > tan 67.5 |dx|) against those above and below, the rest along the diagonal
    their signs give. Outside the image counts as 0."""
    padded = np.pad(magnitude, 1)
    height, width = magnitude.shape

    def at(row: int, column: int) -> np.ndarray:
        return padded[1 + row:1 + row + height, 1 + column:1 + column + width]

    x, y = np.abs(dx), np.abs(dy) << 15
    tan22 = x * 13573
    horizontal = y < tan22
    vertical = ~horizontal & (y > tan22 + (x << 16))
    opposite = (dx ^ dy) < 0  # the gradient runs from top right to bottom left
    before = np.where(opposite, at(-1, 1), at(-1, -1))
    after = np.where(opposite, at(1, -1), at(1, 1))
    return ((horizontal & (magnitude > at(0, -1)) & (magnitude >= at(0, 1)))
            | (vertical & (magnitude > at(-1, 0)) & (magnitude >= at(1, 0)))
            | (~horizontal & ~vertical & (magnitude > before) & (magnitude > after)))


def _hysteresis(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidates 8-connected (through candidates) to a strong pixel, as 255; the rest 0. Connected components
    of the candidates' horizontal runs: runs on neighbouring rows touch where their columns overlap or meet at a
    corner; labels are merged by hooking each touching pair's larger root onto the smaller, then pointing every run
    straight at its root, until nothing changes (a few rounds), all in numpy."""
    height, width = candidates.shape
    steps = np.diff(np.pad(candidates, ((0, 0), (1, 1))).astype(np.int8), axis=1)  # +1 a run starts, -1 it ended
    starts, stops = np.flatnonzero(steps == 1), np.flatnonzero(steps == -1)  # row * (width + 1) + column, row-major
    rows, first, stop = starts // (width + 1), starts % (width + 1), stops % (width + 1)
    stride = width + 2  # keys row * stride + column order the runs as they are numbered
    start_keys, stop_keys = rows * stride + first, rows * stride + stop
    # the runs of the next row that touch each run: from the first ending at or after its start to the last starting
    # at or before its end
    lowest = np.searchsorted(stop_keys, (rows + 1) * stride + first, side="left")
    count = np.maximum(np.searchsorted(start_keys, (rows + 1) * stride + stop, side="right") - lowest, 0)
    upper = np.repeat(np.arange(len(starts)), count)
    lower = np.repeat(lowest - np.cumsum(count) + count, count) + np.arange(count.sum())
    root = np.arange(len(starts))
    while True:
        a, b = root[upper], root[lower]
        differ = a != b
        if not differ.any():
            break
        np.minimum.at(root, np.maximum(a[differ], b[differ]), np.minimum(a[differ], b[differ]))
        while True:
            jumped = root[root]
            if np.array_equal(jumped, root):
                break
            root = jumped
    strong_rows, strong_columns = np.nonzero(strong)
    reached = np.zeros(len(starts), bool)
    reached[root[np.searchsorted(start_keys, strong_rows * stride + strong_columns, side="right") - 1]] = True
    kept = reached[root]
    marks = np.zeros((height, width + 1), np.int32)
    marks[rows[kept], first[kept]] += 1
    marks[rows[kept], stop[kept]] -= 1
    return np.where(np.cumsum(marks, axis=1)[:, :width] > 0, 255, 0).astype(np.uint8)
