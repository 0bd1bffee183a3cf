"""Inpainting's blend, as AUTOMATIC1111 runs it (its CFGDenoiser's mask, and processing's last blend).

The latent mask is the soft (blurred) pixel mask resized to the latents' size by PIL's bicubic filter and rounded,
unless mask_round is off (kiln.masks.latent_mask): 1 repaints, 0 keeps the init latents (after the masked content
acted on them), what lies between mixes the two. Then:
- its k-diffusion samplers (Euler, DPM++ and the others) blend the model's *denoised prediction* with the clean init
  latents after every model call (`mask_before_denoising` off), so the sampler steps as if the model had predicted
  the init image in the kept region. diffusers' samplers take the model's output, not the prediction: `prediction`
  gives them the output that predicts the init latents there, in the scheduler's own terms at that call (its sigma,
  its parameterisation, epsilon or v). Its noise in the kept region is the sampler's own (ancestral and SDE noise
  included), not the first noise re-applied at each level as diffusers' inpainting pipelines do;
- its timestep samplers (DDIM, PLMS, UniPC) paste the clean init latents into the model's *input* before every call
  (`mask_before_denoising` on); the sampler's own latents stay as they are;
- after the last step, the latents are blended with the clean init latents once more (processing.py's sample).
All of it for a 9-channel inpainting UNet too: AUTOMATIC1111 blends whatever the UNet. Soft inpainting replaces
each of these blends (orchestrator.pipeline.soft_inpainting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.pipeline import soft_inpainting
from orchestrator.pipeline.requests import SoftInpainting
from orchestrator.pipeline.sampling import check_sampler

if TYPE_CHECKING:
    import torch

# AUTOMATIC1111's timestep samplers (sd_samplers_timesteps: CFGDenoiserTimesteps masks before denoising)
TIMESTEP_SCHEDULERS = ("UniPCMultistepScheduler",)


@dataclass(frozen=True)
class Blend:
    keep: torch.Tensor  # (rows or 1, 1, h, w): 1 where the init latents stay (AUTOMATIC1111's `mask`), 0 to 1
    init: torch.Tensor  # (rows, channels, h, w): the init latents, after the masked content acted on them
    before: bool  # paste into the model's input (timestep samplers), not into its prediction
    repaint: torch.Tensor | None = None  # soft inpainting's: the latent mask itself (1 - keep)
    soft: SoftInpainting | None = None

    @classmethod
    def for_sampler(cls, sampler: str, repaint: torch.Tensor, init: torch.Tensor,
                    soft: SoftInpainting | None = None) -> Blend:
        chosen = check_sampler(sampler)
        return cls(keep=1 - repaint, init=init, before=chosen.compvis or chosen.scheduler in TIMESTEP_SCHEDULERS,
                   repaint=None if soft is None else repaint, soft=soft)

    def _mixed(self, latents: torch.Tensor, kept: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.soft is not None:
            return soft_inpainting.latent_blend(self.soft, kept, latents,
                                                soft_inpainting.weight(self.soft, self.repaint, sigma))
        return latents * (1 - self.keep) + kept * self.keep

    def model_input(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        """What the model sees of `latents` at this call (before the scheduler scales it); soft inpainting's weight
        takes the timestep for the sigma, as AUTOMATIC1111's timestep samplers pass it."""
        return self._mixed(latents, self.init, float(timestep)) if self.before else latents

    def prediction(self, scheduler, timestep, sample: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The model's (guided) output for scheduler.step: in the kept region, the output that makes the scheduler's
        own prediction of the clean latents the init latents (k-diffusion samplers); unchanged otherwise. Soft
        inpainting blends that prediction of the clean latents with the init latents, at the call's sigma."""
        if self.before:
            return output
        if self.soft is None:
            return self._mixed(output, predicting(scheduler, timestep, sample, self.init), 0.0)
        c0, c1 = coefficients(scheduler, timestep)
        blended = self._mixed(denoised(scheduler, timestep, sample, output), self.init, c1 / c0)
        return predicting(scheduler, timestep, sample, blended)

    def final(self, latents: torch.Tensor) -> torch.Tensor:
        """The last blend, after the last step (none with soft inpainting)."""
        return latents if self.soft is not None else self._mixed(latents, self.init, 0.0)


def coefficients(scheduler, timestep) -> tuple[float, float]:
    """(c0, c1): at the model call now due, the scheduler's sample is c0 x0 + c1 eps. Sigma-space schedulers
    (Euler, Heun, LMS, DPM++ SDE: x0 + sigma eps) take the sigma their scale_model_input divides by (DPM++ SDE's
    midpoint in its second stage); variance-preserving ones (DPM++ 2M, UniPC: alpha x0 + sigma_t eps) the sigma of
    their step index; those without a sigma table (DDPM, LCM) the training schedule at the timestep."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:
        cumprod = float(scheduler.alphas_cumprod[int(timestep)])
        return cumprod ** 0.5, (1 - cumprod) ** 0.5
    midpoint = getattr(scheduler, "mid_point_sigma", None)
    if midpoint is not None and not getattr(scheduler, "state_in_first_order", True):
        sigma = float(midpoint)
    else:
        index = scheduler.step_index
        if index is None:  # before the first step: where it begins (sampling.schedule sets that)
            index = scheduler.begin_index if scheduler.begin_index is not None else scheduler.index_for_timestep(
                timestep)
        sigma = float(sigmas[index])
    if float(scheduler.init_noise_sigma) > 1:  # the sample in sigma space
        return 1.0, sigma
    alpha = (sigma ** 2 + 1) ** -0.5
    return alpha, sigma * alpha


def denoised(scheduler, timestep, sample: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The clean latents the scheduler predicts from the model's `output` at the call now due (predicting's
    inverse)."""
    c0, c1 = coefficients(scheduler, timestep)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - c1 * output) / c0
    if kind == "v_prediction":
        norm = (c0 ** 2 + c1 ** 2) ** 0.5
        return c0 / norm * sample / norm - c1 / norm * output
    if kind == "sample":
        return output
    raise ValueError(f"cannot blend a {kind!r} prediction")


def predicting(scheduler, timestep, sample: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The model output from which the scheduler, at the call now due, predicts the clean latents `x0`."""
    c0, c1 = coefficients(scheduler, timestep)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - c0 * x0) / c1
    if kind == "v_prediction":  # on the unit-variance sample: x0 = a x - s v, a^2 + s^2 = 1
        norm = (c0 ** 2 + c1 ** 2) ** 0.5
        return (c0 / norm * sample / norm - x0) / (c1 / norm)
    if kind == "sample":
        return x0
    raise ValueError(f"cannot blend a {kind!r} prediction")
