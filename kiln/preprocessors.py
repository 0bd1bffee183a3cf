"""sd-webui-controlnet's model-free preprocessors ("modules"), as its registry describes them (name, label, tags,
sorting priority, sliders) with what each does to an image, in numpy:

- none: the image; invert: 255 minus it (canny, lineart, scribble and MLSD maps drawn black on white);
- canny: OpenCV's edges (kiln.canny), thresholds low and high;
- threshold: white where every channel is above the threshold;
- scribble_xdog: the difference of two Gaussian blurs (sigma 0.5 and 5), thresholded: white scribble lines;
- lineart_standard: how much darker each pixel is than its sigma-6 blur, scaled by the median of the lines: grey
  lines on black;
- blur_gaussian, tile_resample: a Gaussian blur, or a shrink by a rate (area), for tile ControlNets;
- recolor_luminance, recolor_intensity: Lab lightness or HSV value, gamma-corrected, for recolor ControlNets;
- color ("t2ia_color_grid"): the image as a grid of 64-pixel cells of its colour, for colour T2I-Adapters;
- inpaint (inpaint_global_harmonious), inpaint_only: the image itself, with the unit's mask (the masked pixels -1);
- shuffle: the image's content moved about along two smooth random fields, for shuffle ControlNets (which pool their
  residuals: kiln.contract.ServedControlNet.global_pool); seeded by the job's seed as the extension seeds it.

Where each runs (the extension's `sizing`): "pad" modules run on the image resized so that its short side is the
processor resolution, its bottom and right edges repeated out to multiples of 64, and cut back after (its
resize_image_with_pad); "resize" ones on the resized image; "shortest" (color) on the image resized by area so that
its short side is the resolution (its cv2_resize_shortest_edge); "own" ones at the image's own size (no resolution).
kiln.detect makes the extension's maps with these; kiln.control runs them for kiln's own units at each pass's size.
The arithmetic follows the extension's numpy and OpenCV calls (kiln.cvimage, kiln.cvfilter), quirks included:
recolor converts the RGB image as if it were BGR, as the extension does; scribble_xdog's 2 x (255 - dog) wraps
around in uint8, as it does there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from kiln.canny import canny
from kiln.cvfilter import gaussian_blur, lab_lightness
from kiln.cvimage import remap_linear, resize, resize_cubic_float
from kiln.errors import InputError


@dataclass(frozen=True)
class Slider:
    """One of a module's sliders (its threshold_a or threshold_b), as the extension's PreprocessorParameter."""

    label: str
    minimum: float
    maximum: float
    value: float  # the default, which -1 asks for
    step: float = 0.01
    integer: bool = False  # canny's thresholds: whole numbers

    def api_json(self) -> dict:
        """The extension's /controlnet/module_list detail of a slider."""
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}


RESOLUTION = Slider("Resolution", 64, 2048, 512, step=8, integer=True)  # processor_res (64: kiln takes legacy's)


@dataclass(frozen=True)
class Preprocessor:
    name: str
    apply: Callable[[np.ndarray, float, float], np.ndarray]  # uint8 (H, W, 3), the two sliders -> uint8 (h, w, 3)
    label: str = ""  # the extension's display name ("" the name); units and /controlnet/detect take either
    tags: tuple[str, ...] = ()  # its control types
    priority: int = 0  # its sorting priority (higher first; a type's default module is its first)
    sizing: str = "pad"  # pad, resize, shortest or own (above)
    sliders: tuple[Slider, ...] = field(default=())  # threshold_a's, then threshold_b's
    soft_in_hires: bool = False  # the hires fix's second pass soft-injects (use_soft_projection_in_hr_fix)
    resolution: int = 0  # a processor resolution the module fixes and hides (shuffle: 512); 0: the unit's
    random: bool = False  # it draws noise (shuffle): `apply` takes a numpy RandomState too
    inpaint: bool = False  # an inpaint module: it takes the unit's mask, its map keeps it (kiln.control.inpaint_hint)

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def uses_resolution(self) -> bool:
        """Whether the unit's processor resolution (a slider the extension shows) sizes the map."""
        return self.sizing != "own" and not self.resolution

    def run(self, pixels: np.ndarray, a: float, b: float, seed: int | None = None) -> np.ndarray:
        """The module on uint8 pixels. A random one draws from numpy's legacy generator seeded with `seed`
        (numpy_seed's), or without one (/controlnet/detect) from a fresh one, as the extension's detect route does."""
        if not self.random:
            return self.apply(pixels, a, b)
        return self.apply(pixels, a, b, np.random.RandomState(seed))

    def slider_values(self, a: float, b: float, names: tuple[str, str], where: str = "") -> tuple[float, float]:
        """threshold_a and threshold_b for this module: -1 its defaults; a value outside a slider's range (which the
        extension would replace by the default) is refused naming the field; a slider the module lacks is -1 (the
        extension ignores what is sent there)."""
        values = []
        for index, (value, name) in enumerate(zip((a, b), names)):
            if index >= len(self.sliders):
                values.append(-1.0)
                continue
            slider = self.sliders[index]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise InputError(f"{where}{name} must be a number ({self.name}'s {slider.label}), got {value!r}")
            if value == -1:
                value = slider.value
            elif slider.integer and value != int(value):
                raise InputError(f"{where}{name} must be an integer ({self.name}'s {slider.label}), got {value:g}")
            elif not slider.minimum <= value <= slider.maximum:
                raise InputError(f"{where}{name} must be {slider.minimum:g} to {slider.maximum:g} (or -1: "
                                 f"{slider.value:g}), {self.name}'s {slider.label}; got {value:g}")
            values.append(float(value))
        if self.name == "canny" and not values[0] < values[1]:
            place = where.rstrip(". ")
            raise InputError(f"{place}{': ' if place else ''}canny thresholds must satisfy 0 <= {names[0]} < "
                             f"{names[1]} <= 255, got {values[0]:g}, {values[1]:g}")
        return values[0], values[1]

    def detail(self) -> dict:
        """The extension's /controlnet/module_list module_detail entry: every slider the module shows."""
        shown = ((RESOLUTION,) if self.uses_resolution else ()) + self.sliders
        return {"model_free": False, "sliders": [s.api_json() for s in shown]}


def numpy_seed(seed: int, subseed: int = -1) -> int:
    """The seed sd-webui-controlnet gives numpy before it preprocesses (its set_numpy_seed): the job's first seed plus
    the request's variation seed (-1: the first seed again), mod 2^32."""
    return (seed + (seed if subseed == -1 else max(subseed, 0))) & 0xFFFFFFFF


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _canny(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.asarray(canny(Image.fromarray(pixels), int(low), int(high)))


def _threshold(pixels: np.ndarray, level: float, _: float) -> np.ndarray:
    return _gray3(np.where(pixels.min(axis=2) > level, 255, 0).astype(np.uint8))


def _scribble_xdog(pixels: np.ndarray, level: float, _: float) -> np.ndarray:
    image = pixels.astype(np.float32)
    dog = (255 - np.min(gaussian_blur(image, 5.0) - gaussian_blur(image, 0.5), axis=2)).clip(0, 255).astype(np.uint8)
    return _gray3(np.where(2 * (255 - dog) > level, 255, 0).astype(np.uint8))  # uint8: 2 x 128 wraps to 0


def _lineart_standard(pixels: np.ndarray, _: float, __: float) -> np.ndarray:
    image = pixels.astype(np.float32)
    intensity = np.min(gaussian_blur(image, 6.0) - image, axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    intensity /= max(16, np.median(lines)) if lines.size else 16  # the extension's max(16, nan) is 16
    intensity *= 127
    return _gray3(intensity.clip(0, 255).astype(np.uint8))


def _tile_resample(pixels: np.ndarray, rate: float, _: float) -> np.ndarray:
    if rate < 1.1:
        return pixels
    height, width = int(pixels.shape[0] / rate), int(pixels.shape[1] / rate)
    if not (height and width):
        raise InputError(f"tile_resample's down sampling rate {rate:g} leaves nothing of the {pixels.shape[1]}x"
                         f"{pixels.shape[0]} image")
    return resize(pixels, width, height, "area")


def _gamma(values: np.ndarray, gamma: float) -> np.ndarray:
    """The extension's recolor curve, in its float32 steps."""
    result = values.astype(np.float32) / 255.0
    result = result ** gamma
    return _gray3((result * 255.0).clip(0, 255).astype(np.uint8))


def _color_grid(pixels: np.ndarray, _: float, __: float) -> np.ndarray:
    """annotator/color's apply_color: shrunk by cubic to one pixel per 64, enlarged back by nearest."""
    height, width = pixels.shape[:2]
    if min(height, width) < 64:
        raise InputError(f"t2ia_color_grid makes one cell per 64 pixels: the {width}x{height} image has none")
    return resize(resize(pixels, width // 64, height // 64, "cubic"), width, height, "nearest")


def _blur(pixels: np.ndarray, sigma: float, _: float) -> np.ndarray:
    return gaussian_blur(pixels, sigma)


def _noise_field(rng: np.random.RandomState, height: int, width: int, cell: int = 256) -> np.ndarray:
    """annotator's make_noise_disk (one channel): uniform noise, one value per `cell` pixels and two more each way,
    enlarged by cubic, its middle cut out, stretched to [0, 1]."""
    noise = rng.uniform(low=0, high=1, size=(height // cell + 2, width // cell + 2))
    noise = resize_cubic_float(noise, width + 2 * cell, height + 2 * cell)[cell:cell + height, cell:cell + width]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise


def _shuffle(pixels: np.ndarray, _: float, __: float, rng: np.random.RandomState) -> np.ndarray:
    """annotator/shuffle's ContentShuffleDetector: each pixel taken (bilinear) from where two smooth noise fields, x
    then y, point; the extension's draws in its order."""
    height, width = pixels.shape[:2]
    x = (_noise_field(rng, height, width) * float(width - 1)).astype(np.float32)
    y = (_noise_field(rng, height, width) * float(height - 1)).astype(np.float32)
    return remap_linear(pixels, x, y)


CANNY_SLIDERS = (Slider("Low Threshold", 0, 255, 100, step=1, integer=True),
                 Slider("High Threshold", 0, 255, 200, step=1, integer=True))
GAMMA = Slider("Gamma Correction", 0.1, 2.0, 1.0, step=0.001)

_ALL = (
    # none: the image itself, what instruct-pix2pix ControlNets take (the extension tags it so)
    Preprocessor("none", lambda pixels, _, __: pixels, tags=("InstructP2P",), priority=10, sizing="own"),
    Preprocessor("canny", _canny, tags=("Canny",), priority=100, sliders=CANNY_SLIDERS, soft_in_hires=True),
    Preprocessor("invert", lambda pixels, _, __: 255 - pixels, label="invert (from white bg & black line)",
                 tags=("Canny", "Lineart", "Scribble", "Sketch", "MLSD"), priority=20, sizing="own"),
    # the extension's current slider is 64 to 2048 (512 by default) and resets a smaller sigma to 512; its earlier
    # one was 0.01 to 64: kiln runs either as sent
    Preprocessor("blur_gaussian", _blur, tags=("Tile", "Blur"), sizing="resize",
                 sliders=(Slider("Sigma", 0.01, 2048, 512),)),
    Preprocessor("scribble_xdog", _scribble_xdog, tags=("Scribble", "Sketch"),
                 sliders=(Slider("XDoG Threshold", 1, 64, 32, step=1),)),
    Preprocessor("lineart_standard", _lineart_standard, label="lineart_standard (from white bg & black line)",
                 tags=("Lineart",), priority=100),
    Preprocessor("recolor_intensity", lambda pixels, gamma, _: _gamma(pixels.max(axis=2), gamma),
                 tags=("Recolor",), sizing="own", sliders=(GAMMA,)),
    Preprocessor("recolor_luminance", lambda pixels, gamma, _: _gamma(lab_lightness(pixels), gamma),
                 tags=("Recolor",), priority=100, sizing="own", sliders=(GAMMA,)),
    Preprocessor("threshold", _threshold, sliders=(Slider("Binarization Threshold", 0, 255, 127),)),
    Preprocessor("color", _color_grid, label="t2ia_color_grid", tags=("T2I-Adapter",), sizing="shortest"),
    # the extension fixes shuffle's resolution at 512 and hides it; each call draws (its detect route: unseeded)
    Preprocessor("shuffle", _shuffle, tags=("Shuffle",), sizing="resize", resolution=512, random=True),
    # the ControlNet inpaint modules pass the image through with its mask (the masked pixels become -1 for the
    # ControlNet); inpaint_only (the Inpaint type's default) also restores the image outside the mask at each step and
    # pastes it back (orchestrator.pipeline.restore), except in img2img inpainting, where the extension runs
    # inpaint_global_harmonious in its place
    Preprocessor("inpaint", lambda pixels, _, __: pixels, label="inpaint_global_harmonious", tags=("Inpaint",),
                 sizing="own", inpaint=True),
    Preprocessor("inpaint_only", lambda pixels, _, __: pixels, tags=("Inpaint",), priority=100, sizing="own",
                 inpaint=True),
    Preprocessor("tile_resample", _tile_resample, tags=("Tile", "Blur"), priority=100, sizing="own",
                 sliders=(Slider("Down Sampling Rate", 1.0, 8.0, 1.0),)),
)
# the extension's order (get_sorted_preprocessors): none, then by priority and label, both descending
PREPROCESSORS = {p.name: p for p in (_ALL[0], *sorted(_ALL[1:], key=lambda p: (p.priority, p.title), reverse=True))}
CONTROL_MODULES = tuple(PREPROCESSORS)
_BY_TITLE = {p.title.lower(): p for p in _ALL} | {p.name.lower(): p for p in _ALL}


def preprocessor(module: str, where: str = "module") -> Preprocessor:
    """A module by its name or its label (as the extension finds it; any case), or a refusal naming the field."""
    found = _BY_TITLE.get(module.lower()) if isinstance(module, str) else None
    if found is None:
        raise InputError(f"{where} {module!r} is unknown; valid: {', '.join(CONTROL_MODULES)}")
    return found
