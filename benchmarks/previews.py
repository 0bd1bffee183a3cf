"""What a task's live preview costs the engine's worker: the WebSocket listener (routes.tasks.task_events) runs on the
worker that ran the step, between two steps. Before, it made the preview there (the latents' "Approx cheap" RGB and
its PNG, once per watching socket); now it hands the event to the socket's coroutine, which makes the preview in a
thread of its own. Both listeners timed against a real asyncio loop running in another thread, in the same run, for
SD 1.x latents at 512, 768 and 1024 pixels a side (64, 96 and 128 latents a side); per call, one watching socket.

    python -m benchmarks.previews [--sides 512 768 1024] [--repeats 5] [--out benchmarks/results]

Prints a table and writes previews.json in --out; each ratio is against the preview made on the worker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("preview made on the worker (before)", "event handed over (now)")
CALLS = 50  # listener calls timed per arm and repeat (one call is microseconds)


def _arms(side: int, loop: asyncio.AbstractEventLoop) -> dict[str, float]:
    from orchestrator.server.preview import preview_png

    latents = np.random.default_rng(side).standard_normal((1, 4, side // 8, side // 8)).astype(np.float32)
    events: asyncio.Queue = asyncio.Queue()

    def before(event: dict) -> None:  # the listener as it was: the preview, then the hand-over
        event = event | {"preview": preview_png(latents)}
        loop.call_soon_threadsafe(events.put_nowait, event)

    def now(event: dict) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    seconds = {}
    for arm, listener in zip(ARMS, (before, now)):
        start = time.perf_counter()
        for step in range(CALLS):
            listener({"event": "progress", "step": step, "steps": CALLS})
        seconds[arm] = (time.perf_counter() - start) / CALLS
    asyncio.run_coroutine_threadsafe(_drain(events), loop).result(10)
    return seconds


async def _drain(events: asyncio.Queue) -> None:
    while not events.empty():
        events.get_nowait()


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.load import by_size

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="benchmark-loop", daemon=True)
    thread.start()
    try:
        return by_size(argv, __doc__, ARMS, lambda side: _arms(side, loop), lambda _index: 0, "previews", RESULTS)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


if __name__ == "__main__":
    main()
