"""AUTOMATIC1111's DPM++ SDE with its eta (k-diffusion's sample_dpmpp_sde), as a diffusers scheduler: the formula is
in orchestrator.pipeline.ancestral, beside the other samplers'. A module of its own, as diffusers' DPM++ SDE imports
torchsde (its Brownian tree): on an install without it, DPM++ SDE is refused by name (sampling.check_sampler) and the
other samplers run.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverSDEScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler, DPMSolverSDESchedulerOutput

from orchestrator.pipeline.ancestral import ancestral_step, predicted


class DPMSolverSDEEta(DPMSolverSDEScheduler):
    """diffusers' DPM++ SDE, its step taking k-diffusion's eta (`eta_ancestral`); at 1 diffusers' step itself."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             s_noise: float = 1.0, eta_ancestral: float = 1.0):
        if eta_ancestral == 1:
            return super().step(model_output, timestep, sample, return_dict=return_dict, s_noise=s_noise)
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.noise_sampler is None:  # diffusers' own, seeded as its: the same tree at every eta
            low, high = self.sigmas[self.sigmas > 0].min(), self.sigmas.max()
            self.noise_sampler = BrownianTreeNoiseSampler(sample, low.item(), high.item(), self.noise_sampler_seed)
        first = self.state_in_first_order  # the call at the step's start, else the one at its midpoint
        index = self.step_index if first else self.step_index - 1
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        midpoint = (sigma * sigma_next) ** 0.5  # halfway in log sigma
        denoised = predicted(self, model_output, sample, sigma if first else midpoint)
        if sigma_next == 0:  # the last step: Euler's, as k-diffusion's
            previous = sample + (sample - denoised) / sigma * (sigma_next - sigma)
        else:
            start = sample if first else self.sample
            sigma_to = midpoint if first else sigma_next
            sigma_down, sigma_up = ancestral_step(sigma, sigma_to, eta_ancestral)
            previous = sigma_down / sigma * start + (1 - sigma_down / sigma) * denoised
            previous = previous + self.noise_sampler(sigma, sigma_to) * s_noise * sigma_up
            self.sample, self.mid_point_sigma = (start, midpoint) if first else (None, None)
        self._step_index += 1
        if not return_dict:
            return previous, denoised
        return DPMSolverSDESchedulerOutput(prev_sample=previous, pred_original_sample=denoised)
