"""What a caller asks the pipeline for, and what it gets back, with AUTOMATIC1111's field meanings."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kiln.errors import KilnError


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet conditioning, as sd-webui-controlnet's unit describes it."""

    image: bytes  # the control image (an edge map, or a photo with module="canny")
    module: str = "none"  # preprocessor: none, or one of kiln.preprocessors' (canny, scribble_xdog, ...)
    weight: float = 1.0  # conditioning scale
    guidance_start: float = 0.0  # fraction of the steps where the ControlNet starts acting
    guidance_end: float = 1.0  # ... and where it stops
    # the module's sliders (sd-webui-controlnet's threshold_a and threshold_b: canny's low and high thresholds, on
    # 0-255 intensities; a blur's sigma; ...); -1 their defaults, and for a module without that slider
    threshold_a: float = -1
    threshold_b: float = -1
    model: str | None = None  # which of the build's ControlNets, by name ("name [hash]" too); None: the first
    save_detected_map: bool = True  # the API returns the unit's preprocessed image after the images (the extension's)
    # sd-webui-controlnet's control_mode: 0 Balanced, 1 My prompt is more important (soft injection: residual i
    # x 0.825^(12 - i), the high-resolution ones weakest), 2 ControlNet is more important (soft, and no residuals on
    # the unconditional rows); orchestrator.pipeline.control
    control_mode: int = 0
    second_pass: bool = False  # set for the hires fix's second pass: canny soft-injects there (the extension's)
    # sd-webui-controlnet's hr_option: the passes the unit acts in, 0 Both, 1 Low res only (not the hires fix's
    # second pass), 2 High res only (that pass alone: without the hires fix, none), as its disabled_by_hr_option
    hr_option: int = 0
    # sd-webui-controlnet's resize mode (0 just resize, 1 crop and resize, 2 resize and fill) for the API's units:
    # the image is then the unit's map already (its module's output at the processor resolution, or the image itself
    # with none), fitted to each pass's size as the extension fits it (kiln.controlmaps). None: kiln's own units,
    # whose module runs on the image at each pass's size (a plain resize, as diffusers')
    resize_mode: int | None = None
    # for the infotext: the processor resolution the API's unit made its map at (-1: none, or kiln's own unit), and
    # whether pixel perfect chose it
    processor_res: int = -1
    pixel_perfect: bool = False
    # an inpaint module's mask (an encoded image of the image's size, white: inpaint; its first channel is read): fitted
    # with the image and binarized, the masked pixels -1 for the ControlNet (kiln.control.inpaint_hint)
    mask: bytes = b""
    # inpaint_only's paste-back: the mask dilated and box-blurred by this many pixels (sd-webui-controlnet's
    # control_net_inpaint_blur_sigma, a box despite its name; orchestrator.pipeline.restore)
    inpaint_blur: float = 7
    # sd-webui-controlnet's effective_region_mask: an encoded image (its first channel read, /255) by which every
    # residual is multiplied, stretched to the residual's size (bilinear), as its apply_effective_region_mask
    region_mask: bytes = b""
    # its advanced_weighting: residual i x advanced_weighting[i], in place of the weight and any soft injection
    advanced_weighting: tuple[float, ...] | None = None

    @property
    def preprocessor(self) -> str:
        """The module still to run on the image: none where the image is its map already."""
        return "none" if self.resize_mode is not None else self.module

    def scale_at(self, index: int, total: int) -> float:
        """diffusers' controlnet_keep: the unit acts on steps inside [guidance_start, guidance_end], in the passes its
        hr_option names (with advanced_weighting, the scales are its own: 1 here)."""
        outside = index / total < self.guidance_start or (index + 1) / total > self.guidance_end
        off = self.hr_option == (1 if self.second_pass else 2)
        return 0.0 if outside or off else 1.0 if self.advanced_weighting is not None else float(self.weight)


@dataclass(frozen=True)
class HiresFix:
    """AUTOMATIC1111's hires fix (its hr_* fields): the txt2img result upscaled, then redrawn by an img2img pass."""

    scale: float = 2.0  # hr_scale: the second pass's size, as a multiple of width x height ...
    resize_x: int = 0  # ... or hr_resize_x / hr_resize_y (0: from the other, keeping the aspect ratio)
    resize_y: int = 0
    upscaler: str = "Latent"  # a latent mode ("Latent", "Latent (bicubic)", ...) or an image upscaler ("Lanczos")
    steps: int = 0  # hr_second_pass_steps: steps the second pass runs; 0: the request's steps
    denoising_strength: float = 0.75  # how much the second pass redraws
    prompt: str | None = None  # hr_prompt; None: the request's prompt
    negative_prompt: str | None = None  # hr_negative_prompt; None: the request's
    sampler: str | None = None  # hr_sampler_name; None: the request's sampler
    # firstpass_image: the first pass's result, given (an encoded image of width x height); its steps are not run
    first_pass: bytes | None = None


@dataclass(frozen=True)
class Refiner:
    """AUTOMATIC1111's refiner: another checkpoint of the same latent space (SDXL's refiner, or any) takes over the
    denoising once `switch_at` of it is done, by noise level (AUTOMATIC1111's default, as diffusers' denoising_end):
    from the first step whose timestep t has (999 - t) / 1000 >= switch_at, the same sampler and latents go on with
    its UNet and its own encoding of the prompts."""

    checkpoint: str  # the checkpoint's name or title (AUTOMATIC1111's refiner_checkpoint)
    switch_at: float = 0.8  # refiner_switch_at: 0 (the refiner from the start) to 1 (never)

    @classmethod
    def asked(cls, checkpoint: str | None, switch_at: float | None) -> Refiner | None:
        """The refiner AUTOMATIC1111's refiner_checkpoint and refiner_switch_at ask for (its own names for none;
        switch_at's default 0.8), or None."""
        if checkpoint in (None, "", "None", "none"):
            return None
        return cls(checkpoint, 0.8 if switch_at is None else switch_at)


PAD_CONDS = ("off", "empty_chunks", "last_vector")  # Txt2ImgRequest.pad_conds


@dataclass(frozen=True)
class Txt2ImgRequest:
    """One txt2img job, with AUTOMATIC1111's field meanings."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    cfg_scale: float = 7.0  # 1 = no classifier-free guidance (no negative branch)
    seed: int = -1  # -1: a random seed, reported in the result
    width: int = 512
    height: int = 512
    batch_size: int = 1
    eta: float = 0.0  # DDIM's eta (other samplers ignore it)
    # k-diffusion's eta (AUTOMATIC1111's eta_ancestral): how much of their noise Euler a and the DPM++ SDE samplers
    # add each step (0: none, Euler's, DPM-Solver++(2S)'s and DPM++ 2M's steps); the others add no noise of their own
    eta_ancestral: float = 1.0
    controlnet: ControlNetUnit | tuple[ControlNetUnit, ...] | None = None  # one unit, or several (summed residuals)
    subseed: int = -1  # variation seed (AUTOMATIC1111): its noise is mixed in by subseed_strength
    subseed_strength: float = 0.0  # 0: the seed's noise alone; 1: the subseed's alone
    # AUTOMATIC1111's "Resize seed from" (seed_resize_from_w, _h): the noise this seed gives at that size (width,
    # height in pixels) is kept at the centre of the image's, so that a seed keeps its composition at another size
    seed_resize_from: tuple[int, int] | None = None
    # AUTOMATIC1111's eta_noise_seed_delta (ENSD): after the initial noise, the samplers' own noise (ancestral,
    # churn; not the SDE samplers' Brownian trees, seeded by the seeds) comes from generators seeded seed + this; 0:
    # from the seed's generator, drawn on
    eta_noise_seed_delta: int = 0
    # AUTOMATIC1111's randn_source (orchestrator.pipeline.noise.RANDN_SOURCES): "CPU", torch's CPU generators
    # (diffusers' noise); "GPU" and "NV", the numbers torch draws on an NVIDIA GPU, on any machine
    randn_source: str = "CPU"
    clip_skip: int = 1  # AUTOMATIC1111's CLIP_stop_at_last_layers: the text encoder layer, counted from the end
    # Karras et al.'s stochastic churn, for the samplers that take it (Euler: diffusers' EulerDiscreteScheduler, as
    # k-diffusion's sample_euler in AUTOMATIC1111): noise added at sigmas in [s_tmin, s_tmax], scaled by s_noise
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    # AUTOMATIC1111's "skip negative prompt" (NGMS): on every other step whose sigma is below this, the unconditional
    # half is not run and the step takes the prompt's prediction alone; 0: never
    s_min_uncond: float = 0.0
    # AUTOMATIC1111's schedule settings sigma_min and sigma_max ("Schedule min/max sigma": the range the schedule type
    # spans; 0: the model's) and rho ("Schedule rho": Karras's and Polyexponential's curve; 0: the type's own), for
    # the types that take them (orchestrator.pipeline.sigmas.check_settings)
    schedule_sigma_min: float = 0.0
    schedule_sigma_max: float = 0.0
    schedule_rho: float = 0.0
    # AUTOMATIC1111's always_discard_next_to_last_sigma: the k-diffusion samplers run the sigmas of one step more,
    # the last above 0 left out (as DPM++ 3M SDE does always; sampling.check_discard)
    discard_penultimate_sigma: bool = False
    # AUTOMATIC1111's sgm_noise_multiplier: a txt2img pass's k-diffusion sampler starts at noise x sqrt(1 +
    # sigma_max^2), not noise x sigma_max (sampling.initial_noise_scale); img2img and the hires pass as they are
    sgm_noise_multiplier: bool = False
    # AUTOMATIC1111's img2img_extra_noise ("Extra noise"): img2img's start, and the hires fix's second pass, get the
    # same noise again times this (inpaint.noised); 0 adds none
    extra_noise: float = 0.0
    # AUTOMATIC1111's inpainting_mask_weight ("Conditional mask weight"): how much of the masked area a 9-channel
    # inpainting UNet's masked image hides (its lerp from the image to the masked image; without a mask, img2img and
    # the hires pass, all of the image is masked); 1 hides all of it. txt2img's first pass takes none (all hidden).
    inpainting_mask_weight: float = 1.0
    # Where the negative prompt and the prompt differ in length (chunks of 75 tokens): "off", AUTOMATIC1111's default,
    # runs them in UNet calls of their own; "empty_chunks" pads the shorter with the empty prompt's chunks (its
    # pad_cond_uncond, "Pad conds"); "last_vector" pads the negative prompt with its last vector, or cuts it
    # (pad_cond_uncond_v0, "Pad conds v0"). Padding makes one UNet call of both (as fast on a CPU:
    # benchmarks/prompts.py) and a slightly other image.
    pad_conds: str = "off"
    # AUTOMATIC1111's use_old_scheduling ("Old prompt editing timelines", its timelines before 1.8): in [a:b:N], N
    # under 1 is a fraction of the steps, any other N a step, and the hires fix's second pass runs the first's again
    use_old_scheduling: bool = False
    hires: HiresFix | None = None  # txt2img only: the hires fix's second pass
    vae: str | None = None  # AUTOMATIC1111's sd_vae: one of the build's VAEs by name; None: the checkpoint's own
    tiling: bool = False  # AUTOMATIC1111's tiling: seamless images (circular padding in the UNet and the VAE)
    vae_tiling: bool | None = None  # VAE decode/encode in tiles (vae_tiles); None: above Limits.vae_tile_above pixels
    refiner: Refiner | None = None  # another checkpoint finishing the denoising (run with Pipeline.generate's refiner)
    # AUTOMATIC1111's save_images_before_highres_fix and save_images_before_color_correction: the images as they were
    # before the hires fix ("highres-fix": its first pass, decoded) and before img2img's colour correction
    # ("color-correction": with the overlay); for inpainting's mask pictures (its save_mask, return_mask_composite,
    # ...) the images before the init image is pasted over them ("overlay") and the mask that pastes it ("mask": its
    # mask_for_overlay, (N, H, W)); kept in GenerationResult.before
    intermediates: tuple[str, ...] = ()

    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers of its passes, sorted (the hires fix's may be another)."""
        return tuple(sorted({self.sampler, getattr(self.hires, "sampler", None) or self.sampler}))

    @property
    def sigma_settings(self) -> tuple[float, float, float]:
        return self.schedule_sigma_min, self.schedule_sigma_max, self.schedule_rho

    @property
    def controlnet_units(self) -> tuple[ControlNetUnit, ...]:
        if self.controlnet is None:
            return ()
        return (self.controlnet,) if isinstance(self.controlnet, ControlNetUnit) else tuple(self.controlnet)


@dataclass(frozen=True)
class SDUpscale:
    """AUTOMATIC1111's "SD upscale" img2img script: script_args [_, overlap, upscaler, scale_factor]."""

    overlap: int = 64  # pixels two neighbouring tiles share, blended
    upscaler: str = "None"  # None (the image as it is), Lanczos, Nearest
    scale: float = 2.0  # the upscaler's factor (None ignores it, as AUTOMATIC1111 does)


@dataclass(frozen=True)
class SoftInpainting:
    """AUTOMATIC1111's Soft inpainting (its built-in always-on script), in its order and with its defaults, ints
    where its are (the infotext writes the numbers as given) (orchestrator.pipeline.soft_inpainting says what each
    does)."""

    schedule_bias: float = 1  # mask_blend_power: the mask's exponent grows with sigma to this power
    preservation_strength: float = 0.5  # mask_blend_scale: ... times this
    transition_contrast_boost: float = 4  # inpaint_detail_preservation: the blended magnitudes' power
    mask_influence: float = 0  # composite_mask_influence: how much the mask biases the difference threshold
    difference_threshold: float = 0.5  # composite_difference_threshold: the latent change at which 50% is new
    difference_contrast: float = 2  # composite_difference_contrast: how sharp that transition is


@dataclass(frozen=True)
class Img2ImgRequest(Txt2ImgRequest):
    """img2img: the init image is encoded, noised to the step `denoising_strength` selects, then denoised."""

    init_image: bytes = b""  # encoded image (PNG/JPEG/...); resized to width x height ("just resize")
    denoising_strength: float = 0.75  # 0: the init image back; 1: all steps, from the image plus the whole noise
    mask: bytes = b""  # inpainting: white = repaint, black = keep (empty: plain img2img)
    # AUTOMATIC1111's latent_mask (its Poor man's outpainting sets one): what the latents are blended by and the fill
    # paints by, as given (width x height, white = repaint; not blurred, inverted or shaped); empty: the mask. The
    # mask still makes the overlay and a 9-channel UNet's mask.
    latent_mask: bytes = b""
    # Gaussian blur radius applied to the mask first (AUTOMATIC1111's default 4), or (x, y): mask_blur_x/y
    mask_blur: int | tuple[int, int] = 4
    inpainting_mask_invert: bool = False  # repaint the black part instead
    # AUTOMATIC1111's mask_round: a partly transparent mask's alpha binarized at 128, the latent mask rounded, and a
    # 9-channel UNet's mask rounded (its default); false keeps each of them soft
    mask_round: bool = True
    # AUTOMATIC1111's resize_mode for the mask, after its blur (kiln.masks.soft_mask): the API shapes the init image
    # by the same mode before the request (kiln.masks.resize_init_image)
    mask_resize: int = 0
    # What the masked area starts from (AUTOMATIC1111's names): 0 fill (the surrounding colours, blurred in),
    # 1 original, 2 latent noise, 3 latent nothing (zeros), at every denoising strength (as AUTOMATIC1111).
    inpainting_fill: int = 1
    overlay: bool = False  # paste the init image back outside the (blurred) mask, as AUTOMATIC1111 finishes
    # AUTOMATIC1111's img2img_color_correction (kiln.color_correction): each image's colours matched to the init
    # image's as the start encodes it (resized, cropped, filled), before the overlay; or to `color_target` (encoded),
    # where given (its Loopback script: the first loop's init image, for every loop)
    color_correction: bool = False
    color_target: bytes = b""
    # AUTOMATIC1111's "only masked": inpaint a crop around the mask (plus padding, widened to width:height)
    # at width x height, then scale it back into the init image, which keeps its own size.
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 0
    initial_noise_multiplier: float = 1.0  # AUTOMATIC1111's: the noise the init image is noised with, scaled
    # AUTOMATIC1111's resize_mode 3 ("just resize (latent upscale)"): the init image is encoded at its own size (to
    # a multiple of 8 below), and its latents are resized (bilinear) to width x height
    latent_resize: bool = False
    sd_upscale: SDUpscale | None = None  # the SD upscale script: tiles of width x height redrawn one by one
    # instruct-pix2pix's image guidance (AUTOMATIC1111's Image CFG scale; orchestrator.pipeline.edit): None or 1, the
    # image on every row and plain guidance; other values guide on the image too (an edit checkpoint's only)
    image_cfg_scale: float | None = None
    # AUTOMATIC1111's Soft inpainting: the mask's grey levels blend the init latents in at every step, and the
    # result is composited with the init image where it changed little (needs mask_round false, as that sets it)
    soft_inpainting: SoftInpainting | None = None

    @property
    def inpainting(self) -> bool:
        return bool(self.mask)


@dataclass
class GenerationResult:
    images: np.ndarray  # (N, H, W, 3) uint8
    seeds: list[int]
    info: dict = field(default_factory=dict)
    masks: list | None = None  # soft inpainting's composite masks, one per image ("L", 255 = generated)
    before: dict[str, np.ndarray] = field(default_factory=dict)  # the request's intermediates, one per image each


class Cancelled(KilnError):
    """The caller cancelled the job between two denoising steps."""


ProgressCallback = Callable[[int, int, np.ndarray], None]  # (step done, total steps, current latents)
