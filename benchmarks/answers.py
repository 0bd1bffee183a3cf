"""`python -m benchmarks.answers`: what a large answer (base64 images in JSON) costs the server's other requests. The
same GenerationResponse-shaped answer (`--images` strings of `--mb` MB of base64 each; 12 x 1.7 MB is what a batch of
twelve 1024-pixel upscales answers) through FastAPI's default response (pydantic's dump_json on the event loop, one
write) and through orchestrator.server.answers.ImagesJSON (made in the thread pool, sent in pieces), while a poller
asks a trivial route every 10 ms: how long its answers waited (the event loop's stalls), and how long the big answers
took.

A real uvicorn in a process of its own, the clients (httpx) on threads of this one; the arms alternate each round.
Every big answer is checked: the first of each arm parsed and compared, the rest by length.

Writes results/answers.json, .md and .png.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.load import grouped_bar_chart, machine, machine_line, run_concurrently, write_results

ARMS = ("default", "pieces")  # the first is the baseline
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class AnswersBenchOptions:
    out: Path = RESULTS
    images: int = 12
    mb: float = 1.7  # of base64 per image
    clients: int = 2  # fetching big answers at once
    requests_per_client: int = 4  # per round
    rounds: int = 3
    poll_every_s: float = 0.01


def _app(answer: dict):
    from fastapi import FastAPI

    from kiln import schemas
    from orchestrator.server.answers import ImagesJSON

    app = FastAPI()

    @app.get("/default", response_model=schemas.GenerationResponse)
    async def default():
        return answer

    @app.get("/pieces", response_model=schemas.GenerationResponse, response_class=ImagesJSON)
    async def pieces():
        return answer

    @app.get("/live")
    async def live():
        return {"status": "live"}

    return app


def _images(options: AnswersBenchOptions) -> list[str]:
    rng = np.random.default_rng(0)
    return [base64.b64encode(rng.bytes(int(options.mb * 1e6 * 3 / 4))).decode() for _ in range(options.images)]


def serve(port: int, options: AnswersBenchOptions) -> None:
    """The benchmark's server (run in a process of its own by run_answers_benchmark)."""
    import uvicorn

    images = _images(options)
    answer = {"images": images, "parameters": {"prompt": "a cat", "steps": 20, "init_images": None},
              "info": json.dumps({"seed": 1, "infotexts": ["a cat\nSteps: 20"] * options.images})}
    uvicorn.run(_app(answer), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _wait_until_up(http, server, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the benchmark's server exited ({server.returncode})")
        try:
            if http.get("/live").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the benchmark's server did not answer /live within {timeout_s} s")
        time.sleep(0.1)


def run_answers_benchmark(options: AnswersBenchOptions, log=print) -> dict:
    import httpx

    from kiln.triton_server import free_port

    images = _images(options)
    port = free_port()
    # the server in a process of its own: the clients' reading (20 MB answers, in Python) would otherwise take the
    # GIL from its event loop, and be measured as the server's stalls
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.answers", "--serve", str(port), "--images",
                               str(options.images), "--mb", str(options.mb)], cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    https = [httpx.Client(base_url=url, timeout=120) for _ in range(options.clients + 1)]
    sizes = {}
    try:
        _wait_until_up(https[0], server)
        for arm in ARMS:  # warm-up, and the check of each arm's answer
            got = https[0].get(f"/{arm}")
            if got.status_code != 200 or got.json()["images"] != images:
                raise RuntimeError(f"/{arm} answered {got.status_code}, not the answer")
            sizes[arm] = len(got.content)
        waits: dict[str, list[float]] = {arm: [] for arm in ARMS}
        polls: dict[str, list[float]] = {arm: [] for arm in ARMS}
        failures: list[str] = []
        with tqdm(total=options.rounds * len(ARMS), desc="bench answers", unit="run") as bar:
            for _ in range(options.rounds):
                for arm in ARMS:
                    bar.set_postfix(arm=arm)
                    done = threading.Event()

                    def poll(arm=arm, done=done) -> None:
                        while not done.is_set():
                            sent = time.perf_counter()
                            if https[-1].get("/live").status_code != 200:
                                failures.append("/live failed")
                                return
                            polls[arm].append(time.perf_counter() - sent)
                            time.sleep(options.poll_every_s)

                    def fetch(index: int, arm=arm) -> None:
                        for _ in range(options.requests_per_client):
                            sent = time.perf_counter()
                            got = https[index].get(f"/{arm}")
                            waits[arm].append(time.perf_counter() - sent)
                            if got.status_code != 200 or len(got.content) != sizes[arm]:
                                raise RuntimeError(f"/{arm} answered {got.status_code}, {len(got.content)} bytes")

                    poller = threading.Thread(target=poll)
                    poller.start()
                    try:
                        run_concurrently(fetch, options.clients)
                    finally:
                        done.set()
                        poller.join()
                    if failures:  # (the poller's thread: raised there, it would be lost)
                        raise RuntimeError(failures[0])
                    bar.update()
    finally:
        for http in https:
            http.close()
        server.terminate()
        server.wait(30)
    rows = []
    for arm in ARMS:
        ms = {name: round(float(np.percentile(values, q)) * 1e3, 2) for name, values, q in (
            ("answer_p50_ms", waits[arm], 50), ("poll_p50_ms", polls[arm], 50), ("poll_p99_ms", polls[arm], 99),
            ("poll_max_ms", polls[arm], 100))}
        rows.append({"arm": arm, "answers": len(waits[arm]), "polls": len(polls[arm]), "answer_mb": round(
            sizes[arm] / 1e6, 2), **ms})
    for row in rows:
        for name in ("answer_p50_ms", "poll_p99_ms", "poll_max_ms"):
            row[name.replace("_ms", "_vs_default")] = round(row[name] / rows[0][name], 3)
    result = {"benchmark": "answers", "images": options.images, "mb_per_image": options.mb,
              "clients": options.clients, "requests_per_client": options.requests_per_client,
              "rounds": options.rounds, "rows": rows, "machine": machine()}
    options.out.mkdir(parents=True, exist_ok=True)
    write_results(options.out / "answers", result, markdown_table, plot, log)
    return result


def markdown_table(result: dict) -> str:
    lines = [f"{result['images']} images of {result['mb_per_image']} MB base64 an answer, {result['clients']} clients "
             "fetching, /live polled every 10 ms", "",
             "| arm | answer MB | answers | answer p50 ms | vs default | polls | poll p50 ms | poll p99 ms "
             "| vs default | poll max ms | vs default |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['arm']} | {r['answer_mb']} | {r['answers']} | {r['answer_p50_ms']} | "
                     f"{r['answer_p50_vs_default']} | {r['polls']} | {r['poll_p50_ms']} | {r['poll_p99_ms']} | "
                     f"{r['poll_p99_vs_default']} | {r['poll_max_ms']} | {r['poll_max_vs_default']} |")
    return "\n".join(lines + ["", machine_line(result["machine"])])


def plot(result: dict, path: Path) -> None:
    names = ("poll_p50_ms", "poll_p99_ms", "poll_max_ms", "answer_p50_ms")
    series = {r["arm"]: [r[name] for name in names] for r in result["rows"]}
    grouped_bar_chart(series, ["poll p50", "poll p99", "poll max", "answer p50"], path, "ms",
                      f"{result['images']} x {result['mb_per_image']} MB answers: what other requests wait")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--images", type=int, default=AnswersBenchOptions.images)
    parser.add_argument("--mb", type=float, default=AnswersBenchOptions.mb, help="of base64 per image")
    parser.add_argument("--clients", type=int, default=AnswersBenchOptions.clients)
    parser.add_argument("--requests", type=int, default=AnswersBenchOptions.requests_per_client,
                        help="per client and round")
    parser.add_argument("--rounds", type=int, default=AnswersBenchOptions.rounds)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # (the server's process)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, AnswersBenchOptions(images=args.images, mb=args.mb))
    return run_answers_benchmark(AnswersBenchOptions(out=args.out, images=args.images, mb=args.mb,
                                                     clients=args.clients, requests_per_client=args.requests,
                                                     rounds=args.rounds))


if __name__ == "__main__":
    main()
