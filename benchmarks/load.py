"""What the benchmarks share: the machine line of their tables, the concurrent load generator, the writing of
results."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from kiln.machine import machine

__all__ = ["machine", "machine_line", "run_concurrently", "write_results"]


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
