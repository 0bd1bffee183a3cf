"""AUTOMATIC1111's Euler a, DPM++ SDE and DPM++ 2M SDE with its eta (k-diffusion's), as diffusers schedulers.

diffusers' EulerAncestralDiscreteScheduler, DPMSolverSDEScheduler and DPMSolverMultistepScheduler ("sde-dpmsolver++")
are k-diffusion's sample_euler_ancestral, sample_dpmpp_sde and sample_dpmpp_2m_sde at eta 1, the only eta they run.
k-diffusion scales the noise each step adds by eta (AUTOMATIC1111's "Eta" for these samplers, the eta_ancestral
setting, 1 by default):

- Euler a: sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)),
  sigma_down = sqrt(sigma_to^2 - sigma_up^2), x = x + (x - denoised) / sigma_from (sigma_down - sigma_from)
  + sigma_up noise: eta 0 is Euler's step;
- DPM++ SDE: each of its two calls a step (to the midpoint in log sigma, then from the start again with the
  midpoint's prediction) is such an ancestral step in the exponential integrator's form, x = sigma_down / sigma_from
  x + (1 - sigma_down / sigma_from) denoised + sigma_up noise (the Brownian tree's), with eta in sigma_up: eta 0 is
  DPM-Solver++(2S)'s step;
- DPM++ 2M SDE (midpoint), with h = log(sigma_from / sigma_to): x = sigma_to / sigma_from e^(-eta h) x
  + (1 - e^(-(1 + eta) h)) (denoised + D1 / 2) + sigma_to sqrt(1 - e^(-2 eta h)) noise, D1 the multistep's
  difference (none on the first step; a last step to sigma 0 lands on the prediction itself): eta 0 is DPM++ 2M's
  step.
  diffusers computes it on the variance-preserving sample (the k-diffusion one times alpha); so does this.

At eta 1 each is diffusers' step itself. The noise is drawn every step whatever eta is, as diffusers draws it, so the
generator's later draws are the same at every eta. DPM++ SDE's class is in orchestrator.pipeline.ancestral_sde: its
Brownian tree needs torchsde, which the serving install leaves out.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput

from orchestrator.pipeline import noise


def predicted(scheduler, model_output: torch.Tensor, sample: torch.Tensor, sigma) -> torch.Tensor:
    """The clean sample a k-diffusion scheduler's model output predicts at `sigma` (epsilon or v)."""
    if scheduler.config.prediction_type == "epsilon":
        return sample - sigma * model_output
    if scheduler.config.prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    raise ValueError(f"prediction_type {scheduler.config.prediction_type!r}: kiln's eta takes epsilon or v_prediction")


def ancestral_step(sigma_from, sigma_to, eta: float) -> tuple:
    """k-diffusion's get_ancestral_step: (sigma_down, sigma_up), the deterministic part's target and the noise's."""
    up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


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
        denoised = predicted(self, model_output, sample, sigma_from)
        sigma_down, sigma_up = ancestral_step(sigma_from, sigma_to, eta_ancestral)
        drawn = noise.draw(tuple(model_output.shape), generator)  # diffusers' draw, a Philox generator's too
        previous = sample + (sample - denoised) / sigma_from * (sigma_down - sigma_from) + drawn * sigma_up
        previous = previous.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return previous, denoised
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=previous, pred_original_sample=denoised)


class DPMSolverMultistepEta(DPMSolverMultistepScheduler):
    """diffusers' DPM++ 2M SDE (midpoint), its step taking k-diffusion's eta (`eta_ancestral`); at 1 diffusers' own."""

    eta_ancestral = 1.0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, variance_noise=None,
             return_dict: bool = True, eta_ancestral: float = 1.0):
        self.eta_ancestral = eta_ancestral  # read by the updates that diffusers' step calls
        return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                            return_dict=return_dict)

    def dpm_solver_first_order_update(self, model_output: torch.Tensor, *args, sample=None, noise=None, **kwargs):
        if self.eta_ancestral == 1 or args or kwargs:
            return super().dpm_solver_first_order_update(model_output, *args, sample=sample, noise=noise, **kwargs)
        return self._with_eta(sample, model_output, None, noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list: list, *args, sample=None, noise=None,
                                                 **kwargs):
        if self.eta_ancestral == 1 or args or kwargs:
            return super().multistep_dpm_solver_second_order_update(model_output_list, *args, sample=sample,
                                                                    noise=noise, **kwargs)
        h, h_last = (self._lambda(self.step_index + i + 1) - self._lambda(self.step_index + i) for i in (0, -1))
        m0, m1 = model_output_list[-1], model_output_list[-2]
        return self._with_eta(sample, m0, (m0 - m1) * (h / h_last), noise)

    def _lambda(self, index: int) -> torch.Tensor:
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        return torch.log(alpha) - torch.log(sigma)

    def _with_eta(self, sample: torch.Tensor, denoised: torch.Tensor, difference, noise) -> torch.Tensor:
        if self.config.algorithm_type != "sde-dpmsolver++" or self.config.solver_type != "midpoint":
            raise ValueError("eta other than 1 runs on DPM++ 2M SDE (sde-dpmsolver++, midpoint) only")
        if self.sigmas[self.step_index + 1] == 0:  # the last step: k-diffusion lands on the prediction
            return denoised
        eta = self.eta_ancestral
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + 1])
        sigma_s = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])[1]
        h = self._lambda(self.step_index + 1) - self._lambda(self.step_index)
        weight = alpha_t * -torch.expm1(-(1 + eta) * h)
        x = sigma_t / sigma_s * torch.exp(-eta * h) * sample + weight * denoised
        if difference is not None:
            x = x + 0.5 * weight * difference
        return x + sigma_t * torch.sqrt(-torch.expm1(-2 * eta * h)) * noise
