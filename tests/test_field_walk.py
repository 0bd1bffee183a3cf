"""Every field of AUTOMATIC1111's txt2img and img2img request models, and of an sd-webui-controlnet unit, sent with a
value other than its default: each is honoured (it changes the images, or the response as AUTOMATIC1111's does) or
refused with a 4xx naming it. None is dropped.

The field lists are AUTOMATIC1111's own (modules/api/models.py generates its request models from
StableDiffusionProcessingTxt2Img/Img2Img's fields plus sampler_index, script_name, script_args, send_images,
save_images, alwayson_scripts and infotext) and sd-webui-controlnet's unit. The walk also checks each is a field of
kiln's schema: one the schema did not declare would be ignored without a word.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from kiln import schemas
from kiln.paths import SAMPLE_IMAGES
from kiln.triton_server import free_port
from orchestrator.pipeline import Limits
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.conftest import encode

pytestmark = pytest.mark.slow

# StableDiffusionProcessing's own fields, shared by both models, then each model's, then the API's additions
PROCESSING_FIELDS = (
    "prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
    "seed_resize_from_w", "sampler_name", "scheduler", "batch_size", "n_iter", "steps", "cfg_scale", "width", "height",
    "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid", "eta", "denoising_strength", "s_min_uncond",
    "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings", "override_settings_restore_afterwards",
    "refiner_checkpoint", "refiner_switch_at", "disable_extra_networks", "firstpass_image", "comments")
API_FIELDS = ("force_task_id", "sampler_index", "script_name", "script_args", "send_images", "save_images",
              "alwayson_scripts", "infotext")
TXT2IMG_FIELDS = PROCESSING_FIELDS + (
    "enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
    "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
    "hr_negative_prompt", "hr_additional_modules") + API_FIELDS
IMG2IMG_FIELDS = PROCESSING_FIELDS + (
    "init_images", "resize_mode", "image_cfg_scale", "mask", "mask_blur_x", "mask_blur_y", "mask_blur", "mask_round",
    "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
    "initial_noise_multiplier", "latent_mask", "include_init_images") + API_FIELDS
UNIT_FIELDS = ("enabled", "image", "input_image", "mask", "mask_image", "module", "model", "weight", "resize_mode",
               "low_vram", "lowvram", "processor_res", "threshold_a", "threshold_b", "guidance_start", "guidance_end",
               "pixel_perfect", "control_mode", "guess_mode", "guessmode", "hr_option", "save_detected_map", "is_ui",
               # the extension's newer fields (v1.1.4xx)
               "input_mode", "use_preview_as_input", "generated_image", "batch_image_dir", "batch_mask_dir",
               "batch_input_gallery", "batch_mask_gallery", "batch_image_files", "batch_keyframe_idx",
               "batch_modifiers", "animatediff_batch", "image_fg", "mask_image_fg", "advanced_weighting",
               "effective_region_mask", "pulid_mode", "union_control_type", "ipadapter_input",
               "inpaint_crop_input_image")
# what each of those newer fields is sent as when a client uses it (kiln runs none of these: each is refused; it runs
# advanced_weighting and effective_region_mask, walked in UNIT)
NEWER_UNIT_VALUES = {"input_mode": "batch", "use_preview_as_input": True, "generated_image": "x",
                     "batch_image_dir": "/in", "batch_mask_dir": "/masks", "batch_input_gallery": ["x"],
                     "batch_mask_gallery": ["x"], "batch_image_files": ["a.png"], "batch_keyframe_idx": "0,5",
                     "batch_modifiers": ["x"], "animatediff_batch": True, "image_fg": "x", "mask_image_fg": "x",
                     "pulid_mode": "Style", "union_control_type": "Canny", "ipadapter_input": ["x"]}

BASE = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 2, "sampler_name": "Euler",
        "cfg_scale": 7.5, "seed": 5, "width": 64, "height": 64}


def _png(size=(64, 64), color=(200, 80, 40)) -> str:
    image = Image.new("RGB", size, color)
    image.paste((20, 160, 220), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return base64.b64encode(encode(image)).decode()


def _mask(box=(16, 16, 48, 48)) -> str:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, box)
    return base64.b64encode(encode(mask)).decode()


def _photo() -> str:
    photo = Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    return base64.b64encode(encode(photo)).decode()


INIT, WIDE, MASK, LATENT, PHOTO = _png(), _png((128, 48), (40, 90, 200)), _mask(), _mask((24, 24, 40, 40)), _photo()
HIRES = {"enable_hr": True, "denoising_strength": 0.6}
CHURN = {"s_churn": 0.6}
INPAINT = {"mask": MASK, "inpaint_full_res": False}


def unit(**fields) -> dict:
    return {"alwayson_scripts": {"controlnet": {"args": [{"image": INIT, "module": "none"} | fields]}}}


# field -> (the request's change, the baseline's change, expected): "image" (other pixels), "size" (W, H), a count
# of images, ("refused", status, words of the message), or a check(response, client) for response-level effects.
TXT2IMG = {
    "prompt": ({"prompt": "a red dog"}, {}, "image"),
    "negative_prompt": ({"negative_prompt": "dark"}, {}, "image"),
    "styles": ({"styles": ["painterly"]}, {}, "image"),
    "seed": ({"seed": 6}, {}, "image"),
    "subseed": ({"subseed": 9, "subseed_strength": 0.5}, {"subseed": 10, "subseed_strength": 0.5}, "image"),
    "subseed_strength": ({"subseed": 9, "subseed_strength": 0.5}, {"subseed": 9}, "image"),
    # Resize seed from: that size's noise at the centre (tests/test_seeds.py); each side changes the image
    "seed_resize_from_h": ({"seed_resize_from_w": 48, "seed_resize_from_h": 32},
                           {"seed_resize_from_w": 48, "seed_resize_from_h": 48}, "image"),
    "seed_resize_from_w": ({"seed_resize_from_w": 32, "seed_resize_from_h": 48},
                           {"seed_resize_from_w": 48, "seed_resize_from_h": 48}, "image"),
    "seed_resize_from_w alone": ({"seed_resize_from_w": 32}, {}, ("refused", 422, "takes both")),
    # 4 steps: img2img's 0.7 of 2 is no call of AUTOMATIC1111's DDIM (t_enc - 1 calls), so a 422
    "sampler_name": ({"sampler_name": "DDIM", "steps": 4}, {"steps": 4}, "image"),
    "scheduler": ({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, {"sampler_name": "DPM++ 2M",
                                                                         "scheduler": "Uniform"}, "image"),
    "batch_size": ({"batch_size": 2}, {}, 2),
    "n_iter": ({"n_iter": 2}, {}, 2),
    "steps": ({"steps": 4}, {}, "image"),
    "cfg_scale": ({"cfg_scale": 3}, {}, "image"),
    "width": ({"width": 96}, {}, (96, 64)),
    "height": ({"height": 96}, {}, (64, 96)),
    "restore_faces": ({"restore_faces": True}, {}, ("refused", 422, "restore_faces")),
    "tiling": ({"tiling": True}, {}, "image"),  # the build's seamless models (kiln build sd --tiling)
    # kiln's own: VAE tiles (the tiny VAE's are 64 pixels: a 128x128 image is cut in 3 x 3)
    "vae_tiling": ({"vae_tiling": True, "width": 128, "height": 128}, {"width": 128, "height": 128}, "image"),
    "do_not_save_samples": ({"save_images": True, "do_not_save_samples": True}, {}, "saves_nothing"),
    "do_not_save_grid": ({"save_images": True, "batch_size": 2, "do_not_save_grid": True}, {}, "saves_no_grid"),
    "eta": ({"sampler_name": "DDIM", "eta": 0.8, "steps": 4}, {"sampler_name": "DDIM", "steps": 4}, "image"),
    "denoising_strength": (HIRES | {"denoising_strength": 0.3}, HIRES, "image"),
    "s_min_uncond": ({"s_min_uncond": 20.0, "steps": 4}, {"steps": 4}, "image"),  # every other step: no uncond
    "s_churn": (CHURN, {}, "image"),
    "s_tmax": (CHURN | {"s_tmax": 0.01}, CHURN, "image"),
    "s_tmin": (CHURN | {"s_tmin": 5.0}, CHURN, "image"),
    "s_noise": (CHURN | {"s_noise": 1.2}, CHURN, "image"),
    "override_settings": ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, {}, "image"),
    # ENSD reseeds the samplers' own noise: Euler a's ancestral noise changes, Euler draws none
    "override_settings (ENSD)": ({"sampler_name": "Euler a", "override_settings": {"eta_noise_seed_delta": 31337}},
                                 {"sampler_name": "Euler a"}, "image"),
    "override_settings (ENSD, no sampler noise)": ({"override_settings": {"eta_noise_seed_delta": 31337}}, {},
                                                   "same_image"),
    "override_settings_restore_afterwards": ({"override_settings": {"eta_ddim": 0.2},
                                              "override_settings_restore_afterwards": False}, {}, "keeps_settings"),
    "refiner_checkpoint": ({"refiner_checkpoint": "sdxl_refiner"}, {}, ("refused", 422, "refiner_checkpoint")),
    "refiner_switch_at": ({"refiner_checkpoint": "sdxl_refiner", "refiner_switch_at": 0.8}, {},
                          ("refused", 422, "refiner")),
    "disable_extra_networks": ({"prompt": BASE["prompt"] + " <lora:ink:0.7>", "disable_extra_networks": True}, {},
                               "same_image"),
    # the hires fix of a given first pass (AUTOMATIC1111's Upscale button), which is then not run
    "firstpass_image": (HIRES | {"firstpass_image": INIT}, HIRES, "image"),
    "firstpass_image without enable_hr": ({"firstpass_image": INIT}, {}, ("refused", 422, "needs enable_hr")),
    "comments": ({"comments": {"note": 1}}, {}, ("refused", 422, "comments")),
    "enable_hr": (HIRES, {}, (128, 128)),
    # the pre-1.0 hires fix's first pass size: the size generated, the hires pass's target computed from it
    "firstphase_width": ({"firstphase_width": 48, "firstphase_height": 64}, {}, (48, 64)),
    "firstphase_height": (HIRES | {"firstphase_width": 32, "firstphase_height": 48}, HIRES, (64, 96)),
    "firstphase_width alone": ({"firstphase_width": 32}, {}, ("refused", 422, "takes both")),
    "hr_scale": (HIRES | {"hr_scale": 1.5}, HIRES, (96, 96)),
    "hr_upscaler": (HIRES | {"hr_upscaler": "Lanczos"}, HIRES, "image"),
    "hr_second_pass_steps": (HIRES | {"hr_second_pass_steps": 1}, HIRES, "image"),
    "hr_resize_x": (HIRES | {"hr_resize_x": 96}, HIRES, (96, 96)),
    "hr_resize_y": (HIRES | {"hr_resize_y": 96}, HIRES, (96, 96)),
    "hr_checkpoint_name": (HIRES | {"hr_checkpoint_name": "other.safetensors"}, HIRES,
                           ("refused", 422, "hr_checkpoint_name")),
    # 4 second-pass steps: AUTOMATIC1111's DDIM runs 2 of them there (N - 2), none of the 2 BASE gives
    "hr_sampler_name": (HIRES | {"hr_sampler_name": "DDIM", "hr_second_pass_steps": 4},
                        HIRES | {"hr_second_pass_steps": 4}, "image"),
    "hr_scheduler": (HIRES | {"hr_sampler_name": "DPM++ 2M", "hr_scheduler": "Karras"},
                     HIRES | {"hr_sampler_name": "DPM++ 2M", "hr_scheduler": "Uniform"}, "image"),
    "hr_prompt": (HIRES | {"hr_prompt": "a red dog"}, HIRES, "image"),
    "hr_negative_prompt": (HIRES | {"hr_negative_prompt": "dark"}, HIRES, "image"),
    "hr_additional_modules": (HIRES | {"hr_additional_modules": ["ae.safetensors"]}, HIRES,
                              ("refused", 422, "hr_additional_modules")),
    "hr_additional_modules (its default)": (HIRES | {"hr_additional_modules": ["Use same choices"]}, HIRES,
                                            "same_image"),
    "clip_skip (SD.Next's)": ({"clip_skip": 2}, {}, "image"),
    "clip_skip 1.5 (SD.Next's interpolation)": ({"clip_skip": 1.5}, {}, ("refused", 422, "fractional clip_skip")),
    "force_task_id": ({"force_task_id": "task(walk)"}, {}, "names_the_task"),
    "sampler_index": ({"sampler_index": "DDIM", "sampler_name": None, "steps": 4}, {"steps": 4}, "image"),
    "script_name": ({"script_name": "sd upscale"}, {}, ("refused", 422, "script_name")),
    "script_args": ({"script_args": [1]}, {}, ("refused", 422, "script_args")),
    "send_images": ({"send_images": False}, {}, 0),
    "save_images": ({"save_images": True}, {}, "saves"),
    "alwayson_scripts": (unit(), {}, "image"),
    # the fields it gives that the request leaves unset (the request's own win: here the variation seed is new)
    "infotext": ({"infotext": "a cat\nSteps: 3, Seed: 1, Variation seed: 7, Variation seed strength: 0.5"}, {},
                 "image"),
}
IMG2IMG = {
    "init_images": ({"init_images": [WIDE]}, {}, "image"),
    "resize_mode": ({"init_images": [WIDE], "resize_mode": 1}, {"init_images": [WIDE]}, "image"),
    "image_cfg_scale": ({"image_cfg_scale": 2.5}, {}, ("refused", 422, "image_cfg_scale")),
    "denoising_strength": ({"denoising_strength": 0.4}, {}, "image"),
    "mask": (INPAINT, {}, "image"),
    "mask_blur_x": (INPAINT | {"mask_blur_x": 12, "mask_blur_y": 0}, INPAINT | {"mask_blur_x": 0, "mask_blur_y": 0},
                    "image"),
    "mask_blur_y": (INPAINT | {"mask_blur_x": 0, "mask_blur_y": 12}, INPAINT | {"mask_blur_x": 0, "mask_blur_y": 0},
                    "image"),
    "mask_blur": (INPAINT | {"mask_blur": 12}, INPAINT | {"mask_blur": 0}, "image"),
    "mask_round": (INPAINT | {"mask_round": False}, INPAINT, "image"),
    "inpainting_fill": (INPAINT | {"inpainting_fill": 2}, INPAINT, "image"),
    "inpaint_full_res": ({"mask": MASK, "inpaint_full_res": True}, INPAINT, "image"),
    "inpaint_full_res_padding": ({"mask": MASK, "inpaint_full_res": True, "inpaint_full_res_padding": 16},
                                 {"mask": MASK, "inpaint_full_res": True}, "image"),
    "inpainting_mask_invert": (INPAINT | {"inpainting_mask_invert": 1}, INPAINT, "image"),
    "initial_noise_multiplier": ({"initial_noise_multiplier": 0.7}, {}, "image"),
    "latent_mask": (INPAINT | {"latent_mask": LATENT}, INPAINT, "image"),
    "include_init_images": ({"include_init_images": True}, {}, "echoes_init_images"),
    "firstpass_image": ({"firstpass_image": INIT}, {}, ("refused", 422, "firstpass_image: the hires fix")),
    "script_name": ({"script_name": "sd upscale", "script_args": [None, 16, "Lanczos", 1.5]}, {}, (96, 96)),
    "script_args": ({"script_name": "sd upscale", "script_args": [None, 16, "Nearest", 1.5]},
                    {"script_name": "sd upscale", "script_args": [None, 16, "Lanczos", 1.5]}, "image"),
    "denoising_strength (hires is txt2img's)": ({"enable_hr": True}, {}, ("refused", 422, "enable_hr")),
}
IMG2IMG_SHARED = {k: v for k, v in TXT2IMG.items() if k in IMG2IMG_FIELDS and k not in IMG2IMG}
UNIT = {
    "enabled": (unit(enabled=False), unit(), "image"),
    "image": (unit(image=WIDE), unit(), "image"),
    "input_image": ({"alwayson_scripts": {"controlnet": {"args": [{"input_image": WIDE}]}}}, unit(), "image"),
    # an inpaint unit's mask (the maps left out: a masked one shows the mask)
    "mask": (unit(module="inpaint", mask=MASK, save_detected_map=False),
             unit(module="inpaint", save_detected_map=False), "image"),
    "mask_image": (unit(module="inpaint", mask_image=MASK, save_detected_map=False),
                   unit(module="inpaint", save_detected_map=False), "image"),
    "mask (not an inpaint module)": (unit(mask=MASK), {}, ("refused", 422, "only the inpaint modules")),
    "module": (unit(module="canny"), unit(), "image"),
    "model": (unit(model="scribble"), unit(), "image"),
    "weight": (unit(weight=0.4), unit(), "image"),
    "resize_mode": (unit(image=WIDE, resize_mode="Just Resize"), unit(image=WIDE), "image"),
    "low_vram": (unit(low_vram=True), unit(), "same_image"),  # a memory strategy: the same images by definition
    "lowvram": (unit(lowvram=True), unit(), "same_image"),
    # the map made at that resolution, then fitted (sd-webui-controlnet's order; tests/test_control_units.py)
    "processor_res": (unit(image=PHOTO, module="canny", processor_res=256), unit(image=PHOTO, module="canny"),
                      "image"),
    # at the photo's own scale (pixel perfect): at the default 512 the 64-pixel photo, upscaled 8x, has no edges
    "threshold_a": (unit(image=PHOTO, module="canny", threshold_a=20, pixel_perfect=True),
                    unit(image=PHOTO, module="canny", pixel_perfect=True), "image"),
    "threshold_b": (unit(image=PHOTO, module="canny", threshold_b=120, pixel_perfect=True),
                    unit(image=PHOTO, module="canny", pixel_perfect=True), "image"),
    "guidance_start": (unit(guidance_start=0.5), unit(), "image"),
    "guidance_end": (unit(guidance_end=0.5), unit(), "image"),
    "pixel_perfect": (unit(image=PHOTO, module="canny", pixel_perfect=True), unit(image=PHOTO, module="canny"),
                      "image"),
    "control_mode": (unit(control_mode="ControlNet is more important"), unit(), "image"),
    "guess_mode": (unit(guess_mode=True), {}, ("refused", 422, "guess_mode")),
    "guessmode": (unit(guessmode=True), {}, ("refused", 422, "guessmode")),
    "hr_option": (HIRES | unit(hr_option="Low res only"), HIRES | unit(), "image"),  # not in the hires pass
    "save_detected_map": (unit(save_detected_map=False), {}, 1),  # the image alone; with it, its map after it
    "is_ui": (unit(is_ui=True), unit(), "same_image"),  # where the unit came from: nothing to honour
    # img2img's "only masked" crop of the unit's image (tests/test_controlnet_inpaint.py): txt2img has none
    "inpaint_crop_input_image": (unit(inpaint_crop_input_image=False), unit(), "same_image"),
    # the unit acts where its region mask is white (tests/test_control_modes.py: the residuals the UNet took)
    "effective_region_mask": (unit(effective_region_mask=MASK), unit(), "image"),
    "effective_region_mask (not an image)": (unit(effective_region_mask="eA=="), {},
                                             ("refused", 422, "effective_region_mask")),
    "advanced_weighting": (unit(advanced_weighting=[0.5] * 13), unit(), "image"),
    "advanced_weighting (too short)": (unit(advanced_weighting=[1.0] * 5), {}, ("refused", 422, "advanced_weighting")),
} | {name: (unit(**{name: value}), {}, ("refused", 422, name)) for name, value in NEWER_UNIT_VALUES.items()}


@pytest.fixture(scope="module")
def walk_api(triton, tmp_path_factory):
    folder = tmp_path_factory.mktemp("walk")
    (folder / "styles.csv").write_text("name,prompt,negative_prompt\npainterly,oil painting of {prompt},photo\n")
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), limits=Limits(max_steps=50),
                                  styles_file=folder / "styles.csv", outputs_dir=folder / "outputs"))
    with live.client() as client:
        yield client, folder / "outputs"
    live.stop()


def _images(response) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in response.json()["images"]]


def _check(walk_api, route: str, base: dict, change: dict, baseline: dict, expected) -> None:
    client, outputs = walk_api
    before = set(outputs.rglob("*.png")) if outputs.exists() else set()
    options = client.get("/sdapi/v1/options").json()
    response = client.post(f"/sdapi/v1/{route}", json=base | change)
    if isinstance(expected, tuple) and expected[0] == "refused":
        _, status, words = expected
        assert response.status_code == status and words in response.text, response.text
        assert client.post(f"/sdapi/v1/{route}", json=base | baseline).status_code == 200  # and it serves on
        return
    assert response.status_code == 200, response.text
    written = (set(outputs.rglob("*.png")) if outputs.exists() else set()) - before
    if expected in ("image", "same_image"):
        reference = client.post(f"/sdapi/v1/{route}", json=base | baseline)
        same = all(np.array_equal(a, b) for a, b in zip(_images(response), _images(reference)))
        assert same == (expected == "same_image"), "the field changed nothing" if same else "it changed the image"
    elif isinstance(expected, int):
        assert len(response.json()["images"]) == expected
    elif isinstance(expected, tuple):
        assert Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).size == expected
    elif expected == "saves":
        assert len(written) == 1
    elif expected == "saves_nothing":
        assert not written
    elif expected == "saves_no_grid":
        assert len(written) == 2 and not any("grid" in p.name for p in written)
    elif expected == "names_the_task":
        progress = client.get("/sdapi/v1/progress", params={"id_task": change["force_task_id"]})
        assert progress.status_code == 200 and change["force_task_id"] in progress.json()["state"]["job"]
    elif expected == "keeps_settings":  # the request's settings are the server's after it (then put back)
        kept = client.get("/sdapi/v1/options").json()
        assert all(kept[key] == value != options[key] for key, value in change["override_settings"].items())
        client.post("/sdapi/v1/options", json={key: options[key] for key in change["override_settings"]})
    elif expected == "echoes_init_images":
        assert response.json()["parameters"]["init_images"] == change.get("init_images", base["init_images"])
    else:
        raise AssertionError(f"unknown expectation {expected!r}")


def test_every_field_is_declared_and_walked():
    """AUTOMATIC1111's fields are kiln's schema's (none ignored unread) and each has its case below."""
    assert set(TXT2IMG_FIELDS) <= set(schemas.Txt2ImgBody.model_fields) and set(TXT2IMG_FIELDS) <= set(TXT2IMG)
    assert set(IMG2IMG_FIELDS) <= set(schemas.Img2ImgBody.model_fields)
    assert set(IMG2IMG_FIELDS) <= set(IMG2IMG) | set(IMG2IMG_SHARED)
    assert set(UNIT_FIELDS) <= set(schemas.ControlNetUnitArgs.model_fields) and set(UNIT_FIELDS) <= set(UNIT)


@pytest.mark.parametrize("field", list(TXT2IMG))
def test_txt2img_field(walk_api, field):
    if field == "force_task_id":  # a task id is the job's once: a fresh one per run
        TXT2IMG[field][0]["force_task_id"] = f"task(walk-{time.time_ns()})"
    _check(walk_api, "txt2img", BASE, *TXT2IMG[field])


@pytest.mark.parametrize("field", list(IMG2IMG) + list(IMG2IMG_SHARED))
def test_img2img_field(walk_api, field):
    change, baseline, expected = (IMG2IMG | IMG2IMG_SHARED)[field]
    if field == "force_task_id":
        change = {"force_task_id": f"task(walk-i-{time.time_ns()})"}
    _check(walk_api, "img2img", BASE | {"init_images": [INIT], "denoising_strength": 0.7}, change, baseline, expected)


@pytest.mark.parametrize("field", list(UNIT))
def test_controlnet_unit_field(walk_api, field):
    _check(walk_api, "txt2img", BASE, *UNIT[field])


def test_a_field_this_server_does_not_have_is_refused_by_name(walk_api):
    client, _ = walk_api
    for route, body, name in (("txt2img", BASE | {"tile_size": 64}, "tile_size"),
                              ("img2img", BASE | {"init_images": [INIT], "inpaint_mode": 1}, "inpaint_mode"),
                              ("txt2img", BASE | unit(effective_mask=1), "effective_mask")):
        response = client.post(f"/sdapi/v1/{route}", json=body)
        assert response.status_code == 422 and name in response.text and "not a field this server has" in \
            response.text, response.text


def test_the_walk_can_fail(walk_api):
    """A field that changed nothing would fail the walk: here, an image expected to change that does not."""
    with pytest.raises(AssertionError, match="the field changed nothing"):
        _check(walk_api, "txt2img", BASE, {"seed": BASE["seed"]}, {}, "image")
