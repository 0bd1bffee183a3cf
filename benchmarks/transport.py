"""`kiln bench transport`: what one denoising step's call to Triton costs outside the model, over gRPC and through
Triton's system shared memory.

The service calls `sd_unet` once per step (per merged batch) with the latents, the timesteps and the text
embeddings, and reads `noise_pred` back. This benchmark serves a Python-backend model with sd_unet's interface
that returns its latents (no compute: what remains is the transport, Triton's scheduling and one Python-backend
call) and times the service's own client code (`TritonGraph` over `TritonClient`) at the shapes of the tiny
pipeline and of SD 1.5 at 512x512, one request (CFG: 2 rows) and four merged ones (8 rows). Both modes run in
the same process against the same Triton, alternating; the table gives shared memory's time as a ratio of the
network's. Every call's output is checked against its input.

Writes results/transport.json, .md and .png.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.load import grouped_bar_chart, machine, machine_line, write_results
from build.repository import SITE_PREAMBLE

MODEL = "transport_probe"
SHAPES = {  # name -> (rows, latent channels, latent side, text tokens, hidden)
    "tiny 64px, 1 request": (2, 4, 32, 77, 32),
    "SD 1.5 512px, 1 request": (2, 4, 64, 77, 768),
    "SD 1.5 512px, 4 requests": (8, 4, 64, 77, 768),
}
MODES = ("network", "shared memory")
BASELINE = "network"

PROBE = '''"""transport_probe: sd_unet's interface, noise_pred = sample (written by `kiln bench transport`)."""

''' + SITE_PREAMBLE + '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            sample = pb_utils.get_input_tensor_by_name(request, "sample").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("noise_pred", np.array(sample))]))
        return responses
'''


@dataclass(frozen=True)
class TransportBenchOptions:
    out: Path
    calls: int = 200  # timed calls per shape and mode (after warm-up), alternating between the modes
    shapes: tuple[str, ...] = tuple(SHAPES)


def probe_repository(target: Path) -> Path:
    """A repository with the one probe model, no batching wait (as the build writes sd_unet)."""
    from build.triton_config import DynamicBatching, ModelConfig, Tensor

    config = ModelConfig(
        name=MODEL, max_batch_size=16, dynamic_batching=DynamicBatching(max_queue_delay_microseconds=0),
        inputs=(Tensor("sample", "FP32", (-1, -1, -1)), Tensor("timestep", "FP32", (1,), reshape=()),
                Tensor("encoder_hidden_states", "FP32", (-1, -1))),
        outputs=(Tensor("noise_pred", "FP32", (-1, -1, -1)),))
    config.write(target)
    (target / MODEL / "1" / "model.py").write_text(PROBE)
    return target


def _inputs(shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, np.ndarray]:
    rows, channels, side, tokens, hidden = shape
    return {"sample": rng.standard_normal((rows, channels, side, side), dtype=np.float32),
            "timestep": np.full(rows, 500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((rows, tokens, hidden), dtype=np.float32)}


def run_transport_benchmark(options: TransportBenchOptions, log=print) -> dict:
    from kiln.triton_client import TritonClient
    from kiln.triton_server import TritonOptions, TritonServer
    from orchestrator.pipeline.components.triton import TritonGraph

    for name in options.shapes:
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; valid: {', '.join(SHAPES)}")
    out = Path(options.out)
    repo = probe_repository(out / "bench_transport" / "repo")
    rng = np.random.default_rng(0)
    rows = []
    triton_options = TritonOptions.on_free_ports(repo, out / "bench_transport" / "triton.log")
    with TritonServer(triton_options) as server:
        clients = {"network": TritonClient(server.grpc_url, shared_memory="off"),
                   "shared memory": TritonClient(server.grpc_url, shared_memory="on")}
        graphs = {mode: TritonGraph(client, MODEL, 16, out_channels=4) for mode, client in clients.items()}
        total = len(options.shapes) * options.calls
        with tqdm(total=total, desc="bench transport", unit="call pair") as bar:
            for name in options.shapes:
                inputs = _inputs(SHAPES[name], rng)
                times: dict[str, list[float]] = {mode: [] for mode in MODES}
                for call in range(options.calls + 10):  # 10 warm-up calls, then timed ones, the modes alternating
                    for mode in MODES:
                        start = time.perf_counter()
                        result = graphs[mode](inputs)
                        elapsed = time.perf_counter() - start
                        if not np.array_equal(result, inputs["sample"]):
                            raise RuntimeError(f"{mode}: {MODEL} did not return its input ({name})")
                        if call >= 10:
                            times[mode].append(elapsed)
                    bar.update(int(call >= 10))
                megabytes = (sum(a.nbytes for a in inputs.values()) + inputs["sample"].nbytes) / 1e6
                for mode in MODES:
                    rows.append({"shape": name, "mode": mode, "megabytes_per_call": round(megabytes, 3),
                                 "p50_ms": round(float(np.median(times[mode])) * 1e3, 3),
                                 "p95_ms": round(float(np.percentile(times[mode], 95)) * 1e3, 3)})
        for client in clients.values():
            client.close()
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["mode"] == BASELINE)
        row["p50_vs_network"] = round(row["p50_ms"] / base["p50_ms"], 3)
    result = {"benchmark": "transport", "calls": options.calls, "rows": rows, "machine": machine(),
              "model": f"{MODEL}: a Python-backend model with sd_unet's interface returning its latents"}
    write_results(out / "transport", result, markdown_table, plot, log)
    return result


def markdown_table(result: dict) -> str:
    lines = [f"One sd_unet-shaped call through the service's client, {result['calls']} calls per cell (p50 / p95, "
             "ms; ratio: p50 against the network's in the same run).", "",
             "| shape | MB per call | network | shared memory | ratio |", "|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in result["rows"]):
        cells = {r["mode"]: r for r in result["rows"] if r["shape"] == shape}
        net, shm = cells["network"], cells["shared memory"]
        lines.append(f"| {shape} | {net['megabytes_per_call']:.2f} | {net['p50_ms']:.2f} / {net['p95_ms']:.2f} | "
                     f"{shm['p50_ms']:.2f} / {shm['p95_ms']:.2f} | {shm['p50_vs_network']:.2f}x |")
    return "\n".join(lines + ["", machine_line(result["machine"])])


def plot(result: dict, path: Path) -> None:
    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    series = {mode: [next(r["p50_ms"] for r in result["rows"] if r["shape"] == s and r["mode"] == mode)
                     for s in shapes] for mode in MODES}
    grouped_bar_chart(series, shapes, path, "p50 ms per call", "One denoising step's transport to Triton", rotation=12)
