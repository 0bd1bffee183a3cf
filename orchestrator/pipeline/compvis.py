"""AUTOMATIC1111's timestep samplers, DDIM and PLMS (its sd_samplers_timesteps), as diffusers-style schedulers.

Their steps are not diffusers' DDIMScheduler's and PNDMScheduler's on SD's "leading" spacing:
- the ladder: A = clip(range(0, T, T // steps) + 1, 0, T - 1), ascending (T = 1000 training timesteps); one entry
  more than `steps` where T // steps does not divide T (31 at 30 steps), and its top clipped to 999 where it reaches
  1000 (3, 9, 27, 36, 37 and 101-111 steps);
- from noise (txt2img): a model call at each of A[-1] down to A[1], each stepping to the entry below; the last ends
  at A[0] = 1 (the noise level of timestep 1), not at diffusers' final alpha. At 20 steps that is 19 calls, the
  first 19 of diffusers' 20; at 30 it is 30 calls from 991, one entry above diffusers' 958;
- img2img (and the hires fix's second pass) from t_enc = int(min(strength, 0.999) x steps) (an explicit step count
  N: N - 1): the latents noised to A[t_enc], then the calls from A[t_enc - 1] on: t_enc - 1 of them, the first one
  level below the noise's (as there);
- DDIM's eta noise, sigma_t = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)), drawn only where eta > 0 (there
  every step draws and multiplies by zero: the same image);
- PLMS: the first step evaluates the model twice (pseudo improved Euler: at A[k], then at A[k - 1] on that first
  estimate, the two averaged), then Adams-Bashforth of order 2, 3 and 4 on the calls' own predictions;
- DDIM CFG++ (its ddim_cfgpp, after CFG++: Manifold-constrained Classifier Free Guidance, 2024): DDIM whose step back
  towards the noise (dir_xt) takes the unconditional prediction, the guided one only predicting x0, its guidance
  scale divided by 12.5 (`cfg_scale_multiplier`: 12.5 is 1, the conditional prediction alone).
A v-prediction checkpoint's output is turned into epsilon first, as there.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from kiln.errors import InputError
from orchestrator.pipeline import noise

# Adams-Bashforth on the calls' predictions, newest first: order -> (weights, divisor)
ADAMS_BASHFORTH = {2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


def ladder(steps: int, train_timesteps: int = 1000) -> list[int]:
    """AUTOMATIC1111's timesteps for `steps` steps (its CompVisSampler.get_timesteps), ascending."""
    stride = train_timesteps // steps
    if stride < 1:
        raise ValueError(f"at most {train_timesteps} steps (one per training timestep), got {steps}")
    return [min(t + 1, train_timesteps - 1) for t in range(0, train_timesteps, stride)]


def first_call(steps: int, start: int | None, train_timesteps: int = 1000) -> tuple[int, int | None]:
    """(k, t_enc): the calls run from ladder entry k down to 1 (none where k < 1), after noise (start None) or, from
    an img2img start (orchestrator.pipeline.sampling.img2img_start: steps - t_enc - 1), from the init latents noised
    to entry t_enc."""
    entries = len(ladder(steps, train_timesteps))  # raises where `steps` cannot be run
    if start is None:
        return entries - 1, None
    t_enc = steps - start - 1
    return t_enc - 1, t_enc


class CompVisDDIM(DDIMScheduler):
    """AUTOMATIC1111's DDIM (the module's docstring): diffusers' DDIM with A1111's ladder and start."""

    plms = False

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.num_inference_steps = num_inference_steps
        self.ladder = ladder(num_inference_steps, self.config.num_train_timesteps)
        self.begin(None)

    def begin(self, start: int | None) -> torch.Tensor:
        """The calls after noise (None) or from an img2img start; sets `noise_timestep`, the level img2img's latents
        are noised to (None from noise), and returns the calls' timesteps."""
        k, t_enc = first_call(self.num_inference_steps, start, self.config.num_train_timesteps)
        a = self.ladder
        calls = [(a[i], a[i], a[i - 1]) for i in range(k, 0, -1)]  # (the model's timestep, step from, step to)
        if self.plms and calls:
            calls.insert(1, (a[k - 1], a[k], a[k - 1]))  # the first step's second evaluation
        self._calls, self._done, self._eps = calls, 0, []
        self.noise_timestep = a[t_enc] if t_enc is not None and calls else None
        self.timesteps = torch.tensor([t for t, _, _ in calls], dtype=torch.long)
        return self.timesteps

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True) -> SchedulerOutput:
        return self._step(model_output, timestep, sample, eta, generator, variance_noise, return_dict)

    def _step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float, generator,
              variance_noise: torch.Tensor | None, return_dict: bool, along: torch.Tensor | None = None):
        """The step; `along`: the prediction the step back towards the noise takes (None: the model output's)."""
        if self._done >= len(self._calls):
            raise ValueError(f"all {len(self._calls)} calls have run")
        t, t_from, t_to = self._calls[self._done]
        if int(timestep) != t:
            raise ValueError(f"call {self._done} runs at timestep {t}, not {int(timestep)}")
        self._done += 1
        eps = self._epsilon(model_output, sample, t)
        if self.plms:
            eps, sample = self._plms(eps, sample)
        a_t, a_prev = float(self.alphas_cumprod[t_from]), float(self.alphas_cumprod[t_to])
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        pred_x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        direction = eps if along is None else self._epsilon(along, sample, t)
        prev = a_prev ** 0.5 * pred_x0 + (1 - a_prev - sigma ** 2) ** 0.5 * direction
        if sigma > 0:
            drawn = noise.draw(tuple(sample.shape), generator) if variance_noise is None else variance_noise
            prev = prev + sigma * drawn.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _epsilon(self, output: torch.Tensor, sample: torch.Tensor, t: int) -> torch.Tensor:
        if self.config.prediction_type == "epsilon":
            return output
        if self.config.prediction_type == "v_prediction":  # A1111's predict_eps_from_z_and_v
            a_t = float(self.alphas_cumprod[t])
            return a_t ** 0.5 * output + (1 - a_t) ** 0.5 * sample
        raise InputError(f"AUTOMATIC1111's DDIM and PLMS take epsilon or v_prediction models; this checkpoint "
                         f"predicts {self.config.prediction_type!r}: choose another sampler")

    def _plms(self, eps: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PLMS's combined prediction, and the sample it steps from (the first step's second call: the first)."""
        if self._done == 1:  # the first evaluation: a provisional step, to evaluate the model there
            self._first, self._eps = sample, [eps]
            return eps, sample
        if self._done == 2:  # pseudo improved Euler: the two evaluations' mean, from the first sample again
            return (eps + self._eps[0]) / 2, self._first
        self._eps = (self._eps + [eps])[-4:]
        weights, divisor = ADAMS_BASHFORTH[len(self._eps)]
        return sum(w * e for w, e in zip(weights, reversed(self._eps))) / divisor, sample


class CompVisDDIMCFGPP(CompVisDDIM):
    """AUTOMATIC1111's DDIM CFG++ (the module's docstring): its step takes the unconditional prediction as well."""

    cfg_scale_multiplier = 1 / 12.5

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True,
             uncond_output: torch.Tensor | None = None) -> SchedulerOutput:
        if uncond_output is None:
            raise ValueError("DDIM CFG++ steps along the unconditional prediction: pass uncond_output")
        return self._step(model_output, timestep, sample, eta, generator, variance_noise, return_dict, uncond_output)


class CompVisPLMS(CompVisDDIM):
    """AUTOMATIC1111's PLMS (the module's docstring): no eta."""

    plms = True

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput:
        return super().step(model_output, timestep, sample, return_dict=return_dict)
