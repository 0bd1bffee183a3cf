"""`kiln bench preprocess`: the JPEG path's first model, `vit_preprocess`, decoding a call's images on its thread pool
against one thread, with `--jpeg-draft` (large JPEGs decoded reduced), and with `--decode torch` (torchvision).

On a GPU server the ViT classifies a batch of 256 in milliseconds, and decoding and transforming the JPEGs (about
5 ms each on one core for the samples, 150 ms for a 12 MP photo) is what sets `vit_classify`'s images/s. This
benchmark serves the model four times in one Triton, as the ViT build writes it: `vit_preprocess` with its pool
(`threads` 0: every core), `serial--vit_preprocess` with `threads` 1, `draft--vit_preprocess` with its pool and
`jpeg_draft`, and `torch--vit_preprocess` decoding with torchvision (`decode` torch: on a CPU libjpeg-turbo and
torch's resize on its threads; on a GPU, nvJPEG). It sends them the same batches, alternating, of each set of photos:
the samples as shipped, and the samples resized to each `--photo-sizes` size (a phone's 12 MP by default) and saved
as JPEG (quality 92). The pool's pixels are checked equal to one thread's on every call; the draft and torch arms'
are compared with them (PSNR on the 0..1 scale, worst image). Ratios (images/s against one thread) are measured in
the same run.

Writes results/preprocess.json, .md and .png.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from benchmarks.load import bar_chart, machine, machine_line, write_results
from kiln import contract as names
from kiln.machine import cores

if TYPE_CHECKING:
    from kiln.imaging import EvalTransform

ARMS = {"pool": names.VIT_PREPROCESS, "one thread": f"serial--{names.VIT_PREPROCESS}",
        "pool + JPEG draft": f"draft--{names.VIT_PREPROCESS}", "torch decode": f"torch--{names.VIT_PREPROCESS}"}
BASELINE = "one thread"
DRAFT = "pool + JPEG draft"
TORCH = "torch decode"  # kiln build vit --decode torch: uint8 pixels out (on a GPU, nvJPEG; here libjpeg-turbo)
APPROXIMATE = (DRAFT, TORCH)  # arms whose pixels are close to the pool's, not equal: their worst PSNR is reported
SAMPLES = "samples"  # the shipped JPEGs at their own sizes


@dataclass(frozen=True)
class PreprocessBenchOptions:
    out: Path
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    calls: int = 20  # timed calls per photo set, batch size and arm (after one warm-up), alternating between the arms
    photo_sizes: tuple[tuple[int, int], ...] = ((4032, 3024),)  # (width, height): the samples resized, as JPEG


def preprocess_repository(target: Path, max_queue_delay_us: int = 2000) -> tuple[Path, EvalTransform]:
    """The three vit_preprocess models, each written as `kiln build vit` writes it (its config and model.py), and the
    eval transform they run (ViT-B/16's)."""
    from build.repository import write_models
    from build.vit.build import ViTBuildOptions
    from build.vit.configs import vit_model_configs
    from build.vit.transform import eval_transform
    from build.vit.weights import load_vit

    transform = eval_transform(load_vit(random_weights=True).model)  # the transform only: weights play no part
    configs = []
    for arm, threads, draft in (("pool", 0, False), ("one thread", 1, False), (DRAFT, 0, True), (TORCH, 0, False)):
        torch = {"decode": "torch", "pixel_wire": "uint8"} if arm == TORCH else {}
        options = ViTBuildOptions(threads=threads, repository=target, max_queue_delay_us=max_queue_delay_us,
                                  jpeg_draft=draft, **torch)
        config = next(c for c in vit_model_configs(options, transform) if c.name == names.VIT_PREPROCESS)
        configs.append(replace(config, name=ARMS[arm]))
    write_models(configs, target)
    return target, transform


def photo_sets(sizes: tuple[tuple[int, int], ...]) -> dict[str, list[bytes]]:
    """The shipped sample JPEGs, and the same photos resized to each size (bicubic) and saved as JPEG (quality 92)."""
    import io

    from PIL import Image

    from kiln.paths import SAMPLE_IMAGES, list_images

    samples = [p.read_bytes() for p in list_images(SAMPLE_IMAGES) if p.suffix.lower() in (".jpg", ".jpeg")]
    sets = {SAMPLES: samples}
    for width, height in sizes:
        encoded = []
        for data in samples:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(
                buffer, "JPEG", quality=92)
            encoded.append(buffer.getvalue())
        sets[f"{width}x{height}"] = encoded
    return sets


def run_preprocess_benchmark(options: PreprocessBenchOptions, log=print) -> dict:
    from build.parity import psnr
    from kiln.triton_client import TritonClient
    from kiln.triton_server import TritonOptions, TritonServer

    out = Path(options.out)
    work = out / "bench_preprocess"
    repo, transform = preprocess_repository(work / "repo")
    std = np.asarray(transform.std, np.float32).reshape(3, 1, 1)  # pixels times it are back on the 0..1 scale
    sets = photo_sets(options.photo_sizes)
    rows = []
    triton_options = TritonOptions.on_free_ports(repo, work / "triton.log")
    with TritonServer(triton_options) as server:
        client = TritonClient(server.grpc_url, shared_memory="off")  # BYTES inputs travel over gRPC in any case
        try:
            total = len(sets) * len(options.batch_sizes) * options.calls
            with tqdm(total=total, desc="bench preprocess", unit="call round") as bar:
                for photos_name, photos in sets.items():
                    for batch in options.batch_sizes:
                        images = np.array([[photos[i % len(photos)]] for i in range(batch)], dtype=object)
                        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
                        worst_psnr = dict.fromkeys(APPROXIMATE, float("inf"))
                        for call in range(options.calls + 1):  # one warm-up call per arm, then the timed ones
                            pixels = {}
                            for arm, model in ARMS.items():
                                output = "pixels" if arm == TORCH else "pixel_values"
                                start = time.perf_counter()
                                pixels[arm] = client.infer(model, {"image": images}, [output])[output]
                                if call:
                                    times[arm].append(time.perf_counter() - start)
                            if not np.array_equal(pixels["pool"], pixels[BASELINE]) or len(pixels["pool"]) != batch:
                                raise RuntimeError(f"the pool and one thread disagree at batch {batch} ({photos_name})")
                            pixels[TORCH] = transform.normalize(pixels[TORCH])  # uint8 out: the floats vit makes
                            for arm in APPROXIMATE:
                                worst_psnr[arm] = min([worst_psnr[arm]] + [psnr(exact * std, near * std, peak=1.0)
                                                      for exact, near in zip(pixels["pool"], pixels[arm])])
                            bar.update(int(call > 0))
                        for arm in ARMS:
                            median, worst = float(np.median(times[arm])), worst_psnr.get(arm)
                            rows.append({"photos": photos_name, "batch": batch, "arm": arm,
                                         "p50_ms": round(1e3 * median, 2), "images_per_s": round(batch / median, 1)}
                                        | ({"pixels_psnr_db": round(worst, 2) if np.isfinite(worst) else None}
                                           if arm in APPROXIMATE else {}))
        finally:
            client.close()
    for row in rows:
        base = next(r for r in rows if (r["photos"], r["batch"], r["arm"]) == (row["photos"], row["batch"], BASELINE))
        row["vs_one_thread"] = round(row["images_per_s"] / base["images_per_s"], 3)
    result = {"benchmark": "preprocess", "calls": options.calls, "rows": rows, "machine": machine(),
              "pool_threads": cores(),
              "photos": {name: f"{len(photos)} JPEGs, cycled" for name, photos in sets.items()}}
    write_results(out / "preprocess", result, markdown_table, plot, log)
    return result


def markdown_table(result: dict) -> str:
    lines = [f"vit_preprocess through Triton: a batch of JPEGs per call, {result['calls']} calls per cell (p50); the "
             f"pool has {result['pool_threads']} threads; ratios: images/s against one thread in the same run; PSNR: "
             "the draft and torch arms' pixels against the exact ones (0..1 scale, worst image; none: identical).", "",
             "| photos | batch | one thread: images/s | pool: images/s | pool + JPEG draft: images/s | torch decode: "
             "images/s | ratios (pool, draft, torch) | draft PSNR dB | torch PSNR dB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for photos, batch in dict.fromkeys((r["photos"], r["batch"]) for r in result["rows"]):
        cells = {r["arm"]: r for r in result["rows"] if (r["photos"], r["batch"]) == (photos, batch)}
        lines.append(f"| {photos} | {batch} | {cells[BASELINE]['images_per_s']:.0f} | "
                     f"{cells['pool']['images_per_s']:.0f} | {cells[DRAFT]['images_per_s']:.0f} | "
                     f"{cells[TORCH]['images_per_s']:.0f} | "
                     + ", ".join(f"{cells[arm]['vs_one_thread']:.2f}x" for arm in ("pool", DRAFT, TORCH)) + " | "
                     f"{cells[DRAFT]['pixels_psnr_db'] or 'none'} | {cells[TORCH]['pixels_psnr_db'] or 'none'} |")
    return "\n".join(lines + ["", machine_line(result["machine"])])


def plot(result: dict, path: Path) -> None:
    largest = max(r["batch"] for r in result["rows"])
    photos = list(dict.fromkeys(r["photos"] for r in result["rows"]))[-1]  # the largest photos
    bar_chart({r["arm"]: r["images_per_s"] for r in result["rows"] if (r["batch"], r["photos"]) == (largest, photos)},
              path, "images/s", f"vit_preprocess: {photos} JPEGs, batch {largest}",
              ["tab:blue", "tab:gray", "tab:green", "tab:orange"])
