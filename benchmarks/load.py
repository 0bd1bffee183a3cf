"""What the benchmarks share: the machine line of their tables, the concurrent load generator, alternating timed
rounds, the writing of results, a table of arms against their baselines by size, a bar chart of seconds per arm."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from kiln.machine import machine

__all__ = ["alternate", "bar_chart", "by_size", "machine", "machine_line", "ratio_row", "run_concurrently",
           "time_each", "write_ratio_table", "write_results"]


def machine_line(info: dict) -> str:
    """The machine in one line, printed with every table: CPU, cores and its ISA."""
    return f"Machine: {info['cpu']}, {info['cores']} cores, ISA: {', '.join(info.get('isa', [])) or 'unknown'}."


def run_concurrently(worker: Callable[[int], None], count: int) -> float:
    """Run worker(0) .. worker(count - 1) on their own threads; return the wall seconds until all finish."""
    threads = [threading.Thread(target=worker, args=(index,)) for index in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def alternate(arms: dict[str, Callable[[], object]], rounds: int, desc: str) -> tuple[dict[str, float], dict]:
    """Each arm once to warm up, then `rounds` rounds of every arm in turn (so drift hits all alike): each arm's median
    seconds, and what each arm's last call returned."""
    import numpy as np
    from tqdm import tqdm

    times: dict[str, list[float]] = {name: [] for name in arms}
    last = {name: call() for name, call in arms.items()}
    for _ in tqdm(range(rounds), desc=desc, unit="round"):
        for name, call in arms.items():
            start = time.perf_counter()
            last[name] = call()
            times[name].append(time.perf_counter() - start)
    return {name: round(float(np.median(t)), 3) for name, t in times.items()}, last


def write_results(stem: Path, result: dict, table: Callable[[dict], str], plot: Callable[[dict, Path], None],
                  log: Callable[[str], None] = print) -> dict:
    """stem.json (the result), stem.md (its table), stem.png (its plot); logs the table and the paths."""
    import json

    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    text = table(result)
    stem.with_suffix(".md").write_text(text + "\n")
    plot(result, stem.with_suffix(".png"))
    log(text)
    log(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return result


def time_each(arms: tuple[str, ...], calls) -> dict[str, float]:
    """Each arm's call timed once, in order: {arm: seconds} (a by-size benchmark's measure)."""
    import time

    seconds = {}
    for arm, call in zip(arms, calls, strict=True):
        start = time.perf_counter()
        call()
        seconds[arm] = time.perf_counter() - start
    return seconds


def ratio_row(side: int, arm: str, times: list[float], baseline: list[float]) -> dict:
    """One row of a by-size table: the arm's median time and its ratio to its baseline's, measured in the same run."""
    import numpy as np

    median = float(np.median(times))
    return {"side": side, "arm": arm, "ms": round(median * 1000, 3),
            "over_baseline": round(median / float(np.median(baseline)), 4)}


def write_ratio_table(rows: list[dict], path: Path, repeats: int) -> dict:
    """Rows of ratio_row (one torch thread) with the machine: printed as a table and written to `path` (JSON)."""
    import json

    result = {"machine": machine(), "repeats": repeats, "torch_threads": 1, "rows": rows}
    print(machine_line(result["machine"]))
    print("| side | arm | ms | over the baseline (first arm of its kind) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['side']} | {row['arm']} | {row['ms']:.3f} | {row['over_baseline']:.4f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def by_size(argv: list[str] | None, doc: str, arms: tuple[str, ...], measure: Callable[[int], dict[str, float]],
            baseline: Callable[[int], int], name: str, default_out: Path, repeats: int = 5) -> dict:
    """A by-size benchmark's command line (--sides, --repeats, --out) and run, one torch thread: `measure(side)` times
    every arm once, the repeats interleaved (drift hits every arm alike); each arm's median against its
    `baseline(index)` arm's; the table printed and written to `<out>/<name>.json`."""
    import argparse

    import torch
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tqdm(total=len(args.sides) * args.repeats, desc=name, unit="run") as bar:
        for side in args.sides:
            times: dict[str, list[float]] = {arm: [] for arm in arms}
            for _ in range(args.repeats):
                for arm, seconds in measure(side).items():
                    times[arm].append(seconds)
                bar.update()
            rows += [ratio_row(side, arm, times[arm], times[arms[baseline(index)]]) for index, arm in enumerate(arms)]
    return write_ratio_table(rows, args.out / f"{name}.json", args.repeats)


def bar_chart(seconds: dict[str, float], path: Path, xlabel: str, title: str, colors: list[str],
              size: tuple[float, float] = (6, 3)) -> None:
    """One horizontal bar per arm (its median seconds), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=size)
    axis.barh(list(seconds), list(seconds.values()), color=colors)
    axis.set_xlabel(xlabel)
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def grouped_bar_chart(series: dict[str, list[float]], groups: list[str], path: Path, ylabel: str, title: str,
                      rotation: float = 0, legend_size: float | None = None) -> None:
    """Vertical bars, one group per entry of `groups`, one bar per series (its label) in each, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.76 / len(series)
    for index, (label, values) in enumerate(series.items()):
        axis.bar(np.arange(len(groups)) + (index - (len(series) - 1) / 2) * width, values, width, label=label)
    axis.set_xticks(np.arange(len(groups)), groups, rotation=rotation)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=legend_size)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
