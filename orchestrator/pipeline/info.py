"""What a generation's images say about their run: AUTOMATIC1111's infotext fields, and the API's info."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from kiln.masks import blur_radius
from kiln.prompt_schedule import schedule
from orchestrator.pipeline import hires
from orchestrator.pipeline.control import CONTROL_MODES, HR_OPTIONS
from orchestrator.pipeline.requests import Img2ImgRequest, Txt2ImgRequest
from orchestrator.pipeline.sampling import CHURN, check_discard, check_sgm, editing_steps, step_options
from orchestrator.pipeline.seeds import Seeds
from orchestrator.pipeline.soft_inpainting import ENABLED_LABEL, LABELS

if TYPE_CHECKING:
    from orchestrator.pipeline.pipeline import Pipeline


def run_info(pipeline: Pipeline, request: Txt2ImgRequest, seeding: Seeds, stopped_at: int | None,
             padded: bool = False) -> dict:
    """What the images' infotext and the API's info say about the run (`padded`: padding made the negative prompt
    and the prompt one length)."""
    contract, seeds = pipeline.contract, seeding.seeds
    info = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "steps": request.steps,
            "sampler": request.sampler, "cfg_scale": request.cfg_scale, "seed": seeds[0], "all_seeds": seeds,
            "width": request.width, "height": request.height, "model": contract.model_name,
            "model_hash": contract.model_hash or None}
    if request.clip_skip != 1:
        info["clip_skip"] = request.clip_skip
    if (vae := contract.vae(request.vae)) is not None:  # AUTOMATIC1111 names a chosen VAE in the infotext
        info |= {"vae": vae.name, "vae_hash": vae.short_hash or None}
    if request.tiling:
        info["tiling"] = True
    if padded:  # AUTOMATIC1111's "Pad conds" or "Pad conds v0"
        info["pad_conds"] = request.pad_conds
    hashes = [pipeline.lora_set(request.prompt)[1].hashes]
    if request.hires is not None and request.hires.prompt is not None:
        hashes.append(pipeline.lora_set(request.hires.prompt)[1].hashes)
    if any(hashes):  # AUTOMATIC1111's "Lora hashes": each file once
        info["lora_hashes"] = ", ".join(dict.fromkeys(h for part in hashes for h in part.split(", ") if h))
    if request.hires is not None:
        info |= hires.info(request)
    if seeding.subseeds is not None:
        info |= {"subseed": seeding.subseeds[0], "all_subseeds": seeding.subseeds, "subseed_strength": seeding.strength}
    if request.seed_resize_from is not None:
        info["seed_resize_from"] = "{}x{}".format(*request.seed_resize_from)
    if seeding.delta_used:  # AUTOMATIC1111 names ENSD where the sampler drew its noise from it
        info["ensd"] = seeding.delta
    if request.randn_source != "GPU":  # AUTOMATIC1111 names any source but its default
        info["rng"] = request.randn_source
    info |= sampler_settings(request)
    if request.extra_noise and (isinstance(request, Img2ImgRequest) or request.hires is not None):
        info["extra_noise"] = request.extra_noise  # AUTOMATIC1111 writes it where an img2img start took it
    if old_timelines(request):
        info["old_timelines"] = True
    if stopped_at is not None:
        info["stopped_at_step"] = stopped_at
    if contract.inpainting_unet or contract.edit_unet:  # AUTOMATIC1111: where the UNet takes image channels
        info["conditional_mask_weight"] = request.inpainting_mask_weight
    if isinstance(request, Img2ImgRequest):
        info["denoising_strength"] = request.denoising_strength
        if pipeline.contract.edit_unet and request.image_cfg_scale is not None:  # (AUTOMATIC1111: an edit model's)
            info["image_cfg_scale"] = request.image_cfg_scale
        if request.initial_noise_multiplier != 1:
            info["noise_multiplier"] = request.initial_noise_multiplier
        if request.inpainting:
            info |= {"mask_blur": blur_radius(request.mask_blur), "inpainting_fill": request.inpainting_fill,
                     "inpainting_mask_invert": request.inpainting_mask_invert}
            if request.soft_inpainting is not None:  # AUTOMATIC1111's script's fields, under its labels
                info["soft_inpainting"] = {ENABLED_LABEL: True} | {
                    LABELS[name]: value for name, value in asdict(request.soft_inpainting).items()}
    if request.controlnet_units:
        info["controlnet"] = [unit_text(unit, contract.controlnet(unit.model).title)
                              for unit in request.controlnet_units]
    return info


RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")


def unit_text(unit, model: str) -> str:
    """A ControlNet unit as sd-webui-controlnet's serialize_unit writes it, quoted: its fields in its order, those
    at -1 (sliders the module lacks, no resolution) left out; the resize mode, resolution and pixel perfect only for
    the API's units (kiln's own run the module at each pass's size)."""
    fields = [("Module", unit.module), ("Model", model), ("Weight", unit.weight)]
    if unit.resize_mode is not None:
        fields.append(("Resize Mode", RESIZE_MODES[unit.resize_mode]))
    fields += [(name, f"{value:g}") for name, value in (("Processor Res", unit.processor_res),
                                                         ("Threshold A", unit.threshold_a),
                                                         ("Threshold B", unit.threshold_b)) if value != -1]
    fields += [("Guidance Start", unit.guidance_start), ("Guidance End", unit.guidance_end)]
    if unit.resize_mode is not None:
        fields.append(("Pixel Perfect", unit.pixel_perfect))
    fields.append(("Control Mode", CONTROL_MODES[unit.control_mode]))
    if unit.hr_option:  # the extension's field after it, written where it is not Both
        fields.append(("Hr Option", HR_OPTIONS[unit.hr_option]))
    return '"' + ", ".join(f"{name}: {value}" for name, value in fields) + '"'


def sampler_settings(request: Txt2ImgRequest) -> dict:
    """The sampler options that are not their defaults (kiln.infotext.SAMPLER_FIELDS names them): DDIM's eta where
    either pass runs DDIM, k-diffusion's where either takes it, the churn (checked to be the sampler's),
    s_min_uncond, the schedule settings, and always_discard_next_to_last_sigma where it changes either pass's
    sigmas."""
    samplers = request.samplers
    settings = {name: getattr(request, name) for name in CHURN if getattr(request, name) != CHURN[name]}
    if "DDIM" in samplers and request.eta:
        settings["eta_ddim"] = request.eta
    if request.eta_ancestral != 1 and any("eta_ancestral" in step_options(sampler) for sampler in samplers):
        settings["eta_ancestral"] = request.eta_ancestral
    if request.s_min_uncond:
        settings["s_min_uncond"] = request.s_min_uncond
    if request.discard_penultimate_sigma and any(check_discard(sampler, True) for sampler in samplers):
        settings["discard_penultimate_sigma"] = True
    drawn = not isinstance(request, Img2ImgRequest) and getattr(request.hires, "first_pass", None) is None
    if drawn and check_sgm(request.sampler, request.sgm_noise_multiplier):
        settings["sgm_noise_multiplier"] = True  # the first pass's start (the hires pass is img2img's)
    for name in ("schedule_sigma_min", "schedule_sigma_max", "schedule_rho"):  # checked to be the schedule's
        if getattr(request, name):
            settings[name] = getattr(request, name)
    return settings


def old_timelines(request: Txt2ImgRequest) -> bool:
    """AUTOMATIC1111's "Old prompt editing timelines": use_old_scheduling on, and some prompt of some pass scheduled
    otherwise under it."""
    if not request.use_old_scheduling:
        return False
    steps = editing_steps(request.sampler, request.steps)
    passes = [((request.prompt, request.negative_prompt), None)]
    if (fix := request.hires) is not None:
        passes.append(((request.prompt if fix.prompt is None else fix.prompt,
                        request.negative_prompt if fix.negative_prompt is None else fix.negative_prompt),
                       editing_steps(fix.sampler or request.sampler, hires.second_pass_steps(fix, request.steps)[1])))
    return any(schedule(text, steps, hires_steps, old=True) != schedule(text, steps, hires_steps)
               for texts, hires_steps in passes for text in texts)
