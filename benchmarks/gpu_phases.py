"""The phases of the GPU check (benchmarks/gpu_check.py), each a function of the run's state that returns its figures.

Every import that needs more than numpy is inside a phase, so a machine that lacks one (a lent GPU machine with
its own Python) loses that phase only, and says which.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.load import run_concurrently
from kiln import contract as names

if TYPE_CHECKING:
    from benchmarks.gpu_check import Check, GPUCheckOptions

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry"


def _versions() -> dict[str, str]:
    """The modules the check needs, and their versions here ("missing": scripts/gpu_check.sh had no wheel for it)."""
    import importlib.metadata
    import importlib.util

    found = {}
    for module, dist in (("torch", "torch"), ("diffusers", "diffusers"), ("transformers", "transformers"),
                         ("timm", "timm"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("grpc", "grpcio"),
                         ("tritonclient", "tritonclient"), ("pytriton", "nvidia-pytriton"),
                         ("google.protobuf", "protobuf"), ("prometheus_client", "prometheus_client")):
        try:
            present = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            present = False
        try:
            found[module] = importlib.metadata.version(dist) if present else "missing"
        except importlib.metadata.PackageNotFoundError:
            found[module] = "present"
    return found


def failure(exc: BaseException) -> dict[str, str]:
    """What stopped a phase or an arm, for results.json: its message and where it failed (a lent machine is gone once
    the run ends, and that file is all that comes back)."""
    import traceback

    return {"error": "".join(traceback.format_exception_only(exc)).strip()[-2000:],
            "traceback": "".join(traceback.format_exception(exc))[-4000:]}


def sync() -> None:
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


def served_session(folder, **options):
    """The artifact a runtime model's folder serves, opened by kiln's Session as its Triton model opens it (on the GPU
    its config names, with its CUDA graphs); `options`: SessionOptions fields to change (channels_last, say)."""
    from kiln.model_config import read_parameters, read_served
    from kiln.runtime import ByteScale, Session, SessionOptions, served_device

    served = read_served(folder / "config.pbtxt")
    scales = ByteScale.parse(read_parameters(folder / "config.pbtxt")[0].get("byte_inputs", "")) or None
    return Session(SessionOptions(served.runtime, folder / "1" / served.artifact,
                                  inference_precision=served.inference_precision, byte_inputs=scales,
                                  **(served_device(served) | options)))


def rate(latencies: list[float], items: int, concurrency: int = 1) -> dict:
    ordered = sorted(latencies)
    return {"images_per_s": round(items * concurrency * len(latencies) / max(sum(latencies), 1e-9), 1),
            "p50_ms": round(1000 * ordered[len(ordered) // 2], 3), "calls": len(latencies)}


# -- phases -----------------------------------------------------------------------------------------

def philox(check: Check) -> dict:
    """AUTOMATIC1111's GPU and NV random numbers as kiln draws them (orchestrator.pipeline.noise.Philox, numpy) against
    torch.randn on this GPU, two calls each: the same numbers are what let a pasted infotext give an NVIDIA GPU's
    image on any machine. A tensor larger than the GPU's threads at once is drawn differently by PyTorch (the last
    row says where). On the CPU there is no CUDA generator (tests/test_seeds.py holds its published figures)."""
    import torch

    from orchestrator.pipeline.noise import Philox

    if not check.options.cuda:
        return {"compared": False, "why": "torch's CUDA generator needs an NVIDIA GPU"}
    props = torch.cuda.get_device_properties(0)
    threads = getattr(props, "max_threads_per_multi_processor", 0) * props.multi_processor_count
    rows = {}
    for seed, shape in ((0, (3, 4)), (31337, (1, 4, 64, 64)), (2**32 + 5, (4, 128, 128)), (1234, (1, 4, 96, 80)),
                        (7, (4, 512, 512))):
        ours, theirs = Philox(seed), torch.Generator("cuda").manual_seed(seed)
        diffs = [float((ours.randn(shape) - torch.randn(shape, generator=theirs, device="cuda").cpu()).abs().max())
                 for _ in range(2)]
        rows[f"{'x'.join(map(str, shape))} seed {seed}"] = {"max_abs_diff": diffs, "same": max(diffs) < 1e-5,
                                                            "elements": int(np.prod(shape))}
    return {"compared": True, "gpu_threads_at_once": threads or None, "draws": rows}


def weights(check: Check) -> dict:
    from build.sd.weights import write_sd_checkpoint

    if not (check.weights / "model_index.json").exists():
        write_sd_checkpoint(check.weights, size="full" if check.options.cuda else "tiny", seed=0, controlnet=False)
    if check.vit_weights and not (check.vit_weights / "model.safetensors").exists():
        from build.vit.weights import write_random_vit

        write_random_vit(check.vit_weights, seed=0, tiny=True)
    return {"sd": str(check.weights), "vit": str(check.vit_weights or "ViT-B/16, seeded random (seed 0)")}


def build(check: Check) -> dict:
    from build.report import read_report
    from build.sd import ImageRange, SDBuildOptions, build_sd
    from build.vit import ViTBuildOptions, build_vit

    options = check.options
    variant, device = options.built, "gpu" if options.cuda else "cpu"  # variant: a key, or a mix of them for SD
    build_sd(SDBuildOptions(weights=str(check.weights), repository=check.repo, images=ImageRange(*options.images),
                            progress=False, variant=variant, device=device, torch_compile=options.torch_compile),
             log=check.log)
    sd = read_report(check.repo)["sd"]["artifacts"]
    result = {"variant": variant, "torch_compile": options.torch_compile,
              "sd_parity": {k: v["parity"] for k, v in sd.items()},
              "sd_build_s": {k: v["build_seconds"] for k, v in sd.items()},
              # AOTInductor's share of the build (torch-aoti-*: compiled kernels, not a plan run op by op)
              "sd_compile_s": {k: v["compile_seconds"] for k, v in sd.items() if v.get("compile_seconds")}}
    if options.runs("vit_served", "vit_in_process"):  # the ViT in the mix's first variant
        key = variant.split("+")[0]
        backend, _, precision = key.rpartition("-")
        build_vit(ViTBuildOptions(**check.vit_source(), backend=backend, precision=precision, variants=(key,),
                                  extra_exports=(), repository=check.repo, device=device, progress=False,
                                  torch_compile=options.torch_compile, pixel_wire="uint8"),  # a GPU build's
                  log=check.log)
        vit = read_report(check.repo)["vit"]["artifacts"][key]
        result |= {"vit_parity": vit["parity"]["logits"], "vit_build_s": vit.get("build_seconds")}
    return result


EXECUTE_TIMING = "execute-timing.jsonl"  # what the served models write (KILN_EXECUTE_TIMING), in the work folder


def serve(check: Check) -> dict:
    from kiln.triton_server import TritonOptions, TritonServer

    started = time.perf_counter()
    timing = check.work / EXECUTE_TIMING  # each runtime model's execute, split (execute_split)
    timing.unlink(missing_ok=True)
    # Triton's explicit model control, every model loaded at start: vit_served reloads `vit` at another count of
    # copies (its concurrent_uint8_other_instances arm)
    models = tuple(sorted(config.parent.name for config in check.repo.glob("*/config.pbtxt")))
    check.server = TritonServer(TritonOptions.on_free_ports(check.repo, check.work / "triton.log", load_models=models,
                                                            extra_env={"KILN_EXECUTE_TIMING": str(timing)})).start()
    return {"ready_s": round(time.perf_counter() - started, 2)}


def execute_split(check: Check, model: str) -> dict:
    """Where a served model's execute spent its time, by rows per execute (medians, from the lines kiln.runtime.model
    writes with KILN_EXECUTE_TIMING): reading the inputs, the session's run (for torch, split into the copy to the
    device, the compute and the copy back) and the responses; and the stub's CPUs and torch threads. What Triton's
    compute_infer holds, taken apart."""
    import json

    path = check.work / EXECUTE_TIMING
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    records = [r for r in records if r["model"] == model]
    by_rows: dict[int, list[dict]] = {}
    for r in records:
        if r["event"] == "execute":
            by_rows.setdefault(r["rows"], []).append(r | (r.get("session") or {}))
    out = {"stub": next(({"cpus": r["cpus"], "torch_threads": r["torch_threads"]} for r in records
                         if r["event"] == "initialize"), None)}
    for rows, group in sorted(by_rows.items()):
        parts = ("inputs_ms", "run_ms", "responses_ms", "to_device_ms", "compute_ms", "to_host_ms")
        out[str(rows)] = {"executes": len(group)} | {
            p: round(float(np.median([g[p] for g in group])), 3) for p in parts if all(p in g for g in group)}
    return out


def _sd_request(options: GPUCheckOptions):
    from orchestrator.pipeline import Txt2ImgRequest

    return Txt2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=options.steps, sampler="Euler a",
                          cfg_scale=7.5, seed=1234, width=options.side, height=options.side)


def _warm(pipeline, options: GPUCheckOptions) -> None:
    from orchestrator.pipeline import Txt2ImgRequest

    pipeline.generate(Txt2ImgRequest(prompt=PROMPT, steps=2, width=options.side, height=options.side))


def sd_served(check: Check) -> dict:
    """One image through Triton + the orchestrator, and where its time goes (Triton's own statistics)."""
    from benchmarks.sd import CallTimer
    from benchmarks.sd_triton import triton_compute_seconds
    from orchestrator.pipeline import Pipeline

    options = check.options
    pipeline = Pipeline.from_triton(check.server.grpc_url, shared_memory="auto")
    try:
        _warm(pipeline, options)
        timer = CallTimer()
        client = pipeline.components.unet.client  # every model call of the loop goes through it
        client.infer = timer.wrap(client.infer)
        before = triton_compute_seconds(check.server.http_url)
        start = time.perf_counter()
        image = pipeline.generate(_sd_request(options)).images[0]
        seconds = time.perf_counter() - start
        after = triton_compute_seconds(check.server.http_url)
    finally:
        pipeline.close()
    np.save(check.work / "sd-served.npy", image)
    compute = sum(after[m]["compute_s"] - before.get(m, {}).get("compute_s", 0) for m in after)
    unet = after[names.SD_UNET]["compute_s"] - before.get(names.SD_UNET, {}).get("compute_s", 0)
    steps = options.steps
    return {"image_s": round(seconds, 4), "step_ms": round(1000 * seconds / steps, 3),
            "model_calls_s": round(timer.seconds, 4), "model_calls": timer.calls,
            "triton_compute_s": round(compute, 4), "unet_compute_ms_per_step": round(1000 * unet / steps, 3),
            "transport_ms_per_call": round(1000 * (timer.seconds - compute) / max(timer.calls, 1), 3),
            "loop_outside_calls_ms_per_step": round(1000 * (seconds - timer.seconds) / steps, 3),
            "unet_execute_split": execute_split(check, names.SD_UNET)}


def sd_in_process(check: Check) -> dict:
    """The same variant in this process (the build's sessions, its CUDA graphs), and diffusers' own pipeline."""
    from orchestrator.pipeline import Pipeline

    options = check.options
    pipeline = Pipeline.from_repository(check.repo)
    try:
        _warm(pipeline, options)
        start = time.perf_counter()
        image = pipeline.generate(_sd_request(options)).images[0]
        seconds = time.perf_counter() - start
    finally:
        pipeline.close()
    np.save(check.work / "sd-in-process.npy", image)
    result = {"in_process": {"image_s": round(seconds, 4), "step_ms": round(1000 * seconds / options.steps, 3)},
              "diffusers": _diffusers(check)}
    served = check.result["phases"].get("sd_served")
    if served:
        result["served_over_in_process"] = round(served["image_s"] / seconds, 3)
        result["served_over_diffusers"] = round(served["image_s"] / result["diffusers"]["image_s"], 3)
        if (check.work / "sd-served.npy").exists():
            from build.parity import psnr

            result["served_vs_in_process_psnr_db"] = psnr(np.load(check.work / "sd-served.npy"), image)
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
    sync()
    start = time.perf_counter()
    pipe(num_inference_steps=options.steps, generator=torch.Generator(device).manual_seed(1234), **kwargs)
    sync()
    seconds = time.perf_counter() - start
    del pipe
    return {"image_s": round(seconds, 4), "step_ms": round(1000 * seconds / options.steps, 3)}


BATCHING_ARMS = ("unbatched", "triton", "step")  # as in `kiln bench serve` (benchmarks/serve.py)


def batching(check: Check) -> dict:
    """Concurrent clients of the service's engine, three arms alternating per client count: `unbatched`, no batching
    anywhere (a second Triton serves the repository with sd_unet's dynamic batcher removed, so every request's CFG pair
    runs alone, as a batch-1 server runs it); `triton`, the build's Triton with step batching off (Triton merges the
    calls that happen to queue together); `step`, the service's step batcher. The target's baseline is `unbatched`."""
    from benchmarks.serve import rebatched_repository, triton_unet_counts
    from kiln.triton_server import TritonOptions, TritonServer
    from orchestrator.engine import Engine, EngineOptions
    from orchestrator.metrics import Metrics
    from orchestrator.pipeline import Txt2ImgRequest

    options = check.options
    # The checkpoint's models only (not the ViT's), served as check.server serves them (timed executes too) but for
    # sd_unet's batcher
    alone = TritonServer(TritonOptions.on_free_ports(
        rebatched_repository(check.repo, check.work / "repo-unbatched", None, prefix="sd_"),
        check.work / "triton-unbatched.log",
        extra_env={"KILN_EXECUTE_TIMING": str(check.work / "execute-timing-unbatched.jsonl")}))
    servers = {"unbatched": alone, "triton": check.server, "step": check.server}
    engines, rows = {}, []
    try:
        alone.start()
        engines |= {arm: Engine(EngineOptions(triton_url=servers[arm].grpc_url, step_batching=arm == "step",
                                              workers=max(options.clients), max_queue=256), Metrics())
                    for arm in BATCHING_ARMS}
        for engine in engines.values():
            engine.submit("txt2img", Txt2ImgRequest(prompt=PROMPT, steps=2, width=options.side,
                                                    height=options.side)).future.result()
        for clients in options.clients:
            for arm, engine in engines.items():  # alternating per N, so drift hits every arm alike
                latencies: list[float] = []
                counts_before = triton_unet_counts(servers[arm].http_url)

                def client(index: int, engine=engine, latencies=latencies) -> None:
                    for r in range(options.requests_per_client):
                        start = time.perf_counter()
                        engine.submit("txt2img", Txt2ImgRequest(
                            prompt=PROMPT, negative_prompt=NEGATIVE, steps=options.batching_steps, cfg_scale=7.5,
                            seed=1000 * index + r, width=options.side, height=options.side)).future.result()
                        latencies.append(time.perf_counter() - start)
                wall = run_concurrently(client, clients)
                ordered = sorted(latencies)
                (rows_before, runs_before), (rows_after, runs_after) = counts_before, \
                    triton_unet_counts(servers[arm].http_url)
                rows.append({"arm": arm, "clients": clients, "requests": len(latencies),
                             "images_per_s": round(len(latencies) / wall, 3),
                             "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
                             # the rows each UNet execution ran, as Triton counts them (step batching's padding in)
                             "unet_rows_per_execution": round((rows_after - rows_before)
                                                              / max(runs_after - runs_before, 1), 2)})
    finally:
        for engine in engines.values():
            engine.close()
        alone.stop()
    over = {}
    for arm in ("step", "triton"):
        over[arm] = {}
        for clients in options.clients:
            by_arm = {r["arm"]: r for r in rows if r["clients"] == clients}
            over[arm][clients] = round(by_arm[arm]["images_per_s"] / by_arm["unbatched"]["images_per_s"], 3)
    return {"steps": options.batching_steps, "rows": rows, "step_over_unbatched": over["step"],
            "triton_over_unbatched": over["triton"]}


def finetune(check: Check) -> dict:
    """Training images/s of kiln finetune's step (issue 16): ViT-B/16 in fp32 and fp16 autocast on the GPU (ViT-Tiny
    and bf16 on the CPU run), the ratio against fp32 measured in the same run."""
    from benchmarks.finetune import MODELS, train_throughput

    label = "ViT-B/16" if check.options.cuda else "ViT-Tiny"
    name, _batch = MODELS[label]
    # the CPU run only proves the phase runs: bf16 autocast is emulated without AVX-512 BF16 (7 s a step at batch 4)
    batch, low = (64, "fp16") if check.options.cuda else (2, "bf16")
    rows = {precision: train_throughput(name, precision, check.options.device, batch, steps=5 if check.options.cuda
                                        else 1) for precision in ("fp32", low)}
    return {"model": label, **rows, f"{low}_over_fp32": round(rows[low]["images_per_s"] /
                                                              rows["fp32"]["images_per_s"], 3)}
