"""`kiln bench serve --replicas 2`: one Triton against two behind the same service, at the same total cores.

The tiny (or full) SD pipeline of `kiln bench serve`, served by one Triton whose runtimes use every core, and by two
Tritons whose runtimes use half of them each (a copy of the repository's configs with `threads` set; the artifacts
are linked), the service sending each job to the less busy one (orchestrator.replicas). For each concurrency N,
N clients send txt2img requests back to back over real HTTP; the arms alternate per N. A third arm runs the two
Tritons' service on the job store shared by several orchestrators (`kiln serve --redis`, orchestrator.shared) in a
real redis-server on loopback, persisting every write as the manifests' does: its cost against the in-memory queue
is the store's overhead. Reported: images/s, p50 and p95 latency, two Tritons over one, Redis over memory.

Writes results/replicas-<pipeline>-<side>.json, .md and .png.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.load import machine, machine_line, write_results
from benchmarks.serve import PIPELINES, ServeBenchOptions, bench_repository, load_clients

ARMS = {"one": 1, "two": 2, "two-redis": 2}  # Tritons per arm; the first is the baseline; the last on Redis


@dataclass(frozen=True)
class ReplicaBenchOptions:
    out: Path
    pipeline: str = "tiny"
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    requests_per_client: int = 3
    steps: int = 20
    skip_build: bool = False
    size: int = 0
    cores: int = 0  # the cores all Tritons share; 0: this machine's


def threaded_repository(repo: Path, target: Path, threads: int) -> Path:
    """`repo`'s models (artifacts linked) with every runtime model's `threads` parameter set to `threads`."""
    import shutil

    from google.protobuf import text_format

    from kiln.model_config import read_config

    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for model in repo.iterdir():
        if not (model / "config.pbtxt").exists():
            continue
        (target / model.name).mkdir()
        for entry in model.iterdir():
            if entry.name != "config.pbtxt":
                (target / model.name / entry.name).symlink_to(entry.resolve())
        config = read_config(model / "config.pbtxt")
        if "threads" in config.parameters:
            config.parameters["threads"].string_value = str(threads)
        (target / model.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return target


def run_replica_benchmark(options: ReplicaBenchOptions, log=print) -> dict:
    from contextlib import ExitStack

    from kiln.redis_server import RedisServer
    from kiln.triton_server import TritonOptions, TritonServer, free_port
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    options.out.mkdir(parents=True, exist_ok=True)
    cores = options.cores or os.cpu_count() or 1
    repo = bench_repository(ServeBenchOptions(out=options.out, pipeline=options.pipeline,
                                              skip_build=options.skip_build), log)
    side = options.size or PIPELINES[options.pipeline][1]
    body = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": options.steps,
            "sampler_name": "Euler a", "cfg_scale": 7.0, "width": side, "height": side}
    workers = max(options.concurrency)
    rows = []
    with ExitStack() as stack:
        services, tritons = {}, {}
        redis = stack.enter_context(RedisServer(options.out / "bench_replicas_redis"))
        for arm, count in ARMS.items():
            threads = max(1, cores // count)
            served = threaded_repository(repo, repo.parent / f"repo-threads-{threads}", threads)
            if count not in tritons:  # the Redis arm uses the two Tritons of the in-memory one
                tritons[count] = [stack.enter_context(TritonServer(TritonOptions.on_free_ports(
                    served, options.out / f"bench_replicas_{arm}_{index}.log"))).grpc_url for index in range(count)]
            urls = tritons[count]
            services[arm] = BackgroundAPI(Settings(triton_url=urls[0], replica_urls=tuple(urls[1:]), port=free_port(),
                                                   workers=workers, max_queue=workers, request_timeout_s=3600,
                                                   redis_url=redis.url if arm.endswith("redis") else ""))
            stack.callback(services[arm].stop)
            load_clients(services[arm].url, 2, 1, body)  # warm-up: sessions, thread pools, first calls
        bar = tqdm(total=len(ARMS) * len(options.concurrency), desc="bench serve --replicas", unit="config")
        for clients in options.concurrency:
            for arm in ARMS:
                bar.set_postfix(clients=clients, arm=arm)
                latencies, wall, _ = load_clients(services[arm].url, clients, options.requests_per_client, body)
                rows.append({"arm": arm, "tritons": ARMS[arm], "threads_each": max(1, cores // ARMS[arm]),
                             "clients": clients, "requests": len(latencies), "images_per_s": len(latencies) / wall,
                             "p50_s": float(np.percentile(latencies, 50)),
                             "p95_s": float(np.percentile(latencies, 95))})
                bar.update()
        bar.close()
    by = {(r["arm"], r["clients"]): r for r in rows}
    ratios = {str(n): by["two", n]["images_per_s"] / by["one", n]["images_per_s"] for n in options.concurrency}
    store = {str(n): by["two-redis", n]["images_per_s"] / by["two", n]["images_per_s"] for n in options.concurrency}
    result = {"machine": machine(), "pipeline": options.pipeline, "image_side": side, "steps": options.steps,
              "cores": cores, "requests_per_client": options.requests_per_client, "rows": rows,
              "two_over_one": ratios, "redis_over_memory": store}
    return write_results(options.out / f"replicas-{options.pipeline}-{side}", result, markdown_table, plot, log)


def markdown_table(result: dict) -> str:
    by = {(r["arm"], r["clients"]): r for r in result["rows"]}
    clients = sorted({r["clients"] for r in result["rows"]})
    lines = [f"{result['pipeline']} SD, {result['image_side']}x{result['image_side']}, {result['steps']} steps "
             f"(Euler a), {result['requests_per_client']} requests per client; {result['cores']} cores shared: one "
             f"Triton with {by['one', clients[0]]['threads_each']} runtime threads, or two with "
             f"{by['two', clients[0]]['threads_each']} each. {machine_line(result['machine'])}", "",
             "| clients | one Triton: images/s | p95 s | two Tritons: images/s | p95 s | two, jobs in Redis: "
             "images/s | p95 s | two / one | Redis / memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in clients:
        one, two, shared = by["one", n], by["two", n], by["two-redis", n]
        lines.append(f"| {n} | {one['images_per_s']:.2f} | {one['p95_s']:.2f} | {two['images_per_s']:.2f} | "
                     f"{two['p95_s']:.2f} | {shared['images_per_s']:.2f} | {shared['p95_s']:.2f} | "
                     f"{result['two_over_one'][str(n)]:.2f}x | {result['redis_over_memory'][str(n)]:.3f}x |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for arm in ARMS:
        points = sorted((r["clients"], r["images_per_s"]) for r in result["rows"] if r["arm"] == arm)
        label = {"one": "one Triton", "two": "two Tritons", "two-redis": "two Tritons, jobs in Redis"}[arm]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axis.set_xlabel("concurrent clients")
    axis.set_ylabel("images/s")
    axis.set_xscale("log", base=2)
    axis.set_title(f"One Triton or two at {result['cores']} cores ({result['pipeline']} SD)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
