"""What the X/Y/Z plot gains from running its cells as concurrent tasks: a 3x3 grid (seeds across, CFG scales down)
as one request against the same 9 cells sent one after another, tiny SD pipeline, over real HTTP to the API service
(uvicorn + the embedded Triton, step batching on). Alternating rounds so drift hits both alike.

    python -m benchmarks.xyz [--rounds 3] [--steps 20]

Writes results/xyz-tiny.json, .md, .png (seconds per grid, each arm) and xyz-grid-tiny.png (the grid itself).
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.load import bar_chart, machine, machine_line, write_results

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS, SCALES = (1, 2, 3), (4.0, 7.0, 10.0)


def run(rounds: int, steps: int, work: Path, log=print) -> dict:
    import httpx

    from benchmarks.serve import PIPELINES, ServeBenchOptions, _repository
    from kiln.triton_server import TritonOptions, TritonServer, free_port
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    repo = _repository(ServeBenchOptions(out=work, pipeline="tiny", skip_build=True), log)
    side = PIPELINES["tiny"][1]
    base = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": steps, "width": side, "height": side}
    grid_body = base | {"seed": SEEDS[0], "script_name": "x/y/z plot",
                        "script_args": ["Seed", ", ".join(map(str, SEEDS)), None, "CFG Scale",
                                        ", ".join(map(str, SCALES)), None]}
    times: dict[str, list[float]] = {"grid (one request, 9 concurrent cells)": [], "9 requests one after another": []}
    with TritonServer(TritonOptions.on_free_ports(repo, work / "bench_xyz_triton.log")) as triton:
        service = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), request_timeout_s=3600))
        try:
            with httpx.Client(base_url=service.url, timeout=3600) as client:
                def grid() -> dict:
                    answer = client.post("/sdapi/v1/txt2img", json=grid_body)
                    answer.raise_for_status()
                    return answer.json()

                def sequential() -> None:
                    for scale in SCALES:
                        for seed in SEEDS:
                            client.post("/sdapi/v1/txt2img", json=base | {"seed": seed, "cfg_scale": scale}
                                        ).raise_for_status()

                grid(), sequential()  # warm-up
                for _ in tqdm(range(rounds), desc="bench xyz", unit="round"):
                    for name, call in zip(times, (grid, sequential)):
                        start = time.perf_counter()
                        last = call()
                        times[name].append(time.perf_counter() - start)
                        if last is not None:
                            picture = last
        finally:
            service.stop()
    (RESULTS / "xyz-grid-tiny.png").write_bytes(base64.b64decode(picture["images"][0]))
    rows = {name: round(float(np.median(t)), 3) for name, t in times.items()}
    grid_s, sequential_s = rows.values()
    return {"machine": machine(), "rounds": rounds, "steps": steps, "side": side, "cells": len(SEEDS) * len(SCALES),
            "seconds": rows, "speedup": round(sequential_s / grid_s, 2),
            "cells_info": json.loads(picture["info"])["xyz"]}


def table(result: dict) -> str:
    lines = [machine_line(result["machine"]), "",
             f"| 3x3 X/Y/Z plot, tiny SD, {result['side']}x{result['side']}, {result['steps']} steps | seconds |",
             "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in result["seconds"].items()]
    lines.append(f"\nThe grid costs {1 / result['speedup']:.2f}x its cells one after another "
                 f"({result['speedup']:.2f}x faster).")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    bar_chart(result["seconds"], path, "seconds per 3x3 grid (median)",
              f"X/Y/Z plot: {result['speedup']:.2f}x from running the cells together", ["#e0703a", "#8b929c"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path(".kiln/bench"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(args.rounds, args.steps, args.work)
    return write_results(RESULTS / "xyz-tiny", result, table, plot)


if __name__ == "__main__":
    main()
