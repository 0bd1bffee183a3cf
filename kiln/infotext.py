"""AUTOMATIC1111's infotext: the "parameters" text a generated PNG carries, written and parsed.

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 512x512, Model hash: ..., Model: ...
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from kiln.errors import InputError
from kiln.imaging import user_comment
from kiln.masks import INPAINTING_FILL

# The hires fix's infotext entries (AUTOMATIC1111's extra_generation_params), by generation-info key
HIRES_FIELDS = {"hires_prompt": "Hires prompt", "hires_negative_prompt": "Hires negative prompt",
                "hires_upscale": "Hires upscale", "hires_resize": "Hires resize", "hires_steps": "Hires steps",
                "hires_upscaler": "Hires upscaler", "hires_sampler": "Hires sampler"}


PAD_CONDS = {"empty_chunks": "Pad conds", "last_vector": "Pad conds v0"}  # info's pad_conds -> its infotext key
# The sampler options that are not their defaults, by generation-info key (AUTOMATIC1111's names)
SAMPLER_FIELDS = {"eta_ddim": "Eta DDIM", "eta_ancestral": "Eta", "s_churn": "Sigma churn", "s_tmin": "Sigma tmin",
                  "s_tmax": "Sigma tmax", "s_noise": "Sigma noise", "s_min_uncond": "NGMS",
                  "schedule_sigma_min": "Schedule min sigma", "schedule_sigma_max": "Schedule max sigma",
                  "schedule_rho": "Schedule rho", "discard_penultimate_sigma": "Discard penultimate sigma",
                  "sgm_noise_multiplier": "SGM noise multiplier"}
SIZE_KEYS = ("Size", "Hires resize", "Seed resize from")  # "WxH" values, parsed into "<key>-1" and "<key>-2" too


def quote(value: Any) -> Any:
    """An infotext value as AUTOMATIC1111 writes it: JSON-quoted when it holds a comma, a colon or a newline."""
    if value is None or not any(c in str(value) for c in ",:\n"):
        return value
    return json.dumps(str(value), ensure_ascii=False)


def parameters_text(info: dict) -> str:
    """The infotext of one image from its generation info (prompt, steps, sampler, seed, size, ...)."""
    lines = [info.get("prompt", "")]
    if info.get("negative_prompt"):
        lines.append(f"Negative prompt: {info['negative_prompt']}")
    fields = [("Steps", info.get("steps")), ("Sampler", info.get("sampler")), ("CFG scale", info.get("cfg_scale")),
              ("Image CFG scale", info.get("image_cfg_scale")),
              ("Seed", info.get("seed")), ("Size", f"{info.get('width')}x{info.get('height')}"),
              ("Model hash", info.get("model_hash")), ("Model", info.get("model")),
              ("Clip skip", info.get("clip_skip")),
              ("Lora hashes", quote(info.get("lora_hashes"))),
              ("VAE hash", info.get("vae_hash")), ("VAE", quote(info.get("vae"))),
              ("Tiling", info.get("tiling")),
              (PAD_CONDS.get(info.get("pad_conds")), True),
              ("Old prompt editing timelines", info.get("old_timelines")),
              ("Refiner", quote(info.get("refiner"))), ("Refiner switch at", info.get("refiner_switch_at")),
              ("Variation seed", info.get("subseed")), ("Variation seed strength", info.get("subseed_strength")),
              ("Seed resize from", info.get("seed_resize_from")), ("ENSD", info.get("ensd")),
              ("RNG", info.get("rng")),
              *((label, info.get(key)) for key, label in SAMPLER_FIELDS.items()),
              ("Denoising strength", info.get("denoising_strength")),
              ("Final denoising strength", info.get("final_denoising_strength")),  # the loopback script's
              ("Denoising curve", info.get("denoising_curve")),
              ("Conditional mask weight", info.get("conditional_mask_weight")),
              # its labels, as AUTOMATIC1111's script writes them (before init adds the mask's fields)
              *(info.get("soft_inpainting") or {}).items(),
              ("Noise multiplier", info.get("noise_multiplier")),
              ("Extra noise", info.get("extra_noise")),
              ("SD upscale overlap", info.get("sd_upscale_overlap")),
              ("SD upscale upscaler", info.get("sd_upscale_upscaler")),
              *((label, quote(info.get(key))) for key, label in HIRES_FIELDS.items()),
              ("Mask blur", info.get("mask_blur")),
              ("Mask mode", None if "inpainting_mask_invert" not in info
               else ("Inpaint not masked" if info["inpainting_mask_invert"] else "Inpaint masked")),
              ("Masked content", None if "inpainting_fill" not in info else INPAINTING_FILL[info["inpainting_fill"]]),
              ("Inpaint area", "Only masked" if info.get("inpaint_full_res") else None),
              ("Masked area padding", info.get("inpaint_full_res_padding")),
              ("Script", info.get("script")),
              *((f"{axis} {what}", quote(info.get(f"{axis.lower()}_{what.lower()}")))
                for axis in "XYZ" for what in ("Type", "Values")),
              ]
    units = info.get("controlnet") or []
    fields += [(f"ControlNet {i}", unit) for i, unit in enumerate([units] if isinstance(units, str) else units)]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None and k is not None))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, Any]:
    """Infotext -> {"Prompt", "Negative prompt", "Steps", "Sampler", ..., "Size-1", "Size-2"} (AUTOMATIC1111's keys)."""
    if not text:
        return {}
    lines = text.strip().split("\n")
    last = lines[-1] if re.search(r"\bSteps: ", lines[-1]) else ""
    body = lines[:-1] if last else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        params[key.strip()] = value
    for key in SIZE_KEYS:
        if "x" in str(params.get(key, "")):
            params[f"{key}-1"], params[f"{key}-2"] = params[key].split("x", 1)
    return params


def read_png_info(data: bytes) -> dict[str, Any]:
    """A PNG's text chunks, its infotext and the infotext parsed (AUTOMATIC1111's /sdapi/v1/png-info answer); a JPEG's
    or WebP's infotext is its EXIF UserComment."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            items, text = {k: v for k, v in image.info.items() if isinstance(v, str)}, infotext_of(image)
    except Exception:  # noqa: BLE001 - PIL raises many types for a broken file; all mean the same here
        raise InputError("image: cannot read its metadata") from None
    return {"info": text, "items": items, "parameters": parse_infotext(text)}


def infotext_of(image) -> str:
    """An opened image's infotext ("" where it has none): a JPEG's or WebP's EXIF UserComment, where it has one, as
    AUTOMATIC1111's read_info_from_image reads it; a PNG's "parameters" text chunk."""
    comment = user_comment(image) if "exif" in image.info else ""
    return comment or str(image.info.get("parameters", ""))
