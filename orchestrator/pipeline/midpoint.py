"""AUTOMATIC1111's DPM2, DPM2 a and DPM++ 2S a (k-diffusion's sample_dpm_2, sample_dpm_2_ancestral and
sample_dpmpp_2s_ancestral) as diffusers schedulers.

Each step, from sigma to its target (the next sigma for DPM2; the ancestral step's sigma_down for the other two, with
k-diffusion's eta), calls the model twice: at sigma, then at the midpoint in log sigma, sqrt(sigma x target) (DPM2's
lerp at 0.5 and DPM-Solver++(2S)'s r = 1/2 are the same point). A step whose target is sigma 0 is Euler's, one call.
With d = (x - denoised) / sigma and h = log(sigma / target):

- DPM2: x_mid = x + d (sigma_mid - sigma), then x = x + d_mid (target - sigma);
- DPM2 a: the same to sigma_down, then + sigma_up noise;
- DPM++ 2S a: x_mid = sigma_mid / sigma x - expm1(-h / 2) denoised, then x = target / sigma x - expm1(-h) denoised_mid,
  then + sigma_up noise.

The ancestral two draw their noise from the step's generator (AUTOMATIC1111's per-image generators, as Euler a's) at
every step that ends above sigma 0, whatever eta is (k-diffusion's draws), so the generator's later numbers do not
depend on eta; the noise times s_noise.

The sigmas are Euler's (diffusers' EulerDiscreteScheduler, with the sampler's schedule switch: k-diffusion's, as
Euler's), one a step (k_timesteps, which sigmas.install and sigmas.discard_penultimate wrap: AUTOMATIC1111 discards
DPM2 and DPM2 a's next-to-last sigma). set_timesteps then interleaves the midpoints' calls: `timesteps` holds every
call's (a midpoint's from its sigma, k-diffusion's sigma_to_t) and `sigmas` every call's sigma and the end, so that
what looks a call's sigma up (scale_model_input, add_noise from a begin index, inpainting's blend) reads its own. The
midpoints depend on eta (sigma_down), so the scheduler is made for one (`planned_eta`, sampling.make_scheduler sets
the request's) and its step refuses another.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from orchestrator.pipeline import noise
from orchestrator.pipeline.ancestral import ancestral_step, predicted


class DPM2Scheduler(EulerDiscreteScheduler):
    """k-diffusion's sample_dpm_2 (no churn): DPM-Solver-2 to the next sigma, Euler's step into sigma 0."""

    order = 2
    ancestral = False
    planned_eta = 1.0

    def k_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Euler's sigmas and timesteps, one a step: the steps the calls are interleaved from."""
        EulerDiscreteScheduler.set_timesteps(self, num_inference_steps, device)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.k_timesteps(num_inference_steps, device)
        edges, starts = self.sigmas.double(), self.timesteps
        log_sigmas = np.log(((1 - self.alphas_cumprod.numpy()) / self.alphas_cumprod.numpy()) ** 0.5)
        calls, times, self.calls = [], [], []
        for i in range(len(edges) - 1):
            target, _ = self.target(edges[i], edges[i + 1])
            calls.append(edges[i])
            times.append(float(starts[i]))
            self.calls.append((i, True))
            if target > 0:
                middle = (edges[i] * target) ** 0.5
                calls.append(middle)
                times.append(float(self._sigma_to_t(np.array(float(middle)), log_sigmas)))
                self.calls.append((i, False))
        self.edges = edges
        self.sigmas = torch.tensor([*map(float, calls), float(edges[-1])], dtype=torch.float32)
        self.timesteps = torch.tensor(times, dtype=starts.dtype, device=starts.device)
        self._step_index = self._begin_index = None

    def target(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple:
        """(where the step's deterministic part goes, the noise it adds after): DPM2's, the next sigma and none."""
        return sigma_next, 0.0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        return self._step(model_output, timestep, sample, generator, return_dict)

    def _step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator, return_dict: bool,
              eta: float = 1.0, s_noise: float = 1.0):
        if self.ancestral and eta != self.planned_eta:
            raise ValueError(f"eta {eta}: this scheduler's midpoints were planned for eta {self.planned_eta}")
        if self.step_index is None:
            self._init_step_index(timestep)
        step, first = self.calls[self.step_index]
        sigma, sigma_next = self.edges[step], self.edges[step + 1]
        target, up = self.target(sigma, sigma_next)
        x = sample.double()
        denoised = predicted(self, model_output.double(), x, self.sigmas[self.step_index].double())
        if first and target == 0:  # into sigma 0: Euler's step, one call
            previous = x + (x - denoised) / sigma * (target - sigma)
        elif first:  # to the midpoint, the step's start kept for its second call
            self.start = x
            previous = self.first_half(x, denoised, sigma, self.sigmas[self.step_index + 1].double())
        else:
            previous = self.second_half(self.start, x, denoised, sigma, self.sigmas[self.step_index].double(), target)
            self.start = None
        if self.ancestral and sigma_next > 0 and (not first or target == 0):  # the step's end: its noise
            previous = previous + noise.draw(tuple(model_output.shape), generator).double() * s_noise * up
        self._step_index += 1
        previous = previous.to(model_output.dtype)
        if not return_dict:
            return previous, denoised
        return EulerDiscreteSchedulerOutput(prev_sample=previous, pred_original_sample=denoised.to(model_output.dtype))

    @staticmethod
    def first_half(x: torch.Tensor, denoised: torch.Tensor, sigma, middle) -> torch.Tensor:
        return x + (x - denoised) / sigma * (middle - sigma)

    @staticmethod
    def second_half(start: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor, sigma, middle, target):
        return start + (x - denoised) / middle * (target - sigma)


class DPM2AncestralScheduler(DPM2Scheduler):
    """k-diffusion's sample_dpm_2_ancestral: DPM2's step to sigma_down, then sigma_up of the generator's noise."""

    ancestral = True

    def target(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple:
        return ancestral_step(sigma, sigma_next, self.planned_eta)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, eta_ancestral: float = 1.0, s_noise: float = 1.0):
        return self._step(model_output, timestep, sample, generator, return_dict, eta_ancestral, s_noise)


class DPMPP2SAncestralScheduler(DPM2AncestralScheduler):
    """k-diffusion's sample_dpmpp_2s_ancestral: DPM-Solver++(2S) to sigma_down, then sigma_up of the noise."""

    @staticmethod
    def first_half(x: torch.Tensor, denoised: torch.Tensor, sigma, middle) -> torch.Tensor:
        return middle / sigma * x - math.expm1(-float(torch.log(sigma / middle))) * denoised

    @staticmethod
    def second_half(start: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor, sigma, middle, target):
        return target / sigma * start - math.expm1(-float(torch.log(sigma / target))) * denoised
