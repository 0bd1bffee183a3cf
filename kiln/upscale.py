"""AUTOMATIC1111's extras upscale with its built-in PIL upscalers, step for step as it runs them
(scripts/postprocessing_upscale.py over modules/upscaler.py): "None" (no upscaling: the image as it is), "Lanczos"
and "Nearest", and with upscaler networks (`networks`: name -> one pass of the network, an ESRGAN x4 say; served by
Triton, build/upscaler.py). Every size is planned, and bounded, before a pixel is allocated.

AUTOMATIC1111's order, for a scale s (resize_mode 0: upscaling_resize; 1: the larger of w/width, h/height):
1. the upscaler's own resize to (int(width * s), int(height * s)); a network instead runs its passes (its native
   scale each) until the image covers the multiple-of-8 size below, at most 3, as AUTOMATIC1111's Upscaler.upscale;
2. a Lanczos resize to (int(width * s // 8 * 8), ...), the multiple of 8 below, where that differs;
3. resize_mode 1 with upscaling_crop: the result centred on a black canvas of exactly w x h;
4. upscaler_2 with extras_upscaler_2_visibility > 0: steps 1-3 with it, blended over the first (PIL's Image.blend).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from PIL import Image

from kiln.errors import InputError

UPSCALERS = ("None", "Lanczos", "Nearest")  # AUTOMATIC1111's names and order (its /sdapi/v1/upscalers)
RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
Network = Callable[[Image.Image], Image.Image]  # one pass of an upscaler network: RGB in, RGB x its scale out
NO_NETWORKS: Mapping[str, Network] = {}


@dataclass(frozen=True)
class UpscaleOptions:
    """The extras fields that shape the image, by AUTOMATIC1111's names."""

    resize_mode: int = 0  # 0: scale by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True  # resize_mode 1: crop (centre on a canvas) to exactly w x h
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0  # upscaler_2's weight in the blend over upscaler_1's result


@dataclass(frozen=True)
class Plan:
    """The sizes one upscale goes through (width, height)."""

    scale: float
    first: tuple[int, int]  # the upscaler's own resize
    size: tuple[int, int]  # after the Lanczos resize to a multiple of 8
    canvas: tuple[int, int] | None  # resize_mode 1 with upscaling_crop


def check(options: UpscaleOptions, networks: Mapping[str, Network] | tuple[str, ...] = NO_NETWORKS) -> None:
    """Refuse, by field, an upscaler this server does not have and a blend it would not run."""
    valid = (*UPSCALERS, *networks)
    for name in ("upscaler_1", "upscaler_2"):
        value = getattr(options, name)
        if value not in valid:
            raise InputError(f"{name} {value!r} is not an upscaler of this server; valid: {', '.join(valid)}")
    if options.upscaler_1 == "None" and options.upscaler_2 != "None" and options.extras_upscaler_2_visibility > 0:
        raise InputError("upscaler_2 is blended over upscaler_1's result, and upscaler_1 is \"None\" (no upscaling: "
                         "AUTOMATIC1111 then skips upscaler_2 too); choose upscaler_1, or set upscaler_2 to \"None\"")


def plan(width: int, height: int, options: UpscaleOptions, max_pixels: int) -> Plan:
    """The sizes AUTOMATIC1111 would make of a width x height image; one over `max_pixels` is refused by field."""
    to = options.resize_mode == 1
    field = "upscaling_resize_w/upscaling_resize_h" if to else "upscaling_resize"
    target = (options.upscaling_resize_w, options.upscaling_resize_h)
    try:
        scale = max(target[0] / width, target[1] / height) if to else float(options.upscaling_resize)
        first = (int(width * scale), int(height * scale))
        size = (int(width * scale // 8 * 8), int(height * scale // 8 * 8))
    except OverflowError:
        raise InputError(f"{field}: too large for a {width}x{height} image") from None
    canvas = target if to and options.upscaling_crop else None
    for what, (w, h) in (("resizes it to", first), ("gives", size), ("crops it to", canvas or size)):
        if w * h > max_pixels:
            raise InputError(f"{field}: upscaling the {width}x{height} image by {scale:g} {what} {w}x{h} = {w * h} "
                             f"pixels, over the limit of {max_pixels}; refused before upscaling")
    if min(size) < 1:
        raise InputError(f"{field}: upscaling the {width}x{height} image by {scale:g} gives {size[0]}x{size[1]} "
                         "(AUTOMATIC1111 rounds each side down to a multiple of 8); each side must be at least 8")
    return Plan(scale=scale, first=first, size=size, canvas=canvas)


def upscale_with(image: Image.Image, upscaler: str, planned: Plan,
                 networks: Mapping[str, Network] = NO_NETWORKS) -> Image.Image:
    """One upscaler's result: its own resize (a network's passes), Lanczos to the multiple of 8, then the crop (steps
    1-3 above)."""
    if upscaler in networks:
        for _ in range(3):
            if image.width >= planned.size[0] and image.height >= planned.size[1]:
                break
            before = image.size
            image = networks[upscaler](image)
            if image.size == before:
                break
    elif planned.first != image.size:  # AUTOMATIC1111's loop stops at once when the upscaler leaves the size alone
        image = image.resize(planned.first, resample=RESAMPLE[upscaler])
    if image.size != planned.size:
        image = image.resize(planned.size, resample=Image.Resampling.LANCZOS)
    if planned.canvas is not None:
        canvas = Image.new("RGB", planned.canvas)
        canvas.paste(image, box=(planned.canvas[0] // 2 - image.width // 2, planned.canvas[1] // 2 - image.height // 2))
        image = canvas
    return image


def upscale(image: Image.Image, options: UpscaleOptions, max_pixels: int,
            networks: Mapping[str, Network] = NO_NETWORKS) -> tuple[Image.Image, str]:
    """An RGB image upscaled as AUTOMATIC1111's extras do it, and its "postprocessing" infotext."""
    check(options, networks)
    if options.upscaler_1 == "None":
        return image, ""
    planned = plan(image.width, image.height, options, max_pixels)
    info: dict[str, object] = {}
    if options.resize_mode == 1:
        info["Postprocess upscale to"] = f"{options.upscaling_resize_w}x{options.upscaling_resize_h}"
    else:
        info["Postprocess upscale by"] = float(options.upscaling_resize)
    if planned.canvas is not None:
        info["Postprocess crop to"] = f"{planned.canvas[0]}x{planned.canvas[1]}"
    result = upscale_with(image, options.upscaler_1, planned, networks)
    info["Postprocess upscaler"] = options.upscaler_1
    if options.upscaler_2 != "None" and options.extras_upscaler_2_visibility > 0:
        second = upscale_with(image, options.upscaler_2, planned, networks)
        result = Image.blend(result, second, float(options.extras_upscaler_2_visibility))
        info["Postprocess upscaler 2"] = options.upscaler_2
    return result, infotext(info)


def infotext(info: dict[str, object]) -> str:
    """AUTOMATIC1111's postprocessing infotext: "key: value, ..." with values that hold , : or newlines quoted."""
    def quote(value: object) -> str:
        text = str(value)
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    return ", ".join(key if key == value else f"{key}: {quote(value)}" for key, value in info.items()
                     if value is not None)


def html_info(text: str) -> str:
    """AUTOMATIC1111's plaintext_to_html: the infotext escaped, one <br> per line, in a <p>."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"
