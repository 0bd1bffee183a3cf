"""AUTOMATIC1111's settings as this server keeps them (POST /sdapi/v1/options, a request's override_settings): their
defaults and types, which ones it applies, and the refusal of any other that asks for another value."""

from __future__ import annotations

import math
import numbers
from typing import Any

from kiln import schemas
from kiln.errors import InputError
from kiln.imaging import IMAGE_FORMATS, ImageFormat
from orchestrator.pipeline.noise import RANDN_SOURCES
from orchestrator.pipeline.sampling import schedule_kind
from orchestrator.pipeline.seeds import MAX_SEED
from orchestrator.pipeline.sigmas import OWN_RHO, TAKE_RANGE
from orchestrator.server.filenames import NAMING_SETTINGS, Naming, check_pattern

OPTION_TYPES = {"show_progress_every_n_steps": int, "live_previews_enable": bool, "samples_format": str,
                "eta_ddim": float, "eta_ancestral": float, "CLIP_stop_at_last_layers": int,
                "sd_model_checkpoint": str, "sd_vae": str, "control_net_no_detectmap": bool, "pad_cond_uncond": bool,
                "pad_cond_uncond_v0": bool, "eta_noise_seed_delta": int, "use_old_scheduling": bool,
                "randn_source": str, "sigma_min": float, "sigma_max": float, "rho": float,
                "always_discard_next_to_last_sigma": bool, "sgm_noise_multiplier": bool, "img2img_extra_noise": float,
                "inpainting_mask_weight": float, "control_net_inpaint_blur_sigma": int,
                "img2img_color_correction": bool, "enable_prompt_comments": bool, "grid_format": str,
                "jpeg_quality": int, "webp_lossless": bool, "save_txt": bool, "save_init_img": bool,
                "save_mask": bool, "save_mask_composite": bool, "return_mask": bool, "return_mask_composite": bool,
                "save_images_before_highres_fix": bool, "save_images_before_color_correction": bool,
                "return_grid": bool, "samples_save": bool, "grid_save": bool, "samples_filename_pattern": str,
                "save_to_dirs": bool, "directories_filename_pattern": str, "grid_save_to_dirs": bool,
                "grid_extended_filename": bool, "save_images_add_number": bool, "directories_max_prompt_words": int,
                "export_for_4chan": bool, "img_downscale_threshold": float, "target_side_length": float}
# How images are encoded and saved: the answers' (set by POST /options; a request's override_settings, applied while
# it runs as AUTOMATIC1111 applies them, reach its saved files, and its answer only where they stay as the server's:
# AUTOMATIC1111 encodes it after restoring them) and the saved files' (save_images; grid_format: its grids'; save_txt:
# an infotext .txt beside each; save_init_img: img2img's init images kept; return_grid: a saving request's answer
# has their grid first)
IMAGE_SETTINGS = ("samples_format", "grid_format", "jpeg_quality", "webp_lossless", "save_txt", "save_init_img",
                  "return_grid")
# Which saved files are written (samples_save, grid_save), their names and folders (filenames.NAMING_SETTINGS) and
# the JPEG copies of large ones (export_for_4chan)
SAVING_SETTINGS = ("samples_save", "grid_save", *NAMING_SETTINGS, "export_for_4chan", "img_downscale_threshold",
                   "target_side_length")
GRID_SETTINGS = ("grid_save", "grid_save_to_dirs", "grid_extended_filename")  # (the saved grids' alone)
# Inpainting's mask pictures (AUTOMATIC1111's mask_for_overlay, and the image where it repaints): saved beside each
# image, returned after each one (outputs.mask_pictures)
MASK_SETTINGS = ("save_mask", "save_mask_composite", "return_mask", "return_mask_composite")
# The images saved as they were before a step (the pipeline request's intermediates), by the step's name
BEFORE_SETTINGS = {"highres-fix": "save_images_before_highres_fix",
                   "color-correction": "save_images_before_color_correction"}
# AUTOMATIC1111's schedule settings (Settings > Sampler parameters) -> the request's fields
SIGMA_SETTINGS = {"sigma_min": "schedule_sigma_min", "sigma_max": "schedule_sigma_max", "rho": "schedule_rho"}
# what one request's override_settings can change
APPLIED_OVERRIDES = ("sd_model_checkpoint", "eta_ddim", "eta_ancestral", "CLIP_stop_at_last_layers",
                     "control_net_no_detectmap", "sd_vae", "pad_cond_uncond", "pad_cond_uncond_v0",
                     "eta_noise_seed_delta", "use_old_scheduling", "randn_source", "always_discard_next_to_last_sigma",
                     "sgm_noise_multiplier", "img2img_extra_noise", "inpainting_mask_weight",
                     "control_net_inpaint_blur_sigma", "img2img_color_correction", "enable_prompt_comments",
                     *SIGMA_SETTINGS, *IMAGE_SETTINGS, *SAVING_SETTINGS, *MASK_SETTINGS, *BEFORE_SETTINGS.values())
# AUTOMATIC1111's padding settings (the first that is on wins, v0 first as there) -> Txt2ImgRequest.pad_conds
PAD_SETTINGS = {"pad_cond_uncond_v0": "last_vector", "pad_cond_uncond": "empty_chunks"}
APPLIED_OPTIONS = APPLIED_OVERRIDES + ("show_progress_every_n_steps", "live_previews_enable")  # POST /options


def check_setting(key: str, value: Any, options: dict, applied: tuple[str, ...], where: str) -> None:
    """A setting (POST /sdapi/v1/options, a request's override_settings) this server acts on: one it applies, or
    one that already holds the value asked for (live_preview_content "Prompt", CLIP_stop_at_last_layers 1, ...).
    Anything else is refused by name, never stored and ignored."""
    if key in applied:
        return
    if key not in options:
        raise InputError(f"{where}{key} is not a setting this server has; it has {', '.join(sorted(options))}")
    if value != options[key]:
        raise InputError(f"{where}{key} {value!r} is not supported by this server: it runs {options[key]!r}")


def check_value(key: str, value: Any) -> None:
    """The range of an option whose type alone does not say it (POST /sdapi/v1/options: stored out of range, it would
    fail every request after it; a request's override_settings are checked with the request)."""
    if key == "randn_source" and value not in RANDN_SOURCES:
        raise InputError(f"option randn_source must be one of {', '.join(RANDN_SOURCES)}, got {value!r}")
    if key == "eta_noise_seed_delta" and not 0 <= value <= MAX_SEED:
        raise InputError(f"option eta_noise_seed_delta must be in [0, 2^32 - 1], got {value}")
    if key in ("eta_ddim", "eta_ancestral", "inpainting_mask_weight") and not 0 <= value <= 1:
        raise InputError(f"option {key} must be in [0, 1], got {value}")
    if key == "img2img_extra_noise" and not 0 <= value <= 100:
        raise InputError(f"option img2img_extra_noise must be in [0, 100] (its slider: 0 to 1), got {value}")
    if key == "control_net_inpaint_blur_sigma" and (not 1 <= value <= 64 or value % 1):
        raise InputError(f"option {key} must be a whole number in [1, 64] (inpaint_only's paste-back: pixels), "
                         f"got {value}")
    if key in ("samples_format", "grid_format") and value.lower() not in IMAGE_FORMATS:
        raise InputError(f"option {key} must be one of {', '.join(IMAGE_FORMATS)}, got {value!r}")
    if key == "jpeg_quality" and not 1 <= value <= 100:
        raise InputError(f"option jpeg_quality must be in [1, 100], got {value}")
    if key in ("samples_filename_pattern", "directories_filename_pattern"):
        check_pattern(key, value)
    if key == "img_downscale_threshold" and not value > 0:
        raise InputError(f"option img_downscale_threshold must be more than 0 (export_for_4chan's MB), got {value}")
    if key == "target_side_length" and not value >= 1:
        raise InputError(f"option target_side_length must be 1 or more (export_for_4chan's pixels), got {value}")
    if key == "directories_max_prompt_words" and not 1 <= value <= 20:
        raise InputError(f"option directories_max_prompt_words must be in [1, 20], got {value}")
    if key in SIGMA_SETTINGS and value < 0:
        raise InputError(f"option {key} must be 0 or more (0: the model's, or the schedule type's own), got {value}")


def default_options() -> dict:
    return {"sd_model_checkpoint": "", "show_progress_every_n_steps": 10, "live_previews_enable": True,
            "samples_format": "png", "eta_ddim": 0.0, "eta_ancestral": 1.0, "CLIP_stop_at_last_layers": 1,
            "sd_vae": "Automatic",
            "live_preview_content": "Prompt", "interrogate_return_ranks": False, "control_net_no_detectmap": False,
            "pad_cond_uncond": False, "pad_cond_uncond_v0": False, "eta_noise_seed_delta": 0,
            "use_old_scheduling": False, "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0,
            "always_discard_next_to_last_sigma": False, "sgm_noise_multiplier": False, "img2img_extra_noise": 0.0,
            "inpainting_mask_weight": 1.0, "control_net_inpaint_blur_sigma": 7, "img2img_color_correction": False,
            "grid_format": "png", "jpeg_quality": 80, "webp_lossless": False, "save_txt": False, "save_init_img": False,
            "return_grid": True,
            "samples_save": True, "grid_save": True, "export_for_4chan": True, "img_downscale_threshold": 4.0,
            "target_side_length": 4000.0,
            **{key: getattr(Naming(), name) for key, name in NAMING_SETTINGS.items()},
            **dict.fromkeys((*MASK_SETTINGS, *BEFORE_SETTINGS.values()), False),
            "enable_prompt_comments": True,  # AUTOMATIC1111's Comments script: # to the end of a line is not run
            # AUTOMATIC1111's default is "GPU"; kiln's is diffusers' noise (orchestrator.pipeline.noise)
            "randn_source": "CPU",
            # AUTOMATIC1111's paste turns on old behaviours for an old Version's infotext; kiln's paste does not
            "auto_backcompat": False}


def setting_fields(body: schemas.Txt2ImgBody, options: dict) -> dict:
    """The request fields AUTOMATIC1111's settings give (a request's override_settings over the server's options);
    each checked when the request is (orchestrator.pipeline.validate)."""
    return {"pad_conds": pad_conds(body, options),
            "use_old_scheduling": bool_setting(body, options, "use_old_scheduling"),
            "discard_penultimate_sigma": bool_setting(body, options, "always_discard_next_to_last_sigma"),
            "sgm_noise_multiplier": bool_setting(body, options, "sgm_noise_multiplier"),
            "extra_noise": applied_setting(body, options, "img2img_extra_noise", has_img2img_start(body)),
            "eta_noise_seed_delta": body.override_settings.get("eta_noise_seed_delta", options["eta_noise_seed_delta"]),
            "randn_source": body.override_settings.get("randn_source", options["randn_source"])}


def sigma_fields(body: schemas.Txt2ImgBody, options: dict, samplers: set[str]) -> dict:
    """The request's schedule settings (SIGMA_SETTINGS): a request's override_settings as sent (checked with the
    request, and refused for a schedule that does not take them); the server's options where every pass's schedule
    takes them, as AUTOMATIC1111 applies its settings, and not otherwise (a stored sigma_min does not fail every
    Euler request)."""
    fields = {}
    for key, field in SIGMA_SETTINGS.items():
        if key in body.override_settings:
            value = body.override_settings[key]
            fields[field] = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        elif options[key] and all(key in taken_settings(schedule_kind(s)) for s in samplers):
            fields[field] = options[key]
    return fields


def taken_settings(kind: str | None) -> set[str]:
    """The schedule settings a schedule type takes (orchestrator.pipeline.sigmas.check_settings)."""
    return ({"sigma_min", "sigma_max"} if kind in TAKE_RANGE else set()) | ({"rho"} if kind in OWN_RHO else set())


def pad_conds(body: schemas.Txt2ImgBody, options: dict) -> str:
    """Txt2ImgRequest.pad_conds from AUTOMATIC1111's settings pad_cond_uncond ("Pad prompt/negative prompt") and
    pad_cond_uncond_v0, a request's override_settings over the server's options."""
    values = {key: bool_setting(body, options, key) for key in PAD_SETTINGS}
    return next((mode for key, mode in PAD_SETTINGS.items() if values[key]), "off")


def number_setting(body: schemas.Txt2ImgBody, options: dict, key: str) -> float:
    """A number setting: the request's override_settings over the server's options."""
    value = body.override_settings.get(key, options[key])
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InputError(f"override_settings.{key} must be a number, got {value!r}")
    return float(value)


def inpaint_blur(body: schemas.Txt2ImgBody, options: dict) -> float:
    """sd-webui-controlnet's control_net_inpaint_blur_sigma (its inpaint_only's paste-back), checked wherever it
    comes from."""
    value = number_setting(body, options, "control_net_inpaint_blur_sigma")
    check_value("control_net_inpaint_blur_sigma", value)
    return value


def refuse_idle(body: schemas.Txt2ImgBody, key: str, acts: bool, where: str) -> None:
    """A 422 for an override setting the request sent where it has nothing to act on (a stored option may stay, and
    its default changes nothing anywhere)."""
    if body.override_settings.get(key, default_options()[key]) != default_options()[key] and not acts:
        raise InputError(f"override_settings.{key} acts on {where}, which this request has none of")


def has_img2img_start(body: schemas.Txt2ImgBody) -> bool:
    """Whether the request has an img2img start (img2img's own, or the hires fix's second pass): where
    img2img_extra_noise and a 9-channel UNet's inpainting_mask_weight act."""
    return isinstance(body, schemas.Img2ImgBody) or bool(body.enable_hr)


def applied_setting(body: schemas.Txt2ImgBody, options: dict, key: str, acts: bool) -> float:
    """A number setting that acts on some requests only: a request's override_settings as sent (the pipeline refuses
    it where it cannot act), the server's option where it acts and its default otherwise, as AUTOMATIC1111 applies
    its settings (a stored img2img_extra_noise does not fail every txt2img request)."""
    if key in body.override_settings or acts:
        return number_setting(body, options, key)
    return float(default_options()[key])


def bool_setting(body: schemas.Txt2ImgBody, options: dict, key: str) -> bool:
    """A true/false setting: the request's override_settings over the server's options."""
    value = body.override_settings.get(key, options[key])
    if not isinstance(value, bool):
        raise InputError(f"override_settings.{key} must be true or false, got {value!r}")
    return value


def runs_script(body: schemas.Txt2ImgBody) -> bool:
    """Whether the request names a script (AUTOMATIC1111's script_name; "None" is none, as its UI sends it)."""
    return body.script_name not in (None, "", "None")


def check_save_settings(body: schemas.Txt2ImgBody, kind: str, cell_script: str | None = None) -> None:
    """save_txt, save_init_img, return_grid and the saving settings (SAVING_SETTINGS) sent in a request's
    override_settings where they cannot act: a 422 (on the request as sent: a script's cells save nothing of their
    own). return_grid acts on the grid of a request that saves its images and runs no script, and on the loopback's
    and outpainting mk2's (`cell_script`: the script's name, a1111.cell_script's; the prompt matrix and the X/Y/Z plot
    always return theirs, SD upscale none, as there)."""
    plain = not runs_script(body)
    refuse_idle(body, "save_txt", body.save_images, "the saved images (save_images)")
    refuse_idle(body, "save_init_img", kind == "img2img", "img2img's init images")
    samples, grids = body.save_images and not body.do_not_save_samples, body.save_images and not body.do_not_save_grid
    for key in SAVING_SETTINGS:  # (a grid's settings act on its grids; samples_save on its images; the rest on both)
        acts, where = (grids, "the saved grids (save_images, not do_not_save_grid)") if key in GRID_SETTINGS else \
            (samples, "the saved images (save_images, not do_not_save_samples)") if key == "samples_save" else \
            (samples or grids, "the saved images or grids (save_images)")
        refuse_idle(body, key, acts, where)
    refuse_idle(body, "return_grid", cell_script in ("loopback", "outpainting mk2") or
                (plain and body.save_images and not body.do_not_save_grid),
                "the grid of a request that saves its images (save_images), the loopback's or outpainting mk2's")


def intermediates(body: schemas.Txt2ImgBody, options: dict, runs: dict[str, bool]) -> tuple[str, ...]:
    """What the pipeline keeps for the request's saved and returned pictures (its request's intermediates): the
    images from before the steps of `runs` that it runs (save_images_before_highres_fix, ..._color_correction), and
    for inpainting ("mask": an inpainting request's) its mask and the images before the overlay (save_mask,
    save_mask_composite, return_mask, return_mask_composite), where the settings are on and act: a save setting where
    the request saves its images. A request's override_settings asking one where it cannot act is a 422."""
    saving = body.save_images and not body.do_not_save_samples
    saved, inpainting = "the saved images (save_images) of ", "an inpainting request (img2img with a mask)"
    acting = {"save_images_before_highres_fix": (saving and runs["highres-fix"],
                                                 f"{saved}a request with the hires fix"),
              "save_images_before_color_correction": (saving and runs["color-correction"],
                                                      f"{saved}a request with img2img's colour correction"),
              "save_mask": (saving and runs["mask"], saved + inpainting),
              "save_mask_composite": (saving and runs["mask"], saved + inpainting),
              "return_mask": (runs["mask"], inpainting), "return_mask_composite": (runs["mask"], inpainting)}
    on = set()
    for key, (acts, where) in acting.items():
        refuse_idle(body, key, acts, where)
        if acts and bool_setting(body, options, key):
            on.add(key)
    kept = [step for step, key in BEFORE_SETTINGS.items() if key in on]
    if on & set(MASK_SETTINGS):
        kept.append("mask")
    if on & {"save_mask_composite", "return_mask_composite"}:
        kept.append("overlay")
    return tuple(kept)


def image_format(settings: dict, key: str = "samples_format") -> ImageFormat:
    """The encoding `settings` (the server's options, or a request's override_settings over them) give its images
    (`key`: samples_format) or grids (grid_format)."""
    return ImageFormat(settings[key].lower(), settings["jpeg_quality"], settings["webp_lossless"])


def answer_format(request, body: schemas.Txt2ImgBody | None = None) -> ImageFormat:
    """The encoding of an answer's images: the server's samples_format; a request's own where its override_settings
    stay as the server's (restore_afterwards false: AUTOMATIC1111 encodes its answer once they are set)."""
    settings = request.app.state.options
    if body is not None and not body.override_settings_restore_afterwards:
        settings = settings | body.override_settings
    return image_format(settings)


def checked_type(key: str, value: Any, where: str) -> Any:
    """An option's value of the type it takes (an int where a float is taken becomes one; a float must be finite);
    a 422 naming it (`where`: "option ", "override_settings.") otherwise. Untyped options pass as they are."""
    kind = OPTION_TYPES.get(key)
    if kind is None:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or \
            (kind is float and not math.isfinite(value)):
        raise InputError(f"{where}{key} must be a {kind.__name__}")
    return value


def check_image_settings(overrides: dict) -> None:
    """A request's override_settings for its saved files and its answer's images: the types and ranges POST /options
    checks."""
    for key in (*IMAGE_SETTINGS, *SAVING_SETTINGS, *MASK_SETTINGS):
        if key in overrides:
            check_value(key, checked_type(key, overrides[key], "override_settings."))
