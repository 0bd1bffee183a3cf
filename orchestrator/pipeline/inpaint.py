"""img2img and inpainting latents, drawn as diffusers' img2img and inpaint pipelines draw them and started as
AUTOMATIC1111 starts them, and AUTOMATIC1111's "only masked" (inpaint a crop around the mask, paste it back)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from kiln.contract import SDContract
from kiln.imaging import ImageLimits, decode_image, encode_png, header_size, resized_rgb, unit_range, vae_input
from kiln.masks import (
    blur_radius,
    crop_region,
    doubled,
    fill_masked,
    given_mask,
    init_overlay,
    latent_mask,
    paste_outside_mask,
    rounded,
    shaped,
    soft_mask,
    under_overlay,
)
from orchestrator.pipeline import edit, soft_inpainting
from orchestrator.pipeline.blend import Blend
from orchestrator.pipeline.components import VAE
from orchestrator.pipeline.noise import draw
from orchestrator.pipeline.requests import GenerationResult, Img2ImgRequest, Txt2ImgRequest
from orchestrator.pipeline.sampling import noised_to
from orchestrator.pipeline.seeds import Seeds

if TYPE_CHECKING:
    import torch


def sample_latents(moments: torch.Tensor, generators: list, scaling_factor: float) -> torch.Tensor:
    """Sample the VAE's latent distribution with each image's generator, scaled (diffusers' _encode_vae_image):
    `moments` of one image (every generator samples it) or of one per generator."""
    import torch

    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))  # DiagonalGaussianDistribution
    if len(mean) == 1:
        mean, std = (t.expand(len(generators), *t.shape[1:]) for t in (mean, std))
    if len(mean) != len(generators):
        raise ValueError(f"{len(mean)} images' latent distributions for {len(generators)} generators")
    return torch.cat([m[None] + s[None] * draw((1, *m.shape), g) for m, s, g in zip(mean, std, generators)]) \
        * scaling_factor


def noised(scheduler, timesteps, start: torch.Tensor, drawn: torch.Tensor, extra: float = 0.0) -> torch.Tensor:
    """img2img's start: `start` noised with `drawn` to the first call's level (sampling.noised_to), plus
    AUTOMATIC1111's extra noise (its img2img_extra_noise): the same noise times `extra`, scaled as the scheduler
    scales the clean latents there (1 in sigma space, sqrt(alpha_cumprod) for its DDIM and the variance-preserving
    samples), so the start is x + (sigma + extra) noise in k-diffusion's terms, as its sample_img2img adds it."""
    import torch

    level = noised_to(scheduler, timesteps, len(start))
    latents = scheduler.add_noise(start, drawn, level)
    return latents + extra * scheduler.add_noise(drawn, torch.zeros_like(drawn), level) if extra else latents


def init_latents(vae: VAE, contract: SDContract, request: Img2ImgRequest, generators: list) -> tuple:
    """Encode the init image and sample its latents with each image's own generator (diffusers' retrieve_latents);
    and for an instruct-pix2pix UNet the image's latents it takes beside them (edit.image_latents), else None."""
    import torch

    if not request.latent_resize:
        moments = torch.from_numpy(vae.encode_image(request.init_image, request.width, request.height))
        channels = edit.image_latents(moments, len(generators)) if contract.edit_unet else None
        return sample_latents(moments, generators, contract.scaling_factor), channels
    width, height = own_size(request.init_image)
    latents = sample_latents(torch.from_numpy(vae.encode_image(request.init_image, width, height)), generators,
                             contract.scaling_factor)
    size = (request.height // contract.vae_scale_factor, request.width // contract.vae_scale_factor)
    return torch.nn.functional.interpolate(latents, size=size, mode="bilinear"), None  # (no edit: edit.check)


def unmasked_channels(vae: VAE, contract: SDContract, request: Txt2ImgRequest, shape: tuple, generators: list,
                      pixels: np.ndarray | None = None) -> torch.Tensor | None:
    """What a 9-channel inpainting UNet takes beside the latents where no mask is given (None for another UNet), as
    AUTOMATIC1111's: all of the image masked (a mask of ones), and the masked image's latents, sampled with each
    image's generator. The masked image is its lerp from the image (in [-1, 1]) to zeros by inpainting_mask_weight:
    img2img's init image (its img2img_image_conditioning), the hires pass's upscaled `pixels` (one per image), and
    txt2img's zeros, grey (its txt2img_image_conditioning; the hires pass's in a latent mode at weight 1, as there)."""
    import torch

    if not contract.inpainting_unet:
        return None
    if pixels is None and isinstance(request, Img2ImgRequest):
        pixels = vae_input(request.init_image, request.width, request.height)
    if pixels is None:
        pixels = np.zeros((3, shape[2] * contract.vae_scale_factor, shape[3] * contract.vae_scale_factor), np.float32)
    hidden = pixels.reshape(-1, *pixels.shape[-3:]) * (1 - np.float32(request.inpainting_mask_weight))
    latents = sample_latents(torch.from_numpy(vae.encode_pixels(hidden)), generators, contract.scaling_factor)
    return torch.cat([torch.ones(len(latents), 1, *latents.shape[2:]), latents], dim=1)


def own_size(init_image: bytes) -> tuple[int, int]:
    """resize_mode 3: the init image's own size, each side down to a multiple of 8 (what the VAE encodes)."""
    width, height = header_size(init_image, "init image")
    return width // 8 * 8, height // 8 * 8


def inpaint_latents(vae: VAE, contract: SDContract, request: Img2ImgRequest, shape: tuple, generators: list,
                    generator, scheduler, timesteps, seeding: Seeds) -> tuple:
    """The inpainting start, as AUTOMATIC1111 makes it, in diffusers' inpaint pipeline's order of random draws
    (image latents, noise, and for a 9-channel UNet the masked image's latents). Returns the starting latents and
    what the loop needs at each step: the blend (orchestrator.pipeline.blend), the soft mask (for the overlay), and
    the channels the UNet takes beside the latents ("channels": a 9-channel UNet's mask and masked-image latents, an
    instruct-pix2pix UNet's image latents of the image as the fill left it)."""
    import torch
    import torch.nn.functional as F

    batch = shape[0]
    soft = soft_mask(request.mask, request.width, request.height, request.mask_blur, request.inpainting_mask_invert,
                     request.mask_resize, request.mask_round)
    # the latents' blend and the fill by the latent mask where one is given (AUTOMATIC1111's latent_mask), else the mask
    given = given_mask(request.latent_mask) if request.latent_mask else soft
    repaint = torch.from_numpy(latent_mask(given, shape[3], shape[2], request.mask_round))[None]
    pixels = vae_input(request.init_image, request.width, request.height)
    filled = None
    if request.inpainting_fill != 1:  # all but "original": the masked area painted with the colours around it first
        filled = fill_masked(resized_rgb(request.init_image, request.width, request.height), given)
        pixels = np.float32(2.0) * unit_range(filled) - np.float32(1.0)
    mask = rounded(soft, request.mask_round)
    nine = contract.inpainting_unet  # a 9-channel UNet also takes the masked image's latents (drawn last)
    hidden = pixels * (1 - np.float32(request.inpainting_mask_weight) * mask)  # its lerp to pixels x (1 - mask)
    moments = torch.from_numpy(vae.encode_pixels(np.stack([pixels, hidden] if nine else [pixels])))
    sampling = seeding.for_latents(generators)  # the VAE's samples: from the seeds' generators with the CPU source
    image_latents = sample_latents(moments[:1], sampling, contract.scaling_factor)
    drawn = seeding.noise(shape, generator, contract.vae_scale_factor) * request.initial_noise_multiplier
    start = image_latents
    if request.inpainting_fill == 2:  # "latent noise": the seeds' noise where the mask repaints
        start = image_latents * (1 - repaint) + drawn * repaint
    elif request.inpainting_fill == 3:  # "latent nothing": zeros there
        start = image_latents * (1 - repaint)
    # At every strength, 1 too, the image (as the masked content leaves it) plus the first step's noise, as
    # AUTOMATIC1111 starts (diffusers' inpaint pipeline starts from noise alone at 1, where the fill would not act)
    latents = noised(scheduler, timesteps, start, drawn, request.extra_noise)
    blend = {"blend": Blend.for_sampler(request.sampler, repaint, start, request.soft_inpainting),
             "soft": soft, "filled": filled}  # soft: for the overlay; filled: the colour correction's target
    if contract.edit_unet:
        return latents, blend | {"channels": edit.image_latents(moments[:1], batch)}
    if not nine:
        return latents, blend
    masked_latents = sample_latents(moments[1:], sampling, contract.scaling_factor)
    mask_latent = F.interpolate(torch.from_numpy(mask[None]), size=shape[2:])  # nearest, as there
    return latents, blend | {"channels": torch.cat([mask_latent.repeat(batch, 1, 1, 1), masked_latents], dim=1)}


def finished(images: np.ndarray, latents: torch.Tensor, request: Img2ImgRequest, inpaint: dict | None) -> tuple:
    """The decoded images as AUTOMATIC1111 finishes them, soft inpainting's composite masks (else None), and the
    images kept from before a step where the request's intermediates ask for them: before colour correction
    ("color-correction", the overlay on them too, as its save_images_before_color_correction), before the overlay
    ("overlay"), and the mask each was overlaid by ("mask", (N, H, W)); the images: their colours corrected
    (request.color_correction), then the init image pasted back outside the mask (request.overlay), or with soft
    inpainting over each image where its latents changed little from the init latents (the masks then go back to
    only_masked, which pastes them)."""
    corrected, before = images, {}
    if getattr(request, "color_correction", False):  # (txt2img's finish passes through here too)
        corrected = color_corrected(images, request, None if inpaint is None else inpaint["filled"])
    masks = None
    if inpaint is not None and inpaint["blend"].soft is not None:
        blend = inpaint["blend"]
        masks = soft_inpainting.composite_masks(blend.soft, blend.repaint, blend.init, latents, request.width,
                                                request.height)
    if "color-correction" in request.intermediates:
        before["color-correction"] = overlaid(images, request, inpaint, masks)
    if "overlay" in request.intermediates:  # (what the init image is pasted over: a mask composite's image)
        before["overlay"] = corrected
    if "mask" in request.intermediates:  # AUTOMATIC1111's mask_for_overlay: the soft mask doubled, or soft inpainting's
        before["mask"] = np.stack([np.asarray(mask) for mask in masks] if masks is not None else
                                  [np.asarray(doubled(inpaint["soft"]))] * len(images))
    return overlaid(corrected, request, inpaint, masks), masks, before


def overlaid(images: np.ndarray, request: Img2ImgRequest, inpaint: dict | None, masks: list | None) -> np.ndarray:
    """The init image pasted back over inpainting's images outside the mask (request.overlay): the doubled soft mask's
    (paste_outside_mask), or each image's soft inpainting composite mask."""
    if inpaint is None or not request.overlay:
        return images
    if masks is None:
        return paste_outside_mask(images, request.init_image, inpaint["soft"])
    from PIL import Image

    init = resized_rgb(request.init_image, request.width, request.height)
    return np.stack([np.asarray(under_overlay(Image.fromarray(image), init_overlay(init, mask)))
                     for image, mask in zip(images, masks)])


def color_corrected(images: np.ndarray, request: Img2ImgRequest, filled: np.ndarray | None) -> np.ndarray:
    """AUTOMATIC1111's img2img colour correction of each image, towards request.color_target where given, else the
    init image as its start was made: at the generation's size (at its own with resize mode 3, as the VAE takes it
    there), with inpainting's fill where one painted the masked area."""
    from kiln.color_correction import color_target, correct

    if request.color_target:
        target = np.asarray(decode_image(request.color_target, ImageLimits(min_side=1)).convert("RGB"))
    elif filled is not None:
        target = np.asarray(filled)
    elif request.latent_resize:
        target = np.asarray(decode_image(request.init_image, ImageLimits(min_side=1)).convert("RGB"))
    else:
        target = np.asarray(resized_rgb(request.init_image, request.width, request.height))
    lab = color_target(target)
    return np.stack([correct(image, lab) for image in images])


def only_masked(generate: Callable[[Img2ImgRequest], GenerationResult], request: Img2ImgRequest) -> GenerationResult:
    """AUTOMATIC1111's inpaint_full_res: generate the masked region's crop at full size, paste it back.

    `generate` runs one whole-picture request (the crop); the init image keeps its own size.
    """
    from PIL import Image

    original = decode_image(request.init_image, ImageLimits(min_side=1))
    width, height = original.size
    mask = soft_mask(request.mask, width, height, request.mask_blur, request.inpainting_mask_invert,
                     binarize=request.mask_round)
    box = crop_region(np.asarray(mask) > 0, request.inpaint_full_res_padding, request.width, request.height)
    if box is None:  # nothing masked: whole-picture inpainting (which keeps everything), and no mask to show
        return generate(replace(request, inpaint_full_res=False, intermediates=tuple(
            name for name in request.intermediates if name not in ("mask", "overlay"))))
    region = (box[2] - box[0], box[3] - box[1])
    # the crop and its mask to width x height as "resize and fill" (as there: the box's aspect is only near theirs)
    crop = shaped(original.crop(box), request.width, request.height, 2)
    crop_mask = shaped(mask.crop(box), request.width, request.height, 2)
    inner = replace(request, init_image=encode_png(crop), mask=encode_png(crop_mask), mask_blur=0,
                    inpainting_mask_invert=False, inpaint_full_res=False, overlay=False,  # already blurred, inverted
                    intermediates=tuple(name for name in request.intermediates if name != "mask"))  # (made here)
    result = generate(inner)
    # the init image back outside the blurred mask (not doubled here, as there); with soft inpainting, outside each
    # image's composite mask, put back into the box as the image is
    # the mask each image is overlaid by: the blurred mask, or soft inpainting's composite mask put back in the box
    masks = [mask] * len(result.images)
    for index, composite in enumerate(result.masks or ()):
        masks[index] = Image.new("L", original.size)
        masks[index].paste(shaped(composite, *region, 1), box[:2])

    def pasted(generated_images: np.ndarray, overlay: bool = request.overlay) -> np.ndarray:
        images = []  # (the images, and those kept from before a step)
        for generated, own in zip(generated_images, masks):
            # back into the box as "crop and resize"; with the overlay, onto a transparent canvas it covers outside
            canvas = original.copy() if not overlay else Image.new("RGBA", original.size)
            canvas.paste(shaped(Image.fromarray(generated), *region, 1), box[:2])
            images.append(np.asarray(under_overlay(canvas, init_overlay(original, own)) if overlay else canvas,
                                     dtype=np.uint8))
        return np.stack(images)

    info = result.info | {"mask_blur": blur_radius(request.mask_blur),
                          "inpainting_mask_invert": request.inpainting_mask_invert, "inpaint_full_res": True,
                          "inpaint_full_res_padding": request.inpaint_full_res_padding, "inpaint_region": list(box)}
    before = {name: pasted(kept, request.overlay and name != "overlay") for name, kept in result.before.items()}
    if "mask" in request.intermediates:
        before["mask"] = np.stack([np.asarray(own) for own in masks])
    return GenerationResult(images=pasted(result.images), seeds=result.seeds, info=info, before=before)
