"""What a generation's images say about their run: AUTOMATIC1111's infotext fields, and the API's info."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.masks import blur_radius
from orchestrator.pipeline import hires
from orchestrator.pipeline.control import CONTROL_MODES
from orchestrator.pipeline.requests import Img2ImgRequest, Txt2ImgRequest

if TYPE_CHECKING:
    from orchestrator.pipeline.pipeline import Pipeline


def run_info(pipeline: Pipeline, request: Txt2ImgRequest, seeds: list[int], variation,
             stopped_at: int | None, padded: bool = False) -> dict:
    """What the images' infotext and the API's info say about the run (`padded`: padding made the negative prompt
    and the prompt one length)."""
    contract = pipeline.contract
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
    if variation is not None:
        info |= {"subseed": variation[0][0], "all_subseeds": variation[0], "subseed_strength": variation[1]}
    if stopped_at is not None:
        info["stopped_at_step"] = stopped_at
    if isinstance(request, Img2ImgRequest):
        info["denoising_strength"] = request.denoising_strength
        if request.initial_noise_multiplier != 1:
            info["noise_multiplier"] = request.initial_noise_multiplier
        if request.inpainting:
            info |= {"mask_blur": blur_radius(request.mask_blur), "inpainting_fill": request.inpainting_fill,
                     "inpainting_mask_invert": request.inpainting_mask_invert}
    if request.controlnet_units:
        info["controlnet"] = [f"\"Module: {unit.module}, Model: {contract.controlnet(unit.model).title}, "
                              f"Weight: {unit.weight}, Guidance Start: {unit.guidance_start}, "
                              f"Guidance End: {unit.guidance_end}, Control Mode: {CONTROL_MODES[unit.control_mode]}\""
                              for unit in request.controlnet_units]
    return info
