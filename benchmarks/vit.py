"""`kiln bench vit`: images/s and latency of the ViT, torch eager fp32 as the baseline of the same run.

For each variant: the runtime called directly on preprocessed tensors ("direct"), the same plus
in-process JPEG decoding and the eval transform ("direct+decode", what a server has to do), and
the full `vit_classify` ensemble through the embedded Triton over gRPC ("triton"). Batch 1 is one
request at a time; batch 8 is a batch of 8 for direct calls and 8 concurrent single-image
requests for Triton (its dynamic batcher forms the batches, as in production).

Writes results/vit.json, results/vit.md (the table) and results/vit.png (the plot).
"""

from __future__ import annotations

import os
import platform
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.load import run_concurrently, write_results
from build.convert import VIT_VARIANTS as VARIANTS
from build.convert import open_session
from build.vit import ViTBuildOptions, build_vit
from build.vit.transform import eval_transform
from build.vit.weights import load_vit
from kiln.contract import VIT
from kiln.errors import ConfigError
from kiln.imaging import preprocess
from kiln.machine import cpu_flags, isa
from kiln.model_config import read_config
from kiln.paths import SAMPLE_IMAGES, list_images

GFLOP_PER_IMAGE = 35.2  # ViT-B/16 at 224x224: 17.6 GMAC


@dataclass(frozen=True)
class BenchOptions:
    out: Path  # results, and the benchmark's own model repository (out/bench_repo)
    variants: tuple[str, ...] = ("onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-bf16",
                                 "openvino-int8", "torch-aoti-fp32")
    batch_sizes: tuple[int, ...] = (1, 8)
    seconds: float = 8.0  # measuring time per configuration, after warm-up
    min_iterations: int = 3
    skip_build: bool = False


@dataclass
class Row:
    variant: str  # torch-fp32 (baseline) or a variant key
    path: str  # direct, direct+decode, triton
    batch: int
    images_per_s: float
    p50_ms: float  # latency of one call (direct) or one request (triton)
    p99_ms: float
    calls: int
    extra: dict = field(default_factory=dict)


def cpu_ceiling_gflops() -> dict:
    """The fp32 FMA peak of this CPU: cores x GHz x flops/cycle (2 FMA pipes x 8 lanes x 2 = 32 with AVX2/Zen)."""
    _name, flags, mhz = cpu_flags()
    cores = os.cpu_count() or 1
    per_cycle = 32 if "fma" in flags else 16
    ghz = mhz / 1000 if mhz else 2.0
    return {"cores": cores, "ghz": round(ghz, 3), "flops_per_cycle_per_core": per_cycle,
            "fp32_peak_gflops": round(cores * ghz * per_cycle, 1), "isa": isa(flags)}


def _timed(fn: Callable[[], None], seconds: float, min_iterations: int) -> list[float]:
    fn()  # warm-up
    latencies = []
    deadline = time.perf_counter() + seconds
    while len(latencies) < min_iterations or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - start)
    return latencies


def _row(variant: str, path: str, batch: int, latencies: list[float], images: int | None = None,
         wall: float | None = None, **extra) -> Row:
    wall = wall if wall is not None else sum(latencies)
    images = images if images is not None else batch * len(latencies)
    ms = np.asarray(latencies) * 1000
    return Row(variant, path, batch, images / wall, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
               len(latencies), extra)


def _load(server_url: str, payloads: list[bytes], concurrency: int, seconds: float, min_requests: int) -> Row:
    """`concurrency` threads, each sending single-image vit_classify requests back to back."""
    from kiln.vit import ViTClient

    client = ViTClient(server_url, "grpc", concurrency=concurrency)
    client.classify_one(payloads[0])  # warm-up
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(offset: int) -> None:
        i = offset
        while True:
            with lock:
                if time.perf_counter() >= deadline and len(latencies) >= min_requests:
                    return
            start = time.perf_counter()
            client.classify_one(payloads[i % len(payloads)], top_k=5)
            with lock:
                latencies.append(time.perf_counter() - start)
            i += 1

    wall = run_concurrently(worker, concurrency)
    return _row("", "triton", concurrency, latencies, images=len(latencies), wall=wall)


def _serve_variant(repository: Path, key: str) -> None:
    """Point the `vit` model of the bench repository at one variant (config parameters only)."""
    from google.protobuf import text_format

    variant = VARIANTS[key]
    path = repository / VIT / "config.pbtxt"
    config = read_config(path)
    config.parameters["runtime"].string_value = variant.runtime
    config.parameters["artifact"].string_value = variant.artifact
    config.parameters["inference_precision"].string_value = variant.inference_precision
    path.write_text(text_format.MessageToString(config))


def run_benchmark(options: BenchOptions) -> dict:
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    repository = out / "bench_repo"
    for key in options.variants:
        if key not in VARIANTS or key == "torch-fp32":  # torch-fp32 is the eager baseline every variant is measured by
            raise ConfigError(f"unknown variant {key!r}; valid: {', '.join(k for k in VARIANTS if k != 'torch-fp32')}")
        if VARIANTS[key].gpu_only:
            raise ConfigError(f"{key} runs on NVIDIA GPUs only: `make gpu-check` measures the GPU variants")

    # 1. Build every variant once into the benchmark's own repository.
    if not options.skip_build or not (repository / VIT).exists():
        if repository.exists():
            shutil.rmtree(repository)
        build_vit(ViTBuildOptions(random_weights=True, variants=options.variants, extra_exports=(),
                                  repository=repository))
    model = load_vit(random_weights=True).model
    transform = eval_transform(model)
    payloads = [p.read_bytes() for p in list_images(SAMPLE_IMAGES) if p.suffix.lower() in (".jpg", ".jpeg")]
    pixels = np.stack([preprocess(payloads[i % len(payloads)], transform) for i in range(max(options.batch_sizes))])
    rows: list[Row] = []
    total = len(options.batch_sizes) * (2 + 3 * len(options.variants))
    bar = tqdm(total=total, desc="bench vit", unit="config")

    # 2. Baseline: torch eager fp32, same inputs.
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    for batch in options.batch_sizes:
        x = torch.from_numpy(pixels[:batch])

        def call(x=x) -> None:
            with torch.inference_mode():
                model(x)

        rows.append(_row("torch-fp32", "direct", batch, _timed(call, options.seconds, options.min_iterations)))
        bar.update()

        def call_decode(batch=batch) -> None:
            batch_pixels = np.stack([preprocess(payloads[i % len(payloads)], transform) for i in range(batch)])
            with torch.inference_mode():
                model(torch.from_numpy(batch_pixels))

        rows.append(_row("torch-fp32", "direct+decode", batch,
                         _timed(call_decode, options.seconds, options.min_iterations)))
        bar.update()

    # 3. Each variant: direct, direct+decode, then through Triton.
    from kiln.triton_server import TritonOptions, TritonServer

    for key in options.variants:
        variant = VARIANTS[key]
        session = open_session(variant, repository / VIT / "1" / variant.artifact)
        executed = session.execution_precision
        for batch in options.batch_sizes:
            feed = {"pixel_values": pixels[:batch], "layer": np.full((batch, 1), 11, dtype=np.int64)}
            rows.append(_row(key, "direct", batch,
                             _timed(lambda session=session, feed=feed: session.run(feed, ["logits"]), options.seconds,
                                    options.min_iterations),
                             executed_precision=executed))
            bar.update()

            def call_decode(batch=batch, session=session) -> None:
                batch_pixels = np.stack([preprocess(payloads[i % len(payloads)], transform) for i in range(batch)])
                session.run({"pixel_values": batch_pixels, "layer": np.full((batch, 1), 11, np.int64)}, ["logits"])

            rows.append(_row(key, "direct+decode", batch, _timed(call_decode, options.seconds, options.min_iterations),
                             executed_precision=executed))
            bar.update()

        _serve_variant(repository, key)
        server = TritonServer(TritonOptions.on_free_ports(repository, out / f"triton-{key}.log"))
        with server:
            for batch in options.batch_sizes:
                row = _load(server.grpc_url, payloads, batch, options.seconds, options.min_iterations * batch)
                row.variant = key
                row.extra["executed_precision"] = executed
                rows.append(row)
                bar.update()
    bar.close()

    # 4. Report.
    return write_results(out / "vit", summarize(rows, options), markdown_table, plot)


def summarize(rows: list[Row], options: BenchOptions) -> dict:
    ceiling = cpu_ceiling_gflops()
    baseline = {r.batch: r.images_per_s for r in rows if r.variant == "torch-fp32" and r.path == "direct"}
    by_key = {(r.variant, r.path, r.batch): r for r in rows}
    table = []
    for r in rows:
        entry = asdict(r)
        entry["speedup_vs_torch"] = r.images_per_s / baseline[r.batch]
        entry["gflops"] = r.images_per_s * GFLOP_PER_IMAGE
        entry["fraction_of_peak"] = entry["gflops"] / ceiling["fp32_peak_gflops"]
        if r.path == "triton":
            direct = by_key.get((r.variant, "direct", r.batch))
            decode = by_key.get((r.variant, "direct+decode", r.batch))
            entry["overhead_vs_direct"] = 1 - r.images_per_s / direct.images_per_s if direct else None
            entry["overhead_vs_direct_decode"] = 1 - r.images_per_s / decode.images_per_s if decode else None
        table.append(entry)
    triton_rows = [e for e in table if e["path"] == "triton"]
    best = max(triton_rows, key=lambda e: e["images_per_s"]) if triton_rows else None
    return {
        "benchmark": "vit",
        "machine": {"platform": platform.platform(), "cpu": ceiling},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "gflop_per_image": GFLOP_PER_IMAGE,
        "rows": table,
        "best_triton": best and {"variant": best["variant"], "batch": best["batch"],
                                 "images_per_s": best["images_per_s"], "speedup_vs_torch": best["speedup_vs_torch"]},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def markdown_table(result: dict) -> str:
    lines = ["| variant | path | batch | images/s | p50 ms | p99 ms | x torch | GFLOP/s | % of peak | "
             "Triton overhead vs direct+decode |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in result["rows"]:
        overhead = e.get("overhead_vs_direct_decode")
        lines.append(
            f"| {e['variant']} | {e['path']} | {e['batch']} | {e['images_per_s']:.2f} | {e['p50_ms']:.0f} | "
            f"{e['p99_ms']:.0f} | {e['speedup_vs_torch']:.2f} | {e['gflops']:.0f} | "
            f"{100 * e['fraction_of_peak']:.0f}% | "
            f"{'' if overhead is None else f'{100 * overhead:+.1f}%'} |")
    cpu = result["machine"]["cpu"]
    lines.append("")
    lines.append(f"CPU peak (fp32 FMA): {cpu['fp32_peak_gflops']} GFLOP/s = {cpu['cores']} cores x {cpu['ghz']} GHz x "
                 f"{cpu['flops_per_cycle_per_core']} flop/cycle; ISA: {', '.join(cpu['isa'])}")
    if result.get("best_triton"):
        b = result["best_triton"]
        lines.append(f"Best through Triton: {b['variant']} at concurrency {b['batch']}: "
                     f"{b['images_per_s']:.2f} images/s, {b['speedup_vs_torch']:.2f}x torch eager fp32")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({e["batch"] for e in result["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    paths = ["direct", "direct+decode", "triton"]
    for ax, batch in zip(axes[0], batches):
        rows = [e for e in result["rows"] if e["batch"] == batch]
        variants = list(dict.fromkeys(e["variant"] for e in rows))
        width = 0.8 / len(paths)
        for j, kind in enumerate(paths):
            values = [next((e["images_per_s"] for e in rows if e["variant"] == v and e["path"] == kind), 0)
                      for v in variants]
            ax.bar(np.arange(len(variants)) + (j - 1) * width, values, width, label=kind)
        base = next(e["images_per_s"] for e in rows if e["variant"] == "torch-fp32" and e["path"] == "direct")
        ax.axhline(3 * base, color="red", linestyle="--", linewidth=1, label="3x torch eager (target)")
        ax.set_xticks(np.arange(len(variants)), variants, rotation=30, ha="right")
        ax.set_ylabel("images/s")
        ax.set_title(f"ViT-B/16, batch/concurrency {batch}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
