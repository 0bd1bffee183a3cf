"""sd-webui-controlnet's inpaint_only: an inpaint ControlNet's unit that also restores its image outside the mask.

After each UNet call (its hook.py, "Post-processing for restore") the clean latents that the noise prediction implies
are replaced outside the mask by the unit's colours encoded by the VAE, and the prediction that implies is blended
with the UNet's by the unit's weight clamped to [0, 1]:

    x0 = a xt - b eps;   x0' = x0 m + z0 (1 - m);   eps' = (a xt - x0') / b;   out = w eps' + (1 - w) eps

with a = 1 / sqrt(abar), b = sqrt(1 / abar - 1) at the call's timestep rounded (the model's own alphas, as its
DDPM tables hold them), xt the UNet's latent input, z0 the colours' encoding, and m the pixel mask max-pooled to the
latents' size (windows of the VAE's factor + 2 every factor pixels, padded by 1: 10 every 8, as the extension's, a
latent cell's ring beyond the mask). It acts on every row (the negative prompt's too), at every step of every pass:
guidance_start/end and hr_option gate the ControlNet's residuals, not this. After decoding, its postprocess pastes
the unit's colours back where the mask, dilated and box-blurred by 7 pixels (its control_net_inpaint_blur_sigma:
ControlNetUnit.inpaint_blur; a box despite the name), is under 1.

Where the mask comes from: the unit's own, else none, so that Resize and Fill's border alone is masked (the
extension's outpainting: its fill counts as masked). In img2img inpainting the extension runs
inpaint_global_harmonious instead, as it warns (orchestrator.server.control_units), so this never meets AUTOMATIC1111's
own blend. One difference: z0 is the encoding's mean, where the extension draws a sample from torch's global
generator, which no seed reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from kiln.control import fitted_map

MODULE = "inpaint_only"
BETAS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")  # what the model's alphas are made of


@dataclass(frozen=True)
class Restore:
    """One inpaint_only unit in one pass: its colours' latents (1, C, h, w), its latent mask (1, 1, h, w; 1:
    generate), its weight clamped to [0, 1] and the model's cumulative alphas."""

    latents: torch.Tensor
    mask: torch.Tensor
    weight: float
    alphas: tuple[float, ...]

    def prediction(self, sample: torch.Tensor, timestep, output: torch.Tensor) -> torch.Tensor:
        """The noise prediction `output` (rows: each copy of the batch's images in turn) restored outside the mask;
        `sample`: the UNet's latent input for one copy of the batch (scaled as the UNet took it)."""
        step = min(max(round(float(timestep)), 0), len(self.alphas) - 1)
        abar = self.alphas[step]
        a, b = abar ** -0.5, (1 / abar - 1) ** 0.5
        scaled = sample.repeat(len(output) // len(sample), 1, 1, 1) * a
        x0 = (scaled - output * b) * self.mask + self.latents * (1 - self.mask)
        return (scaled - x0) / b * self.weight + output * (1 - self.weight)


def restores(request, vae, contract, width: int, height: int) -> list[Restore]:
    """The request's inpaint_only units for a pass at width x height (their maps fitted to it, encoded by `vae`)."""
    found = []
    for unit in request.controlnet_units:
        if unit.module != MODULE:
            continue
        pixels = unit_map(unit, width, height)
        colours = pixels[..., :3].transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255) * 2 - 1
        mean = torch.from_numpy(np.asarray(vae.encode_pixels(colours))).chunk(2, dim=1)[0] * contract.scaling_factor
        found.append(Restore(mean, latent_mask(pixels[..., 3], contract.vae_scale_factor),
                             min(max(float(unit.weight), 0.0), 1.0),
                             model_alphas(*(contract.scheduler_config.get(key) for key in BETAS))))
    return found


def latent_mask(alpha: np.ndarray, factor: int) -> torch.Tensor:
    """A fitted map's mask (h, w; over 127: generate) at the latents' size (1, 1, h / factor, w / factor): max-pooled
    by windows of factor + 2 every factor pixels, padded by 1 (the extension's 10 every 8 on SD)."""
    mask = torch.from_numpy((alpha > 127).astype(np.float32))[None, None]
    return torch.nn.functional.max_pool2d(mask, factor + 2, stride=factor, padding=1)


def paste_back(images: np.ndarray, units) -> np.ndarray:
    """The decoded images (N, H, W, 3 uint8) with each inpaint_only unit's colours pasted back outside its mask,
    dilated and box-blurred by its inpaint_blur (the extension's inpaint_only_post_processing), every image from the
    one map."""
    for unit in units:
        if unit.module != MODULE:
            continue
        pixels = unit_map(unit, images.shape[2], images.shape[1])
        mask = paste_mask((pixels[..., 3] > 127).astype(np.float32), int(unit.inpaint_blur))[..., None]
        colours = pixels[..., :3].astype(np.float32)
        blended = images.astype(np.float32)  # colours + mask (image - colours), in place: a mask in [0, 1] keeps
        blended -= colours                   # it inside 0-255
        blended *= mask
        blended += colours
        images = np.rint(blended, out=blended).astype(np.uint8)
    return images


def paste_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Where the generated image stays (1) in the paste-back: the binary mask dilated by a size x size square, then
    box-blurred by one (cv2.dilate then cv2.blur, as the extension calls them)."""
    return _box_blur(_dilate(mask, size), size)


def unit_map(unit, width: int, height: int) -> np.ndarray:
    """The unit's image and mask fitted to width x height by its resize mode ((height, width, 4) uint8; no mask: 0,
    and Resize and Fill's border 255)."""
    return fitted_map(unit.image, width, height, 0 if unit.resize_mode is None else unit.resize_mode, unit.mask,
                      inpaint=True)


@lru_cache(maxsize=8)
def model_alphas(*betas) -> tuple[float, ...]:
    """The checkpoint's cumulative alphas from its scheduler config's BETAS (the DDPM tables the model was trained
    on, as the extension reads the model's own: no zero-SNR rescale)."""
    from diffusers import DDPMScheduler

    settings = {key: value for key, value in zip(BETAS, betas) if value is not None}
    return tuple(float(a) for a in DDPMScheduler(**settings).alphas_cumprod)


def _padded(values: np.ndarray, size: int, axis: int, mode: str) -> np.ndarray:
    """The image padded along `axis` for windows of `size` (OpenCV's anchor: size // 2 before each pixel) by `mode`
    (numpy's reflect is OpenCV's default border, REFLECT_101), moved to the front."""
    pad = [(0, 0)] * values.ndim
    pad[axis] = (size // 2, size - 1 - size // 2)
    return np.moveaxis(np.pad(values, pad, mode=mode), axis, 0)


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """cv2.dilate by a size x size square of ones (outside the image adds nothing: the mask is not negative)."""
    for axis in (0, 1):
        padded, length = _padded(mask, size, axis, "constant"), mask.shape[axis]
        out = padded[:length].copy()
        for start in range(1, size):
            np.maximum(out, padded[start:start + length], out=out)
        mask = np.moveaxis(out, 0, axis)
    return mask


def _box_blur(mask: np.ndarray, size: int) -> np.ndarray:
    """cv2.blur by a size x size box (normalized; the border reflected, OpenCV's default): running sums in float64."""
    for axis in (0, 1):
        padded, length = _padded(mask, size, axis, "reflect"), mask.shape[axis]
        sums = np.concatenate([np.zeros_like(padded[:1], np.float64), np.cumsum(padded, axis=0, dtype=np.float64)])
        mask = np.moveaxis((sums[size:size + length] - sums[:length]) / size, 0, axis)
    return mask.astype(np.float32)
