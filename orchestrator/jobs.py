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
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np

from kiln.contract import SDContract, SDModels
from kiln.errors import InputError, KilnError, ServerError
from orchestrator.batching import StepBatcher
from orchestrator.checkpoints import Checkpoints, ModelControl
from orchestrator.metrics import Metrics
from orchestrator.pipeline import Cancelled, Limits, Pipeline, Txt2ImgRequest, check_job, with_seeds
from orchestrator.pipeline.refiner import check_refiner
from orchestrator.pipeline.sampling import MAX_SEED

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

    def finish(self, status: Status, error: KilnError | None = None) -> None:
        self.status, self.error, self.finished = status, error, time.time()
        event = {"event": status.value, "progress": self.progress}
        if error is not None:
            event["error"] = str(error)
        self.emit(event)
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

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise ServerError("the service is shutting down; not accepting new jobs")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting)")
            if job.id in self._jobs:
                raise InputError(f"force_task_id {job.id!r} names a task this server already has")
            self._waiting.append(job)
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


@dataclass
class EngineOptions:
    triton_url: str = "127.0.0.1:8001"
    max_queue: int = 64  # jobs waiting beyond the running ones; more is 429
    workers: int = 16  # jobs running at once (their UNet steps share batches)
    step_batching: bool = True
    max_batch_rows: int = 0  # rows per merged UNet call; 0: the model's max batch size
    batch_window_s: float = 0.05  # longest a tick waits for stragglers
    limits: Limits = field(default_factory=Limits)  # what one request may ask for
    shared_memory: str = "auto"  # kiln.triton_client.TritonClient's shared-memory mode for the SD components


class Engine:
    """The checkpoints' pipelines (connected lazily, so the service starts before Triton is up), batcher and queue.

    `connect` makes the pipelines (default: over the Triton at `options.triton_url`; one, or {checkpoint: pipeline}
    with the default first); with `control` (orchestrator.checkpoints.ModelControl) checkpoints are loaded on demand
    through `connect_one`. The engine knows nothing of HTTP.
    """

    def __init__(self, options: EngineOptions, metrics: Metrics,
                 connect: Callable[[], Pipeline | Mapping[str, Pipeline]] | None = None,
                 connect_one: Callable[[SDModels], Pipeline] | None = None,
                 control: ModelControl | None = None) -> None:
        from orchestrator.pipeline.sampling import preload

        preload()  # before any worker thread exists
        self.options = options
        self.metrics = metrics
        connect = connect or (lambda: Pipeline.from_triton(options.triton_url, limits=options.limits,
                                                           shared_memory=options.shared_memory))
        self.checkpoints = Checkpoints(connect, connect_one, control, busy=self._busy_checkpoints)
        self._batcher_ready = False
        self.batcher = StepBatcher(max_rows=options.max_batch_rows or 16, window_s=options.batch_window_s,
                                   enabled=options.step_batching, on_batch=metrics.unet_batch)
        self.queue = JobQueue(self._run_job, max_queue=options.max_queue, workers=options.workers, metrics=metrics)

    def _busy_checkpoints(self) -> set[str]:
        active = [job for job in self.queue.jobs() if job.status in (Status.QUEUED, Status.RUNNING)]
        return {job.checkpoint for job in active} | {job.refiner for job in active if job.refiner is not None}

    def pipelines(self) -> dict[str, Pipeline]:
        """The connected checkpoints' pipelines, by checkpoint name ("": the repository's default)."""
        pipelines = self.checkpoints.pipelines()
        if not self._batcher_ready:
            self._batcher_ready = True
            contract = next(iter(pipelines.values())).contract
            if not self.options.max_batch_rows:
                self.batcher.max_rows = contract.unet_max_batch
            # the row counts and shapes the UNet replays from CUDA graphs
            self.batcher.buckets, self.batcher.bucket_shapes = contract.row_buckets, contract.bucket_row_shapes
        return pipelines

    def checkpoint(self, name: str | None = None, what: str = "sd_model_checkpoint") -> str:
        """The checkpoint a client's name picks (orchestrator.checkpoints.Checkpoints.resolve)."""
        self.pipelines()
        return self.checkpoints.resolve(name, what)

    def pipeline(self, checkpoint: str | None = None, what: str = "sd_model_checkpoint") -> Pipeline:
        """The pipeline of the checkpoint a client names (None: the default), loaded first where it is not."""
        return self.checkpoints.get(self.checkpoint(checkpoint, what))

    def contract(self, checkpoint: str | None = None, what: str = "sd_model_checkpoint") -> SDContract:
        """The contract of the checkpoint a client names, loaded or not (listings never load one)."""
        self.pipelines()
        return self.checkpoints.known()[self.checkpoints.resolve(checkpoint, what)]

    def refresh(self) -> None:
        self.checkpoints.refresh()

    def submit(self, kind: str, request: Txt2ImgRequest, n_iter: int = 1, *, client_id: str | None = None,
               context: dict[str, Any] | None = None, job_id: str | None = None,
               checkpoint: str | None = None) -> Job:
        """Validate against the pipeline of the checkpoint it names (InputError before anything is queued), then
        queue. `job_id`: the caller's id for the job (AUTOMATIC1111's force_task_id); one the queue knows is
        refused."""
        return self.queue.submit(self.prepare(kind, request, n_iter, client_id=client_id, context=context,
                                              job_id=job_id, checkpoint=checkpoint))

    def prepare(self, kind: str, request: Txt2ImgRequest, n_iter: int = 1, *, client_id: str | None = None,
                context: dict[str, Any] | None = None, job_id: str | None = None,
                checkpoint: str | None = None) -> Job:
        """A job checked against the pipeline of the checkpoint it names (None: the default; an InputError naming
        the bad field), not queued yet: callers that queue several together (the X/Y/Z plot's cells) check them all
        first, then pass each to queue.submit."""
        key = self.checkpoint(checkpoint)
        pipeline = self.checkpoints.get(key)
        check_job(request, n_iter, pipeline.limits)
        pipeline.check(request)
        refiner = None
        if request.refiner is not None:  # AUTOMATIC1111's refiner_checkpoint: another served checkpoint
            refiner = self.checkpoint(request.refiner.checkpoint, "refiner_checkpoint")
            check_refiner(pipeline, self.checkpoints.get(refiner), request)
        request = with_seeds(request)  # drawn once: n_iter chains from them
        job = Job(kind=kind, request=request, n_iter=n_iter, client_id=client_id, context=context or {},
                  checkpoint=key, refiner=refiner)
        if job_id is not None:
            job.id = job_id
        return job

    def _run_job(self, job: Job) -> None:
        def loaded(key: str) -> Pipeline:  # unloaded while the job waited (model control): loaded again, its
            return self.checkpoints.get(key, on_load=lambda: job.emit(  # progress saying so
                {"event": "loading", "checkpoint": key or "default"}))

        pipeline = loaded(job.checkpoint)
        refiner = loaded(job.refiner) if job.refiner is not None else None
        request = job.request
        batch = request.batch_size
        for iteration in range(job.n_iter):
            if job.interrupted:
                break
            job.iteration, job.step, job.steps, job.skipped = iteration, 0, 0, False
            run = replace(request, seed=(request.seed + iteration * batch) % (MAX_SEED + 1),
                          subseed=(request.subseed + iteration * batch) % (MAX_SEED + 1))
            progress = self._progress(job)
            result = pipeline.generate(run, progress, job.cancel_event.is_set, unet_call=self.batcher,
                                       stop_early=lambda: job.interrupted or job.skipped,
                                       denoising=self._denoising, refiner=refiner)
            for image, seed in zip(result.images, result.seeds):
                index = len(job.images)
                job.images.append(image)
                job.infos.append(result.info | {"seed": seed, "index": index})
            self.metrics.images.inc(len(result.images))

    def _progress(self, job: Job):
        """The progress callback of one run: the job's state, its listeners' events, the step-time metric."""
        last = [time.perf_counter()]  # when the previous step ended

        def progress(step: int, total: int, latents: np.ndarray) -> None:
            now = time.perf_counter()
            self.metrics.step_seconds.observe(now - last[0])
            last[0] = now
            job.step, job.steps, job.latents = step, total, latents
            job.emit({"event": "progress", "iteration": job.iteration, "n_iter": job.n_iter, "step": step,
                      "steps": total, "progress": job.progress})

        return progress

    @contextmanager
    def _denoising(self):
        """Held by a job for its denoising loop: it makes the job a participant of the step batcher."""
        with self.batcher.participant():
            self.metrics.denoising_jobs.set(self.batcher.participants)
            try:
                yield
            finally:
                self.metrics.denoising_jobs.set(self.batcher.participants - 1)

    def close(self, timeout_s: float = 60.0) -> None:
        self.queue.close(timeout_s)
        self.batcher.close()
        self.checkpoints.close()
