"""Generation jobs: a bounded queue, worker threads, progress, cancellation, step-level batching.

There is no global lock. Each running job has its own worker thread; its text encoding, VAE
calls and scheduler arithmetic run there, concurrently with other jobs, and its UNet calls go
through the shared StepBatcher, which merges the calls of all jobs in their denoising loops into
one Triton call per step. A job is accepted only while the queue has room (QueueFull otherwise),
and every accepted job ends in exactly one of done, failed or cancelled.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from kiln.errors import InputError, KilnError, ServerError
from orchestrator.metrics import Metrics
from orchestrator.pipeline import Cancelled, Txt2ImgRequest

log = logging.getLogger("kiln.jobs")


class QueueFull(KilnError):
    """The queue is at capacity; the caller should retry later."""


class Status(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (Status.DONE, Status.FAILED, Status.CANCELLED)


@dataclass(eq=False)
class Job:
    """One API generation: `n_iter` runs of the pipeline on `request`, seeds chained as AUTOMATIC1111 does."""

    kind: str  # txt2img | img2img
    request: Txt2ImgRequest
    n_iter: int = 1
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    status: Status = Status.QUEUED
    started: float | None = None
    finished: float | None = None
    iteration: int = 0  # current run of n_iter
    step: int = 0  # steps done in the current run
    steps: int = 0  # steps of the current run
    images: list[np.ndarray] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)  # one per image
    # one per image: its images from before a step that the request's intermediates kept (save_images_before_*)
    before: list[dict[str, np.ndarray]] = field(default_factory=list)
    error: KilnError | None = None
    interrupted: bool = False  # AUTOMATIC1111 interrupt: stop now, keep what is done
    skipped: bool = False  # AUTOMATIC1111 skip: end the current run of n_iter, go on with the next
    cancel_event: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)  # resolves to the job itself when it finishes
    latents: np.ndarray | None = None  # after the latest step, for previews
    client_id: str | None = None  # who submitted it (the API scopes interrupt, skip and task reads by it)
    context: dict[str, Any] = field(default_factory=dict)  # the submitter's own (the API: its body and routes)
    checkpoint: str = ""  # the checkpoint it runs on (kiln.contract.SDModels.checkpoint; "": the default)
    refiner: str | None = None  # the checkpoint finishing its denoising (request.refiner's), None: none
    _listeners: list[Callable[[dict], None]] = field(default_factory=list)

    # -- state for callers ---------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        if self.status == Status.DONE:
            return 1.0
        if not self.steps:
            return 0.0
        return min(1.0, (self.iteration + self.step / self.steps) / self.n_iter)

    def eta_seconds(self) -> float | None:
        if self.started is None or self.progress <= 0:
            return None
        elapsed = time.time() - self.started
        return max(0.0, elapsed / self.progress - elapsed)

    def cancel(self) -> None:
        self.cancel_event.set()

    def subscribe(self, listener: Callable[[dict], None]) -> Callable[[], None]:
        """listener(event) is called from the worker thread; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def emit(self, event: dict) -> None:
        for listener in list(self._listeners):
            try:
                listener(event | {"task_id": self.id})
            except Exception:  # noqa: BLE001 - a broken listener (closed socket) must not stop the job
                pass

    def final_event(self) -> dict:
        """A finished job's last event (done, failed or cancelled), made from its state."""
        event = {"event": self.status.value, "progress": self.progress, "task_id": self.id}
        return event | {"error": str(self.error)} if self.error is not None else event

    def finish(self, status: Status, error: KilnError | None = None) -> None:
        self.status, self.error, self.finished = status, error, time.time()
        self.emit(self.final_event())
        if not self.future.done():
            self.future.set_result(self)


class JobQueue:
    """A bounded FIFO served by `workers` threads; `run(job)` does the work and returns normally or raises."""

    def __init__(self, run: Callable[[Job], None], *, max_queue: int, workers: int, metrics: Metrics) -> None:
        self._run = run
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Condition()
        self._closed = False
        self._metrics = metrics
        self._threads = [threading.Thread(target=self._work, name=f"kiln-job-worker-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job, *, again: bool = False) -> Job:
        """again: the id may name a finished job of this queue, which it replaces (the shared store runs a job again
        here after the orchestrator that claimed it from this one stopped)."""
        with self._lock:
            if self._closed:
                raise ServerError("the service is shutting down; not accepting new jobs")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting)")
            known = self._jobs.get(job.id)
            if known is not None and not (again and known.status in FINISHED):
                raise InputError(f"force_task_id {job.id!r} names a task this server already has")
            self._waiting.append(job)
            self._jobs.pop(job.id, None)  # the newest last, as _forget_old reads them
            self._jobs[job.id] = job
            self._forget_old()
            self._metrics.queue_depth.set(len(self._waiting))
            self._lock.notify()
        job.emit({"event": "queued", "queue_position": self.position(job)})
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """0 while running or finished; 1 for the next job to start, and so on."""
        with self._lock:
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return 0

    def jobs(self) -> list[Job]:
        """Every job the queue still knows (waiting, running, and the most recent finished ones)."""
        with self._lock:
            return list(self._jobs.values())

    def running(self) -> list[Job]:
        with self._lock:
            return list(self._running)

    def waiting(self) -> int:
        return len(self._waiting)

    def interrupt(self, job: Job) -> None:
        """AUTOMATIC1111's interrupt: stop now, keep what is done."""
        job.interrupted = True

    def skip(self, job: Job) -> None:
        """AUTOMATIC1111's skip: end the current run of n_iter, go on with the next."""
        job.skipped = True

    def latents(self, job: Job) -> np.ndarray | None:
        """The latents of the job's latest step (previews)."""
        return job.latents

    def cancel(self, job: Job) -> None:
        """Cancel a job: a waiting one leaves the queue at once, a running one stops before its next step."""
        job.cancel()
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                self._metrics.queue_depth.set(len(self._waiting))
            else:
                return
        job.finish(Status.CANCELLED, Cancelled("cancelled while queued"))

    def close(self, timeout_s: float = 60.0, grace_s: float = 5.0) -> None:
        """Stop accepting; let waiting and running jobs finish (drain), up to timeout_s; then cancel what is left (a
        running job stops before its next step) and wait up to grace_s more."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        deadline = time.monotonic() + timeout_s
        for late in (False, True):
            for thread in self._threads:
                thread.join(max(0.0, deadline + (grace_s if late else 0) - time.monotonic()))
            if late or not any(thread.is_alive() for thread in self._threads):
                return
            with self._lock:
                left, running, self._waiting = list(self._waiting), list(self._running), deque()
            log.warning("drain over (%.0f s): %d waiting, %d running cancelled", timeout_s, len(left), len(running))
            for job in left:
                job.finish(Status.CANCELLED, Cancelled("the server shut down before this job ran"))
            for job in running:
                job.cancel()

    def _forget_old(self, keep: int = 512) -> None:
        if len(self._jobs) <= keep:
            return
        for job_id, job in list(self._jobs.items()):
            if len(self._jobs) <= keep:
                break
            if job.status in FINISHED:
                del self._jobs[job_id]

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:  # closed and drained
                    return
                job = self._waiting.popleft()
                self._running.append(job)
                self._metrics.queue_depth.set(len(self._waiting))
                self._metrics.running_jobs.set(len(self._running))
            try:
                job.status, job.started = Status.RUNNING, time.time()
                self._metrics.queue_wait_seconds.observe(job.started - job.created)
                job.emit({"event": "started"})
                self._run(job)
                job.finish(Status.DONE)
            except Cancelled as exc:
                job.finish(Status.CANCELLED, exc)
            except KilnError as exc:
                job.finish(Status.FAILED, exc)
            except Exception as exc:  # noqa: BLE001 - a bug fails its job, not the worker
                log.exception("job %s failed with an internal error", job.id)  # the traceback goes to the log only
                job.finish(Status.FAILED, KilnError(f"internal error ({type(exc).__name__})"))
            finally:
                with self._lock:
                    self._running.remove(job)
                    self._metrics.running_jobs.set(len(self._running))
