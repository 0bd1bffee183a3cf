"""AUTOMATIC1111's API, translated both ways: its request bodies into pipeline requests, a finished job into its
response, its sampler names and options."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

from kiln import schemas
from kiln.contract import SDContract
from kiln.errors import InputError
from kiln.imaging import ImageFormat
from kiln.infotext import HIRES_FIELDS, parameters_text
from kiln.masks import Blur, resize_init_image
from kiln.preprocessors import numpy_seed
from kiln.prompts import EXTRA_NETWORK
from kiln.styles import StyleLibrary
from kiln.upscale import UPSCALERS
from orchestrator.jobs import Job
from orchestrator.pipeline import (
    HiresFix,
    Img2ImgRequest,
    Limits,
    Refiner,
    SDUpscale,
    Txt2ImgRequest,
)
from orchestrator.pipeline.hires import DEFAULT_UPSCALER
from orchestrator.pipeline.seeds import draw_seed
from orchestrator.server import builtin_scripts
from orchestrator.server import soft_inpainting as soft
from orchestrator.server.control_units import InitImage, controlnet_units, detect_map
from orchestrator.server.inputs import decode_b64_image
from orchestrator.server.options import (
    APPLIED_OPTIONS,
    APPLIED_OVERRIDES,
    applied_setting,
    bool_setting,
    check_image_settings,
    check_setting,
    check_value,
    checked_type,
    has_img2img_start,
    inpaint_blur,
    intermediates,
    number_setting,
    refuse_idle,
    runs_script,
    setting_fields,
    sigma_fields,
)
from orchestrator.server.outputs import answer_grid, answer_images, answer_pictures
from orchestrator.server.paste import apply_infotext
from orchestrator.server.sampler_names import hires_fix_sampler, sampler_name

# -- scripts and passes ---------------------------------------------------------------------------------
WHOLE_LINE_COMMENT, COMMENT = re.compile(r"(^|\n)#[^\n]*(\n|$)"), re.compile(r"#[^\n]*(\n|$)")  # AUTOMATIC1111's
SCRIPTS = {"img2img": ("sd upscale",), "txt2img": ()}  # the selectable scripts kiln runs (script_name), by route
# the scripts that run a request as generations of their own (orchestrator.server.cells): each by its name and the
# other names it answers to, and the routes that have it
CELL_SCRIPTS = {"prompt matrix": (("prompt_matrix",), ("txt2img", "img2img")),
                "prompts from file or textbox": (("prompts_from_file",), ("txt2img", "img2img")),
                "x/y/z plot": (("xyz plot", "xyz_grid"), ("txt2img", "img2img")),
                "loopback": ((), ("img2img",)),
                "poor man's outpainting": (("poor mans outpainting", "poormans_outpainting"), ("img2img",)),
                "outpainting mk2": (("outpainting mk 2", "outpainting_mk_2", "outpainting"), ("img2img",))}


def cell_script(body: schemas.Txt2ImgBody) -> str | None:
    """The name of the script of CELL_SCRIPTS a body's script_name names, or None."""
    name = (body.script_name or "").strip().lower()
    return next((script for script, (others, _) in CELL_SCRIPTS.items() if name == script or name in others), None)


def selected_script(body: schemas.Txt2ImgBody, networks: tuple[str, ...] = ()) -> SDUpscale | None:
    """script_name and script_args: AUTOMATIC1111's SD upscale script (img2img), [_, overlap, upscaler, scale]; the
    upscaler by its index in /sdapi/v1/upscalers (the built-in ones, then the repository's `networks`) or by name."""
    route = "img2img" if isinstance(body, schemas.Img2ImgBody) else "txt2img"
    if not runs_script(body):
        if body.script_args:
            raise InputError("script_args without script_name: there is no script to give them to")
        return None
    if cell_script(body):
        raise InputError(f"script_name {cell_script(body)!r} runs through /sdapi/v1/txt2img and /sdapi/v1/img2img "
                         "(its images are tasks of their own: GET /v1/tasks lists them)")
    if body.script_name.lower() not in SCRIPTS[route]:
        raise InputError(f"script_name {body.script_name!r} is not one of this server's {route} scripts; it runs: "
                         f"{', '.join(SCRIPTS[route]) or 'none'} (GET /sdapi/v1/scripts)")
    args = list(body.script_args) + [None] * (4 - len(body.script_args))
    if len(body.script_args) > 4:
        raise InputError(f"script_args: SD upscale takes [_, overlap, upscaler, scale_factor], got "
                         f"{len(body.script_args)} values")
    upscaler = "None" if args[2] is None else args[2]
    listed = (*UPSCALERS, *networks)
    if isinstance(upscaler, int) and not isinstance(upscaler, bool):
        if not 0 <= upscaler < len(listed):
            raise InputError(f"script_args: SD upscale's upscaler index {upscaler} is not one of this server's "
                             f"(0 to {len(listed) - 1}: {', '.join(listed)})")
        upscaler = listed[upscaler]
    names = {name.lower(): name for name in listed}
    return SDUpscale(overlap=64 if args[1] is None else args[1], upscaler=names.get(str(upscaler).lower(), upscaler),
                     scale=2.0 if args[3] is None else args[3])


def refiner(body: schemas.Txt2ImgBody) -> Refiner | None:
    """AUTOMATIC1111's refiner_checkpoint and refiner_switch_at (the engine resolves the checkpoint's name)."""
    return Refiner.asked(body.refiner_checkpoint, body.refiner_switch_at)


def hires_fix(body: schemas.Txt2ImgBody, contract: SDContract, max_pixels: int) -> HiresFix | None:
    """The hires fix an AUTOMATIC1111 txt2img body asks for (enable_hr and its hr_* fields, firstpass_image), or
    None."""
    if not body.enable_hr:
        if body.firstpass_image:  # AUTOMATIC1111 would pass it over without enable_hr: refused, never ignored
            raise InputError("firstpass_image is the hires fix's first pass: it needs enable_hr true")
        return None
    if body.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        check_checkpoint(body.hr_checkpoint_name, contract, "hr_checkpoint_name")
    sampler = hires_fix_sampler(body) if body.hr_sampler_name or body.hr_scheduler else None
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    return HiresFix(scale=body.hr_scale, resize_x=body.hr_resize_x, resize_y=body.hr_resize_y,
                    upscaler=body.hr_upscaler or DEFAULT_UPSCALER, steps=body.hr_second_pass_steps,
                    denoising_strength=strength, prompt=body.hr_prompt or None,
                    negative_prompt=body.hr_negative_prompt or None, sampler=sampler,
                    first_pass=decode_b64_image(body.firstpass_image, "firstpass_image", max_pixels)
                    if body.firstpass_image else None)


def seed_resize_from(body: schemas.Txt2ImgBody) -> tuple[int, int] | None:
    """AUTOMATIC1111's "Resize seed from": (width, height) where both are set (the schema refuses one alone)."""
    return (body.seed_resize_from_w, body.seed_resize_from_h) if body.seed_resize_from_w > 0 else None


# -- bodies -> pipeline requests ----------------------------------------------------------------------
def check_checkpoint(name: str, contract: SDContract, what: str) -> None:
    """A checkpoint name a client sends must be the one served (by title or by name)."""
    if name not in (contract.title, contract.model_name):
        raise InputError(f"{what} {name!r}: no such model; this server serves {contract.title!r}")


def to_request(body: schemas.Txt2ImgBody, contract: SDContract, options: dict, limits: Limits,
               styles: StyleLibrary | None = None) -> Txt2ImgRequest:
    """An AUTOMATIC1111 body as the pipeline's request (its checks run in the pipeline's validation, once); the
    styles it names are applied to its prompts here, and the fields its infotext gives (server.paste)."""
    color_target = getattr(body, "color_target", "")  # (a script's, not a field: the infotext's copy drops it)
    body = apply_infotext(body)
    if body.firstphase_width:  # AUTOMATIC1111's __post_init__: the first pass's size is the size generated
        body = body.model_copy(update={"width": body.firstphase_width, "height": body.firstphase_height})
    builtin_scripts.check(body)  # (AUTOMATIC1111's built-in always-on scripts: the request's own values)
    for key, value in body.override_settings.items():
        check_setting(key, value, options, APPLIED_OVERRIDES, "override_settings.")
    check_image_settings(body.override_settings)  # (its saved files': generation.outputs_of)
    checkpoint = body.override_settings.get("sd_model_checkpoint")
    if checkpoint:
        check_checkpoint(checkpoint, contract, "override_settings.sd_model_checkpoint")
    # AUTOMATIC1111's eta is the sampler's: DDIM's (eta_ddim by default) or k-diffusion's (eta_ancestral by default)
    eta, eta_ancestral = (body.eta, body.eta) if body.eta is not None else \
        (number_setting(body, options, name) for name in ("eta_ddim", "eta_ancestral"))
    clip_skip = body.override_settings.get("CLIP_stop_at_last_layers", options["CLIP_stop_at_last_layers"])
    if body.clip_skip is not None:  # SD.Next's own field
        clip_skip = int(body.clip_skip)
    vae = body.override_settings.get("sd_vae", options["sd_vae"])
    if not isinstance(vae, str):
        raise InputError("override_settings.sd_vae must be a string: a VAE's name, Automatic or None")
    contract.vae(vae)  # an unknown VAE: a 422 listing the build's
    if body.disable_extra_networks:  # AUTOMATIC1111 takes the tags out of the prompts and runs none of them
        body = body.model_copy(update={name: EXTRA_NETWORK.sub("", getattr(body, name))
                                       for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")})
    prompt, negative, hr_prompts = run_prompts(body, options, styles or StyleLibrary(None))
    body = body.model_copy(update=hr_prompts)
    sampler = sampler_name(body)
    seed = draw_seed(body.seed)  # drawn here: a random ControlNet module (shuffle) is seeded by it, as in the extension
    img2img, source = isinstance(body, schemas.Img2ImgBody), None
    if img2img:  # (a ControlNet unit without an image takes the init image, and an inpaint unit the mask)
        init = init_image(body, limits.max_image_pixels)
        mask = decode_b64_image(body.mask, "mask", limits.max_image_pixels) if body.mask else b""
        blur = mask_blur(body)
        source = InitImage(init, body.resize_mode, mask, blur, bool(body.inpainting_mask_invert),
                           body.inpaint_full_res, body.inpaint_full_res_padding)
    units = controlnet_units(body.alwayson_scripts, limits.max_image_pixels, body.width, body.height,
                             numpy_seed(seed, body.subseed), source,
                             inpaint_blur(body, options))
    refuse_idle(body, "control_net_inpaint_blur_sigma", any(unit.module == "inpaint_only" for unit in units or ()),
                "inpaint_only ControlNet units (their paste-back)")
    fields = dict(clip_skip=clip_skip, vae=vae, tiling=bool(body.tiling), vae_tiling=body.vae_tiling, prompt=prompt,
                  negative_prompt=negative, steps=body.steps, **setting_fields(body, options),
                  **sigma_fields(body, options, {sampler, hires_fix_sampler(body) if body.enable_hr else sampler}),
                  sampler=sampler, cfg_scale=body.cfg_scale, seed=seed, width=body.width,
                  height=body.height, batch_size=body.batch_size, eta=eta, eta_ancestral=eta_ancestral,
                  subseed=body.subseed,
                  subseed_strength=body.subseed_strength, seed_resize_from=seed_resize_from(body),
                  s_churn=body.s_churn, s_tmin=body.s_tmin,
                  s_min_uncond=body.s_min_uncond,
                  s_tmax=body.s_tmax or math.inf, s_noise=body.s_noise, refiner=refiner(body),
                  controlnet=units, inpainting_mask_weight=applied_setting(  # (where it acts: a 9-channel UNet's)
                      body, options, "inpainting_mask_weight", contract.inpainting_unet and has_img2img_start(body)))
    multiplier = 1.0 if body.initial_noise_multiplier is None else body.initial_noise_multiplier
    softly = soft.settings(body.alwayson_scripts, img2img, img2img and bool(body.mask))  # (without a mask: nothing)
    script = selected_script(body, contract.upscaler_names)
    if not img2img:
        refuse_idle(body, "img2img_color_correction", False, "img2img's images (txt2img and its hires fix have no "
                    "init image to match)")
        if multiplier != 1:
            raise InputError("initial_noise_multiplier scales img2img's noise; txt2img has no use for it "
                             "(AUTOMATIC1111 ignores it there)")
        return Txt2ImgRequest(**fields, hires=hires_fix(body, contract, limits.max_image_pixels),
                              intermediates=intermediates(body, options, {"highres-fix": bool(body.enable_hr),
                                                                          "color-correction": False, "mask": False}))
    if body.enable_hr or body.firstpass_image:
        raise InputError(f"{'enable_hr' if body.enable_hr else 'firstpass_image'}: the hires fix is txt2img's; "
                         "img2img has none")
    latent = decode_b64_image(body.latent_mask, "latent_mask", limits.max_image_pixels) if body.latent_mask else b""
    # "Only masked" crops the init image as it is; resize_mode shapes the whole picture otherwise (as AUTOMATIC1111).
    if not (mask and body.inpaint_full_res):
        init = resize_init_image(init, body.width, body.height, body.resize_mode)
    correction = bool_setting(body, options, "img2img_color_correction")
    # AUTOMATIC1111 pastes the original back outside the mask: clients expect the kept area untouched.
    return Img2ImgRequest(**fields, init_image=init, denoising_strength=body.denoising_strength, mask=mask,
                          latent_mask=latent, mask_blur=blur, inpainting_mask_invert=bool(body.inpainting_mask_invert),
                          mask_round=body.mask_round and softly is None, soft_inpainting=softly,  # (as its script)
                          mask_resize=0 if body.inpaint_full_res else body.resize_mode,
                          inpainting_fill=body.inpainting_fill, overlay=True, inpaint_full_res=body.inpaint_full_res,
                          inpaint_full_res_padding=body.inpaint_full_res_padding,
                          initial_noise_multiplier=multiplier, latent_resize=body.resize_mode == 3,
                          sd_upscale=script, image_cfg_scale=body.image_cfg_scale,
                          color_correction=correction, intermediates=intermediates(
                              body, options, {"highres-fix": False, "color-correction": correction and script is None,
                                              "mask": bool(mask) and script is None}),
                          color_target=decode_b64_image(
                              color_target, "the loopback's init image", limits.max_image_pixels)
                          if correction and color_target else b"")


def strip_comments(text: str) -> str:
    """AUTOMATIC1111's prompt comments (its Comments script, 1.8 on): from a # to the end of its line, the line's
    end kept (a whole line's comment is one line end)."""
    return COMMENT.sub("\n", WHOLE_LINE_COMMENT.sub("\n", text))


def run_prompts(body: schemas.Txt2ImgBody, options: dict, styles: StyleLibrary) -> tuple[str, str, dict]:
    """The prompts as AUTOMATIC1111 runs them: the styles applied (to the hires fix's own prompts too, as its
    setup_prompts does), then, with enable_prompt_comments (on by default), the comments stripped (before any
    extra-network tag is read: a tag in a comment is not applied). The prompt, the negative prompt, and the hires
    fix's own prompts as body fields (those sent; an empty one is the first pass's, as there)."""
    prompt, negative = styles.apply(body.prompt, body.negative_prompt, body.styles)
    hr_prompt, hr_negative = styles.apply(body.hr_prompt, body.hr_negative_prompt, body.styles)
    hires = {name: text for name, sent, text in (("hr_prompt", body.hr_prompt, hr_prompt),
                                                  ("hr_negative_prompt", body.hr_negative_prompt, hr_negative)) if sent}
    if bool_setting(body, options, "enable_prompt_comments"):
        prompt, negative = strip_comments(prompt), strip_comments(negative)
        hires = {name: strip_comments(text) for name, text in hires.items()}
    return prompt, negative, hires


def mask_blur(body: schemas.Img2ImgBody) -> Blur:
    """AUTOMATIC1111's mask blur: mask_blur, where sent, sets both radii; mask_blur_x and mask_blur_y otherwise (4
    each by default)."""
    if "mask_blur" not in body.model_fields_set and (body.mask_blur_x, body.mask_blur_y) != (None, None):
        x, y = (4 if v is None else v for v in (body.mask_blur_x, body.mask_blur_y))
        return x if x == y else (x, y)
    return body.mask_blur


def init_image(body: schemas.Img2ImgBody, max_pixels: int) -> bytes:
    """An img2img body's one init image, decoded from base64 (its bytes as sent: checked, not yet read)."""
    if len(body.init_images) != 1:
        raise InputError(f"init_images must hold exactly one image, got {len(body.init_images)}")
    return decode_b64_image(body.init_images[0], "init_images[0]", max_pixels)


# -- a finished job -> AUTOMATIC1111's response ------------------------------------------------------
def response_info(job: Job, body: schemas.Txt2ImgBody) -> dict:
    """AUTOMATIC1111's response's info (its Processed.js()): the request as run, each image's prompt, seed and
    infotext."""
    infos = job.infos
    first = infos[0] if infos else {}
    return {
        # all_prompts as run (the styles applied), as AUTOMATIC1111 reports them
        "prompt": body.prompt, "all_prompts": [i.get("prompt", body.prompt) for i in infos],
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [i.get("negative_prompt", body.negative_prompt) for i in infos],
        "seed": first.get("seed"), "all_seeds": [i["seed"] for i in infos], "subseed": first.get("subseed", -1),
        "all_subseeds": [s for i in infos for s in i.get("all_subseeds", [-1])][:len(infos)],
        # the size generated (firstphase_width and _height, an infotext's Size, where they set it)
        "subseed_strength": body.subseed_strength, "width": job.request.width, "height": job.request.height,
        "sampler_name": first.get("sampler"), "cfg_scale": body.cfg_scale, "steps": body.steps,
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.get("model"), "sd_model_hash": first.get("model_hash"),
        "seed_resize_from_w": body.seed_resize_from_w, "seed_resize_from_h": body.seed_resize_from_h,
        "denoising_strength": first.get("denoising_strength"),
        "extra_generation_params": {label: first[key] for key, label in
                                    (*HIRES_FIELDS.items(), ("lora_hashes", "Lora hashes")) if key in first}
        | first.get("soft_inpainting", {}),  # its script's, under its labels
        "index_of_first_image": 0, "infotexts": [parameters_text(i) for i in infos], "styles": body.styles,
        "clip_skip": first.get("clip_skip", 1),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "is_using_inpainting_conditioning": "conditional_mask_weight" in first, "version": "kiln-0.1.0",
        "interrupted": job.interrupted,
    }


def to_response(job: Job, body: schemas.Txt2ImgBody, encoding: ImageFormat) -> dict:
    """AUTOMATIC1111's response: images (`encoding`, the server's samples_format: PNG with the infotext chunk, or
    JPEG/WebP with it in EXIF): their grid first where the job returns it (context["grid"]: return_grid, for a
    request that saves its images and grid, as AUTOMATIC1111's API makes one) and there are two or more, each image
    then its returned mask pictures, the ControlNet units' detected maps; parameters (the request), info (JSON).
    A task's is made once per encoding and kept on the job (GET /v1/tasks/{id} asks for it on every poll)."""
    key, kept = (encoding, job.interrupted), job.context.get("answer")
    if kept is not None and kept[0] == key:
        return _own_copy(kept[1])
    info, pictures = response_info(job, body), answer_pictures(job, job.context.get("masks", frozenset()))
    if job.context.get("grid") and len(pictures) > 1:  # AUTOMATIC1111's return_grid: their grid first
        pictures.insert(0, (answer_grid(pictures), job.infos[0]))
        info["infotexts"].insert(0, parameters_text(job.infos[0]))
        info["index_of_first_image"] = 1
    memo = job.context.get("encoded")  # (a saving job's: its files' bytes where they are the answer's)
    try:
        images = answer_images(encoding, pictures, memo) if body.send_images else []
    finally:
        if memo is not None:
            memo.close()
    if body.send_images and job.context.get("detect_maps"):  # sd-webui-controlnet appends each unit's input
        images += answer_images(encoding, [(detect_map(unit, job.request), None)
                                           for unit in job.request.controlnet_units if unit.save_detected_map])
    # AUTOMATIC1111 echoes the init images and the mask in `parameters` only when include_init_images asks for them.
    images_too = getattr(body, "include_init_images", False)
    parameters = body.model_dump(exclude={"alwayson_scripts"} | (set() if images_too else {"init_images", "mask"}))
    answer = {"images": images, "parameters": parameters, "info": json.dumps(info)}
    if job.context.get("family") == "tasks":  # (an /sdapi answer goes out once)
        job.context["answer"] = (key, answer)
        return _own_copy(answer)
    return answer


def _own_copy(answer: dict) -> dict:
    """A kept answer as a caller may change it (its lists and parameters its own; the images' strings shared)."""
    return {**answer, "images": list(answer["images"]), "parameters": dict(answer["parameters"])}


# -- options ---------------------------------------------------------------------------------------
def updated_options(options: dict, body: dict[str, Any], contract: SDContract | None) -> dict:
    """The option changes a POST /sdapi/v1/options asks for, each checked (type, settable, known checkpoint)."""
    updates = {}
    for key, value in body.items():
        value = checked_type(key, value, "option ")
        if key == "sd_model_checkpoint" and contract is not None:
            check_checkpoint(value, contract, "sd_model_checkpoint")
        if key == "sd_vae" and contract is not None:
            contract.vae(value)
        if key == "CLIP_stop_at_last_layers" and contract is not None and \
                not 1 <= value <= max(1, contract.clip_skip_layers):
            raise InputError(f"option CLIP_stop_at_last_layers must be 1 to {max(1, contract.clip_skip_layers)} "
                             f"(the text encoder's layers this build serves), got {value}")
        check_value(key, value)
        if key.startswith("_"):
            raise InputError(f"option {key} is not settable")
        check_setting(key, value, options, APPLIED_OPTIONS, "option ")
        updates[key] = value
    return updates
