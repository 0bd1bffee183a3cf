"""AUTOMATIC1111's `infotext` request field (1.8+): the request's other fields filled from an infotext, as its
api.apply_infotext does with the UI's paste fields. A field the request sets itself wins over the infotext's; the
settings an infotext carries (Clip skip, VAE, Model) go to override_settings unless the request overrides them too.

Keys are applied (PASTED, SETTINGS, the hires fix's), or are information only (INFORMATION: hashes, the version),
or are refused by name: a key that describes a setting kiln would not apply (a ControlNet unit) would
otherwise change the image without a word. An infotext without RNG is AUTOMATIC1111's default source, GPU (as its
paste reads it), which kiln draws too (orchestrator.pipeline.noise).
"""

from __future__ import annotations

from typing import Any

from kiln import schemas
from kiln.errors import InputError
from kiln.infotext import parse_infotext
from kiln.masks import INPAINTING_FILL
from orchestrator.server import soft_inpainting

# infotext key -> (request field, type); both routes
PASTED = {"Prompt": ("prompt", str), "Negative prompt": ("negative_prompt", str), "Steps": ("steps", int),
          "Sampler": ("sampler_name", str), "Schedule type": ("scheduler", str), "CFG scale": ("cfg_scale", float),
          "Seed": ("seed", int), "Size-1": ("width", int), "Size-2": ("height", int), "Batch size": ("batch_size", int),
          "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
          "Denoising strength": ("denoising_strength", float), "Tiling": ("tiling", bool),
          "Noise multiplier": ("initial_noise_multiplier", float), "Seed resize from-1": ("seed_resize_from_w", int),
          "Seed resize from-2": ("seed_resize_from_h", int), "Sigma churn": ("s_churn", float),
          "Sigma tmin": ("s_tmin", float), "Sigma tmax": ("s_tmax", float), "Sigma noise": ("s_noise", float),
          "NGMS": ("s_min_uncond", float)}
def _choice(options: dict[str, Any]):
    """A key whose text names one of `options` (AUTOMATIC1111's radio buttons)."""
    def convert(key: str, text: str) -> Any:
        if text not in options:
            raise InputError(f"infotext: {key} {text!r} is not one of {', '.join(options)}")
        return options[text]
    return convert


IMG2IMG_PASTED = {"Image CFG scale": ("image_cfg_scale", float), "Mask blur": ("mask_blur", int),
                  "Mask mode": ("inpainting_mask_invert", _choice({"Inpaint masked": 0, "Inpaint not masked": 1})),
                  "Masked content": ("inpainting_fill", _choice({v: k for k, v in INPAINTING_FILL.items()})),
                  "Inpaint area": ("inpaint_full_res", _choice({"Only masked": True, "Whole picture": False})),
                  "Masked area padding": ("inpaint_full_res_padding", int)}
HIRES_PASTED = {"Hires upscale": ("hr_scale", float), "Hires upscaler": ("hr_upscaler", str),
                "Hires steps": ("hr_second_pass_steps", int), "Hires resize-1": ("hr_resize_x", int),
                "Hires resize-2": ("hr_resize_y", int), "Hires prompt": ("hr_prompt", str),
                "Hires negative prompt": ("hr_negative_prompt", str), "Hires sampler": ("hr_sampler_name", str),
                "Hires schedule type": ("hr_scheduler", str)}
SETTINGS = {"Clip skip": ("CLIP_stop_at_last_layers", int), "VAE": ("sd_vae", str),
            "Model": ("sd_model_checkpoint", str), "Pad conds": ("pad_cond_uncond", bool),
            "Pad conds v0": ("pad_cond_uncond_v0", bool), "ENSD": ("eta_noise_seed_delta", int),
            "Eta DDIM": ("eta_ddim", float), "Eta": ("eta_ancestral", float),
            "Old prompt editing timelines": ("use_old_scheduling", bool), "RNG": ("randn_source", str),
            "Schedule min sigma": ("sigma_min", float), "Schedule max sigma": ("sigma_max", float),
            "Schedule rho": ("rho", float),
            "Discard penultimate sigma": ("always_discard_next_to_last_sigma", bool),
            "SGM noise multiplier": ("sgm_noise_multiplier", bool), "Extra noise": ("img2img_extra_noise", float),
            "Conditional mask weight": ("inpainting_mask_weight", float)}
# Emphasis: only "Original", AUTOMATIC1111's default, is kiln's (checked below)
INFORMATION = {"Size", "Hires resize", "Seed resize from", "Model hash", "VAE hash", "Lora hashes", "TI hashes",
               "Hashes", "Version", "Emphasis",
               # a loopback loop's (the script's course; the loop's own fields make its image)
               "Final denoising strength", "Denoising curve"}


def _value(key: str, text: str, kind) -> Any:
    if kind not in (str, bool, int, float):
        return kind(key, text)
    if kind is str:
        return text
    if kind is bool:
        if text not in ("True", "False"):
            raise InputError(f"infotext: {key} {text!r} is not True or False")
        return text == "True"
    try:
        return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
    except ValueError:
        raise InputError(f"infotext: {key} {text!r} is not a number") from None


def apply_infotext(body: schemas.Txt2ImgBody) -> schemas.Txt2ImgBody:
    """The body with the fields its `infotext` gives and it does not set itself (the body unchanged without one)."""
    if not body.infotext:
        return body
    params = parse_infotext(body.infotext)
    img2img = isinstance(body, schemas.Img2ImgBody)
    pasted = PASTED | (IMG2IMG_PASTED if img2img else HIRES_PASTED)
    if params.get("Emphasis", "Original") != "Original":
        raise InputError(f"infotext: Emphasis {params['Emphasis']!r} is not applied; kiln's is AUTOMATIC1111's "
                         "Original")
    soft = soft_inpainting.INFOTEXT_KEYS  # (img2img's script: a txt2img paste leaves its fields, as there)
    unknown = sorted(set(params) - set(pasted) - set(SETTINGS) - INFORMATION - soft - {"Prompt", "Negative prompt"})
    if unknown:
        raise InputError(f"infotext: {', '.join(unknown)} {'is a setting' if len(unknown) == 1 else 'are settings'} "
                         "kiln would not apply; remove it from the infotext, or send the request's own fields")
    explicit = body.model_fields_set
    update: dict[str, Any] = {}
    for key, (field, kind) in pasted.items():
        if key in params and field not in explicit and (params[key] != "" or kind is str):
            update[field] = _value(key, params[key], kind)
    hires = any(k in params for k in ("Hires upscale", "Hires upscaler", "Hires resize-1"))
    if not img2img and hires and "Denoising strength" in params and "enable_hr" not in explicit:
        update["enable_hr"] = True  # AUTOMATIC1111's paste: the hires fix is on when its fields are there
    settings = dict(body.override_settings)
    params.setdefault("RNG", "GPU")  # AUTOMATIC1111 writes no RNG for its default source, GPU
    for key, (setting, kind) in SETTINGS.items():
        if key in params and setting not in settings:
            settings[setting] = _value(key, params[key], kind)
    update["override_settings"] = settings
    if img2img and (scripts := soft_inpainting.pasted(params, body.alwayson_scripts)) is not None:
        update["alwayson_scripts"] = scripts  # its script's own infotext fields, as AUTOMATIC1111 pastes them
    update["infotext"] = None  # applied
    return body.model_validate(body.model_dump(exclude_unset=True) | update)
