"""AUTOMATIC1111's hires fix: a txt2img pass at width x height, its result upscaled (in latent space, or decoded,
upscaled as an image and encoded again), then an img2img pass at the larger size.

What AUTOMATIC1111 does (modules/processing.py, StableDiffusionProcessingTxt2Img), and so what this does:
- the target is width x height x hr_scale, or hr_resize_x/hr_resize_y (one of them keeps the aspect ratio; both:
  the picture is scaled to cover them and the latents are cropped to them, centred);
- the latent modes interpolate the latents (torch's interpolate, with or without antialias); an image upscaler
  resizes the decoded image as AUTOMATIC1111's resize_image does, and the VAE encodes it again;
- the second pass draws new noise from the same seeds at the new size, and runs exactly hr_second_pass_steps (or
  steps) steps of a schedule of int(steps / denoising_strength) (its img2img steps for an explicit step count);
- ControlNet units act in both passes (sd-webui-controlnet's hr_option "Both"; "Low res only" and "High res only"
  in one: ControlNetUnit.scale_at), each on its control image at the pass's size, their guidance windows over each
  pass's steps;
- firstpass_image (AUTOMATIC1111's "Upscale" button under a txt2img result) stands for the first pass, which is then
  not run: an image upscaler takes its pixels, a latent mode the VAE's encoding of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kiln.contract import SDContract
from kiln.errors import InputError
from kiln.imaging import resized_rgb
from kiln.upscale import NO_NETWORKS, Network, UpscaleOptions, upscale_with
from kiln.upscale import plan as plan_upscale
from orchestrator.pipeline.requests import HiresFix, Txt2ImgRequest

if TYPE_CHECKING:
    import torch

# AUTOMATIC1111's latent upscale modes (shared.latent_upscale_modes): torch interpolate's mode and antialias
LATENT_MODES = {
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")  # resize the decoded image ("None": Lanczos, as AUTOMATIC1111)
DEFAULT_UPSCALER = "Latent"  # AUTOMATIC1111's latent_upscale_default_mode, used when hr_upscaler is not given


@dataclass(frozen=True)
class HiresPlan:
    """The sizes of one hires fix, in pixels: what the first pass's result is upscaled to, and the crop after."""

    upscale_to: tuple[int, int]  # (width, height) of the upscaled picture
    truncate: tuple[int, int]  # latent columns and rows cropped off it (hr_resize_x and hr_resize_y both given)
    size: tuple[int, int]  # the second pass's (width, height): the final images'


def plan(request: Txt2ImgRequest, contract: SDContract) -> HiresPlan:
    """AUTOMATIC1111's calculate_target_resolution; the final size must be one the build runs (named if not)."""
    hires, width, height, factor = request.hires, request.width, request.height, contract.vae_scale_factor
    truncate = (0, 0)
    if not hires.resize_x and not hires.resize_y:
        upscale_to = (int(width * hires.scale), int(height * hires.scale))
        asked = f"hr_scale {hires.scale:g}"
    elif not hires.resize_y:
        upscale_to = (hires.resize_x, hires.resize_x * height // width)
        asked = f"hr_resize_x {hires.resize_x}"
    elif not hires.resize_x:
        upscale_to = (hires.resize_y * width // height, hires.resize_y)
        asked = f"hr_resize_y {hires.resize_y}"
    else:
        if width / height < hires.resize_x / hires.resize_y:
            upscale_to = (hires.resize_x, hires.resize_x * height // width)
        else:
            upscale_to = (hires.resize_y * width // height, hires.resize_y)
        truncate = ((upscale_to[0] - hires.resize_x) // factor, (upscale_to[1] - hires.resize_y) // factor)
        asked = f"hr_resize_x/y {hires.resize_x}x{hires.resize_y}"
    size = (upscale_to[0] // factor * factor - truncate[0] * factor,
            upscale_to[1] // factor * factor - truncate[1] * factor)
    multiple = contract.size_multiple
    if max(upscale_to) > contract.max_size or any(side % factor for side in upscale_to) or \
            any(side % multiple or side < contract.min_size for side in size):
        raise InputError(f"{asked} of a {width}x{height} image gives {size[0]}x{size[1]}: the hires pass needs sides "
                         f"that are multiples of {multiple} within the built profile [{contract.min_size}, "
                         f"{contract.max_size}] (upscaled to {upscale_to[0]}x{upscale_to[1]} first, whose sides "
                         f"must be multiples of {factor})")
    contract.check_built_size(*size, f"the hires pass ({asked} of {width}x{height})")
    if truncate != (0, 0):  # the upscaled picture is encoded before the crop
        contract.check_built_size(*upscale_to, f"the hires fix's upscaled picture ({asked} of {width}x{height})")
    return HiresPlan(upscale_to=upscale_to, truncate=truncate, size=size)


def check(request: Txt2ImgRequest, contract: SDContract) -> None:
    """Refuse, by field, a hires fix this server would not run as asked."""
    hires = request.hires
    if not isinstance(hires, HiresFix):
        raise InputError("hires must be a HiresFix")
    valid = (*LATENT_MODES, *IMAGE_UPSCALERS, *contract.upscaler_names)
    if hires.upscaler not in valid:
        raise InputError(f"hr_upscaler {hires.upscaler!r} is not an upscaler of this server; valid: {', '.join(valid)}")
    if not (isinstance(hires.scale, (int, float)) and np.isfinite(hires.scale) and 1 <= hires.scale <= 4):
        raise InputError(f"hr_scale must be in [1, 4], got {hires.scale!r}")
    for name in ("resize_x", "resize_y", "steps"):
        value = getattr(hires, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"hr_{name if name != 'steps' else 'second_pass_steps'} must be a non-negative integer, "
                             f"got {value!r}")
    strength = hires.denoising_strength
    if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
        raise InputError(f"denoising_strength (of the hires pass) must be in (0, 1], got {strength!r}")
    plan(request, contract)


def second_pass_steps(hires: HiresFix, steps: int) -> tuple[int, int]:
    """(schedule length, steps run): AUTOMATIC1111's setup_img2img_steps for an explicit step count."""
    run = hires.steps or steps
    return max(int(run / min(hires.denoising_strength, 0.999)), run), run


def upscale_latents(latents: torch.Tensor, hires: HiresFix, planned: HiresPlan, factor: int) -> torch.Tensor:
    """A latent mode: torch's interpolate to the upscaled size, then the crop."""
    import torch.nn.functional as F

    mode, antialias = LATENT_MODES[hires.upscaler]
    size = (planned.upscale_to[1] // factor, planned.upscale_to[0] // factor)
    return truncate(F.interpolate(latents, size=size, mode=mode, antialias=antialias), planned)


def given_images(request: Txt2ImgRequest) -> np.ndarray:
    """firstpass_image as every image's first pass (uint8 N x H x W x 3): AUTOMATIC1111 takes its pixels as they are
    for an image upscaler (validation made sure it is width x height)."""
    image = resized_rgb(request.hires.first_pass, request.width, request.height, "firstpass_image")
    return np.repeat(np.asarray(image, dtype=np.uint8)[None], request.batch_size, axis=0)


def upscale_images(images: np.ndarray, hires: HiresFix, planned: HiresPlan, max_pixels: int,
                   networks: Mapping[str, Network] = NO_NETWORKS) -> np.ndarray:
    """An image upscaler on the decoded first pass (uint8 N x H x W x 3): AUTOMATIC1111's resize_image (mode 0) with
    that upscaler (its upscale as the extras run it, kiln.upscale; a network of `networks`), then Lanczos to the
    target. Returns pixels in
    [-1, 1], (N, 3, H, W), for the VAE encoder."""
    from PIL import Image

    width, height = planned.upscale_to
    out = []
    for image in images:
        picture = Image.fromarray(image)
        scale = max(width / picture.width, height / picture.height)
        if hires.upscaler != "None" and scale > 1:  # the upscaler's own resize, then Lanczos to a multiple of 8
            options = UpscaleOptions(upscaling_resize=scale, upscaler_1=hires.upscaler)
            picture = upscale_with(picture, hires.upscaler, plan_upscale(picture.width, picture.height, options,
                                                                         max_pixels), networks)
        if picture.size != (width, height):
            picture = picture.resize((width, height), resample=Image.Resampling.LANCZOS)
        out.append(np.asarray(picture, dtype=np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0))
    return np.stack(out)


def truncate(latents: torch.Tensor, planned: HiresPlan) -> torch.Tensor:
    """AUTOMATIC1111's centred crop of the latents to hr_resize_x x hr_resize_y."""
    x, y = planned.truncate
    return latents[:, :, y // 2:latents.shape[2] - (y + 1) // 2, x // 2:latents.shape[3] - (x + 1) // 2]


def info(request: Txt2ImgRequest) -> dict:
    """What the infotext says of the hires fix, by AUTOMATIC1111's names."""
    hires = request.hires
    fields = {"hires_upscaler": hires.upscaler, "denoising_strength": hires.denoising_strength}
    if hires.resize_x or hires.resize_y:
        fields["hires_resize"] = f"{hires.resize_x}x{hires.resize_y}"
    else:
        fields["hires_upscale"] = hires.scale
    if hires.steps:
        fields["hires_steps"] = hires.steps
    if hires.sampler and hires.sampler != request.sampler:
        fields["hires_sampler"] = hires.sampler
    if hires.prompt is not None and hires.prompt != request.prompt:
        fields["hires_prompt"] = hires.prompt
    if hires.negative_prompt is not None and hires.negative_prompt != request.negative_prompt:
        fields["hires_negative_prompt"] = hires.negative_prompt
    return fields
