"""Cold starts with OpenVINO's model cache: seconds from starting Triton on a repository to every model ready, with the
cache off, the first start (empty cache: every OpenVINO model compiles and is written) and the second (the compiled
models read back), for ViT-B/16 (seeded random weights, OpenVINO fp32) and an SD pipeline (OpenVINO fp32: tiny, or
SD 1.5's architecture); and the part that the cache removes, measured alone in this process: opening the ViT's and
the UNet's IR without the cache, with an empty one, with a full one.

    python -m benchmarks.cold_start [--starts 3] [--sd tiny|full]

Writes results/cold-start-<sd>.json and .md; the ratios are against the starts of the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.load import machine, machine_line
from kiln import contract as names

RESULTS = Path(__file__).resolve().parent / "results"


SD_SIZES = {"tiny": ("tiny", (32, 64, 128)), "full": ("full", (256, 512, 768))}  # checkpoint, profile


def _repositories(work: Path, sd_size: str, log) -> dict[str, Path]:
    from build.sd import ImageRange, SDBuildOptions, build_sd
    from build.sd.weights import write_sd_checkpoint
    from build.vit import ViTBuildOptions, build_vit

    vit, sd = work / "cold_vit", work / f"cold_sd_{sd_size}"
    size, (low, opt, high) = SD_SIZES[sd_size]
    if not (vit / names.VIT / "config.pbtxt").exists():
        log("building ViT-B/16 (OpenVINO fp32) ...")
        build_vit(ViTBuildOptions(random_weights=True, backend="openvino", variants=(), extra_exports=(),
                                  repository=vit, progress=False), log=lambda _m: None)
    if not (sd / names.SD_UNET / "config.pbtxt").exists():
        log(f"building the {sd_size} SD pipeline (OpenVINO fp32) ...")
        weights = work / f"cold_sd_{sd_size}_weights"
        if not (weights / "model_index.json").exists():
            write_sd_checkpoint(weights, size=size, seed=0, controlnet=False)
        build_sd(SDBuildOptions(weights=str(weights), repository=sd, images=ImageRange(low, opt, high),
                                variant="openvino-fp32", progress=False), log=lambda _m: None)
    return {"ViT-B/16": vit, f"SD ({sd_size})": sd}


def _start(repo: Path, log_path: Path, cache: bool = True) -> float:
    from kiln.triton_server import TritonOptions, TritonServer

    started = time.perf_counter()
    server = TritonServer(TritonOptions.on_free_ports(repo, log_path,
                                                      extra_env={} if cache else {"KILN_OV_CACHE": "off"})).start()
    seconds = time.perf_counter() - started
    server.stop()
    return seconds


def _compile_alone(ir: Path, cache: Path) -> dict[str, float]:
    from kiln.runtime import Session, SessionOptions

    shutil.rmtree(cache, ignore_errors=True)
    timings = {}
    for name, folder in (("no cache", None), ("empty cache", cache), ("full cache", cache)):
        started = time.perf_counter()
        Session(SessionOptions("openvino", ir, cache_dir=folder))
        timings[name] = round(time.perf_counter() - started, 3)
    return timings


def run(starts: int, work: Path, sd_size: str = "tiny", log=print) -> dict:
    from kiln.runtime import ov_cache_dir

    repos = _repositories(work, sd_size, log)
    rows = {}
    for name, repo in repos.items():
        cache = ov_cache_dir(repo)
        shutil.rmtree(cache, ignore_errors=True)
        uncached = [_start(repo, work / f"cold_{repo.name}_off_{i}.log", cache=False) for i in range(starts - 1)]
        times = [_start(repo, work / f"cold_{repo.name}_{i}.log") for i in range(starts)]
        rows[name] = {"no_cache_s": round(float(np.median(uncached)), 2), "first_s": round(times[0], 2),
                      "second_s": round(float(np.median(times[1:])), 2),
                      "cache_mb": round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20, 1)}
        rows[name]["second_over_first"] = round(rows[name]["second_s"] / rows[name]["first_s"], 3)
        rows[name]["second_over_no_cache"] = round(rows[name]["second_s"] / rows[name]["no_cache_s"], 3)
        log(f"{name}: no cache {rows[name]['no_cache_s']} s, first start {rows[name]['first_s']} s, second "
            f"{rows[name]['second_s']} s")
    alone = {name: _compile_alone(repo / model / "1" / "model.xml", work / "cold_compile.ov-cache")
             for (name, repo), model in zip(repos.items(), (names.VIT, names.SD_UNET))}
    return {"machine": machine(), "starts": starts, "sd": sd_size, "triton": rows, "compile_alone_s": alone}


def table(result: dict) -> str:
    lines = [machine_line(result["machine"]), "",
             "| repository (OpenVINO fp32) | no cache s | first start s (empty cache) | second start s | "
             "second / first | second / no cache | cache MB |",
             "|---|---|---|---|---|---|---|"]
    for name, row in result["triton"].items():
        lines.append(f"| {name} | {row['no_cache_s']:.2f} | {row['first_s']:.2f} | {row['second_s']:.2f} | "
                     f"{row['second_over_first']:.2f} | {row['second_over_no_cache']:.2f} | {row['cache_mb']:.1f} |")
    lines += ["", "| IR opened alone in this process | no cache s | empty cache s | full cache s |",
              "|---|---|---|---|"]
    for name, alone in result["compile_alone_s"].items():
        model = "ViT" if name.startswith("ViT") else "UNet"
        lines.append(f"| {name} {model} | " + " | ".join(f"{v:.3f}" for v in alone.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="starts per repository (the first has an empty cache)")
    parser.add_argument("--work", type=Path, default=Path(".kiln/bench"))
    parser.add_argument("--sd", choices=tuple(SD_SIZES), default="tiny",
                        help="the SD pipeline: tiny (seconds to build) or full (SD 1.5's architecture, minutes)")
    args = parser.parse_args(argv)
    if args.starts < 2:
        parser.error("--starts must be at least 2 (a first and a second start)")
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(args.starts, args.work, args.sd)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"cold-start-{args.sd}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"cold-start-{args.sd}.md").write_text(table(result) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
