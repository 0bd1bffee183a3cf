"""`kiln bench sd` through Triton: the same request over gRPC through the embedded Triton, with Triton's own compute
statistics per model and the Triton process tree's peak memory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks.sd import CallTimer, _peak_rss_mb, bench_request
from build.parity import psnr
from kiln import contract as names
from orchestrator.pipeline import Pipeline

# The models that compute (ensembles only route between them, so their statistics would count twice).
COMPUTING_MODELS = (names.SD_TOKENIZER, names.SD_TEXT_ENCODER, names.SD_UNET, names.SD_VAE_DECODER,
                    names.SD_VAE_POSTPROCESS)


def triton_compute_seconds(http_url: str, settle_s: float = 1.0,
                           models: tuple[str, ...] = COMPUTING_MODELS) -> dict[str, dict]:
    """Triton's cumulative statistics per computing model (or per one of `models`): compute (input + infer + output,
    and each of the three) and queue seconds and the executions, once they have settled: a model records a request's
    statistics after its response has gone out, so a snapshot taken right after a call may lack it (and one taken
    later would give it to the next window). Two equal reads 50 ms apart, or `settle_s` at most."""
    deadline = time.perf_counter() + settle_s
    current = _compute_seconds(http_url, models)
    while time.perf_counter() < deadline:
        time.sleep(0.05)
        latest = _compute_seconds(http_url, models)
        if latest == current:
            break
        current = latest
    return current


def _compute_seconds(http_url: str, models: tuple[str, ...]) -> dict[str, dict]:
    import urllib.request

    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=30) as response:
        stats = json.load(response)["model_stats"]
    out = {}
    for model in stats:
        if model["name"] in models:
            inference = model["inference_stats"]
            stages = {f"{k}_s": int(inference[k]["ns"]) / 1e9 for k in ("compute_input", "compute_infer",
                                                                          "compute_output")}
            out[model["name"]] = {"compute_s": sum(stages.values()), **stages,
                                  "queue_s": int(inference["queue"]["ns"]) / 1e9,
                                  "executions": int(model["execution_count"]),
                                  "requests": int(inference["success"]["count"])}
    return out


def _tree_peak_rss_mb(pid: int) -> float:
    """Sum of the peak RSS of a process and its children (Triton and its Python-backend stubs)."""
    import psutil

    total = 0.0
    try:
        process = psutil.Process(pid)
        for p in [process, *process.children(recursive=True)]:
            try:
                peak = _peak_rss_mb(p.pid)
            except OSError:  # the process ended meanwhile
                continue
            if peak == peak:  # not NaN
                total += peak
    except psutil.Error:
        return float("nan")
    return total


def measure_triton(root: Path, repo: Path, side: int, steps: int, log) -> dict:
    from kiln.triton_server import TritonOptions, TritonServer

    server = TritonServer(TritonOptions.on_free_ports(repo, root / "triton.log"))
    with server:
        pipeline = Pipeline.from_triton(server.grpc_url)
        pipeline.generate(bench_request(side, 1))  # warm-up: every model's first call
        timed = CallTimer()
        client = pipeline.components.unet.client  # the components' one Triton client: every model call goes through it
        client.infer = timed.wrap(client.infer)
        before = triton_compute_seconds(server.http_url)
        start = time.perf_counter()
        image = pipeline.generate(bench_request(side, steps)).images[0]
        seconds = time.perf_counter() - start
        after = triton_compute_seconds(server.http_url)
        peak = _tree_peak_rss_mb(server.pid)
    per_model = {name: {k: after[name][k] - before.get(name, {}).get(k, 0) for k in after[name]} for name in after}
    result = {"variant": "onnxruntime-fp32", "path": "triton", "image_s": seconds, "image_steps": steps,
              "peak_rss_mb": peak, "model_calls_s": timed.seconds, "model_calls": timed.calls,
              "triton_models": per_model,
              "triton_compute_s": sum(m["compute_s"] for m in per_model.values()),
              "triton_queue_s": sum(m["queue_s"] for m in per_model.values())}
    direct = root / "image-onnxruntime-fp32.npy"
    if direct.exists():
        result["image_psnr_vs_direct_db"] = psnr(np.load(direct), image)
    return result


