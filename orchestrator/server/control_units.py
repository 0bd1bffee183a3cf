"""sd-webui-controlnet's API, translated: its alwayson_scripts.controlnet units into the pipeline's ControlNet units
(their options checked, their maps made as the extension makes them), and the "detected maps" its responses append."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image
from pydantic import ValidationError

from kiln import schemas
from kiln.control import control_image, fitted_map
from kiln.detect import (
    DEFAULT_RESOLUTION,
    decode_source,
    map_of,
    mask_shown,
    pixel_perfect_resolution,
    processor_resolution,
)
from kiln.errors import InputError
from kiln.imaging import ImageLimits, encode_png
from kiln.masks import Blur, crop_region, shaped, soft_mask
from kiln.preprocessors import Preprocessor, preprocessor
from orchestrator.pipeline import ControlNetUnit, Txt2ImgRequest
from orchestrator.server import builtin_scripts
from orchestrator.server import soft_inpainting as soft
from orchestrator.server.errors import short
from orchestrator.server.inputs import decode_b64_image

# sd-webui-controlnet's resize modes for the control image, by number and by name
CONTROL_RESIZE = {0: 0, 1: 1, 2: 2, "just resize": 0, "crop and resize": 1, "scale to fit (inner fit)": 1,
                  "inner fit (scale to fit)": 1, "resize and fill": 2, "envelope (outer fit)": 2,
                  "outer fit (shrink to fit)": 2}
CONTROL_MODES = {0: 0, "balanced": 0, 1: 1, "my prompt is more important": 1, 2: 2, "controlnet is more important": 2}
# its hr_option, by number, label or enum name (its HiResFixOption.from_value); None: Both
HR_OPTIONS = {None: 0, 0: 0, "both": 0, "hiresfixoption.both": 0, 1: 1, "low res only": 1,
              "hiresfixoption.low_res_only": 1, 2: 2, "high res only": 2, "hiresfixoption.high_res_only": 2}


def _unit_options(unit: schemas.ControlNetUnitArgs, where: str) -> tuple[int, int, int]:
    """A unit's resize mode (sd-webui-controlnet's default: crop and resize), control mode and hr_option (0, 1, 2);
    what kiln does not run is refused."""
    key = unit.resize_mode.lower() if isinstance(unit.resize_mode, str) else unit.resize_mode
    mode = 1 if unit.resize_mode is None else CONTROL_RESIZE.get(key)
    if mode is None:
        raise InputError(f"{where}.resize_mode {unit.resize_mode!r} is not one of sd-webui-controlnet's: Just Resize, "
                         "Crop and Resize, Resize and Fill (or 0, 1, 2)")
    control_mode = CONTROL_MODES.get(unit.control_mode.lower() if isinstance(unit.control_mode, str)
                                     else unit.control_mode) if isinstance(unit.control_mode, (int, str)) else None
    if control_mode is None:
        raise InputError(f"{where}.control_mode {unit.control_mode!r} is not one of sd-webui-controlnet's: Balanced, "
                         "My prompt is more important, ControlNet is more important (or 0, 1, 2)")
    option = unit.hr_option.lower() if isinstance(unit.hr_option, str) else unit.hr_option
    hr_option = HR_OPTIONS.get(option) if isinstance(option, (int, str, type(None))) else None
    if hr_option is None:
        raise InputError(f"{where}.hr_option {unit.hr_option!r} is not one of sd-webui-controlnet's: Both, Low res "
                         "only, High res only (or 0, 1, 2)")
    return mode, control_mode, hr_option


def _unit_image(unit: schemas.ControlNetUnitArgs, pre: Preprocessor, where: str, data: bytes,
                size: tuple[int, int], mode: int, sliders: tuple[float, float],
                max_pixels: int, seed: int | None) -> tuple[bytes, int]:
    """The unit's map as sd-webui-controlnet makes it: the image itself with no preprocessor; a module without a
    resolution (invert, tile_resample, recolor) at the image's size; the others at the processor resolution
    (processor_res, -1 its default 512; a module's fixed one, shuffle's 512, which processor_res does not change;
    or pixel perfect's, from the image's and the generation's sizes, which overrides both, as there). Each pass
    fits it to its size by the resize mode (orchestrator.pipeline.control.control_images). Fitting first would make the
    preprocessor see resize and fill's borders (canny: a frame of edges). A random module draws from numpy `seed`.
    With the resolution used (-1: none)."""
    if pre.name == "none":
        return data, -1
    image = decode_source(data, max_pixels, f"{where}.image")  # upright: pixel perfect reads the size the map sees
    if pre.sizing == "own":  # the extension hides the resolution and ignores it
        return encode_png(map_of(image, pre.name, DEFAULT_RESOLUTION, *sliders, max_pixels, f"{where}.image",
                                 seed)), -1
    if unit.pixel_perfect:
        resolution = pixel_perfect_resolution(*image.size, *size, mode)
    elif pre.resolution:
        resolution = pre.resolution
    else:
        resolution = processor_resolution(unit.processor_res, f"{where}.processor_res")
    return encode_png(map_of(image, pre.name, resolution, *sliders, max_pixels, f"{where}.image", seed)), resolution


@dataclass(frozen=True)
class InitImage:
    """img2img's init image as an enabled unit without an image takes it (sd-webui-controlnet's fallback): fitted by
    AUTOMATIC1111's resize mode, and for an inpaint module with the request's mask, prepared as the extension
    prepares it (read, inverted, blurred: kiln.masks.soft_mask at its own size)."""

    image: bytes
    resize_mode: int  # AUTOMATIC1111's: 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent (just resize)
    mask: bytes = b""  # as sent
    mask_blur: Blur = 4
    invert: bool = False
    only_masked: bool = False  # inpaint_full_res: the units' images are cropped around the mask too
    padding: int = 0  # inpaint_full_res_padding

    def prepared_mask(self, where: str, max_pixels: int) -> bytes:
        size = decode_source(self.image, max_pixels, "init_images[0]").size
        mask = self._prepared
        if mask.size != size:
            raise InputError(f"{where}: an inpaint unit without an image takes the init image and the mask, which "
                             f"must then be the same size; the mask is {mask.width}x{mask.height}, the init image "
                             f"{size[0]}x{size[1]}")
        return encode_png(mask)

    @cached_property
    def _prepared(self) -> Image.Image:
        """The mask as the extension's prepare_mask leaves it, at its own size: inverted, blurred. Made once for all
        the request's units (its bytes were checked against the server's limits as they arrived)."""
        size = decode_source(self.mask, ImageLimits().max_pixels, "mask").size
        return soft_mask(self.mask, *size, self.mask_blur, self.invert, binarize=False)

    def crop(self, data: bytes, mask: bytes, resize: int, size: tuple[int, int], max_pixels: int,
             where: str) -> tuple[bytes, bytes]:
        """A unit's image (and mask) cut as "only masked" cuts the init image (the extension's
        try_crop_image_with_a1111_mask): shaped to the mask's size by the unit's resize mode (AUTOMATIC1111's
        resize_image, Lanczos), the mask's box cut out (kiln.masks.crop_region) and shaped to the generation's size
        by resize and fill. Nothing masked: uncut (the generation inpaints the whole picture)."""
        prepared = self._prepared
        box = crop_region(np.asarray(prepared) > 0, self.padding, *size)
        if box is None:
            return data, mask

        def cut(image: Image.Image) -> bytes:
            return encode_png(shaped(shaped(image, *prepared.size, resize).crop(box), *size, 2))

        alpha = cut(decode_source(mask, max_pixels, f"{where}.mask").getchannel(0)) if mask else b""
        return cut(decode_source(data, max_pixels, f"{where}.image")), alpha


def controlnet_units(scripts: dict, max_pixels: int, width: int, height: int, seed: int | None = None,
                     init: InitImage | None = None, inpaint_blur: float = 7) -> tuple[ControlNetUnit, ...] | None:
    """sd-webui-controlnet's alwayson_scripts.controlnet.args: every enabled unit, in order, its image (img2img's
    `init` image where it has none; txt2img refuses it) fitted to width x height by the unit's resize mode; a random
    module's map drawn from numpy `seed` (numpy_seed); an inpaint module's mask with it; `inpaint_blur`: the
    extension's control_net_inpaint_blur_sigma (inpaint_only's paste-back)."""
    unknown = sorted(k for k in scripts or {} if k.lower() not in ("controlnet", soft.NAME, *builtin_scripts.NAMES))
    if unknown:
        raise InputError(f"alwayson_scripts: {', '.join(unknown)} not available; only controlnet, soft inpainting "
                         "(img2img's) and AUTOMATIC1111's built-in seed, sampler, refiner, comments, extra options "
                         "and hypertile (their values the request's own)")
    section = next((v for k, v in (scripts or {}).items() if k.lower() == "controlnet"), None)
    if section is None:
        return None
    args = section.get("args", []) if isinstance(section, dict) else None
    if not isinstance(args, list):
        raise InputError("alwayson_scripts.controlnet.args must be a list of units")
    try:
        units = [schemas.ControlNetUnitArgs.model_validate(a) for a in args]
    except ValidationError as exc:  # name the fields, not the values
        raise InputError(f"alwayson_scripts.controlnet.args: {short(exc)}") from None
    result = []
    for index, unit in enumerate(units):
        if not unit.enabled:
            continue
        where = f"alwayson_scripts.controlnet.args[{index}]"
        pre = preprocessor(unit.module, f"{where}.module")  # its name or its label
        sliders = pre.slider_values(unit.threshold_a, unit.threshold_b, ("threshold_a", "threshold_b"), f"{where}.")
        resize, control_mode, hr_option = _unit_options(unit, where)
        image, mask = _unit_input(unit, where)
        if image is None:  # the extension's fallback: img2img's init image, by AUTOMATIC1111's resize mode
            if init is None:
                raise InputError(f"{where} is enabled but has no image (image or input_image); only img2img lends "
                                 "its init image to a unit without one")
            data, resize = init.image, FALLBACK_RESIZE[init.resize_mode]
            mask = init.prepared_mask(where, max_pixels) if pre.inpaint and init.mask else b""
        else:
            data = decode_b64_image(image, f"{where}.image", max_pixels)
            mask = _unit_mask(mask, pre, where, data, max_pixels)
        if init is not None and init.only_masked and init.mask and unit.inpaint_crop_input_image:
            data, mask = init.crop(data, mask, resize, (width, height), max_pixels, where)
        if pre.name == "inpaint_only" and init is not None and init.mask:  # the extension's own fallback, as it warns
            pre = preprocessor("inpaint")
        made, resolution = _unit_image(unit, pre, where, data, (width, height), resize, sliders, max_pixels, seed)
        result.append(ControlNetUnit(image=made, resize_mode=resize, module=pre.name, weight=unit.weight,
                                     guidance_start=unit.guidance_start, guidance_end=unit.guidance_end,
                                     threshold_a=sliders[0], threshold_b=sliders[1], processor_res=resolution,
                                     pixel_perfect=unit.pixel_perfect and resolution != -1,
                                     model=unit.model, save_detected_map=unit.save_detected_map,
                                     control_mode=control_mode, hr_option=hr_option, mask=mask,
                                     inpaint_blur=inpaint_blur, region_mask=_region_mask(unit, where, max_pixels),
                                     advanced_weighting=None if unit.advanced_weighting is None
                                     else tuple(unit.advanced_weighting)))
    return tuple(result) or None


# AUTOMATIC1111's resize mode -> the extension's, for the init image a unit takes (its resize_mode_from_value)
FALLBACK_RESIZE = {0: 0, 1: 1, 2: 2, 3: 0}


def _unit_input(unit: schemas.ControlNetUnitArgs, where: str) -> tuple[Any, Any]:
    """The unit's image and mask as sent (base64, or None): `image` (or its older name `input_image`), given alone or
    as the extension's {"image", "mask"} pair; `mask` (or its newer name `mask_image`); a mask given twice is
    refused (the extension takes one and drops the other without a word)."""
    if unit.mask and unit.mask_image:
        raise InputError(f"{where}: mask and mask_image are the same field; send one")
    image = unit.image if unit.image is not None else unit.input_image
    mask = unit.mask or unit.mask_image or None
    if isinstance(image, dict):
        unknown = sorted(set(image) - {"image", "mask"})
        if unknown:
            raise InputError(f"{where}.image: {', '.join(unknown)} is not supported by this server (an image given "
                             "as a dict holds \"image\" and \"mask\")")
        if mask is not None and image.get("mask"):
            raise InputError(f"{where}: a mask in image and in mask (or mask_image); send one")
        mask = mask or image.get("mask") or None
        image = image.get("image")
    return image, mask


def _unit_mask(mask: Any, pre: Preprocessor, where: str, image: bytes, max_pixels: int) -> bytes:
    """A unit's own mask, decoded (base64) and checked: only an inpaint module takes one, and it must be its image's
    size (read as the extension reads it: its first channel, neither inverted nor blurred)."""
    if mask is None:
        return b""
    if not pre.inpaint:
        raise InputError(f"{where}.mask: only the inpaint modules (inpaint_global_harmonious) take a mask, not "
                         f"{pre.name}")
    data = decode_b64_image(mask, f"{where}.mask", max_pixels)
    size, wanted = decode_source(data, max_pixels, f"{where}.mask").size, decode_source(image, max_pixels).size
    if size != wanted:
        raise InputError(f"{where}.mask is {size[0]}x{size[1]}; it must be the image's size, {wanted[0]}x{wanted[1]}")
    return data


def _region_mask(unit: schemas.ControlNetUnitArgs, where: str, max_pixels: int) -> bytes:
    """A unit's effective_region_mask (base64; any size: it is stretched to each residual's), decoded and checked."""
    if unit.effective_region_mask is None:
        return b""
    if not isinstance(unit.effective_region_mask, str):
        raise InputError(f"{where}.effective_region_mask must be a base64 image")
    data = decode_b64_image(unit.effective_region_mask, f"{where}.effective_region_mask", max_pixels)
    decode_source(data, max_pixels, f"{where}.effective_region_mask")  # (a readable image, or the error names it)
    return data


def detect_map(unit: ControlNetUnit, request: Txt2ImgRequest) -> np.ndarray:
    """What a unit gave its ControlNet (the preprocessor's output, or the resized image), as uint8 pixels: the
    "detected map" sd-webui-controlnet appends to the response's images unless control_net_no_detectmap. An inpaint
    unit's is its fitted image with the mask as alpha, 255 where kept and 128 where masked (its
    visualize_inpaint_mask)."""
    if unit.mask or preprocessor(unit.module).inpaint:
        pixels = fitted_map(unit.image, request.width, request.height, unit.resize_mode, unit.mask, inpaint=True)
        return mask_shown(pixels[..., :3], pixels[..., 3])
    pixels = control_image(unit.image, request.width, request.height, unit.preprocessor, unit.threshold_a,
                           unit.threshold_b, unit.resize_mode)
    return np.round(pixels.transpose(1, 2, 0) * 255).astype(np.uint8)


def wants_detect_maps(body: schemas.Txt2ImgBody, options: dict) -> bool:
    """sd-webui-controlnet's control_net_no_detectmap (an option, or this request's override) turns them off."""
    return not body.override_settings.get("control_net_no_detectmap", options["control_net_no_detectmap"])
