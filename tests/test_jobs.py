"""The job queue on its own: bounds, order, positions, cancellation, failures, drain; and the engine over the
in-process pipeline (no Triton): validation before queueing, n_iter seeds, step batching bit-identical to solo runs.

The queue's unit tests run jobs whose work is a plain function (what the queue does is independent of
what a job computes); the engine tests run the real loop on the real repository in process.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kiln.errors import InputError, KilnError, ServerError
from orchestrator.engine import Engine, EngineOptions
from orchestrator.jobs import FINISHED, Job, JobQueue, QueueFull, Status
from orchestrator.metrics import Metrics, read_metric
from orchestrator.pipeline import Cancelled, Limits, Pipeline, Txt2ImgRequest

REQUEST = Txt2ImgRequest(prompt="a cat", steps=4, seed=3, width=64, height=64)


class Work:
    """A job's work as a plain function: waits for its gate, records what ran, raises what it is told to."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.raises: dict[str, BaseException] = {}
        self.started = threading.Event()

    def __call__(self, job: Job) -> None:
        self.started.set()
        gate = self.gates.get(job.kind)
        while gate is not None and not gate.wait(0.01):
            if job.cancel_event.is_set():
                raise Cancelled("cancelled while running")
        self.ran.append(job.kind)
        if job.kind in self.raises:
            raise self.raises[job.kind]


def _wait(job: Job, timeout: float = 10.0) -> Job:
    return job.future.result(timeout=timeout)


def test_a_bounded_queue_refuses_and_loses_nothing():
    work, metrics = Work(), Metrics()
    work.gates["first"] = threading.Event()
    queue = JobQueue(work, max_queue=2, workers=1, metrics=metrics)
    first = queue.submit(Job(kind="first", request=REQUEST))
    assert work.started.wait(5)  # running: it no longer counts against the queue
    waiting = [queue.submit(Job(kind=f"w{i}", request=REQUEST)) for i in range(2)]
    assert [queue.position(job) for job in waiting] == [1, 2] and queue.position(first) == 0
    assert read_metric(metrics.render().decode(), "kiln_queue_depth") == 2
    with pytest.raises(QueueFull, match="2 jobs waiting"):
        queue.submit(Job(kind="refused", request=REQUEST))
    work.gates["first"].set()
    assert [_wait(job).status for job in (first, *waiting)] == [Status.DONE] * 3
    assert work.ran == ["first", "w0", "w1"]  # first in, first out
    queue.close()


def test_cancelling_a_waiting_job_removes_it_and_a_running_one_stops_it():
    work = Work()
    work.gates["long"] = threading.Event()
    queue = JobQueue(work, max_queue=4, workers=1, metrics=Metrics())
    long = queue.submit(Job(kind="long", request=REQUEST))
    assert work.started.wait(5)
    waiting = queue.submit(Job(kind="waiting", request=REQUEST))
    events = []
    waiting.subscribe(events.append)
    queue.cancel(waiting)
    assert _wait(waiting).status == Status.CANCELLED and events[-1]["event"] == "cancelled"
    queue.cancel(long)
    assert _wait(long).status == Status.CANCELLED and "waiting" not in work.ran
    queue.close()


def test_every_job_ends_exactly_once_whatever_its_work_raises():
    work = Work()
    work.raises = {"bad": InputError("width must be a multiple of 8"), "bug": ZeroDivisionError("oops"),
                   "stopped": Cancelled("cancelled after 2 of 5 steps")}
    queue = JobQueue(work, max_queue=8, workers=2, metrics=Metrics())
    jobs = {kind: queue.submit(Job(kind=kind, request=REQUEST)) for kind in ("ok", "bad", "bug", "stopped")}
    outcomes = {kind: _wait(job) for kind, job in jobs.items()}
    assert outcomes["ok"].status == Status.DONE and outcomes["ok"].progress == 1.0
    assert outcomes["bad"].status == Status.FAILED and "multiple of 8" in str(outcomes["bad"].error)
    # A bug fails its job with a message that names no internals, and the worker goes on.
    assert outcomes["bug"].status == Status.FAILED
    assert str(outcomes["bug"].error) == "internal error (ZeroDivisionError)"
    assert outcomes["stopped"].status == Status.CANCELLED
    assert all(job.status in FINISHED and job.finished for job in jobs.values())
    assert _wait(queue.submit(Job(kind="after", request=REQUEST))).status == Status.DONE
    queue.close()


def test_close_drains_then_refuses():
    work = Work()
    queue = JobQueue(work, max_queue=8, workers=1, metrics=Metrics())
    jobs = [queue.submit(Job(kind=f"j{i}", request=REQUEST)) for i in range(3)]
    queue.close(timeout_s=30)
    assert all(job.status == Status.DONE for job in jobs)
    with pytest.raises(ServerError, match="shutting down"):
        queue.submit(Job(kind="late", request=REQUEST))


def test_a_broken_listener_does_not_stop_the_job():
    queue = JobQueue(Work(), max_queue=2, workers=1, metrics=Metrics())
    job = Job(kind="j", request=REQUEST)
    job.subscribe(lambda event: 1 / 0)
    seen = []
    unsubscribe = job.subscribe(seen.append)
    assert _wait(queue.submit(job)).status == Status.DONE
    assert [e["event"] for e in seen] == ["queued", "started", "done"] and seen[0]["task_id"] == job.id
    unsubscribe()
    queue.close()


# -- the engine over the real loop, in process --------------------------------------------------------------
@pytest.fixture
def engine(model_repo):
    built = Engine(EngineOptions(max_queue=8, workers=4, limits=Limits(max_steps=50)), Metrics(),
                   connect=lambda: Pipeline.from_repository(model_repo, limits=Limits(max_steps=50)))
    yield built
    built.close()


@pytest.mark.slow
def test_engine_validates_before_queueing(engine):
    with pytest.raises(InputError, match="steps must be between 1 and 50"):
        engine.submit("txt2img", Txt2ImgRequest(prompt="a cat", steps=80, width=64, height=64))
    with pytest.raises(InputError, match="n_iter must be between 1 and 16"):
        engine.submit("txt2img", REQUEST, n_iter=17)
    with pytest.raises(InputError, match="batch_size x n_iter = 24 images exceeds the limit of 16"):
        engine.submit("txt2img", Txt2ImgRequest(prompt="a cat", batch_size=3, width=64, height=64), n_iter=8)
    assert engine.queue.waiting() == 0 and not engine.queue.running()


@pytest.mark.slow
def test_engine_chains_n_iter_seeds_from_one_drawn_seed(engine, local):
    job = _wait(engine.submit("txt2img", Txt2ImgRequest(prompt="a cat", steps=2, seed=-1, batch_size=2, width=64,
                                                        height=64), n_iter=2), 60)
    seeds = [info["seed"] for info in job.infos]
    assert job.status == Status.DONE and len(job.images) == 4
    assert seeds == [(seeds[0] + i) % 2**32 for i in range(4)]  # drawn once: the runs chain from it
    again = local.txt2img(Txt2ImgRequest(prompt="a cat", steps=2, seed=seeds[2], width=64, height=64))
    assert np.array_equal(job.images[2], again.images[0])


@pytest.mark.slow
def test_engine_merges_steps_of_concurrent_jobs_bit_identical_to_solo(engine, local):
    requests = [Txt2ImgRequest(prompt="a cat", steps=6, sampler="Euler a", seed=1, width=64, height=64),
                Txt2ImgRequest(prompt="a dog", steps=4, sampler="DDIM", cfg_scale=3.0, seed=2, width=64, height=64),
                Txt2ImgRequest(prompt="a bird", steps=5, sampler="DPM++ 2M Karras", seed=3, width=64, height=64)]
    jobs = [engine.submit("txt2img", request) for request in requests]
    for job, request in zip(jobs, requests):
        assert _wait(job, 60).status == Status.DONE, job.error
        assert np.array_equal(job.images[0], local.txt2img(request).images[0])
    stats = engine.batcher.stats
    assert stats.batches < stats.calls  # some steps ran together


@pytest.mark.slow
def test_engine_interrupt_keeps_what_is_done(engine):
    job = engine.submit("txt2img", Txt2ImgRequest(prompt="a cat", steps=50, seed=4, width=64, height=64), n_iter=3)
    deadline = time.monotonic() + 30
    while job.step < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    job.interrupted = True
    assert _wait(job, 60).status == Status.DONE
    assert len(job.images) == 1 and job.infos[0]["stopped_at_step"] < 50


def test_engine_without_triton_reports_unavailable():
    from kiln.triton_server import free_port

    engine = Engine(EngineOptions(triton_url=f"127.0.0.1:{free_port()}", workers=1), Metrics())
    try:
        with pytest.raises(KilnError, match="is `kiln serve` running"):
            engine.submit("txt2img", REQUEST)
    finally:
        engine.close()


def test_a_drain_is_bounded_and_cancels_what_is_left():
    """kiln serve --drain-timeout: past it, a job that would run on is stopped before its next step and a waiting one
    never starts; both end, cancelled, and close returns."""
    work = Work()
    work.gates["endless"] = threading.Event()  # never set
    queue = JobQueue(work, max_queue=4, workers=1, metrics=Metrics())
    endless = queue.submit(Job(kind="endless", request=REQUEST))
    assert work.started.wait(5)
    waiting = queue.submit(Job(kind="waiting", request=REQUEST))
    start = time.monotonic()
    queue.close(timeout_s=0.5, grace_s=5)
    assert time.monotonic() - start < 3
    assert _wait(endless, 1).status == Status.CANCELLED
    assert _wait(waiting, 1).status == Status.CANCELLED and "shut down before this job ran" in str(waiting.error)
    assert work.ran == []
