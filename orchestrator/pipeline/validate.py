"""Input checks, once, with one set of limits: the API, the command line and the library all call these.

Each check raises an InputError (422) naming the field and the bad value before any model runs;
a prompt over its length cap is a TooLargeError (413), an unknown sampler an UnknownSampler (404).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from kiln.contract import SDContract
from kiln.errors import InputError, TooLargeError
from kiln.imaging import header_size
from kiln.lora import split_lora_tags
from kiln.masks import INPAINTING_FILL
from kiln.prompt_schedule import composable
from kiln.prompts import check_prompt_syntax
from orchestrator.pipeline import edit, hires, soft_inpainting, tiles
from orchestrator.pipeline.inpaint import own_size
from orchestrator.pipeline.noise import RANDN_SOURCES
from orchestrator.pipeline.requests import PAD_CONDS, Img2ImgRequest, Txt2ImgRequest
from orchestrator.pipeline.sampling import (
    CHURN,
    SAMPLERS,
    check_discard,
    check_sampler,
    check_sgm,
    img2img_start,
    runs_here,
    schedule,
    schedule_kind,
    split_schedule,
    step_options,
)
from orchestrator.pipeline.seeds import MAX_SEED
from orchestrator.pipeline.sigmas import check_settings
from orchestrator.pipeline.step import guides
from orchestrator.pipeline.unit_checks import check_units
from orchestrator.pipeline.unit_checks import finite as _finite
from orchestrator.pipeline.unit_checks import is_int as _is_int


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, whoever sends it."""

    max_steps: int = 150  # sampling steps of one run (AUTOMATIC1111's UI allows 150)
    max_batch_size: int = 8  # images per run, denoised together
    max_n_iter: int = 16  # runs per job (the API's n_iter), seeds chained
    max_images: int = 16  # batch_size x n_iter
    max_prompt_chars: int = 16384  # per prompt; longer is a 413 before tokenizing
    max_image_pixels: int = 4096 * 4096  # per input image, read from its header before decoding
    max_controlnet_units: int = 4  # ControlNet units per request
    max_mask_blur: int = 64
    # VAE tiling (orchestrator.pipeline.vae_tiles): images above this many pixels are decoded and encoded in tiles
    # unless a request says otherwise; the tile's side in pixels (0: the VAE's own sample size, as diffusers)
    vae_tile_above: int = 1024 * 1024
    vae_tile: int = 0


def check_request(request: Txt2ImgRequest, contract: SDContract, limits: Limits = Limits()) -> None:
    """Raise an InputError naming the bad field of one pipeline run."""
    multiple = contract.size_multiple
    for name in ("prompt", "negative_prompt"):
        _check_prompt(name, getattr(request, name), limits)
    for name in ("width", "height"):
        value = getattr(request, name)
        if not _is_int(value) or value % multiple:
            raise InputError(f"{name} must be a multiple of {multiple}, got {value!r}")
        if not contract.min_size <= value <= contract.max_size:
            raise InputError(f"{name} must be within the built profile [{contract.min_size}, {contract.max_size}], "
                             f"got {value}")
    contract.check_built_size(request.width, request.height, "width x height")
    if contract.static_sizes and getattr(request, "vae_tiling", None):
        raise InputError("vae_tiling on a static build: its VAE runs at the built sizes only, not at a tile's")
    _integer_in("steps", request.steps, 1, limits.max_steps)
    _integer_in("batch_size", request.batch_size, 1, limits.max_batch_size)
    if not _finite(request.cfg_scale) or request.cfg_scale < 1:
        raise InputError(f"cfg_scale must be a finite number >= 1, got {request.cfg_scale!r}")
    if not guides(request):  # unguided: no unconditional rows for AND's parts to be weighed against
        for name, text in (("prompt", request.prompt), ("hr_prompt", getattr(request.hires, "prompt", None))):
            parts = composable(split_lora_tags(text)[0]) if isinstance(text, str) else [("", 1)]
            if len(parts) > 1:
                raise InputError(f"{name}: AND (composable diffusion) weighs each part's guidance; it needs "
                                 "cfg_scale > 1")
            if parts[0][1] != 1:
                raise InputError(f"{name}: it ends in :{parts[0][1]:g}, which AUTOMATIC1111 reads as the prompt's "
                                 "weight (of its guidance: it needs cfg_scale > 1); end the prompt with a comma to "
                                 "keep the number as text")
    _number_in("eta", request.eta, 0, 1)
    for name in ("seed", "subseed"):
        value = getattr(request, name)
        if not _is_int(value) or not -1 <= value <= MAX_SEED:
            raise InputError(f"{name} must be -1 (random) or in [0, 2^32 - 1], got {value!r}")
    _number_in("subseed_strength", request.subseed_strength, 0, 1)
    _integer_in("eta_noise_seed_delta (ENSD)", request.eta_noise_seed_delta, 0, MAX_SEED)
    if request.randn_source not in RANDN_SOURCES:
        raise InputError(f"randn_source (RNG) must be one of {', '.join(RANDN_SOURCES)}, got {request.randn_source!r}")
    if request.seed_resize_from is not None:
        _check_seed_resize(request.seed_resize_from, contract.vae_scale_factor, limits)
    _number_in("s_min_uncond", request.s_min_uncond, 0, 1000)  # a sigma: SD 1.x's largest is 14.6
    _number_in("extra_noise (img2img_extra_noise)", request.extra_noise, 0, 100)  # a sigma's scale, as above
    if request.extra_noise and not isinstance(request, Img2ImgRequest) and request.hires is None:
        raise InputError("extra_noise (img2img_extra_noise) is added to img2img's start or the hires fix's second "
                         "pass; txt2img without the hires fix has neither")
    if not isinstance(request.use_old_scheduling, bool):
        raise InputError(f"use_old_scheduling must be true or false, got {request.use_old_scheduling!r}")
    if request.pad_conds not in PAD_CONDS:
        raise InputError(f"pad_conds must be one of {', '.join(PAD_CONDS)}, got {request.pad_conds!r}")
    if not isinstance(request.sgm_noise_multiplier, bool):
        raise InputError(f"sgm_noise_multiplier must be true or false, got {request.sgm_noise_multiplier!r}")
    if not isinstance(request, Img2ImgRequest):  # txt2img's start (img2img's is the init image's, as there)
        check_sgm(request.sampler, request.sgm_noise_multiplier)
    if not isinstance(request.discard_penultimate_sigma, bool):
        raise InputError(f"discard_penultimate_sigma (always_discard_next_to_last_sigma) must be true or false, got "
                         f"{request.discard_penultimate_sigma!r}")
    _check_schedule(request.sampler, request.steps, contract, request.sigma_settings,
                    request.discard_penultimate_sigma)
    _check_churn(request)
    _number_in("eta_ancestral", request.eta_ancestral, 0, 1)
    if request.hires is not None:
        _check_hires(request, contract, limits)
    if not _is_int(request.clip_skip) or not 1 <= request.clip_skip <= max(1, contract.clip_skip_layers):
        served = f"1 to {contract.clip_skip_layers}" if contract.clip_skip_layers else \
            "1 only (this build's text encoder serves its last layer: rebuild with `kiln build sd` for clip skip)"
        raise InputError(f"clip_skip (CLIP_stop_at_last_layers) must be {served}, got {request.clip_skip!r}")
    init = isinstance(request, Img2ImgRequest)
    inpainting = init and request.inpainting
    check_units(request.controlnet_units, contract, limits.max_controlnet_units, inpainting)
    if init:
        if not request.init_image:
            raise InputError("init_image is empty")
        _number_in("denoising_strength", request.denoising_strength, 0, 1)
        _number_in("initial_noise_multiplier", request.initial_noise_multiplier, 0, 2)
        if request.latent_resize:
            _check_latent_resize(request, contract)
        if request.sd_upscale is not None:
            tiles.check(request, contract, limits.max_image_pixels)
        blurs = request.mask_blur if isinstance(request.mask_blur, tuple) else (request.mask_blur,)
        if len(blurs) not in (1, 2):
            raise InputError(f"mask_blur must be one radius or (x, y), got {request.mask_blur!r}")
        for axis, blur in zip(("", "_x", "_y")[len(blurs) - 1:], blurs):
            _integer_in(f"mask_blur{axis}", blur, 0, limits.max_mask_blur)
        _integer_in("mask_resize", request.mask_resize, 0, 3)  # AUTOMATIC1111's resize_mode
        if not isinstance(request.mask_round, bool):
            raise InputError(f"mask_round must be true or false, got {request.mask_round!r}")
        if request.inpainting_fill not in INPAINTING_FILL:
            valid = ", ".join(f"{k} ({v})" for k, v in INPAINTING_FILL.items())
            raise InputError(f"inpainting_fill must be one of {valid}, got {request.inpainting_fill!r}")
        if not _is_int(request.inpaint_full_res_padding) or request.inpaint_full_res_padding < 0:
            raise InputError(f"inpaint_full_res_padding must be a non-negative integer, "
                             f"got {request.inpaint_full_res_padding!r}")
        soft_inpainting.check(request)
        _check_latent_mask(request)
        if request.color_target and not request.color_correction:
            raise InputError("color_target is what color_correction matches the images' colours to; "
                             "color_correction is off")
    _check_intermediates(request)
    _number_in("inpainting_mask_weight", request.inpainting_mask_weight, 0, 1)
    if request.inpainting_mask_weight != 1 and not contract.inpainting_unet:
        raise InputError(f"inpainting_mask_weight (Conditional mask weight) weighs the masked image a 9-channel "
                         f"inpainting UNet takes; checkpoint {contract.title!r} has no such UNet (1, the default, "
                         "is accepted)")
    if request.inpainting_mask_weight != 1 and not init and request.hires is None:
        raise InputError("inpainting_mask_weight (Conditional mask weight) weighs img2img's, inpainting's or the hires "
                         "pass's masked image; txt2img's is all masked whatever it is (1, the default, is accepted)")
    edit.check(request, contract)
    start = img2img_start(request.sampler, request.steps, request.denoising_strength) if init else None
    # at strength 0 img2img runs none on purpose (the init image through the VAE); inpainting needs one to blend
    if init and (inpainting or request.denoising_strength > 0) and _runs_none(request.sampler, request.steps, start,
                                                                              contract):
        raise InputError(f"{'inpainting' if inpainting else 'img2img'} needs at least one denoising step: "
                         f"{request.sampler} runs none at steps {request.steps} x denoising_strength "
                         f"{request.denoising_strength}")
    if not init and getattr(request.hires, "first_pass", None) is None \
            and _runs_none(request.sampler, request.steps, None, contract):
        raise InputError(f"steps: {request.sampler} runs no denoising step at steps {request.steps} (AUTOMATIC1111's "
                         "DDIM and PLMS call the model at every step of their ladder but the last): ask for 2 or more")


def _check_schedule(name: str, steps: int, contract: SDContract, settings: tuple[float, float, float],
                    discard: bool) -> None:
    """A known sampler, on a schedule type that takes the schedule settings given (sigmas.check_settings), that can
    discard its next-to-last sigma if asked (sampling.check_discard); where kiln computes the sigmas, they are
    computed now: a range upside down, or a step count AUTOMATIC1111's DDIM type would run as another, is refused
    before the job is queued."""
    check_settings(schedule_kind(name), settings, name)
    check_discard(name, discard)
    if check_sampler(name).sigma_schedule is not None or any(settings):
        schedule(name, contract.scheduler_config, steps, 0, family=contract.family, settings=settings,
                 discard=discard)


def _runs_none(name: str, steps: int, start: int | None, contract: SDContract) -> bool:
    """Whether `steps` steps of the sampler from `start` (img2img_start; None: from noise) call the model not once
    (AUTOMATIC1111's DDIM and PLMS: orchestrator.pipeline.compvis.first_call), or take no step: DPM fast and DPM
    adaptive run from the start's sigma to the schedule's last above 0, one sigma where one step is left
    (AUTOMATIC1111 fails there)."""
    if not check_sampler(name).compvis:
        least = 2 if start is not None and split_schedule(name)[0] in ("DPM fast", "DPM adaptive") else 1
        return start is not None and steps - start < least
    from orchestrator.pipeline.compvis import first_call  # torch and diffusers: only for these samplers

    try:
        return first_call(steps, start, contract.scheduler_config.get("num_train_timesteps", 1000))[0] < 1
    except ValueError as exc:
        raise InputError(f"steps: {name} cannot run {steps} steps ({exc})") from None


def check_job(request: Txt2ImgRequest, n_iter: int, limits: Limits = Limits()) -> None:
    """What a queued job adds to one run: `n_iter` runs, and the images of all of them."""
    _check_runs(request.batch_size, n_iter, limits)


def check_counts(batch_size, n_iter, limits: Limits = Limits()) -> None:
    """A request's batch_size and n_iter, each and together (a script that makes its own runs, checked before any)."""
    _integer_in("batch_size", batch_size, 1, limits.max_batch_size)
    _check_runs(batch_size, n_iter, limits)


def _check_runs(batch_size, n_iter, limits: Limits) -> None:
    _integer_in("n_iter", n_iter, 1, limits.max_n_iter)
    images = batch_size * n_iter if _is_int(batch_size) else 0
    if images > limits.max_images:
        raise InputError(f"batch_size x n_iter = {images} images exceeds the limit of {limits.max_images} "
                         "per request")


def _check_prompt(name: str, text, limits: Limits) -> None:
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string")
    if len(text) > limits.max_prompt_chars:
        raise TooLargeError(f"{name} of {len(text)} characters exceeds the {limits.max_prompt_chars}-character limit")
    if name in ("prompt", "hr_prompt"):  # its LoRA tags leave it (the pipeline applies them); not the negative's
        text = split_lora_tags(text)[0]
    check_prompt_syntax(text, name, parts=name in ("prompt", "hr_prompt"))  # never taken as text


def _check_intermediates(request: Txt2ImgRequest) -> None:
    """The images kept from before a step (save_images_before_*, the mask pictures') name steps this request runs."""
    inpainting = bool(getattr(request, "mask", b""))
    runs = {"highres-fix": request.hires is not None, "color-correction": getattr(request, "color_correction", False),
            "mask": inpainting, "overlay": inpainting}
    if not isinstance(request.intermediates, tuple) or set(request.intermediates) - set(runs):
        raise InputError(f"intermediates must be a tuple of {', '.join(runs)}, got {request.intermediates!r}")
    if request.intermediates and getattr(request, "sd_upscale", None) is not None:
        raise InputError("intermediates: the SD upscale script's tiles keep no images from before a step")
    if not all(runs[name] for name in request.intermediates):
        raise InputError(f"intermediates {request.intermediates!r}: one keeps the images before a step this request "
                         "does not run")


def _check_latent_mask(request: Img2ImgRequest) -> None:
    """A latent mask (AUTOMATIC1111's latent_mask) changes an inpainting's blend: it needs the mask, and a whole
    picture of width x height (not "only masked"'s crop, not soft inpainting's own blend)."""
    if not request.latent_mask:
        return
    for needed, why in ((request.inpainting, "needs a mask: it changes inpainting's blend"),
                        (not request.inpaint_full_res, "with inpaint_full_res (only masked) is not supported: it "
                                                       "inpaints a crop"),
                        (request.soft_inpainting is None, "with soft inpainting is not supported: it blends by the "
                                                          "mask's grey levels")):
        if not needed:
            raise InputError(f"latent_mask {why}")
    width, height = header_size(request.latent_mask, "latent_mask")
    if (width, height) != (request.width, request.height):
        raise InputError(f"latent_mask is {width}x{height}; it must be the image's size, {request.width}x"
                         f"{request.height}")


def _check_latent_resize(request: Img2ImgRequest, contract: SDContract) -> None:
    """resize_mode 3 encodes the init image at its own size: that size must be one the VAE encoder was built for."""
    if request.inpainting:
        raise InputError("resize_mode 3 (latent upscale) with a mask is not supported; 0, 1 and 2 are")
    width, height = own_size(request.init_image)
    if not (contract.min_size <= width <= contract.max_size and contract.min_size <= height <= contract.max_size):
        raise InputError(f"resize_mode 3 encodes the init image at its own size, {width}x{height} (sides down to a "
                         f"multiple of 8), outside the built profile [{contract.min_size}, {contract.max_size}]; "
                         "resize it first or use resize_mode 0")
    contract.check_built_size(width, height, "resize_mode 3 encodes the init image at its own size, which")


def _check_churn(request: Txt2ImgRequest) -> None:
    """s_churn, s_tmin, s_tmax, s_noise: numbers, and other than their defaults only for samplers that take them."""
    for name, default in CHURN.items():
        value = getattr(request, name)
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value) or value < 0 or \
                (math.isinf(value) and name != "s_tmax"):
            raise InputError(f"{name} must be a non-negative number, got {value!r}")
        if value != default:
            for sampler in request.samplers:
                if name not in step_options(sampler):
                    takers = ", ".join(n for n, known in SAMPLERS.items()
                                       if runs_here(known) and name in step_options(n))
                    raise InputError(f"{name} {value!r}: the {sampler} sampler has no churn (samplers that take it: "
                                     f"{takers})")


def _check_hires(request: Txt2ImgRequest, contract: SDContract, limits: Limits) -> None:
    if isinstance(request, Img2ImgRequest):
        raise InputError("the hires fix (enable_hr) is txt2img's; img2img has none")
    fix = request.hires
    for name in ("prompt", "negative_prompt"):
        if getattr(fix, name, None) is not None:
            _check_prompt(f"hr_{name}", getattr(fix, name), limits)
    if getattr(fix, "sampler", None) is not None:
        check_sampler(fix.sampler)
    hires.check(request, contract)
    _integer_in("hr_second_pass_steps", fix.steps, 0, limits.max_steps)
    total, run = hires.second_pass_steps(fix, request.steps)
    sampler = getattr(fix, "sampler", None) or request.sampler
    _check_schedule(sampler, total, contract, request.sigma_settings, request.discard_penultimate_sigma)
    if _runs_none(sampler, total, total - run, contract):
        raise InputError(f"hr_second_pass_steps: {sampler} runs no denoising step in the second pass at {run} steps "
                         "(AUTOMATIC1111's DDIM and PLMS run N - 2 there, DPM fast N - 1): ask for 3 or more")
    if getattr(fix, "first_pass", None) is not None:
        if not isinstance(fix.first_pass, bytes) or not fix.first_pass:
            raise InputError("firstpass_image must be an encoded image (bytes)")
        size = header_size(fix.first_pass, "firstpass_image", limits.max_image_pixels)
        if size != (request.width, request.height):
            raise InputError(f"firstpass_image is {size[0]}x{size[1]}, not the request's width x height "
                             f"({request.width}x{request.height}): it stands for the first pass, which is that size")


def _check_seed_resize(size, scale_factor: int, limits: Limits) -> None:
    """Resize seed from: (width, height) in pixels, at least a latent pixel each, and no more pixels than an input
    image may have (the noise of that size is drawn)."""
    if not isinstance(size, tuple) or len(size) != 2 or not all(_is_int(v) and v >= scale_factor for v in size):
        raise InputError(f"seed_resize_from must be (width, height), each at least {scale_factor} pixels, got "
                         f"{size!r}")
    if size[0] * size[1] > limits.max_image_pixels:
        raise InputError(f"seed_resize_from {size[0]}x{size[1]} is more than this server's "
                         f"{limits.max_image_pixels} pixels")


def _integer_in(name: str, value, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {value!r}")


def _number_in(name: str, value, low: float, high: float) -> None:
    if not _finite(value) or not low <= value <= high:
        raise InputError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
