"""How sd-webui-controlnet hands a unit's map to its ControlNet, in numpy on kiln.cvimage's OpenCV operations:
the map fitted to each pass's size by the unit's resize mode (its detectmap_proc), resized by its
high_quality_resize: colour maps of 3 to 199 colours (segmentations) by nearest neighbour, other maps shrunk by
area and enlarged by cubic; a binary map (two colours, one under 16 and one over 240) kept binary by Otsu's
threshold of its channels' mean, and a map of one-pixel lines (canny's, scribbles) first thinned back to one pixel
(its nake_nms, then lvmin_thin). An inpaint unit's map carries its mask as a fourth channel (the extension's alpha):
resized with the colours' interpolation and binarized (over 127: 255) after, the fill's border counted as masked."""

from __future__ import annotations

import numpy as np

from kiln.cvimage import dilate, erode, hit_or_miss, otsu_threshold, resize

_LINES = [np.array(k, np.uint8) for k in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
                                          [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
# lvmin_thin's hit-or-miss patterns (1 set, -1 clear, 0 either), each in its four rotations, in the extension's order
_THINNING = [np.rot90(np.array(k), turns) for turns in range(4)
             for k in ([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])]
_PRUNING = [np.rot90(np.array(k), turns) for turns in range(4)
            for k in ([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])]
_SQUARE = np.ones((3, 3), np.uint8)


def fit_map(pixels: np.ndarray, width: int, height: int, mode: int) -> np.ndarray:
    """A map (h, w, 3 uint8) at width x height by sd-webui-controlnet's resize mode: 0 just resize; 1 crop and resize
    (scaled by the larger of the two ratios, sides rounded half to even, the middle cut out); 2 resize and fill
    (scaled by the smaller, centred on the median colour of the map's four edges). A fourth channel (an inpaint
    unit's mask) comes out 0 or 255, and the fill's border is masked (the extension's "inpaint hijack")."""
    if mode == 0:
        return high_quality_resize(pixels, width, height)
    old_h, old_w = pixels.shape[:2]
    k = (max if mode == 1 else min)(height / old_h, width / old_w)
    resized = high_quality_resize(pixels, max(1, int(np.round(old_w * k))), max(1, int(np.round(old_h * k))))
    new_h, new_w = resized.shape[:2]
    if mode == 1:
        top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
        return resized[top:top + height, left:left + width]
    edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    border = np.median(edges, axis=0).astype(np.uint8)
    if len(border) == 4:
        border[3] = 255
    canvas = np.tile(border[None, None], (height, width, 1))
    top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


def high_quality_resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """sd-webui-controlnet's high_quality_resize of a map (h, w, 3 uint8) to width x height; a fourth channel (a
    mask) is resized with the colours' interpolation and then binarized, over 127 255 (resized or not)."""
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        colours, mask = pixels[..., :3], pixels[..., 3]
        if mask.shape != (height, width):
            mask = resize(mask, width, height, _interpolation(colours, width, height))
        return np.concatenate([high_quality_resize(colours, width, height),
                               np.where(mask > 127, 255, 0).astype(np.uint8)[..., None]], axis=2)
    if pixels.shape[:2] == (height, width):
        return pixels
    area, old_area = width * height, pixels.shape[0] * pixels.shape[1]
    colours = colour_count(pixels)
    binary = is_binary(pixels, colours)
    one_pixel_lines = False
    if binary:  # most of the lit pixels gone after an opening: lines one pixel wide
        opened = dilate(erode(pixels, _SQUARE), _SQUARE)
        one_pixel_lines = np.count_nonzero(opened < pixels) * 2 > np.count_nonzero(pixels > 127)
    resized = resize(pixels, width, height, _interpolation(pixels, width, height, colours))
    if not binary:
        return resized
    channels = resized.astype(np.float32)
    gray = ((channels[..., 0] + channels[..., 1] + channels[..., 2]) / np.float32(3)).clip(0, 255).astype(np.uint8)
    if one_pixel_lines:
        gray = otsu_binarize(nake_nms(gray))
        gray = lvmin_thin(gray, prunings=area > old_area)
    else:
        gray = otsu_binarize(gray)
    return np.repeat(gray[..., None], 3, axis=2)


def _interpolation(pixels: np.ndarray, width: int, height: int, colours: int | None = None) -> str:
    """The extension's choice: nearest for 3 to 199 colours (a segmentation), else area to shrink, cubic to enlarge."""
    colours = colour_count(pixels) if colours is None else colours
    return "nearest" if 2 < colours < 200 else "area" if width * height < pixels.shape[0] * pixels.shape[1] \
        else "cubic"


def colour_count(pixels: np.ndarray) -> int:
    """How many colours a uint8 image (h, w) or (h, w, channels) holds (each packed into one number: a fast
    unique)."""
    packed = pixels.astype(np.uint32) if pixels.ndim == 2 else np.zeros(pixels.shape[:2], np.uint32)
    for channel in range(pixels.shape[2] if pixels.ndim == 3 else 0):
        packed = (packed << 8) | pixels[..., channel]
    return len(np.unique(packed))


def is_binary(pixels: np.ndarray, colours: int) -> bool:
    """The extension's binary map: two colours, one under 16 and one over 240 (an edge map, a scribble)."""
    return colours == 2 and pixels.min() < 16 and pixels.max() > 240


def otsu_binarize(gray: np.ndarray) -> np.ndarray:
    """cv2.threshold(gray, 0, 255, THRESH_BINARY + THRESH_OTSU)."""
    return np.where(gray > otsu_threshold(gray), 255, 0).astype(np.uint8)


def nake_nms(gray: np.ndarray) -> np.ndarray:
    """The extension's nake_nms: each pixel kept where it is the largest along one of the four lines through it
    (horizontal, vertical, the two diagonals), 0 elsewhere."""
    out = np.zeros_like(gray)
    for line in _LINES:
        np.copyto(out, gray, where=dilate(gray, line) == gray)
    return out


def lvmin_thin(binary: np.ndarray, prunings: bool = True) -> np.ndarray:
    """The extension's lvmin_thin of a 0/255 map: the thinning patterns removed, each in turn, until none matches
    (32 rounds at most), then (prunings) the pruning patterns once."""
    out = binary.copy()

    def remove(patterns) -> bool:
        changed = False
        for pattern in patterns:
            hits = hit_or_miss(out, pattern) > 127
            if hits.any():
                out[hits], changed = 0, True
        return changed

    for _ in range(32):
        if not remove(_THINNING):
            break
    if prunings:
        remove(_PRUNING)
    return out
