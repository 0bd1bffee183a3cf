"""`kiln bench vit-wire`: what a ViT batch costs on its way into the served `vit` model, as float32 pixel_values and
as uint8 pixels (a quarter of the bytes), over gRPC and through Triton's system shared memory.

The served model is the real `vit` (model_repository/vit/1/model.py on kiln.runtime.model.RuntimeModel, its
byte_inputs scaling uint8 as the build writes it) over a probe artifact in place of the ViT: an ONNX graph that
returns each image's mean, so almost nothing is compute and what remains is the image's way in (the client's copy,
Triton's copy into the Python backend, the stub's, and on the CPU the scaling of uint8). Every answer is checked
against the mean of the floats the client would have sent. The arms alternate call by call against one Triton; the
table gives each arm's p50 as a ratio of float32 over gRPC's, and Triton's own compute_input and compute_infer.

Writes results/vit-wire.json, .md and .png.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.load import grouped_bar_chart, machine, machine_line, write_results
from kiln import contract as names

SIZE = 224
MEAN = STD = (0.5, 0.5, 0.5)  # the stock ViT's (augreg): the cost is the same for any
ARMS = (("float32", "network"), ("float32", "shared memory"), ("uint8", "network"), ("uint8", "shared memory"))
BASELINE = ("float32", "network")


@dataclass(frozen=True)
class VitWireBenchOptions:
    out: Path
    batch_sizes: tuple[int, ...] = (32, 256)
    calls: int = 10  # timed calls per batch size and arm (after two warm-ups), alternating between the arms


def probe_repository(target: Path, max_batch: int) -> Path:
    """`vit` as a Python-backend build writes it (build.vit.configs: both image inputs, byte_inputs), over the probe
    artifact in place of the ViT, batching up to `max_batch`."""
    import onnx
    from onnx import TensorProto, helper

    from build.repository import write_model
    from build.triton_config import DynamicBatching, Tensor
    from build.vit import ViTBuildOptions
    from build.vit.configs import vit_model_configs
    from kiln.imaging import EvalTransform

    transform = EvalTransform(resize=248, crop=(SIZE, SIZE), interpolation="bicubic", mean=MEAN, std=STD)
    built = next(c for c in vit_model_configs(ViTBuildOptions(random_weights=True), transform) if c.name == names.VIT)
    write_model(replace(built, max_batch_size=max_batch, dynamic_batching=DynamicBatching(0),
                        outputs=(Tensor("logits", "FP32", (3,)),),
                        parameters=built.parameters | {"runtime": "onnxruntime", "artifact": "probe.onnx"}), target)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixel_values"], ["logits"], axes=[2, 3], keepdims=0)], "probe",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, target / names.VIT / "1" / "probe.onnx")
    return target


def run_vit_wire_benchmark(options: VitWireBenchOptions, log=print) -> dict:
    from benchmarks.sd_triton import triton_compute_seconds
    from kiln.imaging import normalize_pixels
    from kiln.triton_client import TritonClient
    from kiln.triton_server import TritonOptions, TritonServer

    out = Path(options.out)
    repo = probe_repository(out / "bench_vit_wire" / "repo", max(options.batch_sizes))
    raw = np.random.default_rng(0).integers(0, 256, (max(options.batch_sizes), 3, SIZE, SIZE), dtype=np.uint8)
    rows = []
    with TritonServer(TritonOptions.on_free_ports(repo, out / "bench_vit_wire" / "triton.log")) as server:
        clients = {"network": TritonClient(server.grpc_url, shared_memory="off"),
                   "shared memory": TritonClient(server.grpc_url, shared_memory="on")}
        with tqdm(total=len(options.batch_sizes) * options.calls, desc="bench vit-wire", unit="call round") as bar:
            for batch in options.batch_sizes:
                feeds = {"uint8": {"pixels": raw[:batch]}, "float32": {"pixel_values": normalize_pixels(
                    raw[:batch], MEAN, STD)}}
                expected = feeds["float32"]["pixel_values"].mean(axis=(2, 3))
                times: dict[tuple, list[float]] = {arm: [] for arm in ARMS}
                stats: dict[tuple, dict] = {arm: {} for arm in ARMS}
                for call in range(options.calls + 2):
                    for arm in ARMS:
                        wire, mode = arm
                        before = triton_compute_seconds(server.http_url, settle_s=0.5, models=(names.VIT,))
                        start = time.perf_counter()
                        result = clients[mode].infer(names.VIT, feeds[wire], ["logits"],
                                                     output_shapes={"logits": (batch, 3)})["logits"]
                        elapsed = time.perf_counter() - start
                        if not np.allclose(result, expected, atol=1e-4):
                            raise RuntimeError(f"{wire} over {mode}: the probe's means differ from the floats' "
                                               f"(max {np.abs(result - expected).max():.3g})")
                        if call >= 2:
                            times[arm].append(elapsed)
                            after = triton_compute_seconds(server.http_url, settle_s=0.5, models=(names.VIT,))
                            for key in ("compute_input_s", "compute_infer_s"):
                                stats[arm].setdefault(key, []).append(after[names.VIT][key] - before[names.VIT][key])
                    bar.update(int(call >= 2))
                for (wire, mode), values in times.items():
                    split = stats[(wire, mode)]
                    rows.append({"batch": batch, "wire": wire, "mode": mode,
                                 "megabytes_in": round(next(iter(feeds[wire].values())).nbytes / 1e6, 2),
                                 "p50_ms": round(float(np.median(values)) * 1e3, 2),
                                 "compute_input_ms": round(float(np.median(split["compute_input_s"])) * 1e3, 2),
                                 "compute_infer_ms": round(float(np.median(split["compute_infer_s"])) * 1e3, 2)})
        for client in clients.values():
            client.close()
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and (r["wire"], r["mode"]) == BASELINE)
        row["p50_vs_float32_network"] = round(row["p50_ms"] / base["p50_ms"], 3)
    result = {"benchmark": "vit-wire", "calls": options.calls, "rows": rows, "machine": machine(),
              "model": "the served vit (model.py, RuntimeModel, byte_inputs) over an ONNX probe returning each "
                       "image's per-channel mean, on ONNX Runtime"}
    write_results(out / "vit-wire", result, markdown_table, plot, log)
    return result


def markdown_table(result: dict) -> str:
    lines = [f"A ViT batch into the served `vit` (a probe artifact in place of the network), {result['calls']} calls "
             "per cell: p50 ms of the client's call, Triton's compute_input and compute_infer (the stub's share: its "
             "inputs, the uint8 scaling on the CPU, the probe), and the p50 against float32 over gRPC in the same "
             "run.", "", "| batch | wire | transport | MB in | p50 ms | compute_input ms | compute_infer ms | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['wire']} | {r['mode']} | {r['megabytes_in']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['compute_input_ms']:.1f} | {r['compute_infer_ms']:.1f} | "
                     f"{r['p50_vs_float32_network']:.2f}x |")
    return "\n".join(lines + ["", machine_line(result["machine"])])


def plot(result: dict, path: Path) -> None:
    batches = list(dict.fromkeys(r["batch"] for r in result["rows"]))
    series = {" over ".join(arm): [next(r["p50_ms"] for r in result["rows"]
                                        if r["batch"] == b and (r["wire"], r["mode"]) == arm) for b in batches]
              for arm in ARMS}
    grouped_bar_chart(series, [f"batch {b}" for b in batches], path, "p50 ms per call",
                      "A ViT batch's way into the served model", legend_size=8)
