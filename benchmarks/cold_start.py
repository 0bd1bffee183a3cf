"""Cold starts with OpenVINO's model cache: seconds from starting Triton on a repository to every model ready, the
first start (empty cache: every OpenVINO model compiles) against the second (the compiled models read back), for
ViT-B/16 (seeded random weights, OpenVINO fp32) and the tiny SD pipeline (OpenVINO fp32); and the part that the cache
removes, measured alone in this process: opening ViT-B/16's IR without the cache, with an empty one, with a full one.

    python -m benchmarks.cold_start [--starts 2]

Writes results/cold-start.json and .md; the ratio is against the first start of the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.load import machine, machine_line

RESULTS = Path(__file__).resolve().parent / "results"


def _repositories(work: Path, log) -> dict[str, Path]:
    from build.sd import ImageRange, SDBuildOptions, build_sd
    from build.sd.weights import write_sd_checkpoint
    from build.vit import ViTBuildOptions, build_vit
    from kiln import contract as names

    vit, sd = work / "cold_vit", work / "cold_sd"
    if not (vit / names.VIT / "config.pbtxt").exists():
        log("building ViT-B/16 (OpenVINO fp32) ...")
        build_vit(ViTBuildOptions(random_weights=True, backend="openvino", variants=(), extra_exports=(),
                                  repository=vit, progress=False), log=lambda _m: None)
    if not (sd / names.SD_UNET / "config.pbtxt").exists():
        log("building the tiny SD pipeline (OpenVINO fp32) ...")
        weights = work / "cold_sd_weights"
        if not (weights / "model_index.json").exists():
            write_sd_checkpoint(weights, size="tiny", seed=0, controlnet=False)
        build_sd(SDBuildOptions(weights=str(weights), repository=sd, images=ImageRange(32, 64, 128),
                                variant="openvino-fp32", progress=False), log=lambda _m: None)
    return {"ViT-B/16": vit, "SD (tiny)": sd}


def _start(repo: Path, log_path: Path) -> float:
    from kiln.triton_server import TritonOptions, TritonServer, free_port

    started = time.perf_counter()
    server = TritonServer(TritonOptions(repository=repo, http_port=free_port(), grpc_port=free_port(),
                                        metrics_port=free_port(), log_path=log_path)).start()
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


def run(starts: int, work: Path, log=print) -> dict:
    from kiln.runtime import ov_cache_dir

    repos = _repositories(work, log)
    rows = {}
    for name, repo in repos.items():
        cache = ov_cache_dir(repo)
        shutil.rmtree(cache, ignore_errors=True)
        times = [_start(repo, work / f"cold_{repo.name}_{i}.log") for i in range(starts)]
        rows[name] = {"first_s": round(times[0], 2), "second_s": round(float(np.median(times[1:])), 2),
                      "cache_mb": round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20, 1)}
        rows[name]["second_over_first"] = round(rows[name]["second_s"] / rows[name]["first_s"], 3)
        log(f"{name}: first start {rows[name]['first_s']} s, second {rows[name]['second_s']} s")
    ir = repos["ViT-B/16"] / "vit" / "1" / "model.xml"
    alone = _compile_alone(ir, work / "cold_compile.ov-cache")
    return {"machine": machine(), "starts": starts, "triton": rows, "vit_compile_alone_s": alone}


def table(result: dict) -> str:
    lines = [machine_line(result["machine"]), "",
             "| repository (OpenVINO fp32) | first start s | second start s | second / first | cache MB |",
             "|---|---|---|---|---|"]
    for name, row in result["triton"].items():
        lines.append(f"| {name} | {row['first_s']:.2f} | {row['second_s']:.2f} | {row['second_over_first']:.2f} | "
                     f"{row['cache_mb']:.1f} |")
    alone = result["vit_compile_alone_s"]
    lines += ["", "| ViT-B/16 IR opened alone | seconds |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in alone.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="starts per repository (the first has an empty cache)")
    parser.add_argument("--work", type=Path, default=Path(".kiln/bench"))
    args = parser.parse_args(argv)
    if args.starts < 2:
        parser.error("--starts must be at least 2 (a first and a second start)")
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(args.starts, args.work)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cold-start.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "cold-start.md").write_text(table(result) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
