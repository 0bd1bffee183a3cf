"""ControlNet inpainting (sd-webui-controlnet's inpaint modules): the unit's image with its mask, fitted together, the
masked pixels -1 for the ControlNet (its hook's "inpaint protocol", diffusers' recipe for control_v11p_sd15_inpaint);
where the mask comes from (the unit's mask or mask_image, an {"image", "mask"} pair, or img2img's own init image and
mask for a unit without an image); inpaint_only as the extension runs it in img2img inpainting. No server: the units
as the txt2img/img2img routes make them (control_units), and the pipeline in process against diffusers."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from kiln.control import control_image, fitted_map
from kiln.controlmaps import fit_map, high_quality_resize
from kiln.cvimage import resize
from kiln.errors import InputError
from kiln.imaging import encode_png
from kiln.masks import shaped, soft_mask
from kiln.paths import SAMPLE_IMAGES
from orchestrator.pipeline import ControlNetUnit, HiresFix, Img2ImgRequest, Txt2ImgRequest, make_scheduler
from orchestrator.server.control_units import InitImage, controlnet_units, detect_map

MAX_PIXELS = 1 << 22


def _photo(size: tuple[int, int]) -> bytes:
    return encode_png(Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize(size, Image.Resampling.LANCZOS))


def _mask(size: tuple[int, int], box: tuple[int, int, int, int], soft: bool = False) -> bytes:
    """White (inpaint) inside `box`; with `soft`, a grey ramp across the image too (values either side of 127)."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    pixels = np.asarray(mask, dtype=np.int32)
    if soft:
        pixels = np.maximum(pixels, np.linspace(0, 250, size[0], dtype=np.int32)[None])
    return encode_png(Image.fromarray(pixels.astype(np.uint8)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_the_mask_is_fitted_with_the_image_binarized_and_the_masked_pixels_are_minus_one():
    """The extension's high_quality_resize: the mask takes the colours' interpolation (area to shrink, cubic to
    enlarge) and is binarized after (over 127); resize and fill's border is masked; the ControlNet's input is the
    colours in [0, 1] and -1 where masked."""
    photo, mask = _photo((48, 32)), _mask((48, 32), (10, 5, 30, 20), soft=True)
    colours, alpha = _pixels(photo), _pixels(mask)[..., 0]
    for width, height, interpolation in ((96, 64, "cubic"), (24, 16, "area")):
        fitted = fit_map(np.concatenate([colours, alpha[..., None]], axis=2), width, height, 0)
        assert np.array_equal(fitted[..., :3], high_quality_resize(colours, width, height))
        expected = np.where(resize(alpha, width, height, interpolation) > 127, 255, 0)
        assert np.array_equal(fitted[..., 3], expected) and set(np.unique(fitted[..., 3])) == {0, 255}
    same = fitted_map(photo, 48, 32, 0, mask)  # at its own size: binarized all the same
    assert np.array_equal(same[..., 3], np.where(alpha > 127, 255, 0))
    filled = fitted_map(photo, 48, 48, 2, mask)  # 48x32 into 48x48: bands of 8 above and below, masked
    assert (filled[:8, :, 3] == 255).all() and (filled[-8:, :, 3] == 255).all()
    assert np.array_equal(filled[8:40, :, 3], same[..., 3])
    assert fitted_map(photo, 48, 48, 2, mask) is filled and not filled.flags.writeable  # fitted once a pass
    hint = control_image(photo, 48, 32, fit=0, mask=mask)
    plain = control_image(photo, 48, 32, fit=0)
    masked = same[..., 3] == 255
    assert hint.shape == (3, 32, 48) and (hint[:, masked] == -1).all()
    assert np.array_equal(hint[:, ~masked], plain[:, ~masked]) and masked.any() and (~masked).any()
    bands = control_image(photo, 48, 48, fit=2, inpaint=True)  # an inpaint unit without a mask: the fill's alone
    assert (bands[:, :8] == -1).all() and (bands[:, -8:] == -1).all()
    assert np.array_equal(bands[:, 8:40], control_image(photo, 48, 32, fit=0))
    with pytest.raises(InputError, match="controlnet mask is 40x32; it must be its image's size, 48x32"):
        control_image(photo, 48, 32, fit=0, mask=_mask((40, 32), (0, 0, 9, 9)))


def test_the_units_mask_comes_from_its_fields_and_img2img_lends_its_own():
    """mask, mask_image and an {"image", "mask"} pair give the same unit; a unit without an image takes img2img's
    init image (by AUTOMATIC1111's resize mode) and, an inpaint one, its mask as the extension prepares it (inverted,
    blurred); txt2img refuses a unit without an image; inpaint_only becomes inpaint_global_harmonious where img2img
    has a mask, as the extension's own fallback."""
    photo, mask = _photo((64, 64)), _mask((64, 64), (16, 16, 40, 40))

    def units(*args, init=None):
        return controlnet_units({"controlnet": {"args": list(args)}}, MAX_PIXELS, 64, 64, 5, init)

    unit = {"module": "inpaint_global_harmonious", "image": _b64(photo)}
    (plain,) = units(unit | {"mask": _b64(mask)})
    assert plain.module == "inpaint" and plain.mask == mask and plain.resize_mode == 1 and plain.processor_res == -1
    assert units(unit | {"mask_image": _b64(mask)}) == units({"module": "inpaint", "image": {
        "image": _b64(photo), "mask": _b64(mask)}}) == (plain,)
    (maskless,) = units(unit)  # nothing masked: the image alone, as the extension's all-zero alpha
    assert maskless.mask == b"" and np.array_equal(control_image(maskless.image, 64, 64, fit=1),
                                                   control_image(photo, 64, 64, fit=1))
    pair = {"image": _b64(photo), "mask": _b64(mask)}
    for bad, words in ((unit | {"mask": _b64(mask), "mask_image": _b64(mask)}, "mask and mask_image are the same"),
                       (unit | {"image": pair, "mask_image": _b64(mask)}, "a mask in image and in mask"),
                       (unit | {"mask": _b64(_mask((32, 64), (0, 0, 8, 8)))}, "].mask is 32x64; it must be the "
                                                                               "image's size, 64x64"),
                       ({"module": "canny", "image": _b64(photo), "mask": _b64(mask)}, "only the inpaint modules"),
                       ({"module": "canny"}, "is enabled but has no image")):
        with pytest.raises(InputError, match="alwayson_scripts.controlnet.args\\[0\\]") as info:
            units(bad)
        assert words in str(info.value)

    wide = _photo((96, 64))
    init = InitImage(wide, 2, _mask((96, 64), (10, 10, 50, 40)), mask_blur=3, invert=True)
    canny, inpaint, only = units({"module": "canny"}, {"module": "inpaint"}, {"module": "inpaint_only"}, init=init)
    assert canny.image != wide and canny.resize_mode == 2 and canny.mask == b""  # the map of the init image
    assert inpaint.image == wide and inpaint.resize_mode == 2  # AUTOMATIC1111's resize mode, not the unit's
    prepared = soft_mask(init.mask, 96, 64, 3, True, binarize=False)
    assert np.array_equal(_pixels(inpaint.mask)[..., 0], np.asarray(prepared))
    assert only == replace(inpaint, module="inpaint")
    (lone,) = units({"module": "inpaint_only", "image": _b64(photo)})  # txt2img: its restore (below)
    assert lone.module == "inpaint_only"
    with pytest.raises(InputError, match="the mask is 64x64, the init image 96x64"):
        units({"module": "inpaint"}, init=replace(init, mask=mask))
    shown = detect_map(inpaint, Txt2ImgRequest(prompt="", width=64, height=64))  # the extension's visualization
    fitted = fitted_map(wide, 64, 64, 2, inpaint.mask)
    assert shown.shape == (64, 64, 4) and set(np.unique(shown[..., 3])) == {128, 255}
    assert np.array_equal(shown[..., 3] == 128, fitted[..., 3] == 255)


def test_only_masked_crops_the_units_image_around_the_mask():
    """img2img's "only masked" (inpaint_full_res) cuts each unit's image (and an inpaint unit's mask) as it cuts the
    init image, as the extension's try_crop_image_with_a1111_mask: shaped to the mask's size by the unit's resize
    mode, the mask's box (padded, grown to the generation's aspect) cut out and shaped to the generation's size by
    resize and fill; inpaint_crop_input_image false leaves it whole; without "only masked", or a mask, nothing is
    cut."""
    photo, wide = _photo((64, 64)), _photo((96, 64))
    mask = _mask((64, 64), (20, 24, 35, 39))
    init = InitImage(photo, 0, mask, mask_blur=0, only_masked=True, padding=4)

    def units(*args, init=init):
        return controlnet_units({"controlnet": {"args": list(args)}}, MAX_PIXELS, 64, 64, 5, init)

    box = (16, 20, 40, 44)  # the mask's 16x16 box, 4 more on each side (already square)
    for mode, name in ((0, "Just Resize"), (1, "Crop and Resize"), (2, "Resize and Fill")):
        (cut,) = units({"image": _b64(wide), "resize_mode": name})
        expected = shaped(shaped(Image.open(io.BytesIO(wide)), 64, 64, mode).crop(box), 64, 64, 2)
        assert np.array_equal(_pixels(cut.image), np.asarray(expected)), name
    unit = {"image": _b64(wide), "module": "inpaint", "mask": _b64(_mask((96, 64), (0, 0, 47, 63)))}
    (inpaint,) = units(unit | {"resize_mode": "Just Resize"})
    expected_mask = shaped(Image.open(io.BytesIO(_mask((96, 64), (0, 0, 47, 63)))), 64, 64, 0).crop(box)
    assert np.array_equal(_pixels(inpaint.mask)[..., 0], np.asarray(shaped(expected_mask, 64, 64, 2)))
    (whole,) = units({"image": _b64(wide), "inpaint_crop_input_image": False})
    for init_changed in (replace(init, only_masked=False), replace(init, mask=b"")):
        assert units({"image": _b64(wide)}, init=init_changed) == (whole,)
    assert whole.image == wide


def test_an_inpaint_unit_matches_diffusers_inpaint_condition(local, sd_checkpoint):
    """The tiny ControlNet given the photo with a mask: diffusers' ControlNet pipeline given its recipe's tensor
    (the image in [0, 1], -1 where the mask is over one half) makes the same image; the mask acts; inpaint_only
    outside img2img inpainting, and a mask on another module, are refused by the pipeline's checks."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    def recipe(photo: bytes, mask: bytes) -> np.ndarray:  # diffusers' make_inpaint_condition
        image = _pixels(photo).astype(np.float32) / 255
        image[_pixels(mask)[..., 0].astype(np.float32) / 255 > 0.5] = -1.0
        return image.transpose(2, 0, 1)

    photo, mask, soft = _photo((64, 64)), _mask((64, 64), (8, 20, 40, 56)), _mask((64, 64), (8, 20, 40, 56), True)
    # the ControlNet's input is the recipe's, exactly, a grey mask's threshold too (the tiny random ControlNet hears
    # its input faintly: the images below tell the mask from none by 5 levels, 0 from -1 there by a level or two)
    for given in (mask, soft):
        assert np.array_equal(control_image(photo, 64, 64, fit=0, mask=given), recipe(photo, given))
    tensor = recipe(photo, mask)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_checkpoint), safety_checker=None)
    control = StableDiffusionControlNetPipeline(**pipe.components,
                                                controlnet=ControlNetModel.from_pretrained(
                                                    str(sd_checkpoint / "controlnet")))
    control.set_progress_bar_config(disable=True)
    control.scheduler = make_scheduler("Euler", dict(pipe.scheduler.config))
    expected = control("a photo of a cat", image=torch.from_numpy(tensor[None].copy()),
                       num_inference_steps=6, guidance_scale=7.5, negative_prompt="blurry", height=64, width=64,
                       controlnet_conditioning_scale=2.0, output_type="np",
                       generator=torch.Generator().manual_seed(3)).images
    expected = (expected * 255).round().astype(np.uint8)
    unit = ControlNetUnit(image=photo, module="inpaint", mask=mask, resize_mode=0, weight=2.0)
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=6, sampler="Euler",
                             cfg_scale=7.5, seed=3, width=64, height=64, controlnet=(unit,))
    made = local.txt2img(request)
    assert np.abs(made.images.astype(int) - expected.astype(int)).max() <= 2
    unmasked = local.txt2img(replace(request, controlnet=(replace(unit, mask=b""),)))
    assert np.abs(unmasked.images.astype(int) - made.images.astype(int)).max() > 2  # the mask acted (5 levels)
    assert "Module: inpaint" in made.info["controlnet"][0]
    with pytest.raises(InputError, match="only the inpaint modules"):
        local.txt2img(replace(request, controlnet=(replace(unit, module="canny"),)))


def _restored(pipe, hint: np.ndarray, weight: float):
    """diffusers' UNet `pipe.unet` made to restore the way sd-webui-controlnet's hook.py does for inpaint_only,
    written from its formulas: x0 = a xt - b eps outside the mask (max-pooled 10x10 every 8, padded 1) replaced by
    the colours' latents, the noise that implies blended by the weight, at the timestep rounded."""
    colours = torch.from_numpy(hint[..., :3].transpose(2, 0, 1)[None].astype(np.float32) / 255)
    with torch.inference_mode():
        z0 = pipe.vae.encode(colours * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    masked = torch.from_numpy((hint[..., 3] > 127).astype(np.float32))[None, None]
    factor = pipe.vae_scale_factor  # 8: the extension's 10x10 windows every 8 (the tiny VAE's 2: 4x4 every 2)
    m = torch.nn.functional.max_pool2d(masked, factor + 2, stride=factor, padding=1)
    alphas = pipe.scheduler.alphas_cumprod
    forward = pipe.unet.forward

    def restored(sample, timestep, *args, **kwargs):
        eps = forward(sample, timestep, *args, **kwargs)[0]
        abar = alphas[int(torch.round(torch.as_tensor(timestep).float()))]
        a, b = torch.sqrt(1 / abar), torch.sqrt(1 / abar - 1)
        x0 = (a * sample - b * eps) * m + z0 * (1 - m)
        return ((a * sample - x0) / b * weight + eps * (1 - weight),)

    return restored


def test_inpaint_only_restores_each_step_and_pastes_back_as_the_extension(local, sd_checkpoint):
    """inpaint_only outpainting in txt2img (the photo Resize-and-Filled: its bands masked, and a mask of its own):
    diffusers' ControlNet pipeline given the hint, its UNet restored by the extension's formulas (_restored) and its
    paste-back (the mask dilated by 7 then box-blurred by 7: scipy's filters) makes the same image; outside the
    blurred mask the image is the photo's pixels. Without the restore (inpaint_global_harmonious) the masked part
    differs; the hires fix's second pass restores and pastes at its size; img2img inpainting refuses it."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from scipy.ndimage import maximum_filter, uniform_filter

    photo, mask, weight = _photo((64, 48)), _mask((64, 48), (20, 12, 40, 30)), 0.75
    hint = fitted_map(photo, 64, 64, 2, mask)  # bands of 8 above and below, masked (tested above)
    assert (hint[:8, :, 3] == 255).all() and (hint[8:56, :, 3] == 0).any()
    tensor = np.where(hint[..., 3:] > 127, np.float32(-1), hint[..., :3].astype(np.float32) / 255).transpose(2, 0, 1)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_checkpoint), safety_checker=None)
    control = StableDiffusionControlNetPipeline(**pipe.components, controlnet=ControlNetModel.from_pretrained(
        str(sd_checkpoint / "controlnet")))
    control.set_progress_bar_config(disable=True)
    control.scheduler = make_scheduler("Euler", dict(pipe.scheduler.config))
    control.unet.forward = _restored(control, hint, weight)
    try:
        generated = control("a photo of a cat", image=torch.from_numpy(tensor[None].copy()), num_inference_steps=6,
                            guidance_scale=7.5, negative_prompt="blurry", height=64, width=64,
                            controlnet_conditioning_scale=weight, output_type="np",
                            generator=torch.Generator().manual_seed(3)).images[0]
    finally:
        del control.unet.forward
    kept = uniform_filter(maximum_filter((hint[..., 3] > 127).astype(np.float32), size=7, mode="constant"), size=7,
                          mode="mirror")[..., None]
    expected = np.round(kept * np.round(generated * 255) + (1 - kept) * hint[..., :3])

    unit = ControlNetUnit(image=photo, module="inpaint_only", mask=mask, resize_mode=2, weight=weight)
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=6, sampler="Euler",
                             cfg_scale=7.5, seed=3, width=64, height=64, controlnet=(unit,))
    made = local.txt2img(request).images[0]
    assert np.abs(made.astype(int) - expected).max() <= 2
    outside = kept[..., 0] == 0
    assert outside.any() and np.array_equal(made[outside], hint[..., :3][outside])  # pasted back exactly
    plain = local.txt2img(replace(request, controlnet=(replace(unit, module="inpaint"),))).images[0]
    inside = hint[..., 3] == 255
    assert np.abs(plain[inside].astype(int) - made[inside].astype(int)).max() > 2  # the restore acted in the mask

    hires = replace(request, hires=HiresFix(scale=2.0, upscaler="Latent", denoising_strength=0.6, steps=3))
    big = local.txt2img(hires).images[0]
    fitted = fitted_map(photo, 128, 128, 2, mask)
    far = uniform_filter(maximum_filter((fitted[..., 3] > 127).astype(np.float32), size=7, mode="constant"),
                         size=7, mode="mirror") == 0
    assert big.shape == (128, 128, 3) and np.array_equal(big[far], fitted[..., :3][far])
    inpainting = Img2ImgRequest(prompt="a cat", steps=3, width=64, height=64, init_image=_photo((64, 64)),
                                mask=_mask((64, 64), (8, 8, 30, 30)), controlnet=(unit,))
    with pytest.raises(InputError, match="inpaint_only restores its image outside its mask"):
        local.img2img(inpainting)


def test_the_paste_back_mask_is_opencvs_dilate_then_blur_and_the_benchmark_runs(tmp_path):
    """restore.paste_mask against scipy's filters (a square of ones dilating, the box blur reflecting the border as
    OpenCV's REFLECT_101), at the extension's 7, an even size (OpenCV's anchor: size // 2) and 1 (nothing done);
    benchmarks/inpaint_only.py at a small side (it checks the same against scipy itself)."""
    from scipy.ndimage import maximum_filter, uniform_filter

    from benchmarks.inpaint_only import main as bench_main
    from orchestrator.pipeline.restore import paste_mask

    mask = np.zeros((40, 30), np.float32)
    mask[5:12, 0:9] = mask[30:40, 20:24] = 1
    for size in (7, 4, 1):  # (scipy's window, like OpenCV's, starts size // 2 before the pixel)
        expected = uniform_filter(maximum_filter(mask, size=size, mode="constant"), size=size, mode="mirror")
        assert np.abs(paste_mask(mask, size) - expected).max() < 1e-6, size
    assert np.array_equal(paste_mask(mask, 1), mask)
    rows = bench_main(["--sides", "64", "--repeats", "1", "--out", str(tmp_path)])["rows"]
    assert len(rows) == 4 and all(row["ms"] > 0 for row in rows) and (tmp_path / "inpaint_only.json").exists()
