"""`kiln bench preprocess`: the JPEG path's first model, `vit_preprocess`, decoding a call's images on its thread pool
against one thread.

On a GPU server the ViT classifies a batch of 256 in milliseconds, and decoding and transforming the JPEGs (about
5 ms each on one core) is what sets `vit_classify`'s images/s. This benchmark serves the model twice in one Triton,
as the ViT build writes it: `vit_preprocess` with its pool (`threads` 0: all cores) and `serial--vit_preprocess`
with `threads` 1, and sends both the same batches of the sample photographs, alternating. Every call's pixels are
checked equal between the two. The ratio (pool over one thread, images/s) is measured in the same run.

Writes results/preprocess.json, .md and .png.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.load import bar_chart, machine, machine_line, write_results
from kiln import contract as names

ARMS = {"pool": names.VIT_PREPROCESS, "one thread": f"serial--{names.VIT_PREPROCESS}"}
BASELINE = "one thread"


@dataclass(frozen=True)
class PreprocessBenchOptions:
    out: Path
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    calls: int = 20  # timed calls per batch size and arm (after one warm-up), alternating between the arms


def preprocess_repository(target: Path, max_queue_delay_us: int = 2000) -> Path:
    """The two vit_preprocess models, each written as `kiln build vit` writes it (its config and model.py)."""
    from build.repository import write_models
    from build.vit.build import ViTBuildOptions
    from build.vit.configs import vit_model_configs
    from build.vit.transform import eval_transform
    from build.vit.weights import load_vit

    transform = eval_transform(load_vit(random_weights=True).model)  # the transform only: weights play no part
    configs = []
    for arm, threads in (("pool", 0), ("one thread", 1)):
        options = ViTBuildOptions(threads=threads, repository=target, max_queue_delay_us=max_queue_delay_us)
        config = next(c for c in vit_model_configs(options, transform) if c.name == names.VIT_PREPROCESS)
        configs.append(replace(config, name=ARMS[arm]))
    write_models(configs, target)
    return target


def run_preprocess_benchmark(options: PreprocessBenchOptions, log=print) -> dict:
    import os

    from kiln.paths import SAMPLE_IMAGES, list_images
    from kiln.triton_client import TritonClient
    from kiln.triton_server import TritonOptions, TritonServer

    out = Path(options.out)
    work = out / "bench_preprocess"
    repo = preprocess_repository(work / "repo")
    photos = [p.read_bytes() for p in list_images(SAMPLE_IMAGES) if p.suffix.lower() in (".jpg", ".jpeg")]
    rows = []
    triton_options = TritonOptions.on_free_ports(repo, work / "triton.log")
    with TritonServer(triton_options) as server:
        client = TritonClient(server.grpc_url, shared_memory="off")  # BYTES inputs travel over gRPC in any case
        try:
            with tqdm(total=len(options.batch_sizes) * options.calls, desc="bench preprocess", unit="call pair") as bar:
                for batch in options.batch_sizes:
                    images = np.array([[photos[i % len(photos)]] for i in range(batch)], dtype=object)
                    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
                    for call in range(options.calls + 1):  # one warm-up call per arm, then the timed ones
                        pixels = {}
                        for arm, model in ARMS.items():
                            start = time.perf_counter()
                            pixels[arm] = client.infer(model, {"image": images}, ["pixel_values"])["pixel_values"]
                            if call:
                                times[arm].append(time.perf_counter() - start)
                        if not np.array_equal(pixels["pool"], pixels[BASELINE]) or len(pixels["pool"]) != batch:
                            raise RuntimeError(f"the two arms disagree at batch {batch}")
                        bar.update(int(call > 0))
                    for arm in ARMS:
                        median = float(np.median(times[arm]))
                        rows.append({"batch": batch, "arm": arm, "p50_ms": round(1e3 * median, 2),
                                     "images_per_s": round(batch / median, 1)})
        finally:
            client.close()
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["arm"] == BASELINE)
        row["vs_one_thread"] = round(row["images_per_s"] / base["images_per_s"], 3)
    result = {"benchmark": "preprocess", "calls": options.calls, "rows": rows, "machine": machine(),
              "pool_threads": os.cpu_count(), "images": f"{len(photos)} sample JPEGs, cycled"}
    write_results(out / "preprocess", result, markdown_table, plot, log)
    return result


def markdown_table(result: dict) -> str:
    lines = [f"vit_preprocess through Triton: a batch of JPEGs per call, {result['calls']} calls per cell (p50); the "
             f"pool has {result['pool_threads']} threads; ratio: images/s against one thread in the same run.", "",
             "| batch | one thread: images/s | pool: images/s | ratio |", "|---|---|---|---|"]
    for batch in dict.fromkeys(r["batch"] for r in result["rows"]):
        cells = {r["arm"]: r for r in result["rows"] if r["batch"] == batch}
        lines.append(f"| {batch} | {cells[BASELINE]['images_per_s']:.0f} | {cells['pool']['images_per_s']:.0f} | "
                     f"{cells['pool']['vs_one_thread']:.2f}x |")
    return "\n".join(lines + ["", machine_line(result["machine"])])


def plot(result: dict, path: Path) -> None:
    largest = max(r["batch"] for r in result["rows"])
    bar_chart({f"{r['arm']} (batch {largest})": r["images_per_s"] for r in result["rows"] if r["batch"] == largest},
              path, "images/s", "vit_preprocess: JPEG decode + eval transform", ["tab:gray", "tab:blue"])
