"""What AUTOMATIC1111's Brownian-tree noise costs the denoising loop: DPM++ 2M SDE (3M SDE draws the same way), a
step of diffusers' DPMSolverMultistep scheduler with its generator's noise against the same step with the noise of
the tree seeded by each image's seed, asked for at each step, and kiln's way, the run's noise computed ahead in a
thread (orchestrator.pipeline.ancestral.BrownianSteps); and DPM++ SDE (two model calls a step, a query each),
diffusers' DPMSolverSDEScheduler asking its tree in its step against kiln's, computed ahead. SD 1.5's latent at
512x512 (4 x 64 x 64), batch 1 and 4, one torch thread.

Before each model call the loop waits `--wait` ms, as the orchestrator waits on Triton for a GPU's UNet (its thread
idle, the GIL released): a sleep stands in for that wait here, so this measures how much of the tree's work the wait
hides, not a model. 0 is the loop alone.

    python -m benchmarks.brownian [--steps 20] [--repeats 3] [--wait 0 10] [--out benchmarks/results]

Prints a table, writes brownian.json in --out; each ratio is a model call's time against DPM++ 2M SDE's with the
generator's noise, measured in the same run at the same wait, and each sampler's two tree arms' last latents are
checked to be equal (the tree's two ways must agree exactly).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "steps_offset": 1, "timestep_spacing": "leading"}


ARMS = ("DPM++ 2M SDE, generator noise", "DPM++ 2M SDE, tree asked at each step", "DPM++ 2M SDE, tree computed ahead",
        "DPM++ SDE, tree asked at each call (diffusers')", "DPM++ SDE, tree computed ahead")


def _run(arm: str, batch: int, steps: int, wait_s: float) -> tuple[float, object]:
    """Seconds a model call, and the last latent, for one arm."""
    import torch
    from diffusers import DPMSolverSDEScheduler
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    from orchestrator.pipeline.sampling import schedule

    seeds = list(range(100, 100 + batch))
    sde = arm.startswith("DPM++ SDE")
    scheduler, timesteps = schedule("DPM++ SDE Karras" if sde else "DPM++ 2M SDE Exponential", SCHEDULE, steps,
                                    seed=seeds)
    if "diffusers'" in arm:  # diffusers' own class, its tree asked in its step
        own = DPMSolverSDEScheduler.from_config(scheduler.config, noise_sampler_seed=seeds)
        own.set_timesteps(steps)
        scheduler, timesteps = own, own.timesteps
    if "generator" in arm:
        scheduler.noise_sampler_seed = None
    x = torch.randn(batch, 4, 64, 64, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    eps = torch.randn(batch, 4, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.3
    generator, sigmas = torch.Generator().manual_seed(2), scheduler.sigmas
    tree = None
    start = time.perf_counter()
    for i, t in enumerate(timesteps):
        time.sleep(wait_s)  # the model's call
        if sde:
            x = scheduler.step(eps, t, scheduler.scale_model_input(x, t)).prev_sample
            continue
        noise = None
        if "asked" in arm:
            if tree is None:
                tree = BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min().item(), sigmas.max().item(), seeds)
            noise = torch.zeros_like(x) if sigmas[i + 1] == 0 else tree(sigmas[i], sigmas[i + 1])
        x = scheduler.step(eps, t, x, generator=generator, variance_noise=noise).prev_sample
    return (time.perf_counter() - start) / len(timesteps), x


def main(argv: list[str] | None = None) -> dict:
    import torch
    from tqdm import tqdm

    from benchmarks.load import machine, machine_line

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wait", type=float, nargs="+", default=[0.0, 10.0], help="ms the loop waits a step")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = [(batch, wait) for batch in (1, 4) for wait in args.wait]
    rows = []
    with tqdm(total=len(cases) * len(ARMS) * args.repeats, desc="brownian", unit="run") as bar:
        for batch, wait in cases:
            times: dict[str, list[float]] = {arm: [] for arm in ARMS}
            last = {}
            for _ in range(args.repeats):  # interleaved: drift hits every arm alike
                for arm in ARMS:
                    seconds, last[arm] = _run(arm, batch, args.steps, wait / 1000)
                    times[arm].append(seconds)
                    bar.update()
            assert torch.equal(last[ARMS[1]], last[ARMS[2]]), "the 2M SDE tree's two ways gave other numbers"
            assert torch.equal(last[ARMS[3]], last[ARMS[4]]), "the SDE tree's two ways gave other numbers"
            base = float(np.median(times[ARMS[0]]))
            for arm in ARMS:
                median = float(np.median(times[arm]))
                rows.append({"batch": batch, "wait_ms": wait, "arm": arm, "ms_per_call": round(median * 1000, 3),
                             "over_generator": round(median / base, 3),
                             "beyond_wait_ms": round(median * 1000 - wait, 3)})
    result = {"machine": machine(), "steps": args.steps, "repeats": args.repeats, "latent": [4, 64, 64],
              "torch_threads": 1, "rows": rows}
    print(machine_line(result["machine"]))
    print("| batch | wait a call (ms) | sampler, noise | ms a call | beyond the wait (ms) | over 2M's generator |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch']} | {row['wait_ms']:g} | {row['arm']} | {row['ms_per_call']:.2f} | "
              f"{row['beyond_wait_ms']:.2f} | {row['over_generator']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "brownian.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
