"""instruct-pix2pix: a UNet that takes the image it edits as more input channels, run as AUTOMATIC1111 runs it.

An edit checkpoint's UNet takes twice the latent channels (SDContract.edit_unet): the noisy latents, then the image's
latents, which are its VAE distribution's mode, unscaled (AUTOMATIC1111's edit_image_conditioning, diffusers'
StableDiffusionInstructPix2PixPipeline). It edits img2img's init image (after inpainting's fill, where a mask is sent);
txt2img has no image to edit (AUTOMATIC1111 fails on it).

`image_cfg_scale` (AUTOMATIC1111's "Image CFG scale"; its UI sends 1.5, its API's default is none):
- none, or 1: the image on every row and classifier-free guidance as usual (AUTOMATIC1111 runs its plain path there,
  which takes AND's parts, s_min_uncond and ControlNet);
- anything else: three rows an image, the prompt with the image, the negative prompt with the image, the negative
  prompt with zeros, guided on both (its combine_denoised_for_edit_model):
  uncond + cfg_scale x (prompt - image) + image_cfg_scale x (image - uncond).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kiln.contract import SDContract
from kiln.errors import InputError
from kiln.lora import split_lora_tags
from kiln.prompt_schedule import composable

if TYPE_CHECKING:
    import torch

DEFAULT_IMAGE_CFG = 1.5  # AUTOMATIC1111's UI default, which its clients send whatever the checkpoint


def image_guided(request, contract: SDContract) -> bool:
    """Whether the request's steps run the three rows of image guidance (image_cfg_scale set and not 1)."""
    scale = getattr(request, "image_cfg_scale", None)
    return contract.edit_unet and scale is not None and scale != 1


def check(request, contract: SDContract) -> None:
    """InputError naming why `request` cannot run on this checkpoint as an edit, or why image_cfg_scale cannot act."""
    scale = getattr(request, "image_cfg_scale", None)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
                              or not 0 <= scale <= 100):
        raise InputError(f"image_cfg_scale must be in [0, 100], got {scale!r}")
    if not contract.edit_unet:
        if scale not in (None, DEFAULT_IMAGE_CFG):
            raise InputError(f"image_cfg_scale is instruct-pix2pix's image guidance; checkpoint {contract.title!r} "
                             f"takes no image to edit ({DEFAULT_IMAGE_CFG:g}, AUTOMATIC1111's default that its clients "
                             "send, is accepted)")
        return
    if not hasattr(request, "init_image"):
        raise InputError(f"checkpoint {contract.title!r} is an instruct-pix2pix model: it edits an image; send the "
                         "image to img2img (txt2img has none to edit)")
    if request.latent_resize:
        raise InputError("resize_mode 3 (latent upscale) with an instruct-pix2pix checkpoint is not supported: the "
                         "image it edits is taken at width x height; 0, 1 and 2 are")
    if not image_guided(request, contract):
        return
    refused = (("AND (composable diffusion)", len(composable(split_lora_tags(request.prompt)[0])) > 1),
               ("s_min_uncond", request.s_min_uncond > 0), ("ControlNet", bool(request.controlnet_units)))
    for what, sent in refused:
        if sent:  # AUTOMATIC1111 asserts on AND, skips no rows for s_min_uncond; kiln's units take two rows an image
            raise InputError(f"{what} with image_cfg_scale {scale:g} on an instruct-pix2pix checkpoint is not "
                             "supported (image guidance runs three rows an image); image_cfg_scale 1 runs it")


def image_latents(moments: torch.Tensor, batch: int) -> torch.Tensor:
    """The edited image's latents for each of `batch` images: its VAE distribution's mode (mean), unscaled."""
    mean = moments[:1].chunk(2, dim=1)[0]
    return mean.expand(batch, *mean.shape[1:])


def extra_rows(extra: torch.Tensor, copies: int, guided: bool) -> torch.Tensor:
    """The channels beside the latents for each of a step's `copies` row blocks: `extra` on each; image guidance's
    last block (the negative prompt without the image) zeros."""
    import torch

    if not guided:
        return torch.cat([extra] * copies)
    return torch.cat([extra] * (copies - 1) + [torch.zeros_like(extra)])


@dataclass(frozen=True)
class EditRows:
    """A step's conditioning with image guidance's third block: its rows (the negative prompt's, the prompt's), then
    the negative prompt's again, for the rows without the image."""

    step: object  # conditioning.Conditioning or conditioning.Split
    batch: int

    def __len__(self) -> int:
        return len(self.step) + self.batch

    def calls(self, skip: int) -> list[tuple[slice, dict[str, np.ndarray]]]:
        negative = getattr(self.step, "negative", None)
        if negative is None:  # one call: the rows, the first block again after them
            return [(slice(0, None), self.step.inputs(lambda rows: np.concatenate([rows, rows[:self.batch]])))]
        rows = len(self.step)
        return [*self.step.calls(0), (slice(rows, None), negative.inputs(lambda value: value))]


def combine(noise_pred, cfg_scale: float, image_cfg_scale: float):
    """AUTOMATIC1111's combine_denoised_for_edit_model on kiln's row order (negative with the image, prompt with the
    image, negative without): uncond + cfg x (prompt - image) + image_cfg x (image - uncond)."""
    image, prompt, uncond = noise_pred.chunk(3)
    return uncond + (prompt - image) * cfg_scale + (image - uncond) * image_cfg_scale
