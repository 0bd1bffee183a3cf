"""`python -m benchmarks.shared_listing`: what listing the shared queue's jobs costs (GET /v1/tasks, a script's
interrupt, the checkpoints in use all read SharedQueue.jobs()). A real redis-server with `--jobs` queued jobs (one
worker holds the first, so the rest wait); the baseline reads each job's record in its own round trip (SharedQueue.get
for each, what jobs() did before), the other arm is jobs() (the records read in one pipelined round trip). Alternating
rounds; each arm's jobs are checked to be the same.

Writes results/shared-listing.json, .md and .png.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

from benchmarks.load import alternate, bar_chart, machine, machine_line, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def run_listing_benchmark(jobs: int = 500, rounds: int = 7, out: Path = RESULTS, log=print) -> dict:
    from kiln.redis_server import RedisServer
    from orchestrator.jobs import Job
    from orchestrator.metrics import Metrics
    from orchestrator.pipeline import Txt2ImgRequest
    from orchestrator.shared.queue import RECENT, SharedQueue

    with tempfile.TemporaryDirectory(prefix="kiln-bench-listing-") as scratch, \
            RedisServer(Path(scratch) / "redis") as server:
        held = threading.Event()
        queue = SharedQueue(server.url, lambda _job: held.wait(), max_queue=10 * jobs, workers=1, metrics=Metrics())
        try:
            request = Txt2ImgRequest(prompt="a cat", steps=2, width=64, height=64)
            for _ in range(jobs):
                queue.submit(Job(kind="txt2img", request=request, n_iter=1))

            def one_by_one() -> list[str]:
                ids = [i.decode() for i in queue.redis.zrevrange(RECENT, 0, 511)]
                return [job.id for job in (queue.get(i) for i in ids) if job is not None]

            medians, last = alternate({"one round trip each": one_by_one,
                                       "jobs(), pipelined": lambda: [job.id for job in queue.jobs()]},
                                      rounds, "bench shared-listing")
        finally:
            held.set()
            queue.close(timeout_s=5, grace_s=1)
    listed = {len(ids) for ids in last.values()}
    if len({tuple(ids) for ids in last.values()}) != 1:
        raise RuntimeError(f"the arms listed different jobs ({listed})")
    base = medians["one round trip each"]
    rows = [{"arm": arm, "ms": round(seconds * 1e3, 1), "vs_baseline": round(seconds / base, 3)}
            for arm, seconds in medians.items()]
    result = {"benchmark": "shared-listing", "jobs": jobs, "listed": listed.pop(), "rounds": rounds, "rows": rows,
              "machine": machine()}
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / "shared-listing", result, markdown_table, plot, log)
    return result


def markdown_table(result: dict) -> str:
    lines = [f"{result['listed']} jobs listed ({result['jobs']} queued), median of {result['rounds']} rounds", "",
             "| arm | ms | vs baseline |", "|---|---:|---:|"]
    lines += [f"| {r['arm']} | {r['ms']} | {r['vs_baseline']} |" for r in result["rows"]]
    return "\n".join(lines + ["", machine_line(result["machine"])])


def plot(result: dict, path: Path) -> None:
    bar_chart({r["arm"]: r["ms"] for r in result["rows"]}, path, "ms per listing",
              f"Listing {result['listed']} jobs of the shared queue", ["tab:gray", "tab:blue"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    return run_listing_benchmark(args.jobs, args.rounds, args.out)


if __name__ == "__main__":
    main()
