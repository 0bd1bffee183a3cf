"""Choosing a variant by measurement (`kiln build vit --backend auto`): of the variants built and checked on this
machine, serve the fastest whose parity is inside its tolerance; the report keeps every candidate's figures and
the reason. Speed depends on the CPU (OpenVINO int8 beats ONNX Runtime int8 with VNNI, not without), so it is
measured where the repository is built, never assumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from kiln.errors import ConfigError


def throughput(run: Callable[[], object], items: int, repeats: int = 3) -> dict:
    """`run` (one call over `items` inputs) once to warm up, then `repeats` timed: items per second (median)."""
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    median = seconds[len(seconds) // 2]
    return {"items": items, "repeats": repeats, "median_s": round(median, 5), "per_s": round(items / median, 3)}


def choose(measured: Mapping[str, dict], rejected: Mapping[str, str], unit: str) -> tuple[str, str]:
    """The fastest measured candidate, and why (what it beat, what was refused)."""
    if not measured:
        raise ConfigError("no variant is inside its tolerance on this machine: "
                          + "; ".join(f"{k}: {why}" for k, why in rejected.items()))
    ranked = sorted(measured, key=lambda k: measured[k]["per_s"], reverse=True)
    best = ranked[0]
    reason = f"fastest of {len(ranked)} within tolerance: {measured[best]['per_s']:.2f} {unit}"
    if len(ranked) > 1:
        runner_up = ranked[1]
        reason += (f", {measured[best]['per_s'] / measured[runner_up]['per_s']:.2f}x the next, {runner_up} "
                   f"({measured[runner_up]['per_s']:.2f})")
    if rejected:
        reason += f"; outside tolerance: {', '.join(rejected)}"
    return best, reason
