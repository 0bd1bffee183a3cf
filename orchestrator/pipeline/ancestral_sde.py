"""AUTOMATIC1111's DPM++ SDE with its eta (k-diffusion's sample_dpmpp_sde), as a diffusers scheduler: the formula is
in orchestrator.pipeline.ancestral, beside the other samplers'. A module of its own, as diffusers' DPM++ SDE imports
torchsde (its Brownian tree): on an install without it, DPM++ SDE is refused by name (sampling.check_sampler) and the
other samplers run.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverSDEScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDESchedulerOutput

from orchestrator.pipeline.ancestral import BrownianSteps, ancestral_step, predicted


def noise_query(sigmas: torch.Tensor, index: int) -> tuple | None:
    """The noise query diffusers' DPMSolverSDEScheduler makes at step index `index` of its interleaved sigmas (even: a
    step's first call, to the midpoint in log sigma; odd: its second, to the next sigma), computed as it computes it,
    so the same floats; None where the step goes to sigma 0 (Euler's, no noise)."""
    first = index % 2 == 0
    sigma, sigma_next = (sigmas[index], sigmas[index + 1]) if first else (sigmas[index - 1], sigmas[index])
    if sigma_next == 0:
        return None
    t, t_next = sigma.log().neg(), sigma_next.log().neg()
    if first:
        t_next = t + (t_next - t) * 0.5
    return t.neg().exp(), t_next.neg().exp()


class DPMSolverSDEEta(DPMSolverSDEScheduler):
    """diffusers' DPM++ SDE, its step taking k-diffusion's eta (`eta_ancestral`); at 1 diffusers' step itself. Its
    Brownian noise is computed ahead (ancestral.BrownianSteps), answering the queries diffusers' step makes."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             s_noise: float = 1.0, eta_ancestral: float = 1.0):
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.noise_sampler is None and eta_ancestral:  # at eta 0 no noise is added: no tree
            queries = (noise_query(self.sigmas, k) for k in range(self.step_index, len(self.sigmas) - 1))
            self.noise_sampler = BrownianSteps(sample, self.sigmas, self.noise_sampler_seed,
                                               [query for query in queries if query is not None])
        if eta_ancestral == 1:
            return super().step(model_output, timestep, sample, return_dict=return_dict, s_noise=s_noise)
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
            if eta_ancestral:
                noise = self.noise_sampler(*noise_query(self.sigmas, self.step_index))
                previous = previous + noise * s_noise * sigma_up
            self.sample, self.mid_point_sigma = (start, midpoint) if first else (None, None)
        self._step_index += 1
        if not return_dict:
            return previous, denoised
        return DPMSolverSDESchedulerOutput(prev_sample=previous, pred_original_sample=denoised)
