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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.load import alternate, bar_chart, machine, machine_line, write_results

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS, SCALES = (1, 2, 3), (4.0, 7.0, 10.0)


@contextmanager
def tiny_api(work: Path, log=print, repo: Path | None = None) -> Iterator[tuple[httpx.Client, int]]:
    """The tiny seeded-random SD pipeline (built under `work` once; or `repo`, a built one) served: the embedded
    Triton and the API service (step batching on); an HTTP client to it and the pipeline's image side."""
    from benchmarks.serve import PIPELINES, ServeBenchOptions, bench_repository
    from kiln.triton_server import TritonOptions, TritonServer, free_port
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    repo = repo or bench_repository(ServeBenchOptions(out=work, pipeline="tiny", skip_build=True), log)
    with TritonServer(TritonOptions.on_free_ports(repo, work / "bench_scripts_triton.log")) as triton:
        service = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), request_timeout_s=3600))
        try:
            with httpx.Client(base_url=service.url, timeout=3600) as client:
                yield client, PIPELINES["tiny"][1]
        finally:
            service.stop()


def post(client: httpx.Client, route: str, body: dict) -> dict:
    answer = client.post(route, json=body)
    answer.raise_for_status()
    return answer.json()


def run(rounds: int, steps: int, client: httpx.Client, side: int) -> tuple[dict, bytes]:
    """The result, and the grid's PNG (client, side: tiny_api's)."""
    base = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": steps, "width": side,
            "height": side}
    grid_body = base | {"seed": SEEDS[0], "script_name": "x/y/z plot",
                        "script_args": ["Seed", ", ".join(map(str, SEEDS)), None, "CFG Scale",
                                        ", ".join(map(str, SCALES)), None]}

    def sequential() -> None:
        for scale in SCALES:
            for seed in SEEDS:
                post(client, "/sdapi/v1/txt2img", base | {"seed": seed, "cfg_scale": scale})

    rows, last = alternate({"grid (one request, 9 concurrent cells)":
                            lambda: post(client, "/sdapi/v1/txt2img", grid_body),
                            "9 requests one after another": sequential}, rounds, "bench xyz")
    picture = last["grid (one request, 9 concurrent cells)"]
    grid_s, sequential_s = rows.values()
    return {"machine": machine(), "rounds": rounds, "steps": steps, "side": side, "cells": len(SEEDS) * len(SCALES),
            "seconds": rows, "speedup": round(sequential_s / grid_s, 2),
            "cells_info": json.loads(picture["info"])["xyz"]}, base64.b64decode(picture["images"][0])


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
    with tiny_api(args.work) as (client, side):
        result, grid = run(args.rounds, args.steps, client, side)
    (RESULTS / "xyz-grid-tiny.png").write_bytes(grid)
    return write_results(RESULTS / "xyz-tiny", result, table, plot)


if __name__ == "__main__":
    main()
