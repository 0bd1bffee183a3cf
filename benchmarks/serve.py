"""`kiln bench serve`: concurrent txt2img clients against the API service, step-level batching on vs off.

For each concurrency N, N client threads send AUTOMATIC1111 txt2img requests back to back over
real HTTP to the service (uvicorn + the embedded Triton), each with its own seed. The same run
measures the service with step-level batching on and with it off (every UNet call goes to
Triton on its own; Triton's dynamic batcher may still merge calls that happen to coincide), the
two alternating per N so drift hits both alike. Reported: images/s, p50/p95 request latency,
and the mean rows per UNet call Triton received (from the service's /metrics).

Writes results/serve-<pipeline>.json, .md and .png (throughput and p95 latency against N).
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.load import run_concurrently
from build.errors import KilnError

PIPELINES = {  # checkpoint size, image side, served profile (min, opt, max)
    "tiny": ("tiny", 64, (32, 64, 128)),
    "full": ("full", 512, (256, 512, 768)),
}


@dataclass(frozen=True)
class ServeBenchOptions:
    out: Path
    pipeline: str = "tiny"
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    requests_per_client: int = 3
    steps: int = 20
    sampler: str = "Euler a"
    cfg_scale: float = 7.0
    skip_build: bool = False
    size: int = 0  # image side in pixels; 0: the pipeline's default


@dataclass
class Row:
    batching: bool
    clients: int
    requests: int
    images_per_s: float
    p50_s: float
    p95_s: float
    mean_unet_rows: float  # rows per UNet call Triton received
    unet_calls: int


def _metric(text: str, name: str) -> float:
    from orchestrator.metrics import read_metric

    return read_metric(text, name) or 0.0


def _load(url: str, clients: int, per_client: int, body: dict) -> tuple[list[float], float, dict]:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=3600) as http:
            for k in range(per_client):
                start = time.perf_counter()
                response = http.post("/sdapi/v1/txt2img", json=body | {"seed": 1000 * index + k})
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors.append(f"{response.status_code}: {response.text[:200]}")

    with httpx.Client(base_url=url, timeout=60) as http:
        before = http.get("/metrics").text
    wall = run_concurrently(client, clients)
    with httpx.Client(base_url=url, timeout=60) as http:
        after = http.get("/metrics").text
    if errors:
        raise KilnError(f"{len(errors)} of the benchmark's requests failed, e.g. {errors[0]}")
    calls = _metric(after, "kiln_unet_batch_rows_count") - _metric(before, "kiln_unet_batch_rows_count")
    rows = _metric(after, "kiln_unet_batch_rows_sum") - _metric(before, "kiln_unet_batch_rows_sum")
    return latencies, wall, {"calls": int(calls), "rows": rows}


def _repository(options: ServeBenchOptions, log) -> Path:
    from build.sd import ImageRange, SDBuildOptions, build_sd
    from build.sd_weights import write_sd_checkpoint

    size, _side, (low, opt, high) = PIPELINES[options.pipeline]
    root = options.out / f"bench_serve_{options.pipeline}"
    repo = root / "repo"
    if options.skip_build and (repo / "sd_unet" / "config.pbtxt").exists():
        return repo
    checkpoint = root / "weights"
    if not (checkpoint / "model_index.json").exists():
        write_sd_checkpoint(checkpoint, size=size, seed=0, controlnet=False)
    log(f"building the {options.pipeline} SD pipeline into {repo} ...")
    build_sd(SDBuildOptions(weights=str(checkpoint), repository=repo, images=ImageRange(low, opt, high)), log=log)
    return repo


def run_serve_benchmark(options: ServeBenchOptions, log=print) -> dict:
    from orchestrator.api import Settings
    from orchestrator.service import BackgroundAPI
    from orchestrator.triton_server import TritonOptions, TritonServer, free_port

    if options.pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {options.pipeline!r}; valid: {', '.join(PIPELINES)}")
    options.out.mkdir(parents=True, exist_ok=True)
    repo = _repository(options, log)
    side = options.size or PIPELINES[options.pipeline][1]
    body = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": options.steps,
            "sampler_name": options.sampler, "cfg_scale": options.cfg_scale, "width": side, "height": side}
    rows: list[Row] = []
    triton = TritonServer(TritonOptions(repository=repo, http_port=free_port(), grpc_port=free_port(),
                                        metrics_port=free_port(), log_path=options.out / "bench_serve_triton.log"))
    workers = max(options.concurrency)
    with triton:
        services = {on: BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), workers=workers,
                                               max_queue=workers, step_batching=on, request_timeout_s=3600))
                    for on in (False, True)}
        try:
            for service in services.values():  # warm-up: sessions, thread pools, first-call allocations
                _load(service.url, 2, 1, body)
            bar = tqdm(total=2 * len(options.concurrency), desc="bench serve", unit="config")
            for clients in options.concurrency:
                for on in (False, True):
                    bar.set_postfix(clients=clients, batching="on" if on else "off")
                    latencies, wall, unet = _load(services[on].url, clients, options.requests_per_client, body)
                    rows.append(Row(batching=on, clients=clients, requests=len(latencies),
                                    images_per_s=len(latencies) / wall, p50_s=float(np.percentile(latencies, 50)),
                                    p95_s=float(np.percentile(latencies, 95)),
                                    mean_unet_rows=unet["rows"] / unet["calls"] if unet["calls"] else 0.0,
                                    unet_calls=unet["calls"]))
                    bar.update()
            bar.close()
        finally:
            for service in services.values():
                service.stop()
    result = summarize(rows, options) | {"image_side": side}
    stem = options.out / f"serve-{options.pipeline}-{side}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    table = markdown_table(result)
    stem.with_suffix(".md").write_text(table + "\n")
    plot(result, stem.with_suffix(".png"))
    log(table)
    log(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return result


def summarize(rows: list[Row], options: ServeBenchOptions) -> dict:
    by = {(r.batching, r.clients): r for r in rows}
    ratios = {}
    for clients in options.concurrency:
        on, off = by[(True, clients)], by[(False, clients)]
        ratios[clients] = {"throughput": on.images_per_s / off.images_per_s, "p95": on.p95_s / off.p95_s}
    target = ratios.get(8)
    return {
        "benchmark": "serve", "pipeline": options.pipeline, "options": {k: str(v) for k, v in asdict(options).items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "rows": [asdict(r) for r in rows], "ratios": ratios,
        "target": None if target is None else {
            "clients": 8, "throughput_ratio": target["throughput"], "p95_ratio": target["p95"],
            "met": target["throughput"] >= 2.0 and target["p95"] <= 1.0},
    }


def markdown_table(result: dict) -> str:
    lines = [f"Pipeline: {result['pipeline']} at {result['image_side']}x{result['image_side']}; ratios are "
             "batching on / off at the same number of clients.", "",
             "| clients | batching | images/s | p50 s | p95 s | rows per UNet call | throughput ratio | p95 ratio |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        ratio = result["ratios"][row["clients"]]
        extra = (f"{ratio['throughput']:.2f}x", f"{ratio['p95']:.2f}x") if row["batching"] else ("", "")
        lines.append(f"| {row['clients']} | {'on' if row['batching'] else 'off'} | {row['images_per_s']:.2f} | "
                     f"{row['p50_s']:.2f} | {row['p95_s']:.2f} | {row['mean_unet_rows']:.1f} | {extra[0]} | {extra[1]} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for on, style in ((False, "o--"), (True, "o-")):
        rows = [r for r in result["rows"] if r["batching"] == on]
        label = "step batching " + ("on" if on else "off")
        left.plot([r["clients"] for r in rows], [r["images_per_s"] for r in rows], style, label=label)
        right.plot([r["clients"] for r in rows], [r["p95_s"] for r in rows], style, label=label)
    for axis, title, unit in ((left, "throughput", "images/s"), (right, "p95 latency", "seconds")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(unit)
        axis.set_title(f"{title} ({result['pipeline']} SD, {result['image_side']}px)")
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
