"""What the benchmarks share: the machine they ran on, the concurrent load generator, the writing of results."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path


def cpu_flags() -> tuple[str, set[str], float]:
    """This CPU's model name, its flags and its clock in MHz, from /proc/cpuinfo (empty where there is none)."""
    name, flags, mhz = platform.processor() or platform.machine(), set(), 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name in ("", platform.machine()):
                name = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu MHz" and not mhz:
                mhz = float(value)
    except OSError:
        pass
    return name, flags, mhz


def isa(flags: set[str]) -> list[str]:
    """The vector extensions that decide these figures (AVX2 only, or AVX-512 with VNNI/BF16, or AMX)."""
    return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")) or "vnni" in f or "bf16" in f)


def machine() -> dict:
    """What every result records about the machine: CPU, cores, ISA, Python."""
    name, flags, _ = cpu_flags()
    return {"cpu": name, "cores": os.cpu_count(), "isa": isa(flags), "python": platform.python_version()}


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
