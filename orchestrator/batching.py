"""Step-level batching: the UNet calls of concurrent generations merged into one Triton call per step.

Every generation in its denoising loop is a *participant*. At each step it submits its UNet call
(latents, timesteps, text embeddings, per row) and waits. When every participant has submitted,
or `window_s` after the first call of the tick arrived (counted from the end of the previous
tick when that is later: the generations it just answered are about to submit again, and
without this the participants split into groups that alternate, each tick half as big), the
batcher groups the calls whose
tensors have the same per-row shapes (same model, image size and prompt-chunk count), stacks
them row-wise into batches of at most `max_rows` rows, runs each batch once, and hands each
caller back its own rows. Generations join and leave at step boundaries; what each does between
steps (its sampler, CFG scale, seed, step count) is its own business, because the UNet sees only
rows. Rows of one call are never split across batches unless the call alone exceeds `max_rows`.

With `buckets` (the row counts the UNet replays from CUDA graphs, from the build's contract), a
batch whose per-row shapes are the captured ones (`bucket_shapes`) is padded to the next bucket
with copies of its last row and the padding is dropped from the result: one graph replay for 6
rows costs less than an uncaptured 6-row call. Other sizes run as they are.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from kiln.runtime import pad_rows as repeat_last_row
from orchestrator.pipeline.components import Graph


@dataclass
class _Call:
    graph: Graph
    inputs: dict[str, np.ndarray]
    future: Future = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return len(self.inputs["sample"])

    @property
    def key(self) -> tuple:
        return (self.graph.key,) + tuple((name, value.shape[1:]) for name, value in sorted(self.inputs.items()))


@dataclass
class BatchStats:
    """What the batcher did, for /metrics and the benchmark."""

    calls: int = 0  # UNet calls submitted by generations
    batches: int = 0  # Triton calls made
    rows: int = 0  # rows sent to Triton
    last_batch_rows: int = 0
    busy_s: float = 0.0  # time spent inside Triton calls
    padded_rows: int = 0  # rows added to fill CUDA-graph buckets (not counted in `rows`)

    @property
    def mean_batch_rows(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class StepBatcher:
    """Merges the UNet calls of all participants per step; thread-safe.

    A merged call runs the graph the callers named (which may split it further to fit the model's
    own max batch). With `enabled=False` every call runs at once on its caller's thread, which is
    the baseline the benchmark compares against.
    """

    def __init__(self, *, max_rows: int = 16, window_s: float = 0.05, enabled: bool = True,
                 on_batch: Callable[[int, float], None] | None = None, buckets: tuple[int, ...] = (),
                 bucket_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.buckets = buckets
        self.bucket_shapes = bucket_shapes or {}
        self.window_s = window_s
        self.enabled = enabled
        self._on_batch = on_batch
        self.stats = BatchStats()
        self._lock = threading.Condition()
        self._participants = 0
        self._pending: list[_Call] = []
        self._arrivals = 0  # participants whose calls are pending (one arrival may bring several calls)
        self._first_arrival = 0.0
        self._tick_end = 0.0  # when the previous tick's results were handed back
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- participants ------------------------------------------------------------------------------
    @contextmanager
    def participant(self) -> Iterator[StepBatcher]:
        """Hold this while in the denoising loop: the batcher waits for every holder each step."""
        with self._lock:
            self._participants += 1
            self._lock.notify_all()
        try:
            yield self
        finally:
            with self._lock:
                self._participants -= 1
                self._lock.notify_all()  # one fewer to wait for: the tick may be complete now

    @property
    def participants(self) -> int:
        return self._participants

    def __call__(self, graph: Graph, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Submit one UNet call and wait for its rows of the merged result."""
        return self.run_all([(graph, inputs)])[0]

    def run_all(self, calls: list[tuple[Graph, dict[str, np.ndarray]]]) -> list[np.ndarray]:
        """Submit the UNet calls of one participant's step together (one arrival: rows whose conditioning differs in
        shape, conditioning.Split) and wait for each one's rows of the merged results."""
        if not self.enabled:
            return [self._execute(graph, inputs) for graph, inputs in calls]
        submitted = [_Call(graph, {name: np.ascontiguousarray(value, dtype=np.float32)
                                   for name, value in inputs.items()}) for graph, inputs in calls]
        with self._lock:
            if self._closed:
                raise RuntimeError("the step batcher is closed")
            if not self._pending:
                self._first_arrival = time.monotonic()
            self._pending.extend(submitted)
            self._arrivals += 1
            self.stats.calls += len(submitted)
            self._ensure_thread()
            self._lock.notify_all()
        return [call.future.result() for call in submitted]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- the tick loop -----------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="kiln-step-batcher", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._tick_ready():
                    timeout = None
                    if self._pending:
                        timeout = max(0.0, self._deadline() - time.monotonic())
                    self._lock.wait(timeout)
                if self._closed and not self._pending:
                    return
                calls, self._pending, self._arrivals = self._pending, [], 0
            self._run_tick(calls)
            with self._lock:
                self._tick_end = time.monotonic()

    def _deadline(self) -> float:
        return max(self._first_arrival, self._tick_end) + self.window_s

    def _tick_ready(self) -> bool:
        if not self._pending:
            return False
        everyone = self._arrivals >= self._participants  # every generation in its loop is waiting
        return everyone or time.monotonic() >= self._deadline()

    def _run_tick(self, calls: list[_Call]) -> None:
        groups: dict[tuple, list[_Call]] = defaultdict(list)
        for call in calls:
            groups[call.key].append(call)
        for group in groups.values():
            for batch in _pack(group, self.max_rows):
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Call]) -> None:
        try:
            merged = {name: np.concatenate([c.inputs[name] for c in batch]) for name in batch[0].inputs}
            rows = len(merged["sample"])
            captured = all(merged[k].shape[1:] == v for k, v in self.bucket_shapes.items() if k in merged)
            padded = pad_rows(merged, self.buckets, self.max_rows) if captured else merged
            if len(padded["sample"]) > rows:
                with self._lock:
                    self.stats.padded_rows += len(padded["sample"]) - rows
            out = self._execute(batch[0].graph, padded, rows)[:rows]
        except BaseException as exc:  # noqa: BLE001 - every caller of this batch gets the failure
            if len(batch) > 1 and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                for call in batch:  # one bad call must not fail the others: retry each alone
                    self._run_batch([call])
                return
            for call in batch:
                call.future.set_exception(exc)
            return
        start = 0
        for call in batch:
            call.future.set_result(out[start:start + call.rows])
            start += call.rows

    def _execute(self, graph: Graph, inputs: dict[str, np.ndarray], rows: int | None = None) -> np.ndarray:
        """Run one call; `rows`: the callers' rows in it (without bucket padding), what the stats count."""
        started = time.perf_counter()
        out = graph(inputs)
        elapsed = time.perf_counter() - started
        rows = rows or len(inputs["sample"])
        with self._lock:
            self.stats.batches += 1
            self.stats.rows += rows
            self.stats.last_batch_rows = rows
            self.stats.busy_s += elapsed
            if not self.enabled:
                self.stats.calls += 1
        if self._on_batch is not None:
            self._on_batch(rows, elapsed)
        return out


def pad_rows(inputs: dict[str, np.ndarray], buckets: tuple[int, ...], max_rows: int) -> dict[str, np.ndarray]:
    """`inputs` padded to the smallest bucket that holds their rows, with copies of the last row (real values: no
    NaN or zeros a model might treat differently); unchanged without a bucket that fits."""
    rows = len(inputs["sample"])
    target = min((b for b in buckets if rows <= b <= max_rows), default=rows)
    if target == rows:
        return inputs
    return {name: repeat_last_row(value, target) for name, value in inputs.items()}


def _pack(calls: list[_Call], max_rows: int) -> list[list[_Call]]:
    """Whole calls, in arrival order, into batches of at most max_rows rows (a bigger call goes alone)."""
    batches: list[list[_Call]] = []
    current: list[_Call] = []
    rows = 0
    for call in calls:
        if current and rows + call.rows > max_rows:
            batches.append(current)
            current, rows = [], 0
        current.append(call)
        rows += call.rows
    if current:
        batches.append(current)
    return batches
