"""`make gpu-check` (scripts/gpu_check.sh on a lent GPU machine): the NVIDIA figures, in one run of at most 8 minutes.

It generates full-size seeded random SD 1.5 and ViT-B/16 weights, builds `torch-cuda-fp16` (CUDA graphs per row
bucket), starts the embedded Triton on the GPU and measures, in the same run:
- ViT images/s at batch 1, 8, 64, 256 through Triton (tensor input to `vit`, JPEG input to `vit_classify`) against
  in-process torch fp16, eager and torch.compile'd, and p50 latency at batch 1; Triton's split of each request per
  model, the largest batch from 4 clients at once, the host-to-GPU copy of a batch three ways, and the served
  artifact through kiln's Session in process (Triton's share of the gap, and the session's);
- SD 1.5 512x512, 50 steps, Euler a, CFG 7.5: seconds per image through Triton + the orchestrator, the same variant
  in process, and diffusers' own fp16 pipeline; the per-step split;
- the served UNet's artifact in process at each CUDA-graph row bucket: milliseconds per row, which say what merging
  steps can gain, and in the other layout (benchmarks/gpu_unet.py);
- step batching at 1, 4 and 16 concurrent clients of the service's engine: images/s and p95 against no batching (a
  second Triton whose sd_unet runs each call alone) and against Triton's own merging, with the UNet's rows per
  execution as Triton counts them;
- kiln finetune's training step on ViT-B/16: images/s in fp32 and fp16 autocast.
- last, the served UNet compiled by torch.compile in process (benchmarks/gpu_unet.py): the compile's seconds and
  its ms per call at each bucket against the served UNet's.
Each phase is timed against a budget and fails alone: results.json is rewritten after every phase, so a run that
is cut short still says what it measured and why it stopped. `--device cpu` runs the same code on tiny weights
(torch-fp32 on the CPU): a test runs it so the script cannot rot before a GPU is lent.

`--variant` builds another torch variant or mix (torch-aoti-cuda-fp16+text_encoder=torch-cuda-fp16+vae=torch-cuda-fp16
compiles the UNet alone), `--torch-compile` serves the UNet and the ViT compiled by torch.compile, and `--phases`
runs some phases only (the build phase builds the ViT only for a ViT phase): a run that measures one change fits in
what is left of a lent machine's time. results.png draws the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.gpu_phases import (
    _versions,
    batching,
    build,
    failure,
    finetune,
    philox,
    sd_in_process,
    sd_served,
    serve,
    weights,
)
from benchmarks.gpu_plot import plot
from benchmarks.gpu_unet import unet_compiled, unet_rows
from benchmarks.gpu_vit import vit_in_process, vit_served
from benchmarks.load import machine, machine_line
from kiln.triton_install import stub_numpy, stub_site_packages

TARGETS = {"sd_served_s": 0.45, "served_over_in_process": 1.10, "vit_images_per_s_at_256": 10_000,
           "step_batching_speedup_at_16": 3.0}


@dataclass(frozen=True)
class GPUCheckOptions:
    out: Path
    work: Path = Path(".kiln/gpu-check")  # weights, repository, logs (not under $OUT: it travels back)
    device: str = "cuda"  # cuda: full-size weights, torch-cuda-fp16; cpu: tiny weights, torch-fp32 (the test)
    steps: int = 50
    batching_steps: int = 20  # per request of the step-batching phase (16 clients x 2 requests x 50 steps is long)
    vit_batches: tuple[int, ...] = (1, 8, 64, 256)
    vit_clients: int = 4  # concurrent clients at the largest ViT batch
    clients: tuple[int, ...] = (1, 4, 16)
    requests_per_client: int = 2
    seconds: float = 2.0  # per ViT measurement, after warm-up
    budget_s: float = 400.0  # a phase that would start later is skipped, and said so (the script stops at 480 s)
    compiled: bool = True  # in-process torch.compile baselines (minutes on a CPU: off there)
    torch_compile: bool = False  # the served UNet and ViT compiled by torch.compile when Triton loads them
    variant: str = ""  # the torch variant built and served; "": torch-cuda-fp16 on cuda, torch-fp32 on the CPU
    phases: tuple[str, ...] = ()  # the phases to run, in PHASES' order; (): all

    @property
    def built(self) -> str:
        return self.variant or ("torch-cuda-fp16" if self.cuda else "torch-fp32")

    def runs(self, *phases: str) -> bool:
        """Whether any of these phases runs (the build phase builds the ViT only for its phases)."""
        return not self.phases or any(p in self.phases for p in phases)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def side(self) -> int:
        return 512 if self.cuda else 64

    @property
    def images(self) -> tuple[int, int, int]:
        return (256, 512, 768) if self.cuda else (32, 64, 128)


class Check:
    """The run's state and its results file."""

    def __init__(self, options: GPUCheckOptions, log) -> None:
        import torch

        self.options, self.log, self.start = options, log, time.perf_counter()
        self.root = Path(options.out) / "gpu-check"  # results only: $OUT is copied back from a lent machine
        self.root.mkdir(parents=True, exist_ok=True)
        self.work = Path(options.work)  # weights (4 GB at full size), the repository, Triton's log
        self.work.mkdir(parents=True, exist_ok=True)
        self.repo, self.weights = self.work / "repo", self.work / "sd-weights"
        # The ViT: ViT-B/16 with seeded random weights on a GPU; on the CPU run, its architecture 64 wide
        # (`kiln weights vit --tiny`, written by the weights phase), as the SD is tiny there
        self.vit_weights = None if options.cuda else self.work / "vit-weights"
        self.server, self.stopped = None, ""
        self.unet_feeds: tuple | None = None  # unet_rows' and unet_compiled's inputs (the 4 GB weights read once)
        gpu = torch.cuda.get_device_name(0) if options.cuda else ""
        self.result = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
                       "machine": machine(), "gpu": gpu, "torch": torch.__version__, "targets": TARGETS,
                       "modules": _versions(), "stub_numpy": stub_numpy(stub_site_packages()), "phases": {},
                       "errors": {}, "tracebacks": {}, "skipped": {},
                       # float32 on the GPU (the upcast VAE, the fp32 arms): TF32 where these say so
                       "tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                                "matmul": torch.backends.cuda.matmul.allow_tf32}}

    def vit_source(self) -> dict:
        """The ViT's weights as ViTBuildOptions and load_vit take them."""
        return {"weights": str(self.vit_weights)} if self.vit_weights else {"random_weights": True}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, name: str, phase) -> None:
        if self.stopped:
            self.result["skipped"][name] = self.stopped
        elif self.elapsed() > self.options.budget_s:
            self.result["skipped"][name] = f"time budget ({self.options.budget_s:.0f} s) spent"
        else:
            self.log(f"gpu-check: {name} ({self.elapsed():.0f} s in)")
            started = time.perf_counter()
            try:
                self.result["phases"][name] = phase(self) | {"seconds": round(time.perf_counter() - started, 2)}
            except KeyboardInterrupt:  # scripts/gpu_check.sh's time limit: keep what was measured
                self.stopped = f"the run's time limit interrupted {name} at {self.elapsed():.0f} s"
                self.result["errors"][name] = self.stopped
            except Exception as exc:  # noqa: BLE001 - a phase fails alone; the file says how
                described = failure(exc)
                self.result["errors"][name] = described["error"]
                self.result["tracebacks"][name] = described["traceback"]
                self.log(f"!! {name}: {self.result['errors'][name]}")
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        (self.root / "results.json").write_text(json.dumps(self.result, indent=2, default=str))



# The served figures first (the targets are theirs; only the one-second random-number check before them), then what
# runs without Triton: if Triton cannot start on a lent machine, the in-process GPU figures still come back.
PHASES = (("philox", philox), ("weights", weights), ("build", build), ("serve", serve), ("sd_served", sd_served),
          ("unet_rows", unet_rows), ("vit_served", vit_served), ("batching", batching),
          ("sd_in_process", sd_in_process), ("vit_in_process", vit_in_process), ("finetune", finetune),
          ("unet_compiled", unet_compiled))  # last: its compile may take minutes, and the targets' phases come first
SERVED = ("sd_served", "vit_served", "batching")


def run_gpu_check(options: GPUCheckOptions, log=print) -> dict:
    check = Check(options, log)
    try:
        for name, phase in PHASES:
            if not options.runs(name):
                continue
            if name in SERVED and check.server is None:
                check.result["skipped"][name] = "Triton did not start"
                continue
            check.run(name, phase)
    finally:
        if check.server is not None:
            check.result["triton_exit"] = check.server.stop()
    check.result["verdict"] = verdict(check.result)
    # What the run imported beyond the standard library: the list scripts/gpu_check.sh must find or carry.
    check.result["imported"] = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names)
                                      - {"kiln", "build", "orchestrator", "benchmarks"} - {""})
    (check.root / "results.json").write_text(json.dumps(check.result, indent=2, default=str))
    (check.root / "results.md").write_text(markdown(check.result) + "\n")
    try:
        plot(check.result, check.root / "results.png")
    except Exception as exc:  # noqa: BLE001 - the picture is a convenience; the figures are in results.json
        log(f"gpu-check: no results.png ({failure(exc)['error']})")
    log(markdown(check.result))
    log(f"wrote {check.root / 'results.json'}")
    return check.result


def verdict(result: dict) -> dict:
    """Each target against its figure (None where the phase did not run)."""
    phases = result["phases"]
    served = phases.get("vit_served", {})
    top = served.get("batches", {}).get(max(served.get("batches", {})) if served.get("batches") else 0, {})
    # the best of one client and several at once, float32 or uint8, at the other count of vit's copies, and from a
    # client's CUDA shared memory
    # (phases.vit_served has them all; kiln build vit --instances chooses the count)
    rates = [top.get(arm, {}).get("images_per_s") for arm in ("triton_tensor", "triton_uint8")] + \
        [served.get(arm, {}).get("images_per_s")
         for arm in ("concurrent", "concurrent_uint8", "concurrent_uint8_other_instances", "cuda_shm_uint8")] + \
        [served.get("cuda_shm_uint8", {}).get("one_client", {}).get("images_per_s")]
    vit_rate = max((r for r in rates if r is not None), default=None)
    speed = phases.get("batching", {}).get("step_over_unbatched", {})
    return {"sd_served_s": phases.get("sd_served", {}).get("image_s"),
            "served_over_in_process": phases.get("sd_in_process", {}).get("served_over_in_process"),
            "vit_images_per_s_at_max_batch": vit_rate,
            "step_batching_speedup_at_max_clients": speed.get(max(speed)) if speed else None}


def markdown(result: dict) -> str:
    lines = [f"GPU check: {result['gpu'] or 'CPU'}, torch {result['torch']}; {machine_line(result['machine'])}",
             "", "| figure | measured | target |", "|---|---|---|"]
    for (name, value), target in zip(result["verdict"].items(), TARGETS.values()):
        lines.append(f"| {name} | {value if value is not None else 'not measured'} | {target} |")
    for name, why in {**result["errors"], **result["skipped"]}.items():
        lines.append(f"\n{name}: {why.splitlines()[-1] if why else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results")))
    # No phase starts in the last 80 s of scripts/gpu_check.sh's limit (KILN_GPU_CHECK_LIMIT_S, 480 s by default)
    limit = float(os.environ.get("KILN_GPU_CHECK_LIMIT_S", "480"))
    parser.add_argument("--budget-s", type=float, default=min(GPUCheckOptions.budget_s, limit - 80),
                        help="no phase starts after this many seconds (default: the script's limit less 80 s)")
    parser.add_argument("--variant", default="", help="the torch variant to build and serve (torch-aoti-cuda-fp16: "
                        "AOTInductor's compiled kernels; default torch-cuda-fp16, torch-fp32 with --device cpu)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="build the served UNet and ViT with --torch-compile (torch.compile's kernels in their "
                        "CUDA graphs, compiled when Triton loads them); unet_compiled then times the UNet uncompiled")
    parser.add_argument("--phases", default="", help=f"comma-separated, from {', '.join(n for n, _ in PHASES)} "
                        "(default: all); a served phase needs serve, and serve needs build")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("KILN_GPU_CHECK_WORK", ".kiln/gpu-check")),
                        help="weights, repository and logs (kept out of --out, which a lent machine sends back)")
    args = parser.parse_args(argv)
    phases = tuple(p for p in args.phases.split(",") if p)
    unknown = sorted(set(phases) - {n for n, _ in PHASES})
    if unknown:
        parser.error(f"unknown phase {', '.join(unknown)}; the phases are {', '.join(n for n, _ in PHASES)}")
    chosen = {"variant": args.variant, "phases": phases, "torch_compile": args.torch_compile}
    if args.device == "cpu":  # the tiny run that keeps this script honest where no GPU is lent
        options = GPUCheckOptions(out=args.out, work=args.work, device="cpu", steps=3, batching_steps=2,
                                  vit_batches=(1,), vit_clients=2, clients=(1, 2), requests_per_client=1, seconds=0.2,
                                  budget_s=args.budget_s, compiled=False, **chosen)
    else:
        options = GPUCheckOptions(out=args.out, work=args.work, budget_s=args.budget_s, **chosen)
    result = run_gpu_check(options)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
