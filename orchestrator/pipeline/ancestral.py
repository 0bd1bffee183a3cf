"""AUTOMATIC1111's Euler a, DPM++ SDE, DPM++ 2M SDE (midpoint and Heun) and DPM++ 3M SDE with its eta (k-diffusion's),
as diffusers schedulers.

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
- DPM++ 2M SDE, with h = log(sigma_from / sigma_to) and h_eta = (1 + eta) h: x = sigma_to / sigma_from e^(-eta h) x
  + (1 - e^(-h_eta)) denoised + the multistep's term + sigma_to sqrt(1 - e^(-2 eta h)) noise; the term is none on
  the first step, else (1 - e^(-h_eta)) D1 / 2 (midpoint) or phi_2 D1 (Heun, phi_2 = (e^(-h_eta) - 1) / h_eta + 1),
  D1 the first difference of the predictions over the step ratio; a last step to sigma 0 lands on the prediction
  itself; eta 0 is DPM++ 2M's step (midpoint);
- DPM++ 3M SDE (sample_dpmpp_3m_sde): the same, Heun's term on its second step and phi_2 d1 - phi_3 d2 from the
  third (phi_3 = phi_2 / h_eta - 0.5, d1 and d2 the third-order differences), at every eta: diffusers' third-order
  SDE update is another formula.
  diffusers computes these on the variance-preserving sample (the k-diffusion one times alpha); so does this.

At eta 1 each is diffusers' step itself (3M SDE's third-order steps aside). Euler a draws its noise every step
whatever eta is, as diffusers draws it, so the generator's later draws are the same at every eta. DPM++ SDE, 2M SDE
and 3M SDE take theirs from a Brownian tree seeded by each image's seed, as AUTOMATIC1111's (its brownian_noise; a
tree per image, so an image's noise does not depend on the batch it is in); the tree needs torchsde. DPM++ SDE's
class is in orchestrator.pipeline.ancestral_sde, as diffusers' DPM++ SDE imports torchsde at once.
"""

from __future__ import annotations

import threading
import weakref

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


class _Ahead:
    """What BrownianSteps' thread shares with it: the values computed, how many were taken, and why it stopped."""

    def __init__(self) -> None:
        self.values: dict[int, torch.Tensor] = {}
        self.taken = 0
        self.failed: Exception | None = None
        self.done = self.closed = False
        self.ready = threading.Condition()

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify_all()


def _compute_ahead(ahead: _Ahead, shape: torch.Tensor, sigmas: torch.Tensor, seed, queries: list, window: int) -> None:
    try:
        from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler  # torchsde

        tree = BrownianTreeNoiseSampler(shape, sigmas[sigmas > 0].min().item(), sigmas.max().item(), seed)
        for i, (sigma, sigma_next) in enumerate(queries):
            with ahead.ready:  # at most `window` values waiting: memory bounded, and no work for an abandoned run
                ahead.ready.wait_for(lambda i=i: ahead.closed or i - ahead.taken < window)
                if ahead.closed:
                    return
            value = tree(sigma, sigma_next)
            with ahead.ready:
                ahead.values[i] = value
                ahead.ready.notify_all()
    except Exception as exc:  # noqa: BLE001 - raised again in the step that waits for it
        with ahead.ready:
            ahead.failed = exc
    finally:
        with ahead.ready:
            ahead.done = True
            ahead.ready.notify_all()


class BrownianSteps:
    """A noise sampler (k-diffusion's BrownianTreeNoiseSampler over a schedule's range, a tree per image seeded by its
    seed, on the CPU as k-diffusion's) whose answers to a run's queries, known in advance, are computed ahead in a
    thread of its own, in their order and at most `window` ahead, so that the tree's work overlaps the model's calls:
    a query descends the tree to its tolerance with some 50 seeded draws, about 5 ms for each 512x512 image on a CPU
    core, where a step with the generator's noise takes 0.5 (benchmarks/brownian.py; a thread per image was slower:
    the draws hold the GIL between them). It answers the same queries in the same order, so with the same numbers; a
    query other than the next one expected is an error. When the sampler goes (its run done or abandoned), the
    thread stops."""

    def __init__(self, sample: torch.Tensor, sigmas: torch.Tensor, seed, queries: list[tuple], window: int = 3) -> None:
        if isinstance(seed, (list, tuple)) and len(seed) != len(sample):  # None: a random tree, as diffusers'
            raise ValueError(f"{len(seed)} seeds for a batch of {len(sample)} images")
        self._queries, self._ahead = queries, _Ahead()
        weakref.finalize(self, self._ahead.close)
        threading.Thread(target=_compute_ahead, args=(self._ahead, torch.zeros_like(sample, dtype=torch.float32),
                                                      sigmas.clone(), seed, queries, window),
                         daemon=True, name="brownian-steps").start()

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """The next query's noise, waiting for it if the thread has not got there yet."""
        ahead = self._ahead
        index = ahead.taken
        if index >= len(self._queries) or not all(torch.equal(torch.as_tensor(asked), expected) for asked, expected
                                                  in zip((sigma, sigma_next), self._queries[index])):
            raise RuntimeError(f"Brownian noise asked for ({float(sigma):g}, {float(sigma_next):g}), not the run's "
                               "next query")
        with ahead.ready:
            ahead.ready.wait_for(lambda: index in ahead.values or ahead.done)
            if index not in ahead.values:
                raise RuntimeError("the Brownian tree's noise failed") from ahead.failed
            ahead.taken += 1
            ahead.ready.notify_all()
            return ahead.values.pop(index)


class DPMSolverMultistepEta(DPMSolverMultistepScheduler):
    """diffusers' DPM++ 2M SDE (midpoint or heun) and, at solver order 3, k-diffusion's DPM++ 3M SDE, their steps
    taking k-diffusion's eta (`eta_ancestral`; at 1 diffusers' own first- and second-order updates) and s_noise,
    their noise from a Brownian tree seeded by each image's seed (`noise_sampler_seed`), as AUTOMATIC1111 draws it."""

    eta_ancestral = 1.0
    noise_sampler_seed: int | list[int] | None = None  # set by sampling.make_scheduler; None: the step's generator
    noise_sampler = None

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.noise_sampler = None  # a tree over the new sigmas' range

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, variance_noise=None,
             return_dict: bool = True, eta_ancestral: float = 1.0, s_noise: float = 1.0):
        self.eta_ancestral = eta_ancestral  # read by the updates that diffusers' step calls
        if variance_noise is None and self.noise_sampler_seed is not None:  # none at eta 0, as k-diffusion asks none
            variance_noise = self._brownian(sample, timestep) if eta_ancestral else torch.zeros_like(sample).float()
        if s_noise != 1:  # k-diffusion's s_noise: the noise each step adds, scaled
            drawn = noise.draw(tuple(model_output.shape), generator) if variance_noise is None else variance_noise
            variance_noise = drawn * s_noise
        return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                            return_dict=return_dict)

    def _brownian(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """k-diffusion's noise_sampler(sigma, sigma_next) for this step (none into sigma 0, where no noise is added),
        from a tree over the schedule's range, as sample_dpmpp_2m_sde's: the run's, computed ahead (BrownianSteps)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        if sigma_next == 0:
            return torch.zeros_like(sample, dtype=torch.float32)
        if self.noise_sampler is None:
            pairs = zip(self.sigmas[self.step_index:-1], self.sigmas[self.step_index + 1:])
            self.noise_sampler = BrownianSteps(sample, self.sigmas, self.noise_sampler_seed,
                                               [(a, b) for a, b in pairs if b != 0])
        return self.noise_sampler(sigma, sigma_next)

    def dpm_solver_first_order_update(self, model_output: torch.Tensor, *args, sample=None, noise=None, **kwargs):
        if self.eta_ancestral == 1 or args or kwargs:
            return super().dpm_solver_first_order_update(model_output, *args, sample=sample, noise=noise, **kwargs)
        return self._with_eta(sample, model_output, (), noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list: list, *args, sample=None, noise=None,
                                                 **kwargs):
        if self.eta_ancestral == 1 or args or kwargs:
            return super().multistep_dpm_solver_second_order_update(model_output_list, *args, sample=sample,
                                                                    noise=noise, **kwargs)
        h, h_last = (self._lambda(self.step_index + i + 1) - self._lambda(self.step_index + i) for i in (0, -1))
        m0, m1 = model_output_list[-1], model_output_list[-2]
        return self._with_eta(sample, m0, ((m0 - m1) * (h / h_last),), noise)

    def multistep_dpm_solver_third_order_update(self, model_output_list: list, *args, sample=None, noise=None,
                                                **kwargs):
        """k-diffusion's sample_dpmpp_3m_sde step at any eta (diffusers' third-order SDE update is another)."""
        if self.config.algorithm_type != "sde-dpmsolver++" or args or kwargs:
            return super().multistep_dpm_solver_third_order_update(model_output_list, *args, sample=sample,
                                                                   noise=noise, **kwargs)
        h, h_1, h_2 = (self._lambda(self.step_index + i + 1) - self._lambda(self.step_index + i) for i in (0, -1, -2))
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d1_0, d1_1 = (m0 - m1) * (h / h_1), (m1 - m2) * (h / h_2)
        r0, r1 = h_1 / h, h_2 / h
        return self._with_eta(sample, m0, (d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1), (d1_0 - d1_1) / (r0 + r1)), noise)

    def _lambda(self, index: int) -> torch.Tensor:
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        return torch.log(alpha) - torch.log(sigma)

    def _with_eta(self, sample: torch.Tensor, denoised: torch.Tensor, differences: tuple, noise) -> torch.Tensor:
        """k-diffusion's DPM++ 2M SDE / 3M SDE step on diffusers' variance-preserving sample: `differences` are none
        (the first step), the multistep's first difference (2M, or 3M's second step) or its first and second."""
        if self.config.algorithm_type != "sde-dpmsolver++":
            raise ValueError("eta other than 1 runs on DPM++ 2M SDE and 3M SDE (sde-dpmsolver++) only")
        if self.sigmas[self.step_index + 1] == 0:  # the last step: k-diffusion lands on the prediction
            return denoised
        eta = self.eta_ancestral
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + 1])
        sigma_s = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])[1]
        h = self._lambda(self.step_index + 1) - self._lambda(self.step_index)
        h_eta = (1 + eta) * h
        x = sigma_t / sigma_s * torch.exp(-eta * h) * sample + alpha_t * -torch.expm1(-h_eta) * denoised
        phi_2 = torch.expm1(-h_eta) / h_eta + 1
        if len(differences) == 1 and self.config.solver_type == "midpoint":
            x = x + 0.5 * alpha_t * -torch.expm1(-h_eta) * differences[0]
        elif len(differences) == 1:  # heun
            x = x + alpha_t * phi_2 * differences[0]
        elif differences:  # third order
            x = x + alpha_t * (phi_2 * differences[0] - (phi_2 / h_eta - 0.5) * differences[1])
        return x + sigma_t * torch.sqrt(-torch.expm1(-2 * eta * h)) * noise
