"""`kiln bench edge`: kiln's served OpenVINO variants against what an edge user would run instead, on the same weights
and machine: OpenVINO GenAI's Text2ImagePipeline at the same precisions (benchmarks.edge_genai: why optimum-intel's
pipeline cannot be a row), and diffusers' torch fp32 pipeline, whose image is the reference.

Each row runs in a fresh process, so its peak memory is its own: kiln's is the Triton process tree (server and
Python-backend stubs) plus the orchestrator's process; GenAI's and diffusers' their process. Per row: seconds per
image (512x512, 20 steps, Euler, CFG 7.5, after a one-step warm-up at the same size), cold start (kiln: Triton
started to every model ready, with an empty OpenVINO cache and again with it; GenAI: its pipeline constructed, with
an empty CACHE_DIR and again; diffusers: from_pretrained), peak RSS, and the image's PSNR against diffusers' fp32
image. The ratio that matters is kiln's seconds per image against GenAI's at the same precision, measured in the
same run.

    kiln bench edge [--pipeline full|tiny] [--steps 20] [--size 512] [--variants openvino-fp32,...]
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.load import machine, machine_line
from benchmarks.sd import _peak_rss_mb

DEFAULT_VARIANTS = ("openvino-fp32", "openvino-bf16", "openvino-int8", "openvino-int4")
PROMPT, NEGATIVE, SEED = "a photograph of an astronaut riding a horse", "blurry, low quality", 1234


@dataclass(frozen=True)
class EdgeBenchOptions:
    out: Path
    pipeline: str = "full"  # full: SD 1.5's architecture with seeded random weights; tiny: the tests' sizes
    size: int = 0  # image side; 0: 512 full, 64 tiny
    steps: int = 20
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    genai: bool = True  # the GenAI rows (at each variant's precision)
    work: Path | None = None  # where checkpoints and builds go (default: out/edge-<pipeline>)
    log: object = field(default=print, compare=False)

    @property
    def side(self) -> int:
        return self.size or (512 if self.pipeline == "full" else 64)


def _request(options: EdgeBenchOptions) -> dict:
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": options.side, "height": options.side,
            "steps": options.steps, "cfg_scale": 7.5, "seed": SEED}


def _in_child(function, *args):
    """function(*args) in a fresh spawned process (its peak memory its own); its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# -- the rows, each in its own process --------------------------------------------------------------------------------
def _torch_row(checkpoint: Path, request: dict) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from orchestrator.pipeline import make_scheduler

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(str(checkpoint), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("Euler", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    ready = time.perf_counter() - start

    def image(steps: int) -> np.ndarray:
        out = pipe(request["prompt"], negative_prompt=request["negative_prompt"], width=request["width"],
                   height=request["height"], num_inference_steps=steps, guidance_scale=request["cfg_scale"],
                   generator=torch.Generator().manual_seed(request["seed"]), output_type="np").images[0]
        return (out * 255).round().astype(np.uint8)

    image(1)
    start = time.perf_counter()
    pixels = image(request["steps"])
    return {"ready_s": [ready], "image_s": time.perf_counter() - start, "image": pixels, "peak_rss_mb": _peak_rss_mb()}


def _genai_row(folder: Path, precision: str, request: dict, cache: Path, image: bool = True) -> dict:
    from benchmarks.edge_genai import generate

    return generate(folder, precision, request, cache, image) | {"peak_rss_mb": _peak_rss_mb()}


def _build_row(checkpoint: Path, repo: Path, variant: str, side: int) -> dict:
    from build.report import read_report
    from build.sd import ImageRange, SDBuildOptions, build_sd

    if (repo / "build-report.json").exists() and read_report(repo).get("sd", {}).get("variant") == variant:
        return {"build_s": None}  # built by an earlier run of the benchmark on the same checkpoint
    start = time.perf_counter()
    build_sd(SDBuildOptions(weights=str(checkpoint), repository=repo, images=ImageRange(min(side, 256), side, side),
                            variant=variant, progress=False), log=lambda _m: None)
    return {"build_s": time.perf_counter() - start, "build_peak_rss_mb": _peak_rss_mb()}


class _TreeSampler:
    """The largest sums of resident memory of a process tree (and this process) seen every 0.2 s: of RSS, and of PSS
    (each shared page, such as OpenVINO's libraries that every Triton stub maps, counted once across the tree). The
    peak of the sum: summing each process's own peak (VmHWM) counts peaks that never happened together."""

    def __init__(self) -> None:
        import threading

        self.root, self.rss_mb, self.pss_mb, self._stop = None, 0.0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            self._once()
            if self._stop.wait(0.2):
                return

    def _once(self) -> None:
        import os

        import psutil

        processes = [psutil.Process(os.getpid())]
        if self.root is not None:
            processes += [self.root, *self.root.children(recursive=True)]
        rss = pss = 0
        for process in processes:
            try:
                rss += process.memory_info().rss
                pss += _pss(process.pid)
            except (psutil.Error, OSError):
                continue
        self.rss_mb, self.pss_mb = max(self.rss_mb, rss / 2**20), max(self.pss_mb, pss / 2**20)

    def watch(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self._once()

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        self._once()
        return self.rss_mb, self.pss_mb


def _pss(pid: int) -> int:
    """A process's proportional set size in bytes (/proc/PID/smaps_rollup)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _kiln_row(repo: Path, request: dict) -> dict:
    """Two starts (an empty OpenVINO cache, then the filled one), a warm-up and the timed image with nothing else
    running; then the memory, sampled over a 2-step image of the same size (a step's peak is every step's)."""
    from benchmarks.sd_triton import _tree_peak_rss_mb
    from kiln.runtime import ov_cache_dir
    from kiln.triton_server import TritonOptions, TritonServer
    from orchestrator.pipeline import Pipeline, Txt2ImgRequest

    shutil.rmtree(ov_cache_dir(repo), ignore_errors=True)  # the first start compiles every model
    ready = []

    def start() -> TritonServer:
        began = time.perf_counter()
        server = TritonServer(TritonOptions.on_free_ports(repo, repo.parent / "triton.log")).start()
        ready.append(time.perf_counter() - began)
        return server

    start().stop()
    server = start()
    try:
        pipeline = Pipeline.from_triton(server.grpc_url)
        fields = dict(prompt=request["prompt"], negative_prompt=request["negative_prompt"], sampler="Euler",
                      cfg_scale=request["cfg_scale"], seed=request["seed"], width=request["width"],
                      height=request["height"])
        pipeline.generate(Txt2ImgRequest(**fields, steps=1))
        began = time.perf_counter()
        pixels = pipeline.generate(Txt2ImgRequest(**fields, steps=request["steps"])).images[0]
        seconds = time.perf_counter() - began
        sampler = _TreeSampler()
        sampler.watch(server.pid)
        pipeline.generate(Txt2ImgRequest(**fields, steps=2))
        peak, proportional = sampler.stop()
        each = _tree_peak_rss_mb(server.pid) + _peak_rss_mb()
        pipeline.close()
    finally:
        server.stop()
    return {"ready_s": ready, "image_s": seconds, "image": pixels, "peak_rss_mb": peak, "peak_pss_mb": proportional,
            "sum_of_process_peaks_mb": each}


# -- the run -----------------------------------------------------------------------------------------------------------
def run(options: EdgeBenchOptions) -> dict:
    from benchmarks.edge_genai import convert
    from build.parity import psnr
    from build.sd.weights import write_sd_checkpoint
    from orchestrator.pipeline import make_scheduler

    log, request = options.log, _request(options)
    work = options.work or options.out / f"edge-{options.pipeline}"
    checkpoint = work / "weights"
    if not (checkpoint / "model_index.json").exists():
        log(f"writing the {options.pipeline} SD 1.5 checkpoint (seeded random weights) ...")
        write_sd_checkpoint(checkpoint, size=options.pipeline, seed=0, controlnet=False)
    config = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    scheduler = make_scheduler("Euler", config)  # what every row samples with
    euler = dict(scheduler.config) | {"_class_name": type(scheduler).__name__}
    rows = []

    def add(name: str, kind: str, precision: str, row: dict) -> None:
        image = row.pop("image")
        reference = rows[0]["image"] if rows else image
        row |= {"row": name, "kind": kind, "precision": precision, "image": image,
                "psnr_db": psnr(reference, image) if rows else None}
        rows.append(row)
        ready = ", ".join(f"{s:.1f}" for s in row["ready_s"])
        log(f"  {name}: {row['image_s']:.2f} s/image, ready {ready} s, peak {row['peak_rss_mb']:.0f} MB"
            + (f", PSNR {row['psnr_db']:.1f} dB" if row["psnr_db"] is not None else ""))

    log(f"diffusers torch fp32, {options.side}x{options.side}, {options.steps} steps ...")
    kept = work / f"torch-{options.side}-{options.steps}.json"  # the reference, kept for reruns on the same weights
    if kept.exists():
        reference = json.loads(kept.read_text()) | {"image": np.load(kept.with_suffix(".npy"))}
    else:
        reference = _in_child(_torch_row, checkpoint, request)
        np.save(kept.with_suffix(".npy"), reference["image"])
        kept.write_text(json.dumps({k: v for k, v in reference.items() if k != "image"}))
    add("diffusers torch-fp32", "diffusers", "fp32", reference)
    for variant in options.variants:
        precision = variant.removeprefix("openvino-")
        repo = work / f"repo-{precision}"
        log(f"kiln {variant}: build ...")
        built = _in_child(_build_row, checkpoint, repo, variant, options.side)
        add(f"kiln {variant}", "kiln", precision, _in_child(_kiln_row, repo, request) | built)
        if options.genai:
            folder, cache = work / f"genai-{precision}", work / f"genai-{precision}.cache"
            if not (folder / "model_index.json").exists():
                log(f"GenAI {precision}: converting ...")
                _in_child(convert, checkpoint, folder, precision, euler)
            shutil.rmtree(cache, ignore_errors=True)
            first = _in_child(_genai_row, folder, precision, request, cache, False)  # its cold start alone
            second = _in_child(_genai_row, folder, precision, request, cache)
            second["ready_s"] = [first["ready_s"], second["ready_s"]]
            add(f"GenAI {precision}", "genai", precision, second)
    result = {"machine": machine(), "pipeline": options.pipeline, "side": options.side, "steps": options.steps,
              "sampler": "Euler", "rows": [{k: v for k, v in r.items() if k != "image"} for r in rows]}
    result["versus_genai"] = _versus(result["rows"])
    for row in rows:
        np.save(work / f"image-{row['row'].replace(' ', '_')}.npy", row["image"])
    return result


def _versus(rows: list[dict]) -> dict:
    """Per precision: kiln's seconds per image and peak memory against GenAI's."""
    out = {}
    for kiln in (r for r in rows if r["kind"] == "kiln"):
        peer = next((r for r in rows if r["kind"] == "genai" and r["precision"] == kiln["precision"]), None)
        if peer is not None:
            out[kiln["precision"]] = {"time_ratio": kiln["image_s"] / peer["image_s"],
                                      "memory_ratio": kiln["peak_rss_mb"] / peer["peak_rss_mb"],
                                      "pss_ratio": kiln.get("peak_pss_mb", float("nan")) / peer["peak_rss_mb"]}
    return out


def table(result: dict) -> str:
    lines = [f"SD 1.5 ({result['pipeline']}, seeded random weights), {result['side']}x{result['side']}, "
             f"{result['steps']} steps, {result['sampler']}, CFG 7.5. {machine_line(result['machine'])}",
             "kiln's memory: its process tree (Triton, the Python-backend stubs, the loop) sampled every 0.2 s over a "
             "2-step image after the timed one (the OpenVINO cache filled); RSS counts the libraries every stub maps "
             "once per stub, PSS once. GenAI's and diffusers': their process's peak RSS (the second GenAI process, "
             "its cache filled).", "",
             "| row | s/image | x GenAI (same precision) | cold start s (empty cache, cached) | peak RSS MB "
             "| peak PSS MB | x GenAI memory (RSS, PSS) | PSNR vs torch fp32 dB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        versus = result["versus_genai"].get(row["precision"]) if row["kind"] == "kiln" else None
        time_ratio = f"{versus['time_ratio']:.2f}x" if versus else ""
        memory_ratio = f"{versus['memory_ratio']:.2f}x, {versus['pss_ratio']:.2f}x" if versus else ""
        pss = f"{row['peak_pss_mb']:.0f}" if "peak_pss_mb" in row else ""
        psnr = row["psnr_db"]
        quality = "(reference)" if psnr is None else "inf" if psnr == float("inf") else f"{psnr:.1f}"
        ready = " / ".join(f"{s:.1f}" for s in row["ready_s"])
        lines.append(f"| {row['row']} | {row['image_s']:.2f} | {time_ratio} | {ready} | {row['peak_rss_mb']:.0f} | "
                     f"{pss} | {memory_ratio} | {quality} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["row"] for r in rows]
    colors = {"kiln": "tab:orange", "genai": "tab:blue", "diffusers": "tab:gray"}
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5), sharey=True)
    speed.barh(names, [r["image_s"] for r in rows], color=[colors[r["kind"]] for r in rows])
    speed.set_xlabel(f"seconds per {result['side']}x{result['side']} image, {result['steps']} steps")
    memory.barh(names, [r["peak_rss_mb"] / 1024 for r in rows], color=[colors[r["kind"]] for r in rows])
    memory.set_xlabel("peak RSS, GB")
    speed.invert_yaxis()
    figure.suptitle("kiln served (orange) vs OpenVINO GenAI (blue) vs diffusers torch (grey)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_edge_benchmark(options: EdgeBenchOptions) -> dict:
    from benchmarks.load import write_results

    options.out.mkdir(parents=True, exist_ok=True)
    result = run(options)
    return write_results(options.out / f"edge-{options.pipeline}-{options.side}", result, table, plot, options.log)
