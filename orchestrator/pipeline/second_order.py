"""AUTOMATIC1111's DPM2, DPM2 a, DPM++ 2S a, Restart and DPM fast (k-diffusion's sample_dpm_2, sample_dpm_2_ancestral,
sample_dpmpp_2s_ancestral and sample_dpm_fast, and AUTOMATIC1111's restart_sampler) as diffusers schedulers whose
calls are planned ahead.

Each step, from sigma to its target, calls the model at sigma and at any later points on the way; a step with one
call is Euler's (into sigma 0, say). With d = (x - denoised) / sigma and h = log(sigma / target):

- DPM2: to the next sigma, its second call at the midpoint in log sigma, sqrt(sigma x target): x_mid = x + d (sigma_mid
  - sigma), then x = x + d_mid (target - sigma);
- DPM2 a: the same to the ancestral step's sigma_down (k-diffusion's eta), then + sigma_up noise;
- DPM++ 2S a: to sigma_down, at the same midpoint (DPM-Solver++(2S)'s r = 1/2): x_mid = sigma_mid / sigma x
  - expm1(-h / 2) denoised, then x = target / sigma x - expm1(-h) denoised_mid, then + sigma_up noise;
- Restart: Heun's steps (the second call at the next sigma, the mean of both slopes), and from 20 steps on, Karras
  sigmas over the schedule's range for all but 9 of them (36 and more: all but 2 x steps // 4), which then go back up
  from the sigma nearest 0.1 to the one nearest 2 and down again (twice from 36), noise added to reach the higher
  sigma (Restart Sampling for Improving Generative Processes, 2023), as AUTOMATIC1111's;
- DPM fast: DPM-Solver-3 steps (calls at 0, 1/3 and 2/3 of the step in log sigma) evenly in log sigma, the last one
  or two of order 2 or 1, as many calls as steps, to sigma_down, then + sigma_up noise (DPMFastScheduler).

The noise comes from the step's generator (AUTOMATIC1111's per-image generators, as Euler a's): the ancestral ones
draw at every step that ends above sigma 0 (DPM fast: at every step), whatever eta is (k-diffusion's draws), so the
generator's later numbers do not depend on eta; their noise times s_noise.

The sigmas are Euler's (diffusers' EulerDiscreteScheduler, with the sampler's schedule switch: k-diffusion's, as
Euler's), one a step (k_timesteps, which sigmas.install and sigmas.discard_penultimate wrap: AUTOMATIC1111 discards
DPM2 and DPM2 a's next-to-last sigma). `begin` then plans the steps from noise or from an img2img start (Restart's
and DPM fast's plans depend on where they start, as AUTOMATIC1111's run on the sigmas left) and lays out their calls:
`timesteps` holds every call's (a sigma that is not one of Euler's: k-diffusion's sigma_to_t), `sigmas` every call's
sigma and the end, so that what looks a call's sigma up (scale_model_input, add_noise from the begin index,
inpainting's blend) reads its own. The ancestral points depend on eta (sigma_down), so the scheduler is made for one
(`planned_eta`, sampling.make_scheduler sets the request's) and its step refuses another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from orchestrator.pipeline import noise
from orchestrator.pipeline.ancestral import ancestral_step, predicted
from orchestrator.pipeline.sigmas import Table, schedule_sigmas


@dataclass
class Step:
    """One planned step: from `sigma` towards `target` (the next sigma, or an ancestral step's sigma_down), the model
    called at each of `points` (the first `sigma`; one point alone: Euler's step), then, where it `draws`, `up` x the
    generator's noise."""

    sigma: float
    target: float
    points: tuple[float, ...]
    up: float = 0.0
    draws: bool = False
    ratios: tuple[float, ...] = ()  # DPM fast's: where its later calls lie, as fractions of the step in log sigma


def _single(value: float) -> float:
    """`value` as the float32 a call's sigma is kept in, so that a step's formulas use the sigma its call ran at."""
    return float(np.float32(value))


class EulerEdges(EulerDiscreteScheduler):
    """Euler's sigmas and timesteps one a step (`edges`, `edge_timesteps`), from which a sampler lays out its calls
    (`begin`: from noise, or from step `start` of the schedule, img2img's and the hires pass's)."""

    def k_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Euler's sigmas and timesteps, one a step (its schedule type's: sigmas.install wraps this)."""
        EulerDiscreteScheduler.set_timesteps(self, num_inference_steps, device)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.k_timesteps(num_inference_steps, device)
        self.edges = [float(s) for s in self.sigmas]
        self.edge_timesteps = dict(zip(self.edges, map(float, self.timesteps)))
        self.begin(None)

    def begin(self, start: int | None):
        raise NotImplementedError


class WholeRange:
    """DPM fast's and DPM adaptive's range, as AUTOMATIC1111 hands k-diffusion its sigma_min and sigma_max: from noise
    the model's whole range (its model_wrap.sigmas[0] and [-1]), the start's noise the schedule's first sigma; from an
    img2img start, its sigma to the schedule's last above 0. Before EulerEdges in a class's bases."""

    @property
    def init_noise_sigma(self) -> float:
        return self.edges[0]  # AUTOMATIC1111's start: noise x the schedule's first sigma

    def sigma_range(self, edges: list[float], from_noise: bool) -> tuple[float, float]:
        """(lowest, highest) sigma the run goes between; from noise, as the float32 sigmas the model is called at."""
        if from_noise:
            table = Table(self.alphas_cumprod).sigmas
            return _single(table[0]), _single(table[-1])
        return edges[-2], edges[0]


class PlannedSteps(EulerEdges):
    """Euler's sigmas one a step (`edges`), planned into steps (plan) whose calls are laid out (begin); each call's
    input and prediction are kept to the step's end (`inputs`, `predictions`), from which `toward` gives the next
    call's input and `finish` the step's result."""

    ancestral = False
    planned_eta = 1.0

    def begin(self, start: int | None) -> torch.Tensor:
        """The calls from noise (None) or from step `start` of the schedule (img2img's, the hires pass's): lays them
        out and returns their timesteps."""
        edges = self.edges[start or 0:]
        table = Table(self.alphas_cumprod)
        steps = self.plan(edges, start is None)
        self.calls = [(step, k) for step in steps for k in range(len(step.points))]
        sigmas = [step.points[k] for step, k in self.calls]
        self.sigmas = torch.tensor([*sigmas, steps[-1].target if steps else edges[-1]], dtype=torch.float32)
        self.timesteps = torch.tensor([self.edge_timesteps.get(s, table.sigma_to_t(s)) for s in sigmas],
                                      dtype=torch.float32)
        self._step_index, self._begin_index = None, 0
        return self.timesteps

    def plan(self, edges: list[float], from_noise: bool) -> list[Step]:
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        return self._step(model_output, timestep, sample, generator, return_dict)

    def _step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator, return_dict: bool,
              eta: float = 1.0, s_noise: float = 1.0):
        if self.ancestral and eta != self.planned_eta:
            raise ValueError(f"eta {eta}: this scheduler's calls were planned for eta {self.planned_eta}")
        if self.step_index is None:
            self._init_step_index(timestep)
        step, k = self.calls[self.step_index]
        x = sample.double()
        denoised = predicted(self, model_output.double(), x, self.sigmas[self.step_index].double())
        self.inputs, self.predictions = ([], []) if k == 0 else (self.inputs, self.predictions)
        self.inputs.append(x)
        self.predictions.append(denoised)
        if k + 1 < len(step.points):
            previous = self.toward(step, k + 1)
        else:  # the step's end (one call: Euler's), and its noise
            previous = self.finish(step) if k else x + self.slope(0, step) * (step.target - step.sigma)
            if step.draws:
                previous = previous + noise.draw(tuple(model_output.shape), generator).double() * s_noise * step.up
        self._step_index += 1
        previous = previous.to(model_output.dtype)
        if not return_dict:
            return previous, denoised
        return EulerDiscreteSchedulerOutput(prev_sample=previous, pred_original_sample=denoised.to(model_output.dtype))

    def slope(self, k: int, step: Step) -> torch.Tensor:
        """k-diffusion's to_d at the step's call k: (x - denoised) / sigma."""
        return (self.inputs[k] - self.predictions[k]) / step.points[k]

    def toward(self, step: Step, k: int) -> torch.Tensor:
        """Call k's input: Euler's step from the step's start to its point."""
        return self.inputs[0] + self.slope(0, step) * (step.points[k] - step.sigma)

    def finish(self, step: Step) -> torch.Tensor:
        """DPM2's: from the step's start with the slope at the second call."""
        return self.inputs[0] + self.slope(1, step) * (step.target - step.sigma)


class DPM2Scheduler(PlannedSteps):
    """k-diffusion's sample_dpm_2 (no churn): DPM-Solver-2 to the next sigma, Euler's step into sigma 0."""

    def target(self, sigma: float, sigma_next: float) -> tuple[float, float]:
        """(where the step's deterministic part goes, the noise it adds after): DPM2's, the next sigma and none."""
        return sigma_next, 0.0

    def plan(self, edges: list[float], from_noise: bool) -> list[Step]:
        steps = []
        for sigma, sigma_next in zip(edges[:-1], edges[1:]):
            target, up = self.target(sigma, sigma_next)
            points = (sigma, _single(math.sqrt(sigma * target))) if target > 0 else (sigma,)
            steps.append(Step(sigma, target, points, up, self.ancestral and sigma_next > 0))
        return steps


class AncestralSteps(PlannedSteps):
    """Steps to an ancestral step's sigma_down (k-diffusion's eta: eta_ancestral), then its sigma_up of noise."""

    ancestral = True

    def target(self, sigma: float, sigma_next: float) -> tuple[float, float]:
        down, up = ancestral_step(*torch.tensor([sigma, sigma_next], dtype=torch.float64), self.planned_eta)
        return float(down), float(up)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, eta_ancestral: float = 1.0, s_noise: float = 1.0):
        return self._step(model_output, timestep, sample, generator, return_dict, eta_ancestral, s_noise)


class DPM2AncestralScheduler(AncestralSteps, DPM2Scheduler):
    """k-diffusion's sample_dpm_2_ancestral: DPM2's step to sigma_down, then sigma_up of the generator's noise."""


class DPMPP2SAncestralScheduler(DPM2AncestralScheduler):
    """k-diffusion's sample_dpmpp_2s_ancestral: DPM-Solver++(2S) to sigma_down, then sigma_up of the noise."""

    def toward(self, step: Step, k: int) -> torch.Tensor:
        middle = step.points[1]
        return middle / step.sigma * self.inputs[0] - math.expm1(-math.log(step.sigma / middle)) * self.predictions[0]

    def finish(self, step: Step) -> torch.Tensor:
        return (step.target / step.sigma * self.inputs[0]
                - math.expm1(-math.log(step.sigma / step.target)) * self.predictions[1])


class RestartScheduler(PlannedSteps):
    """AUTOMATIC1111's restart_sampler with its automatic restart list: Heun's steps, restarting below sigma 2."""

    def plan(self, edges: list[float], from_noise: bool) -> list[Step]:
        pairs = list(zip(edges[:-1], edges[1:]))
        steps = len(pairs)
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            edges = self._karras(steps - restart_steps * restart_times, edges[-2], edges[0])
            low, high = self._nearest(edges, 0.1), self._nearest(edges, 2)
            pairs = list(zip(edges[:-1], edges[1:]))
            if high < low:  # from the sigma nearest 2 down to the one nearest 0.1, after the step that reaches it
                again = self._karras(restart_steps + 1, edges[low], edges[high])[:-1]
                pairs[low:low] = list(zip(again[:-1], again[1:])) * restart_times
        planned = [Step(old, new, (old, new) if new != 0 else (old,)) for old, new in pairs]
        for before, after in zip(planned[:-1], planned[1:]):
            if after.sigma > before.target:  # back up to a higher sigma: its noise, at the end of the step before
                before.up, before.draws = math.sqrt(after.sigma**2 - before.target**2), True
        return planned

    def finish(self, step: Step) -> torch.Tensor:
        return self.inputs[0] + (self.slope(0, step) + self.slope(1, step)) / 2 * (step.target - step.sigma)

    def _karras(self, n: int, low: float, high: float) -> list[float]:
        """k-diffusion's get_sigmas_karras(n, low, high): n sigmas, then 0."""
        return [_single(s) for s in schedule_sigmas("Karras", n, self.alphas_cumprod, settings=(low, high, 0.0))]

    @staticmethod
    def _nearest(sigmas: list[float], value: float) -> int:
        return int(np.argmin([abs(s - value) for s in sigmas]))


class DPMFastScheduler(WholeRange, AncestralSteps):
    """k-diffusion's sample_dpm_fast (DPM-Solver-Fast), as AUTOMATIC1111 runs it: steps evenly in log sigma from the
    model's highest sigma to its lowest (img2img: from its start's sigma to the schedule's last above 0), which it
    ends at, not at 0; DPM-Solver-3 steps (calls at the start, 1/3 and 2/3 of the way) but for the last one or two
    (order 2, at 1/2; order 1, Euler's), as many calls as steps; each to the ancestral step's sigma_down (eta), then
    sigma_up of noise, drawn at every step."""

    def plan(self, edges: list[float], from_noise: bool) -> list[Step]:
        calls = len(edges) - 1
        low, high = self.sigma_range(edges, from_noise)
        t_end = -math.log(low)
        m = calls // 3 + 1
        ts = torch.linspace(-math.log(high), t_end, m + 1).double().tolist()
        orders = [3] * (m - 2) + [2, 1] if calls % 3 == 0 else [3] * (m - 1) + [calls % 3]
        steps = []
        for order, t, t_next in zip(orders, ts, ts[1:]):
            sigma, sigma_next = math.exp(-t), math.exp(-t_next)
            down, _ = self.target(sigma, sigma_next)
            t_down = min(t_end, -math.log(down))
            ratios = {3: (1 / 3, 2 / 3), 2: (1 / 2,), 1: ()}[order]
            points = tuple(_single(math.exp(-(t + r * (t_down - t)))) for r in (0, *ratios))
            up = math.sqrt(max(sigma_next**2 - math.exp(-2 * t_down), 0.0))
            steps.append(Step(points[0], math.exp(-t_down), points, up, True, ratios))
        return steps

    def toward(self, step: Step, k: int) -> torch.Tensor:
        h, eps_0, r_1 = math.log(step.sigma / step.target), self.slope(0, step), step.ratios[0]
        ahead = self.inputs[0] - step.points[k] * math.expm1(step.ratios[k - 1] * h) * eps_0
        if k == 1:
            return ahead
        r_2 = step.ratios[1]
        bend = (r_2 / r_1) * (math.expm1(r_2 * h) / (r_2 * h) - 1)
        return ahead - step.points[2] * bend * (self.slope(1, step) - eps_0)

    def finish(self, step: Step) -> torch.Tensor:
        h, eps_0 = math.log(step.sigma / step.target), self.slope(0, step)
        x = self.inputs[0] - step.target * math.expm1(h) * eps_0
        if len(step.points) == 2:
            return x - step.target / (2 * step.ratios[0]) * math.expm1(h) * (self.slope(1, step) - eps_0)
        return x - step.target / step.ratios[1] * (math.expm1(h) / h - 1) * (self.slope(2, step) - eps_0)
