"""`python -m benchmarks.classify_api`: what the API adds to a classification. `POST /v1/classify` (JSON, one base64
JPEG a request, or `--images N`) against the same JPEGs sent straight to Triton's `vit_classify` (a kiln.vit.ViTClient
over gRPC for each benchmark client), at 1, 4 and 16 concurrent clients sending back to back, the arms alternating at
each concurrency.

The tests' tiny ViT (ViT-B/16's architecture 64 wide, seeded random, ONNX Runtime fp32) keeps the model's own time
small, so that what the API layer costs shows: HTTP and JSON, the base64, the image's header check, the API's thread
pool, its calls to Triton. The service runs in this process (orchestrator.server.service.BackgroundAPI, as
benchmarks.serve), its clients on threads. Every answer is checked: the API's top labels are Triton's.

Writes results/classify-api.json, .md and .png.
"""

from __future__ import annotations

import argparse
import base64
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.load import grouped_bar_chart, machine, machine_line, run_concurrently, write_results

ARMS = ("triton", "api")  # the first is the baseline
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class ClassifyBenchOptions:
    out: Path = RESULTS
    clients: tuple[int, ...] = (1, 4, 16)
    requests_per_client: int = 40
    rounds: int = 2  # of both arms at each concurrency, alternating
    images: int = 1  # per request (the same JPEG)


def _repository(work: Path) -> Path:
    from build.vit import ViTBuildOptions, build_vit
    from build.vit.weights import write_random_vit

    weights = write_random_vit(work / "vit", seed=0, tiny=True)
    repo = work / "repo"
    build_vit(ViTBuildOptions(weights=str(weights), repository=repo, progress=False, variants=("onnxruntime-fp32",),
                              extra_exports=()), log=lambda _m: None)
    return repo


def _load(send, clients: int, per_client: int) -> tuple[list[float], float]:
    """`clients` threads calling send(client_index) `per_client` times each: the latencies and the wall seconds."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        own = []
        for _ in range(per_client):
            start = time.perf_counter()
            send(index)
            own.append(time.perf_counter() - start)
        with lock:
            latencies.extend(own)

    return latencies, run_concurrently(client, clients)


def run_classify_benchmark(options: ClassifyBenchOptions, log=print) -> dict:
    import httpx

    from kiln.paths import SAMPLE_IMAGES, list_images
    from kiln.triton_server import TritonOptions, TritonServer, free_port
    from kiln.vit import ViTClient
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    photo = list_images(SAMPLE_IMAGES)[0].read_bytes()
    body = {"images": [base64.b64encode(photo).decode()] * options.images, "top_k": 5}
    named = [(f"images[{index}]", photo) for index in range(options.images)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-classify-") as scratch:
        repo = _repository(Path(scratch))
        with TritonServer(TritonOptions.on_free_ports(repo, Path(scratch) / "triton.log")) as server:
            api = BackgroundAPI(Settings(triton_url=server.grpc_url, port=free_port()))
            most, vits, https = max(options.clients), [], []
            try:
                vits += [ViTClient(server.grpc_url, "grpc") for _ in range(most)]
                https += [httpx.Client(base_url=api.url, timeout=60) for _ in range(most)]
                expected = vits[0].classify_one(photo).labels

                def triton(index: int) -> None:
                    if [result.labels for result in vits[index].classify(named)] != [expected] * options.images:
                        raise RuntimeError("Triton's labels changed between calls")

                def through_api(index: int) -> None:
                    answer = https[index].post("/v1/classify", json=body)
                    if answer.status_code != 200 or answer.json()["results"][0].get("top") is None:
                        raise RuntimeError(f"/v1/classify answered {answer.status_code}: {answer.text[:200]}")
                    if [[entry["label"] for entry in result["top"]] for result in answer.json()["results"]] \
                            != [expected] * options.images:
                        raise RuntimeError("the API's labels are not Triton's")

                sends = {"triton": triton, "api": through_api}
                for arm in ARMS:  # warm-up: sessions, connections, thread pools
                    _load(sends[arm], most, 2)
                total = len(options.clients) * options.rounds * len(ARMS)
                with tqdm(total=total, desc="bench classify-api", unit="run") as bar:
                    for clients in options.clients:
                        latencies: dict[str, list[float]] = {arm: [] for arm in ARMS}
                        walls: dict[str, float] = dict.fromkeys(ARMS, 0.0)
                        for _ in range(options.rounds):
                            for arm in ARMS:
                                bar.set_postfix(clients=clients, arm=arm)
                                times, wall = _load(sends[arm], clients, options.requests_per_client)
                                latencies[arm] += times
                                walls[arm] += wall
                                bar.update()
                        for arm in ARMS:
                            count = len(latencies[arm])
                            rows.append({"clients": clients, "arm": arm, "requests": count,
                                         "images_per_s": round(count * options.images / walls[arm], 1),
                                         "p50_ms": round(float(np.percentile(latencies[arm], 50)) * 1e3, 2),
                                         "p95_ms": round(float(np.percentile(latencies[arm], 95)) * 1e3, 2)})
            finally:
                for http in https:
                    http.close()
                for vit in vits:
                    vit.close()
                api.stop()
    for row in rows:
        base = next(r for r in rows if r["clients"] == row["clients"] and r["arm"] == ARMS[0])
        row["images_per_s_vs_triton"] = round(row["images_per_s"] / base["images_per_s"], 3)
        row["p50_vs_triton"] = round(row["p50_ms"] / base["p50_ms"], 3)
    result = {"benchmark": "classify-api", "requests_per_client": options.requests_per_client,
              "images_per_request": options.images,
              "rounds": options.rounds, "rows": rows, "machine": machine(),
              "model": "the tests' tiny ViT (ViT-B/16 64 wide, seeded random), ONNX Runtime fp32"}
    options.out.mkdir(parents=True, exist_ok=True)
    stem = "classify-api" + (f"-{options.images}" if options.images > 1 else "")
    write_results(options.out / stem, result, markdown_table, plot, log)
    return result


def markdown_table(result: dict) -> str:
    lines = ["| clients | arm | requests | images/s | vs Triton | p50 ms | p95 ms | p50 vs Triton |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['clients']} | {r['arm']} | {r['requests']} | {r['images_per_s']} | "
                     f"{r['images_per_s_vs_triton']} | {r['p50_ms']} | {r['p95_ms']} | {r['p50_vs_triton']} |")
    return "\n".join(lines + ["", machine_line(result["machine"])])


def plot(result: dict, path: Path) -> None:
    clients = sorted({r["clients"] for r in result["rows"]})
    series = {arm: [next(r["images_per_s"] for r in result["rows"] if r["clients"] == n and r["arm"] == arm)
                    for n in clients] for arm in ARMS}
    each = result["images_per_request"]
    grouped_bar_chart(series, [f"{n} clients" for n in clients], path, "images/s",
                      f"{each} JPEG{'s' if each > 1 else ''} a request: Triton's vit_classify, and /v1/classify "
                      "through the API")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--clients", type=int, nargs="+", default=list(ClassifyBenchOptions.clients))
    parser.add_argument("--requests", type=int, default=ClassifyBenchOptions.requests_per_client,
                        help="per client and run")
    parser.add_argument("--rounds", type=int, default=ClassifyBenchOptions.rounds)
    parser.add_argument("--images", type=int, default=ClassifyBenchOptions.images,
                        help="per request (writes classify-api-N.* where more than one)")
    args = parser.parse_args(argv)
    return run_classify_benchmark(ClassifyBenchOptions(out=args.out, clients=tuple(args.clients),
                                                       requests_per_client=args.requests, rounds=args.rounds,
                                                       images=args.images))


if __name__ == "__main__":
    main()
