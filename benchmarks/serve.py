"""`kiln bench serve`: concurrent txt2img clients against the API service, step-level batching on vs off.

For each concurrency N, N client threads send AUTOMATIC1111 txt2img requests back to back over
real HTTP to the service (uvicorn + the embedded Triton), each with its own seed. The same run
measures three arms, alternating per N so drift hits all alike:

- `unbatched`: no batching anywhere. Step batching off, and a second Triton serves the same
  models with `sd_unet`'s dynamic batcher removed, so every request's UNet call (its CFG pair)
  executes alone: what a batch-1 server does.
- `triton`: step batching off; Triton's dynamic batcher (`sd_unet` with a 2 ms queue delay, on
  a third Triton) merges the calls that happen to arrive together.
- `step`: the service's step-level batcher merges the UNet calls of every running request (the
  build's `sd_unet`, which waits for no partners).

Reported: images/s, p50/p95 request latency, rows per UNet call the service sent (its
/metrics), rows per model execution Triton ran (Triton's own statistics), and the share of the
wall time the service spent waiting on UNet calls.

Writes results/serve-<pipeline>.json, .md and .png (throughput and p95 latency against N).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.load import machine, machine_line, run_concurrently, write_results
from kiln import contract as names
from kiln.errors import KilnError

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


ARMS = ("unbatched", "triton", "step")  # see the module docstring
BASELINE = "unbatched"


@dataclass
class Row:
    arm: str
    clients: int
    requests: int
    images_per_s: float
    p50_s: float
    p95_s: float
    mean_unet_rows: float  # rows per UNet call the service sent
    unet_calls: int
    rows_per_execution: float  # rows per sd_unet execution, from Triton's statistics
    unet_busy_share: float  # UNet call seconds / wall seconds (above 1 when calls overlap)


def _metric(text: str, name: str) -> float:
    from orchestrator.metrics import read_metric

    return read_metric(text, name) or 0.0


def triton_unet_counts(triton_http_url: str) -> tuple[int, int]:
    """(inferences, executions) of sd_unet so far: Triton counts every batch row as an inference."""
    import urllib.request

    with urllib.request.urlopen(f"http://{triton_http_url}/v2/models/{names.SD_UNET}/stats", timeout=30) as response:
        stats = json.load(response)["model_stats"]
    return sum(int(s["inference_count"]) for s in stats), sum(int(s["execution_count"]) for s in stats)


def load_clients(url: str, clients: int, per_client: int, body: dict) -> tuple[list[float], float, dict]:
    """`clients` threads sending `per_client` txt2img requests each (seeds 1000 * client + k): the latencies, the
    wall seconds, and the service's UNet calls, rows and busy seconds over the run (its /metrics)."""
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
    busy = _metric(after, "kiln_unet_call_seconds_sum") - _metric(before, "kiln_unet_call_seconds_sum")
    return latencies, wall, {"calls": int(calls), "rows": rows, "busy_s": busy}


def unet_cost_curve(triton_grpc_url: str, side: int, rows: tuple[int, ...], repeats: int = 15) -> dict[int, float]:
    """Median seconds of one sd_unet call of `rows` rows, alone on an idle server (the batching ceiling's input)."""
    from orchestrator.pipeline import Pipeline, Txt2ImgRequest

    pipeline = Pipeline.from_triton(triton_grpc_url)
    contract = pipeline.contract
    context = pipeline.encode_prompts(["a photo of a cat"], Txt2ImgRequest(prompt="", width=side, height=side))
    latent = side // contract.vae_scale_factor
    rng = np.random.default_rng(0)
    curve = {}
    for n in rows:
        inputs = {"sample": rng.standard_normal((n, contract.unet_in_channels, latent, latent), dtype=np.float32),
                  "timestep": np.full(n, 500, np.float32),
                  **context.repeat(n).inputs(lambda rows: rows)}
        pipeline.components.unet(inputs)  # warm-up at this shape
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            pipeline.components.unet(inputs)
            times.append(time.perf_counter() - start)
        curve[n] = float(np.median(times))
    return curve


def batching_ceiling(curve: dict[int, float], clients: int, rows_per_request: int = 2) -> float:
    """Best throughput ratio merging can give if the UNet were all the work: N solo calls vs one merged call."""
    merged = min(clients * rows_per_request, max(curve))
    if merged not in curve:
        return float("nan")
    return (merged // rows_per_request) * curve[rows_per_request] / curve[merged]


def rebatched_repository(repo: Path, target: Path, queue_delay_us: int | None, prefix: str = "") -> Path:
    """The same models (linked, not copied; those whose names start with `prefix`) with sd_unet's dynamic batching
    changed: removed (None), so each call executes alone, or waiting `queue_delay_us` for partners."""
    import shutil

    from google.protobuf import text_format

    from kiln.model_config import read_config

    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for entry in repo.iterdir():
        if entry.name != names.SD_UNET and entry.name.startswith(prefix):
            (target / entry.name).symlink_to(entry.resolve())
    unet = target / names.SD_UNET
    unet.mkdir()
    for entry in (repo / names.SD_UNET).iterdir():
        if entry.name != "config.pbtxt":
            (unet / entry.name).symlink_to(entry.resolve())
    config = read_config(repo / names.SD_UNET / "config.pbtxt")
    if queue_delay_us is None:
        config.ClearField("dynamic_batching")
    else:
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    (unet / "config.pbtxt").write_text(text_format.MessageToString(config))
    return target


def bench_repository(options: ServeBenchOptions, log) -> Path:
    from build.sd import ImageRange, SDBuildOptions, build_sd
    from build.sd.weights import write_sd_checkpoint

    size, _side, (low, opt, high) = PIPELINES[options.pipeline]
    root = options.out / f"bench_serve_{options.pipeline}"
    repo = root / "repo"
    if options.skip_build and (repo / names.SD_UNET / "config.pbtxt").exists():
        return repo
    checkpoint = root / "weights"
    if not (checkpoint / "model_index.json").exists():
        write_sd_checkpoint(checkpoint, size=size, seed=0, controlnet=False)
    log(f"building the {options.pipeline} SD pipeline into {repo} ...")
    build_sd(SDBuildOptions(weights=str(checkpoint), repository=repo, images=ImageRange(low, opt, high)), log=log)
    return repo


def run_serve_benchmark(options: ServeBenchOptions, log=print) -> dict:
    from contextlib import ExitStack

    from kiln.triton_server import TritonOptions, TritonServer, free_port
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    if options.pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {options.pipeline!r}; valid: {', '.join(PIPELINES)}")
    options.out.mkdir(parents=True, exist_ok=True)
    repo = bench_repository(options, log)
    # The build's sd_unet waits for no partners (the step batcher merges); Triton's own batching arm waits 2 ms.
    repos = {"step": repo, "unbatched": rebatched_repository(repo, repo.parent / "repo-unbatched", None),
             "triton": rebatched_repository(repo, repo.parent / "repo-triton", 2000)}
    side = options.size or PIPELINES[options.pipeline][1]
    body = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": options.steps,
            "sampler_name": options.sampler, "cfg_scale": options.cfg_scale, "width": side, "height": side}
    rows: list[Row] = []
    workers = max(options.concurrency)
    with ExitStack() as stack:
        tritons = {name: stack.enter_context(TritonServer(TritonOptions.on_free_ports(
            path, options.out / f"bench_serve_triton_{name}.log"))) for name, path in repos.items()}
        triton_of = tritons  # one Triton per arm
        services = {arm: BackgroundAPI(Settings(triton_url=triton_of[arm].grpc_url, port=free_port(), workers=workers,
                                                max_queue=workers, step_batching=arm == "step",
                                                request_timeout_s=3600))
                    for arm in ARMS}
        for service in services.values():
            stack.callback(service.stop)
        for service in services.values():  # warm-up: sessions, thread pools, first-call allocations
            load_clients(service.url, 2, 1, body)
        max_rows = 2 * max(options.concurrency)
        curve = unet_cost_curve(tritons["step"].grpc_url, side,
                                tuple(n for n in (1, 2, 4, 8, 16) if n <= max(max_rows, 2)))
        log("sd_unet alone, seconds per call by rows: "
            + ", ".join(f"{n}: {t * 1000:.1f} ms" for n, t in curve.items()))
        bar = tqdm(total=len(ARMS) * len(options.concurrency), desc="bench serve", unit="config")
        for clients in options.concurrency:
            for arm in ARMS:
                bar.set_postfix(clients=clients, arm=arm)
                inferences, executions = triton_unet_counts(triton_of[arm].http_url)
                latencies, wall, unet = load_clients(services[arm].url, clients, options.requests_per_client, body)
                inferences_after, executions_after = triton_unet_counts(triton_of[arm].http_url)
                ran = executions_after - executions
                rows.append(Row(arm=arm, clients=clients, requests=len(latencies),
                                images_per_s=len(latencies) / wall, p50_s=float(np.percentile(latencies, 50)),
                                p95_s=float(np.percentile(latencies, 95)),
                                mean_unet_rows=unet["rows"] / unet["calls"] if unet["calls"] else 0.0,
                                unet_calls=unet["calls"],
                                rows_per_execution=(inferences_after - inferences) / ran if ran else 0.0,
                                unet_busy_share=unet["busy_s"] / wall))
                bar.update()
        bar.close()
    result = summarize(rows, options, curve) | {"image_side": side}
    stem = options.out / f"serve-{options.pipeline}-{side}"
    return write_results(stem, result, markdown_table, plot, log)


def summarize(rows: list[Row], options: ServeBenchOptions, curve: dict[int, float]) -> dict:
    by = {(r.arm, r.clients): r for r in rows}
    ratios = {}
    for clients in options.concurrency:
        base = by[(BASELINE, clients)]
        ratios[clients] = {arm: {"throughput": by[(arm, clients)].images_per_s / base.images_per_s,
                                 "p95": by[(arm, clients)].p95_s / base.p95_s} for arm in ARMS if arm != BASELINE}
        ratios[clients]["ceiling"] = batching_ceiling(curve, clients)
    target = ratios.get(8)
    return {
        "benchmark": "serve", "pipeline": options.pipeline, "options": {k: str(v) for k, v in asdict(options).items()},
        "machine": machine(),
        "rows": [asdict(r) for r in rows], "baseline": BASELINE, "ratios": ratios,
        "unet_seconds_by_rows": {str(n): t for n, t in curve.items()},
        "target": None if target is None else {
            "clients": 8, "throughput_ratio": target["step"]["throughput"], "p95_ratio": target["step"]["p95"],
            "vs_triton_dynamic_batching": target["step"]["throughput"] / target["triton"]["throughput"],
            "ceiling": target["ceiling"],
            "met": target["step"]["throughput"] >= 2.0 and target["step"]["p95"] <= 1.0},
    }


def markdown_table(result: dict) -> str:
    lines = [f"Pipeline: {result['pipeline']} at {result['image_side']}x{result['image_side']}; ratios are against "
             f"the `{result['baseline']}` arm at the same number of clients. Ceiling: what merging could give if the "
             "UNet were all the work, N solo 2-row calls against one merged call, from sd_unet's cost alone: "
             + ", ".join(f"{n} rows {t * 1000:.1f} ms" for n, t in result["unet_seconds_by_rows"].items()) + ".",
             machine_line(result["machine"]), "",
             "| clients | arm | images/s | p50 s | p95 s | rows per call sent | rows per Triton execution | "
             "UNet busy | throughput ratio | p95 ratio | ceiling |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        ratio = result["ratios"][row["clients"]].get(row["arm"])
        extra = (f"{ratio['throughput']:.2f}x", f"{ratio['p95']:.2f}x") if ratio else ("", "")
        ceiling = result["ratios"][row["clients"]]["ceiling"] if row["arm"] == "step" else None
        lines.append(f"| {row['clients']} | {row['arm']} | {row['images_per_s']:.2f} | {row['p50_s']:.2f} | "
                     f"{row['p95_s']:.2f} | {row['mean_unet_rows']:.1f} | {row['rows_per_execution']:.1f} | "
                     f"{row['unet_busy_share']:.0%} | {extra[0]} | {extra[1]} | "
                     f"{'' if ceiling is None else f'{ceiling:.2f}x'} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"unbatched": "no batching", "triton": "Triton dynamic batching only", "step": "step-level batching"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, style in zip(ARMS, (":o", "--o", "-o")):
        rows = [r for r in result["rows"] if r["arm"] == arm]
        left.plot([r["clients"] for r in rows], [r["images_per_s"] for r in rows], style, label=labels[arm])
        right.plot([r["clients"] for r in rows], [r["p95_s"] for r in rows], style, label=labels[arm])
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
