"""AUTOMATIC1111's DPM adaptive (k-diffusion's sample_dpm_adaptive, DPMSolver.dpm_solver_adaptive with the defaults
AUTOMATIC1111 leaves it: order 3, rtol 0.05, atol 0.0078, h_init 0.05, a PID step size controller with its integral
term alone, accept_safety 0.81; eta its eta_ancestral) as a diffusers-style scheduler whose calls are decided as it
runs.

In t = -log(sigma), from the model's highest sigma to its lowest (img2img: from its start's sigma to the schedule's
last above 0, as DPM fast), which it ends at, not at 0. Each attempt from s tries t = s + h (h the controller's,
at most to the end): eta > 0 moves it to the ancestral step's sigma_down (t'); three calls, at s, s + (t' - s) / 3
and s + 2 (t' - s) / 3, give DPM-Solver-2 (r1 = 1/3) and DPM-Solver-3 steps to t'. Their difference, scaled by
max(atol, rtol x max(|x_low|, |x_prev|)), gives the error (its RMS over the whole batch: the images of one request
share their step sizes, as AUTOMATIC1111's batch does); the controller scales h by 1 + atan(error^(-1/order) - 1)
(order 3, or 1.5 with eta) and accepts where that factor is at least 0.81. An accepted attempt moves to the third
order result, adds sigma_up of the generator's noise (drawn at every accepted attempt, whatever eta is, as
k-diffusion's noise_sampler is called) and goes on from t; a rejected one starts again from s with the smaller h, its
three calls made again (k-diffusion's cache is per attempt).

The steps asked for do not set the calls: `steps` places img2img's start, and is the length the loop counts in.
Progress and ControlNet's guidance range read how far in t the accepted attempts have come (Calls.done); prompt
editing reads the call's index, as AUTOMATIC1111's denoiser counts its calls (past the last step, the first prompt,
as its reconstruct_cond_batch). `begin` returns `Calls`, which the loop iterates while the scheduler appends each
attempt's calls; `sigmas` and `timesteps` hold every call's so far (what scale_model_input, add_noise and
inpainting's blend look up by step index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from kiln.errors import InputError
from orchestrator.pipeline import noise
from orchestrator.pipeline.ancestral import ancestral_step, predicted
from orchestrator.pipeline.second_order import EulerEdges, WholeRange
from orchestrator.pipeline.sigmas import Table

RTOL, ATOL, H_INIT, ACCEPT_SAFETY = 0.05, 0.0078, 0.05, 0.81
R1, R2 = 1 / 3, 2 / 3
# A bound on one run's calls: its error control takes tens of attempts on a real model (three calls each); a run
# that has not converged by this many is stopped with an error rather than holding a worker.
MAX_CALLS = 3000


def _sigma(t: float) -> float:
    return math.exp(-t)


@dataclass
class Attempt:
    """One try from `s` towards `t` (in t = -log sigma): where its solution lands (`landing`, t' with eta), the noise
    then added (`up`), and its first call's index among the run's (`first`); its calls lie at `at(0, R1, R2)`."""

    s: float
    t: float
    landing: float
    up: float
    first: int

    @property
    def h(self) -> float:
        return self.landing - self.s

    def at(self, r: float) -> float:
        return self.s + r * self.h


class Calls:
    """The run's calls' timesteps as the loop reads them: iterating goes on while the scheduler appends the next
    attempt's; the length is the steps asked for (AUTOMATIC1111's p.steps), which the calls may pass."""

    def __init__(self, scheduler: DPMAdaptiveScheduler):
        self.scheduler = scheduler

    def __iter__(self):
        index = 0
        while index < len(self.scheduler.timesteps):
            yield self.scheduler.timesteps[index]
            index += 1

    def __len__(self) -> int:
        return self.scheduler.nominal

    def __getitem__(self, key):
        return self.scheduler.timesteps[key]

    def done(self, after: bool) -> int:
        """Progress in steps of `len`: how far the accepted attempts have come in t (the calls' count says nothing);
        before a call, at most the last step (ControlNet's guidance range reads it)."""
        steps = len(self)
        return self.scheduler.travelled(steps) if after else min(steps - 1, self.scheduler.travelled(steps))


class DPMAdaptiveScheduler(WholeRange, EulerEdges):
    """k-diffusion's sample_dpm_adaptive as AUTOMATIC1111 calls it (the module's docstring), over DPM fast's range."""

    ancestral = True
    planned_eta = 1.0

    def begin(self, start: int | None) -> Calls:
        """The run from noise (None) or from step `start` of the schedule (img2img's, the hires pass's)."""
        edges = self.edges[start or 0:]
        self.table = Table(self.alphas_cumprod)
        low, high = self.sigma_range(edges, start is None)
        self.t_start, self.t_end = -math.log(high), -math.log(low)
        self.nominal = len(edges) - 1
        self.s, self.h, self.x_prev = self.t_start, H_INIT, None
        self.accepted = self.rejected = 0
        self.points: list[float] = []
        self.current: Attempt | None = None
        self._attempt()
        self._step_index, self._begin_index = None, 0
        return Calls(self)

    def travelled(self, steps: int) -> int:
        span = self.t_end - self.t_start
        return steps if span <= 0 else min(steps, math.floor(steps * (self.s - self.t_start) / span + 1e-9))

    def _attempt(self) -> None:
        """The next attempt from `s` (none where the end is reached), its calls appended."""
        if self.s < self.t_end - 1e-5:
            t = min(self.t_end, self.s + self.h)
            if self.planned_eta:
                down, _ = ancestral_step(*torch.tensor([_sigma(self.s), _sigma(t)], dtype=torch.float64),
                                         self.planned_eta)
                landing = min(self.t_end, -math.log(float(down)))
                up = math.sqrt(max(_sigma(t) ** 2 - _sigma(landing) ** 2, 0.0))
            else:
                landing, up = t, 0.0
            self.current = Attempt(self.s, t, landing, up, len(self.points))
            if len(self.points) + 3 > MAX_CALLS:
                raise InputError(f"DPM adaptive: its error control did not reach the end within {MAX_CALLS} model "
                                 "calls; use another sampler")
            self.points += [float(np.float32(_sigma(self.current.at(r)))) for r in (0, R1, R2)]
        else:
            self.current = None
        end = _sigma(self.t_end if self.current is None else self.current.landing)
        self.sigmas = torch.tensor([*self.points, end], dtype=torch.float32)
        self.timesteps = torch.tensor([self.edge_timesteps.get(s, self.table.sigma_to_t(s)) for s in self.points],
                                      dtype=torch.float32)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, eta_ancestral: float = 1.0, s_noise: float = 1.0):
        if eta_ancestral != self.planned_eta:
            raise ValueError(f"eta {eta_ancestral}: this scheduler's attempts were planned for eta {self.planned_eta}")
        if self.step_index is None:
            self._init_step_index(timestep)
        attempt = self.current
        k = self.step_index - attempt.first
        x = sample.double()
        sigma = self.points[self.step_index]
        denoised = predicted(self, model_output.double(), x, sigma)
        eps = (x - denoised) / sigma
        if k == 0:
            self._x0, self._eps = x, [eps]
            self.x_prev = x if self.x_prev is None else self.x_prev
        else:
            self._eps.append(eps)
        h, x0, (e0, *rest) = attempt.h, self._x0, self._eps
        if k == 0:  # toward the second call, DPM-Solver's first order step
            previous = x0 - _sigma(attempt.at(R1)) * math.expm1(R1 * h) * e0
        elif k == 1:
            bend = (R2 / R1) * (math.expm1(R2 * h) / (R2 * h) - 1)
            previous = (x0 - _sigma(attempt.at(R2)) * math.expm1(R2 * h) * e0
                        - _sigma(attempt.at(R2)) * bend * (rest[0] - e0))
        else:
            previous = self._finish(attempt, x0, e0, rest, generator, s_noise, model_output.shape)
        self._step_index += 1
        previous = previous.to(model_output.dtype)
        if not return_dict:
            return previous, denoised
        return EulerDiscreteSchedulerOutput(prev_sample=previous, pred_original_sample=denoised.to(model_output.dtype))

    def _finish(self, attempt: Attempt, x0: torch.Tensor, e0: torch.Tensor, rest: list, generator, s_noise: float,
                shape) -> torch.Tensor:
        """The attempt's end: accepted, the third order solution (and its noise); rejected, where it started."""
        h, end = attempt.h, _sigma(attempt.landing)
        first = x0 - end * math.expm1(h) * e0
        low = first - end / (2 * R1) * math.expm1(h) * (rest[0] - e0)
        high = first - end / R2 * (math.expm1(h) / h - 1) * (rest[1] - e0)
        scale = torch.clamp(RTOL * torch.maximum(low.abs(), self.x_prev.abs()), min=ATOL)
        error = float(torch.linalg.vector_norm((low - high) / scale)) / math.sqrt(low.numel())
        if self._accept(error):
            self.x_prev, self.s = low, attempt.t
            self.accepted += 1
            result = high + attempt.up * s_noise * noise.draw(tuple(shape), generator).double()
        else:
            self.rejected += 1
            result = x0
        self._attempt()
        return result

    def _accept(self, error: float) -> bool:
        """k-diffusion's PIDStepSizeController with pcoeff 0, icoeff 1, dcoeff 0: h scaled by the limited factor."""
        order = 1.5 if self.planned_eta else 3
        factor = (1 / (error + 1e-8)) ** (1 / order)
        factor = 1 + math.atan(factor - 1)
        self.h *= factor
        return factor >= ACCEPT_SAFETY
