"""The shared job store's leases, in process (no Triton: each orchestrator's run is a function): SharedQueues on a real
redis-server, one of which stalls while a job runs on it and later gets the job back after the orchestrator that had
claimed it stops. Fast: the whole story takes a few seconds with a lease of 1.5 s."""

from __future__ import annotations

import json
import time

import numpy as np

from orchestrator.jobs import Job, Status
from orchestrator.metrics import Metrics
from orchestrator.pipeline import Cancelled, Txt2ImgRequest
from orchestrator.shared import SharedQueue

LEASE_S = 1.5


def _wait(condition, timeout_s: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _runner(name: str, runs: list[str], finish_after: int):
    """A run that records who ran the job and blocks until it is cancelled, except from run number finish_after on,
    which paints an image with the orchestrator's letter."""

    def run(job: Job) -> None:
        runs.append(name)
        if len(runs) >= finish_after:
            job.images, job.infos = [np.full((4, 4, 3), ord(name), np.uint8)], [{"by": name}]
            return
        while not job.cancel_event.wait(0.02):
            pass
        raise Cancelled(f"cancelled on {name}")

    return run


def test_a_job_claimed_away_and_back_runs_again_on_its_first_orchestrator(redis_server):
    """A runs the job and stalls past the lease; B claims it and runs it; A, back, finds it claimed and stops its run;
    B stops renewing (as a killed process would); A claims it back after the lease and runs it to the end. Before the
    fix, A's local queue refused the id it had run before and the job stayed 'running' forever."""
    runs: list[str] = []
    store = redis_server.client()
    a = SharedQueue(redis_server.url, _runner("A", runs, finish_after=3), max_queue=8, workers=1,
                    metrics=Metrics(), lease_s=LEASE_S)
    b = None
    try:
        job = a.submit(Job(kind="txt2img", request=Txt2ImgRequest(prompt="a lighthouse", seed=1)))
        _wait(lambda: runs == ["A"], what="A to start the job")
        b = SharedQueue(redis_server.url, _runner("B", runs, finish_after=99), max_queue=8, workers=1,
                        metrics=Metrics(), lease_s=LEASE_S)
        with a._lock:  # A stalls: its lease renewal, pulling and writing all wait for this lock
            _wait(lambda: runs == ["A", "B"], what="B to claim the job after A's lease lapsed")
        _wait(lambda: not a._executing, what="A to stop its run once it sees B owns the job")
        assert json.loads(store.hget("kiln:job:" + job.id, "state"))["status"] == "running"

        # B stops as a SIGKILLed orchestrator would, as far as the store can tell: its threads end, so its lease is
        # no longer renewed, and its run never returns (an in-process stand-in: the fault under test is A's memory
        # of the job, not the kill itself, which tests/test_shared_queue.py does to real processes)
        b._closed = b._stopped = True
        _wait(lambda: runs == ["A", "B", "A"], what="A to claim the job back")
        done = a.get(job.id).future.result(timeout=15)
        assert done.status == Status.DONE, (done.status, done.error)
        assert int(done.images[0][0, 0, 0]) == ord("A") and done.infos == [{"by": "A"}]
        _wait(lambda: not a._executing, what="A to free its worker")
        assert int(store.hget("kiln:job:" + job.id, "completions")) == 1
        assert int(store.hget("kiln:job:" + job.id, "restarts")) == 2
        assert store.xlen("kiln:stream") == 0 and store.zcard("kiln:running") == 0

        # A still takes new jobs: its one worker is free again
        more = a.submit(Job(kind="txt2img", request=Txt2ImgRequest(prompt="a harbour", seed=2)))
        assert a.get(more.id).future.result(timeout=15).status == Status.DONE
    finally:
        if b is not None:
            for _entry, running in list(b._executing.values()):
                running.cancel()
            b.close(timeout_s=5, grace_s=1)
        a.close(timeout_s=5, grace_s=1)
