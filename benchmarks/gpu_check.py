"""`make gpu-check` (scripts/gpu_check.sh on a lent GPU machine): the NVIDIA figures, in one run of at most 8 minutes.

It generates full-size seeded random SD 1.5 and ViT-B/16 weights, builds `torch-cuda-fp16` (CUDA graphs per row
bucket), starts the embedded Triton on the GPU and measures, in the same run:
- ViT images/s at batch 1, 8, 64, 256 through Triton (tensor input to `vit`, JPEG input to `vit_classify`) against
  in-process torch fp16, eager and torch.compile'd, and p50 latency at batch 1;
- SD 1.5 512x512, 50 steps, Euler a, CFG 7.5: seconds per image through Triton + the orchestrator, the same variant
  in process, and diffusers' own fp16 pipeline; the per-step split;
- step batching at 1, 4 and 16 concurrent clients of the service's engine: images/s and p95 against no batching.
Each phase is timed against a budget and fails alone: results.json is rewritten after every phase, so a run that
is cut short still says what it measured and why it stopped. `--device cpu` runs the same code on tiny weights
(torch-fp32 on the CPU): a test runs it so the script cannot rot before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.load import machine, machine_line, run_concurrently
from kiln import contract as names

TARGETS = {"sd_served_s": 0.45, "served_over_in_process": 1.10, "vit_images_per_s_at_256": 10_000,
           "step_batching_speedup_at_16": 3.0}
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry"


@dataclass(frozen=True)
class GPUCheckOptions:
    out: Path
    device: str = "cuda"  # cuda: full-size weights, torch-cuda-fp16; cpu: tiny weights, torch-fp32 (the test)
    steps: int = 50
    batching_steps: int = 20  # per request of the step-batching phase (16 clients x 2 requests x 50 steps is long)
    vit_batches: tuple[int, ...] = (1, 8, 64, 256)
    clients: tuple[int, ...] = (1, 4, 16)
    requests_per_client: int = 2
    seconds: float = 2.0  # per ViT measurement, after warm-up
    budget_s: float = 420.0  # a phase that would start later is skipped, and said so
    compiled: bool = True  # in-process torch.compile baselines (minutes on a CPU: off there)

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
        self.root = Path(options.out) / "gpu-check"
        self.root.mkdir(parents=True, exist_ok=True)
        self.repo, self.weights = self.root / "repo", self.root / "sd-weights"
        self.server = None
        gpu = torch.cuda.get_device_name(0) if options.cuda else ""
        self.result = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
                       "machine": machine(), "gpu": gpu, "torch": torch.__version__, "targets": TARGETS,
                       "phases": {}, "errors": {}, "skipped": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, name: str, phase) -> None:
        if self.elapsed() > self.options.budget_s:
            self.result["skipped"][name] = f"time budget ({self.options.budget_s:.0f} s) spent"
        else:
            self.log(f"gpu-check: {name} ({self.elapsed():.0f} s in)")
            started = time.perf_counter()
            try:
                self.result["phases"][name] = phase(self) | {"seconds": round(time.perf_counter() - started, 2)}
            except Exception as exc:  # noqa: BLE001 - a phase fails alone; the file says how
                self.result["errors"][name] = "".join(traceback.format_exception_only(exc)).strip()[-2000:]
                self.log(f"!! {name}: {self.result['errors'][name]}")
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        (self.root / "results.json").write_text(json.dumps(self.result, indent=2, default=str))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(call, seconds: float, min_calls: int = 3) -> list[float]:
    """Latencies of `call` after one warm-up call, for at least `seconds` and `min_calls` calls."""
    call()
    latencies, until = [], time.perf_counter() + seconds
    while len(latencies) < min_calls or time.perf_counter() < until:
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return latencies


def rate(latencies: list[float], items: int, concurrency: int = 1) -> dict:
    ordered = sorted(latencies)
    return {"images_per_s": round(items * concurrency * len(latencies) / max(sum(latencies), 1e-9), 1),
            "p50_ms": round(1000 * ordered[len(ordered) // 2], 3), "calls": len(latencies)}


# -- phases -----------------------------------------------------------------------------------------

def weights(check: Check) -> dict:
    from build.sd.weights import write_sd_checkpoint

    if not (check.weights / "model_index.json").exists():
        write_sd_checkpoint(check.weights, size="full" if check.options.cuda else "tiny", seed=0, controlnet=False)
    return {"sd": str(check.weights)}


def build(check: Check) -> dict:
    from build.report import read_report
    from build.sd import ImageRange, SDBuildOptions, build_sd
    from build.vit import ViTBuildOptions, build_vit

    cuda = check.options.cuda
    variant, device = ("torch-cuda-fp16", "gpu") if cuda else ("torch-fp32", "cpu")
    build_sd(SDBuildOptions(weights=str(check.weights), repository=check.repo, images=ImageRange(*check.options.images),
                            progress=False, variant=variant, device=device), log=check.log)
    build_vit(ViTBuildOptions(random_weights=True, backend="torch-cuda" if cuda else "torch",
                              precision="fp16" if cuda else "fp32", variants=(variant,), extra_exports=(),
                              repository=check.repo, device=device, progress=False), log=check.log)
    report = read_report(check.repo)
    return {"variant": variant, "sd_parity": {k: v["parity"] for k, v in report["sd"]["artifacts"].items()},
            "sd_build_s": {k: v["build_seconds"] for k, v in report["sd"]["artifacts"].items()},
            "vit_parity": report["vit"]["artifacts"][variant]["parity"]["logits"]}


def serve(check: Check) -> dict:
    from kiln.triton_server import TritonOptions, TritonServer, free_port

    started = time.perf_counter()
    check.server = TritonServer(TritonOptions(repository=check.repo, http_port=free_port(), grpc_port=free_port(),
                                              metrics_port=free_port(), log_path=check.root / "triton.log")).start()
    return {"ready_s": round(time.perf_counter() - started, 2)}


def vit(check: Check) -> dict:
    import torch

    from build.vit.weights import load_vit
    from kiln.imaging import preprocess
    from kiln.paths import SAMPLE_IMAGES, list_images
    from kiln.triton_client import TritonClient

    options, batches = check.options, check.options.vit_batches
    model = load_vit(random_weights=True, seed=0).model
    from build.vit.transform import eval_transform

    transform = eval_transform(model)
    payloads = [p.read_bytes() for p in list_images(SAMPLE_IMAGES) if p.suffix.lower() in (".jpg", ".jpeg")]
    pixels = np.stack([preprocess(payloads[i % len(payloads)], transform) for i in range(max(batches))])
    jpegs = np.array([payloads[i % len(payloads)] for i in range(max(batches))], dtype=object).reshape(-1, 1)
    client = TritonClient(check.server.grpc_url, shared_memory="auto")
    rows = {}
    for batch in batches:
        feed = {"pixel_values": pixels[:batch]}
        tensor = timed(lambda feed=feed, batch=batch: client.infer(
            names.VIT, feed, ["logits"], output_shapes={"logits": (batch, 1000)}), options.seconds)
        jpeg = timed(lambda batch=batch: client.infer(names.VIT_CLASSIFY, {"image": jpegs[:batch]}, ["labels"]),
                     options.seconds)
        rows[batch] = {"triton_tensor": rate(tensor, batch), "triton_jpeg": rate(jpeg, batch)}
    client.close()
    device, dtype = ("cuda", torch.float16) if options.cuda else ("cpu", torch.float32)
    model = model.to(device, dtype).eval()
    arms = {"in_process_eager": model}
    if options.compiled:
        arms["in_process_compiled"] = torch.compile(model, mode="reduce-overhead" if options.cuda else "default")
    for arm, module in arms.items():
        for batch in batches:
            if arm == "in_process_compiled" and check.elapsed() > options.budget_s * 0.6:
                rows[batch][arm] = {"skipped": "time budget"}
                continue
            x = torch.from_numpy(pixels[:batch]).to(device, dtype)

            def call(x=x, module=module) -> None:
                with torch.inference_mode():
                    module(x)
                _sync()
            rows[batch][arm] = rate(timed(call, options.seconds), batch)
    top = rows[max(batches)]
    return {"batches": rows, "served_over_eager_at_max_batch": round(
        top["triton_tensor"]["images_per_s"] / top["in_process_eager"]["images_per_s"], 3)}


def sd(check: Check) -> dict:
    from benchmarks.sd import CallTimer, triton_compute_seconds
    from orchestrator.pipeline import Pipeline, Txt2ImgRequest

    options = check.options
    request = Txt2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=options.steps, sampler="Euler a",
                             cfg_scale=7.5, seed=1234, width=options.side, height=options.side)
    result = {}
    for path in ("triton", "in_process"):
        pipeline = (Pipeline.from_triton(check.server.grpc_url, shared_memory="auto") if path == "triton"
                    else Pipeline.from_repository(check.repo))
        pipeline.generate(Txt2ImgRequest(prompt=PROMPT, steps=2, width=options.side, height=options.side))  # warm-up
        timer = CallTimer()
        if path == "triton":
            client = pipeline.components.unet.client
            client.infer = timer.wrap(client.infer)
            before = triton_compute_seconds(check.server.http_url)
        start = time.perf_counter()
        image = pipeline.generate(request).images[0]
        seconds = time.perf_counter() - start
        result[path] = {"image_s": round(seconds, 4), "step_ms": round(1000 * seconds / options.steps, 3)}
        if path == "triton":
            after = triton_compute_seconds(check.server.http_url)
            compute = sum(after[m]["compute_s"] - before.get(m, {}).get("compute_s", 0) for m in after)
            unet = after[names.SD_UNET]["compute_s"] - before.get(names.SD_UNET, {}).get("compute_s", 0)
            result[path] |= {"model_calls_s": round(timer.seconds, 4), "model_calls": timer.calls,
                             "triton_compute_s": round(compute, 4), "unet_compute_ms_per_step": round(
                                 1000 * unet / options.steps, 3),
                             "transport_ms_per_call": round(1000 * (timer.seconds - compute) / max(timer.calls, 1), 3),
                             "loop_outside_calls_ms_per_step": round(1000 * (seconds - timer.seconds) / options.steps,
                                                                     3)}
        np.save(check.root / f"sd-{path}.npy", image)
        pipeline.close()
    result["diffusers"] = _diffusers(check)
    result["served_over_in_process"] = round(result["triton"]["image_s"] / result["in_process"]["image_s"], 3)
    result["served_over_diffusers"] = round(result["triton"]["image_s"] / result["diffusers"]["image_s"], 3)
    return result


def _diffusers(check: Check) -> dict:
    """diffusers' own pipeline on the same weights: fp16 on the GPU, Euler a, CFG 7.5, the same steps."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    options = check.options
    device, dtype = ("cuda", torch.float16) if options.cuda else ("cpu", torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(str(check.weights), torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True).to(device)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance_scale": 7.5, "height": options.side,
              "width": options.side}
    pipe(num_inference_steps=2, **kwargs)  # warm-up
    _sync()
    start = time.perf_counter()
    pipe(num_inference_steps=options.steps, generator=torch.Generator(device).manual_seed(1234), **kwargs)
    _sync()
    seconds = time.perf_counter() - start
    del pipe
    return {"image_s": round(seconds, 4), "step_ms": round(1000 * seconds / options.steps, 3)}


def batching(check: Check) -> dict:
    from orchestrator.jobs import Engine, EngineOptions
    from orchestrator.metrics import Metrics
    from orchestrator.pipeline import Txt2ImgRequest

    options = check.options
    engines = {arm: Engine(EngineOptions(triton_url=check.server.grpc_url, step_batching=arm == "step",
                                         workers=max(options.clients), max_queue=256), Metrics())
               for arm in ("unbatched", "step")}
    rows = []
    try:
        for engine in engines.values():
            engine.submit("txt2img", Txt2ImgRequest(prompt=PROMPT, steps=2, width=options.side,
                                                    height=options.side)).future.result()
        for clients in options.clients:
            for arm, engine in engines.items():  # alternating per N, so drift hits both alike
                latencies: list[float] = []
                rows_before, batches_before = engine.batcher.stats.rows, engine.batcher.stats.batches

                def client(index: int, engine=engine, latencies=latencies) -> None:
                    for r in range(options.requests_per_client):
                        start = time.perf_counter()
                        engine.submit("txt2img", Txt2ImgRequest(
                            prompt=PROMPT, negative_prompt=NEGATIVE, steps=options.batching_steps, cfg_scale=7.5,
                            seed=1000 * index + r, width=options.side, height=options.side)).future.result()
                        latencies.append(time.perf_counter() - start)
                wall = run_concurrently(client, clients)
                ordered = sorted(latencies)
                rows.append({"arm": arm, "clients": clients, "requests": len(latencies),
                             "images_per_s": round(len(latencies) / wall, 3),
                             "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
                             "mean_unet_rows": round((engine.batcher.stats.rows - rows_before)
                                                     / max(engine.batcher.stats.batches - batches_before, 1), 2)})
    finally:
        for engine in engines.values():
            engine.close()
    speedup = {}
    for clients in options.clients:
        by_arm = {r["arm"]: r for r in rows if r["clients"] == clients}
        speedup[clients] = round(by_arm["step"]["images_per_s"] / by_arm["unbatched"]["images_per_s"], 3)
    return {"steps": options.batching_steps, "rows": rows, "step_over_unbatched": speedup}


PHASES = (("weights", weights), ("build", build), ("serve", serve), ("vit", vit), ("sd", sd), ("batching", batching))


def run_gpu_check(options: GPUCheckOptions, log=print) -> dict:
    check = Check(options, log)
    try:
        for name, phase in PHASES:
            if name not in ("weights", "build") and check.server is None and name != "serve":
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
    log(markdown(check.result))
    log(f"wrote {check.root / 'results.json'}")
    return check.result


def verdict(result: dict) -> dict:
    """Each target against its figure (None where the phase did not run)."""
    phases = result["phases"]
    sd_ = phases.get("sd", {})
    vit_ = phases.get("vit", {}).get("batches", {})
    top = vit_.get(max(vit_) if vit_ else 0, {}).get("triton_tensor", {})
    speed = phases.get("batching", {}).get("step_over_unbatched", {})
    return {"sd_served_s": sd_.get("triton", {}).get("image_s"),
            "served_over_in_process": sd_.get("served_over_in_process"),
            "vit_images_per_s_at_max_batch": top.get("images_per_s"),
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
    parser.add_argument("--budget-s", type=float, default=GPUCheckOptions.budget_s)
    args = parser.parse_args(argv)
    if args.device == "cpu":  # the tiny run that keeps this script honest where no GPU is lent
        options = GPUCheckOptions(out=args.out, device="cpu", steps=3, batching_steps=2, vit_batches=(1, 2),
                                  clients=(1, 2), requests_per_client=1, seconds=0.2, budget_s=args.budget_s,
                                  compiled=False)
    else:
        options = GPUCheckOptions(out=args.out, budget_s=args.budget_s)
    result = run_gpu_check(options)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
