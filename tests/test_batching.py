"""The step batcher on its own: merging, packing, per-caller rows, failures, participants joining and leaving.

The graphs here are real computations on numpy rows (a row-wise affine map), standing in for the
UNet: the batcher only stacks rows, calls the graph and hands rows back, so any row-wise function
shows whether each caller got its own rows.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

from orchestrator.batching import StepBatcher


class RowGraph:
    """noise_pred = 2 * sample + timestep, row by row; records the rows of every call it executes."""

    def __init__(self, key: str = "sd_unet", fail_on: float | None = None) -> None:
        self.key, self.fail_on = key, fail_on
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.fail_on is not None and np.any(inputs["timestep"] == self.fail_on):
            raise ValueError(f"bad timestep {self.fail_on}")
        with self._lock:
            self.calls.append(len(inputs["sample"]))
        return 2 * inputs["sample"] + inputs["timestep"].reshape(-1, 1, 1, 1)


def _inputs(rows: int, t: float, side: int = 4, chunks: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(t * 1000) + rows)
    return {"sample": rng.standard_normal((rows, 4, side, side), dtype=np.float32),
            "timestep": np.full(rows, t, np.float32),
            "encoder_hidden_states": np.zeros((rows, 77 * chunks, 8), np.float32)}


def _expected(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return 2 * inputs["sample"] + inputs["timestep"].reshape(-1, 1, 1, 1)


def _step_together(batcher: StepBatcher, graph, calls: list[dict]) -> list[np.ndarray]:
    """Each call from its own participant thread, all in their loop at once (one tick)."""
    barrier = threading.Barrier(len(calls))

    def one(inputs):
        with batcher.participant():
            barrier.wait()
            return batcher(graph, inputs)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


def test_calls_of_one_tick_are_merged_and_each_caller_gets_its_rows():
    batcher, graph = StepBatcher(max_rows=16, window_s=5.0), RowGraph()
    calls = [_inputs(2, 10.0), _inputs(1, 20.0), _inputs(4, 30.0)]
    results = _step_together(batcher, graph, calls)
    assert graph.calls == [7]  # one execution: every participant had submitted, no window wait
    for inputs, result in zip(calls, results):
        np.testing.assert_array_equal(result, _expected(inputs))
    assert batcher.stats.calls == 3 and batcher.stats.batches == 1 and batcher.stats.rows == 7
    batcher.close()


def test_different_shapes_or_graphs_run_in_separate_batches():
    batcher, unet, other = StepBatcher(max_rows=16, window_s=5.0), RowGraph("sd_unet"), RowGraph("sd_controlnet_unet")
    calls = [(unet, _inputs(2, 1.0)), (unet, _inputs(2, 2.0, side=8)), (unet, _inputs(2, 3.0, chunks=2)),
             (other, _inputs(2, 4.0)), (unet, _inputs(2, 5.0))]
    barrier = threading.Barrier(len(calls))

    def one(call):
        graph, inputs = call
        with batcher.participant():
            barrier.wait()
            return batcher(graph, inputs)

    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(one, calls))
    for (_, inputs), result in zip(calls, results):
        np.testing.assert_array_equal(result, _expected(inputs))
    assert sorted(unet.calls) == [2, 2, 4] and other.calls == [2]  # only same-shape calls of one graph merge
    batcher.close()


def test_a_participants_calls_of_one_step_arrive_together():
    """A step whose rows run in two calls (the negative prompt and a longer prompt, AUTOMATIC1111's default) is one
    arrival: the tick still waits for the other participant, whose call merges with the one of its shape."""
    batcher, graph = StepBatcher(max_rows=16, window_s=5.0), RowGraph()
    short, long, other = _inputs(2, 1.0), _inputs(2, 1.0, chunks=2), _inputs(2, 2.0)
    started, both_in = time.monotonic(), threading.Barrier(2)

    def split():
        with batcher.participant():
            both_in.wait()
            return batcher.run_all([(graph, short), (graph, long)])

    def single():
        with batcher.participant():
            both_in.wait()
            while len(batcher._pending) < 2 and batcher.stats.batches == 0:  # the split step first: two calls
                time.sleep(0.01)
            return batcher(graph, other)

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(split), pool.submit(single)
        (short_out, long_out), other_out = first.result(), second.result()
    for inputs, result in ((short, short_out), (long, long_out), (other, other_out)):
        np.testing.assert_array_equal(result, _expected(inputs))
    assert sorted(graph.calls) == [2, 4]  # the other call merged with the split step's call of its shape
    assert time.monotonic() - started < 5.0  # one tick, when both had arrived: not the window's end
    assert batcher.stats.calls == 3
    batcher.close()


def test_batches_hold_whole_calls_up_to_max_rows():
    batcher, graph = StepBatcher(max_rows=4, window_s=5.0), RowGraph()
    calls = [_inputs(2, 1.0), _inputs(2, 2.0), _inputs(3, 3.0), _inputs(6, 4.0)]
    results = _step_together(batcher, graph, calls)
    for inputs, result in zip(calls, results):
        np.testing.assert_array_equal(result, _expected(inputs))
    # Whole calls in arrival order, at most 4 rows a batch; the 6-row call goes alone, never split.
    assert sum(graph.calls) == 13 and 6 in graph.calls and all(rows <= 4 for rows in graph.calls if rows != 6)
    assert len(graph.calls) < 4 or sorted(graph.calls) == [2, 2, 3, 6]  # 2+2 merge unless the 3 came between
    batcher.close()


def test_a_failing_call_fails_alone():
    """A merged batch that raises is retried call by call: only the culprit gets the error."""
    batcher, graph = StepBatcher(max_rows=16, window_s=5.0), RowGraph(fail_on=666.0)
    calls = [_inputs(2, 1.0), _inputs(1, 666.0), _inputs(2, 3.0)]
    barrier = threading.Barrier(len(calls))

    def one(inputs):
        with batcher.participant():
            barrier.wait()
            try:
                return batcher(graph, inputs)
            except ValueError as exc:
                return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        good, bad, other = pool.map(one, calls)
    assert isinstance(bad, ValueError) and "666" in str(bad)
    np.testing.assert_array_equal(good, _expected(calls[0]))
    np.testing.assert_array_equal(other, _expected(calls[2]))
    batcher.close()


@contextmanager
def _idle_participant(batcher: StepBatcher):
    """Another generation in its denoising loop that makes no call until released (then leaves its loop)."""
    release = threading.Event()

    def hold():
        with batcher.participant():
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    time.sleep(0.05)
    try:
        yield release
    finally:
        release.set()
        thread.join()


def test_a_straggler_is_waited_for_only_as_long_as_the_window():
    """Two participants, one of which never calls: the other's call runs when the window ends."""
    batcher, graph = StepBatcher(max_rows=16, window_s=0.2), RowGraph()
    with _idle_participant(batcher), batcher.participant():
        start = time.monotonic()
        result = batcher(graph, _inputs(1, 7.0))
        waited = time.monotonic() - start
    assert 0.15 <= waited < 3.0  # the window, not the idle participant's five seconds
    np.testing.assert_array_equal(result, _expected(_inputs(1, 7.0)))
    batcher.close()


def test_a_participant_leaving_completes_the_tick():
    """The tick waits for every participant; one that leaves its loop no longer counts."""
    batcher, graph = StepBatcher(max_rows=16, window_s=30.0), RowGraph()
    with _idle_participant(batcher) as release, batcher.participant(), ThreadPoolExecutor(1) as pool:
        future = pool.submit(batcher, graph, _inputs(1, 3.0))
        time.sleep(0.1)
        assert not future.done()  # waiting for the other participant (window: 30 s)
        release.set()
        np.testing.assert_array_equal(future.result(timeout=5), _expected(_inputs(1, 3.0)))
    batcher.close()


def test_disabled_runs_each_call_at_once_and_counts_it():
    seen = []
    batcher, graph = StepBatcher(max_rows=16, enabled=False, on_batch=lambda rows, _s: seen.append(rows)), RowGraph()
    results = _step_together(batcher, graph, [_inputs(2, 1.0), _inputs(2, 2.0)])
    assert sorted(graph.calls) == [2, 2] and len(results) == 2
    assert batcher.stats.calls == batcher.stats.batches == 2 and sorted(seen) == [2, 2]


def test_closed_batcher_refuses_calls():
    batcher = StepBatcher(max_rows=4)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher(RowGraph(), _inputs(1, 1.0))
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        StepBatcher(max_rows=0)


def test_batches_are_padded_to_the_next_cuda_graph_bucket_and_callers_get_only_their_rows():
    """With the UNet's CUDA-graph row counts and shapes (the build's contract), 2 + 2 + 2 rows run as one 8-row call
    (two padding rows, copies of the last), 2 rows as a 2-row call, 10 rows (above every bucket below max_rows) and
    rows of another image size unpadded."""
    graph = RowGraph()
    batcher = StepBatcher(max_rows=16, window_s=5.0, buckets=(2, 4, 8), bucket_shapes={"sample": (4, 4, 4)})
    calls = [_inputs(2, t) for t in (1.0, 2.0, 3.0)]
    for inputs, out in zip(calls, _step_together(batcher, graph, calls)):
        np.testing.assert_array_equal(out, _expected(inputs))
    assert graph.calls == [8] and batcher.stats.padded_rows == 2 and batcher.stats.rows == 6
    alone = _inputs(2, 4.0)
    np.testing.assert_array_equal(_step_together(batcher, graph, [alone])[0], _expected(alone))
    big = [_inputs(5, 5.0), _inputs(5, 6.0)]
    for inputs, out in zip(big, _step_together(batcher, graph, big)):
        np.testing.assert_array_equal(out, _expected(inputs))
    assert graph.calls == [8, 2, 10] and batcher.stats.padded_rows == 2
    other_size = [_inputs(3, 7.0, side=6)]  # not the captured shape: no graph to fill, no padding
    np.testing.assert_array_equal(_step_together(batcher, graph, other_size)[0], _expected(other_size[0]))
    assert graph.calls[-1] == 3 and batcher.stats.padded_rows == 2
    batcher.close()
