"""Checkpoint switching: seconds from a request to its image (1 step, so the switch dominates) when the checkpoint
it names is loaded, when `kiln serve --max-checkpoints 1` must load it (and unload the other), and, as the baseline
in the same run, AUTOMATIC1111's way of switching: the whole pipeline loaded again in process (diffusers'
`from_pretrained` of the checkpoint folder, then the same 1-step image). Tiny SD 1.x and SD 2.x (or SD 1.5-sized with
--size full), over real HTTP to the API service and the embedded Triton.

    python -m benchmarks.checkpoints [--rounds 5] [--size tiny|full]

Writes results/checkpoints-<size>.json, .md, .png.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.load import bar_chart, machine, machine_line, write_results

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = {"tiny": (32, 64, 128), "full": (256, 512, 512)}
ARMS = ("loaded (the checkpoint of the previous request)", "switch: loaded on demand, the other unloaded",
        "AUTOMATIC1111-style reload: the pipeline loaded again in process")


def _repository(work: Path, size: str, log) -> tuple[Path, dict[str, Path]]:
    from build.sd import ImageRange, SDBuildOptions, build_sd
    from build.sd.weights import write_sd_checkpoint
    from kiln.contract import SD_UNET, SDModels

    repo, weights = work / f"checkpoints_{size}", {}
    for family, checkpoint in (("sd1", ""), ("sd2", "sd2")):
        folder = work / f"checkpoints_{size}_{family}"
        if not (folder / "model_index.json").exists():
            write_sd_checkpoint(folder, size=size, seed=0, controlnet=False, family_name=family)
        weights[checkpoint] = folder
        unet = repo / SDModels(checkpoint)(SD_UNET) / "config.pbtxt"
        if not unet.exists():
            log(f"building {family} ({size}) into {repo} ...")
            build_sd(SDBuildOptions(weights=str(folder), repository=repo, images=ImageRange(*SIDES[size]),
                                    checkpoint=checkpoint, progress=False), log=lambda _m: None)
    return repo, weights


def run(rounds: int, size: str, work: Path, log=print) -> dict:
    import httpx
    import torch
    from diffusers import StableDiffusionPipeline

    from kiln.triton_server import TritonOptions, TritonServer, free_port
    from orchestrator.checkpoints import ModelControl, checkpoint_bytes
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    repo, weights = _repository(work, size, log)
    side = SIDES[size][1]
    body = {"prompt": "a photo of a cat", "steps": 1, "sampler_name": "Euler", "seed": 1, "width": side,
            "height": side}
    options = TritonOptions.on_free_ports(repo, work / "bench_checkpoints_triton.log")
    url = f"127.0.0.1:{options.grpc_port}"
    control = ModelControl(repo, url, max_loaded=1)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with TritonServer(replace(options, load_models=control.startup_models())):
        service = BackgroundAPI(Settings(triton_url=url, port=free_port(), model_control=control,
                                         request_timeout_s=3600))
        try:
            with httpx.Client(base_url=service.url, timeout=3600) as client:
                def generate(checkpoint: str) -> float:
                    start = time.perf_counter()
                    client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {
                        "sd_model_checkpoint": checkpoint or "checkpoints_" + size + "_sd1"}}).raise_for_status()
                    return time.perf_counter() - start

                generate(""), generate("sd2")  # warm-up: both connected once
                for _ in tqdm(range(rounds), desc="bench checkpoints", unit="round"):
                    for checkpoint in ("", "sd2"):
                        times[ARMS[1]].append(generate(checkpoint))  # the other one was loaded: a switch
                        times[ARMS[0]].append(generate(checkpoint))  # now loaded
                        start = time.perf_counter()
                        pipe = StableDiffusionPipeline.from_pretrained(str(weights[checkpoint]), safety_checker=None)
                        pipe.set_progress_bar_config(disable=True)
                        pipe(body["prompt"], num_inference_steps=1, height=side, width=side,
                             generator=torch.Generator().manual_seed(1))
                        times[ARMS[2]].append(time.perf_counter() - start)
                        del pipe
        finally:
            service.stop()
    seconds = {arm: round(float(np.median(t)), 3) for arm, t in times.items()}
    return {"machine": machine(), "size": size, "side": side, "rounds": rounds, "seconds": seconds,
            "checkpoint_gb": {key or "default": round(checkpoint_bytes(repo, key) / 2**30, 3) for key in weights}}


def table(result: dict) -> str:
    lines = [machine_line(result["machine"]), "",
             f"| {result['size']} SD 1.x and SD 2.x, {result['side']}x{result['side']}, 1 step | seconds (median of "
             f"{result['rounds'] * 2}) |", "|---|---|"]
    lines += [f"| {arm} | {value:.2f} |" for arm, value in result["seconds"].items()]
    loaded, switch, reload = result["seconds"].values()
    lines.append(f"\nA switch costs {switch - loaded:.2f} s over a loaded checkpoint; the in-process reload "
                 f"{reload - loaded:.2f} s. Models per checkpoint: {result['checkpoint_gb']} GB.")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    bar_chart(result["seconds"], path, "seconds from request to image (median)",
              f"Checkpoint switching ({result['size']})", ["#3a7be0", "#e0703a", "#8b929c"], size=(10, 2.8))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", choices=tuple(SIDES), default="tiny")
    parser.add_argument("--work", type=Path, default=Path(".kiln/bench"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(args.rounds, args.size, args.work)
    return write_results(RESULTS / f"checkpoints-{args.size}", result, table, plot)


if __name__ == "__main__":
    main()
