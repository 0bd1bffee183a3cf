"""AUTOMATIC1111's DPM adaptive (k-diffusion's sample_dpm_adaptive, written out below as its DPMSolver runs it):
the scheduler's calls, attempts and noise against it, through the pipeline's loop, in process and through the API."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from kiln.errors import InputError
from orchestrator.pipeline import adaptive
from orchestrator.pipeline.sampling import schedule
from orchestrator.pipeline.sigmas import Table
from tests.test_second_order import SD15, _run, whole_range


def _curved(scale: float):
    """A model whose output bends with its input and reads its timestep: `scale` sets how hard the solver's error
    control has to work (large: attempts are rejected)."""
    def eps(x, t):
        x = x.double()
        return scale * torch.tanh(x) + 1e-3 * float(t) * torch.cos(3 * x)
    return eps


class _Solver:
    """k-diffusion's DPMSolver (eps, dpm_solver_1/2/3_step's shared cache) and PIDStepSizeController with the
    arguments sample_dpm_adaptive gets from AUTOMATIC1111 (order 3, rtol 0.05, atol 0.0078, h_init 0.05, pcoeff 0,
    icoeff 1, dcoeff 0, accept_safety 0.81), in float64."""

    def __init__(self, eps_model, table: Table):
        self.eps_model, self.table, self.calls = eps_model, table, 0

    def sigma(self, t):
        return math.exp(-t)

    def eps(self, cache, key, x, t):
        if key in cache:
            return cache[key], cache
        self.calls += 1
        s = float(torch.tensor(self.sigma(t), dtype=torch.float32))  # the model is called at a float32 sigma
        denoised = x - s * self.eps_model((x / math.sqrt(s**2 + 1)).float(), self.table.sigma_to_t(s))
        eps = (x - denoised) / s
        return eps, {key: eps, **cache}

    def step_2(self, x, t, t_next, r1, cache):
        h = t_next - t
        eps, cache = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1, cache = self.eps(cache, "eps_r1", u1, s1)
        x_2 = (x - self.sigma(t_next) * math.expm1(h) * eps
               - self.sigma(t_next) / (2 * r1) * math.expm1(h) * (eps_r1 - eps))
        return x_2, cache

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps, cache = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1, cache = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * math.expm1(r2 * h) * eps
              - self.sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2, cache = self.eps(cache, "eps_r2", u2, s2)
        x_3 = (x - self.sigma(t_next) * math.expm1(h) * eps
               - self.sigma(t_next) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps))
        return x_3, cache

    def adaptive(self, x, t_start, t_end, eta, generator):
        order, rtol, atol, accept_safety = 3, 0.05, 0.0078, 0.81
        b1 = 1 / (1.5 if eta else order)  # PIDStepSizeController: (pcoeff + icoeff + dcoeff) / order, the rest 0
        h, errs = 0.05, []
        s, x_prev = t_start, x
        info = {"n_accept": 0, "n_reject": 0}
        while s < t_end - 1e-5:
            cache = {}
            t = min(t_end, s + h)
            if eta:
                sigma_from, sigma_to = self.sigma(s), self.sigma(t)
                su = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
                sd = math.sqrt(sigma_to**2 - su**2)
                t_ = min(t_end, -math.log(sd))
                su = math.sqrt(self.sigma(t) ** 2 - self.sigma(t_) ** 2)
            else:
                t_, su = t, 0.0
            x_low, cache = self.step_2(x, s, t_, 1 / 3, cache)
            x_high, cache = self.step_3(x, s, t_, cache)
            delta = torch.maximum(torch.tensor(atol, dtype=torch.float64),
                                  rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = float(torch.linalg.norm((x_low - x_high) / delta)) / x.numel() ** 0.5
            inv_error = 1 / (error + 1e-8)
            errs = errs or [inv_error] * 3
            errs[0] = inv_error
            factor = 1 + math.atan(errs[0] ** b1 - 1)
            accept = factor >= accept_safety
            if accept:
                errs[2], errs[1] = errs[1], errs[0]
            h *= factor
            if accept:
                x_prev = x_low
                x = x_high + su * torch.randn(x.shape, generator=generator).double()
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
        return x, info


@pytest.mark.parametrize(("steps", "start", "scale"), [(20, None, 0.4), (20, None, 6.0), (12, 5, 0.4), (30, 9, 6.0)])
def test_dpm_adaptive_is_automatic1111s(steps, start, scale):
    """From noise over the model's whole sigma range, ending at its lowest sigma; in img2img from its start's sigma to
    the schedule's last above 0 (as DPM fast); eta 1, 0 and between: the same result, calls, accepted and rejected
    attempts (a hard model rejects some), and a draw at every accepted attempt."""
    sample = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 3
    rejected = 0
    for eta in (1.0, 0.0, 0.5):
        scheduler, timesteps, table, edges, low, high = whole_range("DPM adaptive", steps, start, eta)
        assert len(timesteps) == len(edges) - 1  # the steps asked for: progress and fractions count in them
        solver, generator = _Solver(_curved(scale), table), torch.Generator().manual_seed(5)
        expected, info = solver.adaptive(sample.double(), -math.log(high), -math.log(low), eta, generator)
        after = float(torch.randn(1, generator=generator))
        generator = torch.Generator().manual_seed(5)
        got = _run(scheduler, timesteps, sample.clone(), eta, generator, _curved(scale))
        assert float(torch.randn(1, generator=generator)) == after  # a draw at every accepted attempt
        assert (scheduler.accepted, scheduler.rejected) == (info["n_accept"], info["n_reject"]), eta
        assert len(got) == solver.calls == 3 * (info["n_accept"] + info["n_reject"])
        assert torch.allclose(got[-1].double(), expected, atol=2e-4 * max(1.0, float(expected.abs().max()))), eta
        assert float(scheduler.sigmas[-1]) == pytest.approx(low, rel=1e-5)  # it ends at sigma_min, not 0
        assert timesteps.done(True) == len(timesteps) and timesteps.done(False) == len(timesteps) - 1
        rejected += info["n_reject"]
    assert rejected > 0 or scale < 1  # the hard model exercises the rejections


def test_its_progress_is_how_far_it_has_come():
    """Before each call, the steps done by how far the accepted attempts have come in log sigma: from 0, never back,
    under the steps asked for (ControlNet's guidance range reads it); after the last, all of them."""
    scheduler, timesteps = schedule("DPM adaptive", SD15, 10, seed=0, eta=1.0)
    x, generator, seen = torch.randn(1, 4, 3, 3) * scheduler.init_noise_sigma, torch.Generator().manual_seed(0), []
    for t in timesteps:
        seen.append(timesteps.done(False))
        x = scheduler.step(_curved(0.4)(scheduler.scale_model_input(x, t), t).float(), t, x, generator=generator,
                           eta_ancestral=1.0).prev_sample
    assert seen[0] == 0 and seen == sorted(seen) and seen[-1] <= 9 and len(set(seen)) > 5 and len(seen) > 10
    assert timesteps.done(True) == 10


def test_a_run_that_does_not_converge_is_stopped(monkeypatch):
    """Its calls are bounded: a run whose error control never reaches the end fails with the reason."""
    monkeypatch.setattr(adaptive, "MAX_CALLS", 12)
    scheduler, timesteps = schedule("DPM adaptive", SD15, 20, seed=0, eta=1.0)
    with pytest.raises(InputError, match="did not reach the end within 12 model calls"):
        _run(scheduler, timesteps, torch.randn(1, 4, 3, 3) * 14, 1.0, torch.Generator().manual_seed(0))


def test_the_eta_it_was_planned_for():
    scheduler, timesteps = schedule("DPM adaptive", SD15, 20, seed=0, eta=0.0)
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="planned for eta 0.0"):
        scheduler.step(x, next(iter(timesteps)), x, eta_ancestral=1.0)


@pytest.mark.slow
def test_dpm_adaptive_in_process(local, tmp_path, monkeypatch, init_image_png, edge_map_png):
    """txt2img's calls do not depend on the steps asked for (the model's whole range either way, as AUTOMATIC1111's);
    the progress ends at the steps asked for; img2img and inpainting run from their start; the hires fix's second
    pass takes it; a ControlNet acts in its guidance range; a refiner takes over at the first call past its switch
    (decided as the calls are), and not at all at 1."""
    import numpy as np
    from PIL import Image

    from build.sd import SDBuildOptions, build_sd
    from build.sd.weights import write_sd_checkpoint
    from orchestrator.pipeline import ControlNetUnit, HiresFix, Img2ImgRequest, Pipeline, Refiner, Txt2ImgRequest
    from orchestrator.pipeline import refiner as refiner_module
    from tests.conftest import IMAGES, encode

    base = Txt2ImgRequest(prompt="a cat", sampler="DPM adaptive", seed=3, steps=10, width=64, height=64)
    seen = []
    ten = local.txt2img(base, progress=lambda step, total, _latents: seen.append((step, total)))
    assert np.array_equal(ten.images, local.txt2img(replace(base, steps=25)).images)
    assert seen[-1] == (10, 10) and len(seen) % 3 == 0 and [s for s, _ in seen] == sorted(s for s, _ in seen)
    assert ten.info["sampler"] == "DPM adaptive"
    assert not np.array_equal(ten.images, local.txt2img(replace(base, sampler="DPM fast")).images)
    img2img = Img2ImgRequest(prompt="a cat", sampler="DPM adaptive", seed=3, steps=10, width=64, height=64,
                             init_image=init_image_png, denoising_strength=0.5)
    changed = local.img2img(img2img)
    assert not np.array_equal(changed.images, local.img2img(replace(img2img, denoising_strength=0.8)).images)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    inpainted = local.img2img(replace(img2img, mask=encode(mask), mask_blur=0))
    assert not np.array_equal(inpainted.images, changed.images)
    unit = ControlNetUnit(image=edge_map_png, weight=0.8)
    controlled = local.txt2img(replace(base, controlnet=unit))
    assert not np.array_equal(controlled.images, ten.images)
    assert not np.array_equal(controlled.images, local.txt2img(replace(base, controlnet=replace(
        unit, guidance_start=0.5))).images)
    hires = local.txt2img(replace(base, hires=HiresFix(scale=1.5, upscaler="Latent", steps=4,
                                                       denoising_strength=0.6)))
    assert hires.images.shape[1:3] == (96, 96)
    weights = write_sd_checkpoint(tmp_path / "other", size="tiny", seed=5, controlnet=False)
    build_sd(SDBuildOptions(weights=str(weights), repository=tmp_path / "repo", images=IMAGES, progress=False),
             log=lambda _m: None)
    other = Pipeline.from_repository(tmp_path / "repo")  # a refiner: another checkpoint of the same latent space
    decided, starts = [], refiner_module.Handover.starts
    monkeypatch.setattr(refiner_module.Handover, "starts",
                        lambda self, index, t: decided.append((float(t), starts(self, index, t))) or decided[-1][1])
    refined = local.txt2img(replace(base, refiner=Refiner(other.contract.title, 0.5)), refiner=other)
    first = next(i for i, (_, started) in enumerate(decided) if started)  # AUTOMATIC1111's completed ratio
    assert (999 - round(decided[first][0])) / 1000 >= 0.5 > max((999 - round(t)) / 1000 for t, _ in decided[:first])
    assert not np.array_equal(refined.images, ten.images) and refined.info["refiner_switch_at"] == 0.5
    never = local.txt2img(replace(base, refiner=Refiner(other.contract.title, 1.0)), refiner=other)
    assert np.array_equal(never.images, ten.images)  # at 1 the base runs every call


@pytest.mark.slow
def test_dpm_adaptive_through_the_api(triton, local):
    """Listed with AUTOMATIC1111's alias; through Triton the in-process image; two requests at once, each taking its
    own number of calls, merged by the step batcher, each the image it gets alone."""
    import base64
    import io
    import json
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    from kiln.triton_server import free_port
    from orchestrator.pipeline import Txt2ImgRequest
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    def pixels(b64: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)

    api = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), workers=2))
    body = {"prompt": "a cat", "steps": 6, "seed": 3, "width": 64, "height": 64, "sampler_name": "k_dpm_ad"}
    try:
        with api.client() as client:
            listed = {s["name"]: s["aliases"] for s in client.get("/sdapi/v1/samplers").json()}
            assert listed["DPM adaptive"] == ["k_dpm_ad"]
            alone = client.post("/sdapi/v1/txt2img", json=body)
            assert alone.status_code == 200, alone.text
            assert "Sampler: DPM adaptive" in json.loads(alone.json()["info"])["infotexts"][0]
            local_image = local.txt2img(Txt2ImgRequest(prompt="a cat", steps=6, seed=3, width=64, height=64,
                                                       sampler="DPM adaptive")).images[0]
            assert np.abs(pixels(alone.json()["images"][0]) - local_image.astype(int)).max() <= 1
            other = body | {"seed": 11, "prompt": "a dog on a hill"}
            second = client.post("/sdapi/v1/txt2img", json=other).json()["images"][0]
            with ThreadPoolExecutor(2) as pool:
                together = list(pool.map(lambda b: client.post("/sdapi/v1/txt2img", json=b), [body, other]))
            assert [r.status_code for r in together] == [200, 200]
            assert np.abs(pixels(together[0].json()["images"][0]) - pixels(alone.json()["images"][0])).max() <= 1
            assert np.abs(pixels(together[1].json()["images"][0]) - pixels(second)).max() <= 1
    finally:
        api.stop()
