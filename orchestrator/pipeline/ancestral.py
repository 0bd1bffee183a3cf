"""AUTOMATIC1111's Euler a with its eta (k-diffusion's sample_euler_ancestral), as a diffusers scheduler.

diffusers' EulerAncestralDiscreteScheduler is k-diffusion's ancestral step at eta 1, the only one it runs. k-diffusion
scales the noise each step adds by eta (AUTOMATIC1111's "Eta" for its ancestral samplers, the eta_ancestral setting,
1 by default):

    sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2))
    sigma_down = sqrt(sigma_to^2 - sigma_up^2)
    x = x + (x - denoised) / sigma_from (sigma_down - sigma_from) + sigma_up noise

so eta 0 is Euler's step (no noise), and eta 1 diffusers' own. The noise is drawn every step whatever eta is, as
diffusers draws it, so the generator's later draws are the same at every eta.
"""

from __future__ import annotations

import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput

from orchestrator.pipeline import noise


class EulerAncestralEta(EulerAncestralDiscreteScheduler):
    """diffusers' Euler a, its step taking k-diffusion's eta (`eta_ancestral`); at 1 diffusers' step itself."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict: bool = True,
             eta_ancestral: float = 1.0):
        if eta_ancestral == 1:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma_from, sigma_to = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        sample = sample.to(torch.float32)
        if self.config.prediction_type == "epsilon":
            denoised = sample - sigma_from * model_output
        elif self.config.prediction_type == "v_prediction":
            denoised = model_output * (-sigma_from / (sigma_from**2 + 1) ** 0.5) + sample / (sigma_from**2 + 1)
        else:
            raise ValueError(f"prediction_type {self.config.prediction_type!r}: Euler a takes epsilon or v_prediction")
        full = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_up = torch.minimum(sigma_to, eta_ancestral * full)
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        drawn = noise.draw(tuple(model_output.shape), generator)  # diffusers' draw, a Philox generator's too
        previous = sample + (sample - denoised) / sigma_from * (sigma_down - sigma_from) + drawn * sigma_up
        previous = previous.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return previous, denoised
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=previous, pred_original_sample=denoised)
