"""The machine a figure was measured on: its CPU and the vector extensions that decide speed and precision.

CPUs differ between the machines this project runs on (AVX2 only, or AVX-512 with VNNI/BF16, or AMX):
every benchmark and build report records them beside its figures.
"""

from __future__ import annotations

import os
import platform
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


def cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads() -> int:
    """The threads a runtime gets where it was told 0 ("all cores"): OMP_NUM_THREADS where set (the usual way to
    share one machine between processes: torch and OpenMP read it too), else every core this process may run on.
    Processes that each take every core slow each other down far more than their share would (ONNX Runtime's and
    OpenMP's threads spin while they wait: on 2 cores, two processes of 2 threads each trained a model in 39 s where 1
    thread each took 21 s)."""
    try:
        share = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        share = 0
    return share if share > 0 else cores()


def machine() -> dict:
    """What every result records about the machine: CPU, cores, ISA, Python."""
    name, flags, _ = cpu_flags()
    return {"cpu": name, "cores": os.cpu_count(), "isa": isa(flags), "python": platform.python_version()}
