"""The engine: the checkpoints' pipelines on Triton, the step batcher and the job queue, joined.

A job runs on a worker thread of the queue (orchestrator.jobs); its UNet calls go through the shared StepBatcher,
which merges the calls of all jobs in their denoising loops into one Triton call per step. The engine knows nothing
of HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kiln.contract import SDContract, SDModels
from kiln.errors import ConfigError, KilnError, ServerError
from orchestrator.batching import StepBatcher
from orchestrator.checkpoints import Checkpoints, ModelControl
from orchestrator.jobs import Job, JobQueue, Status
from orchestrator.metrics import Metrics
from orchestrator.pipeline import Limits, Pipeline, Txt2ImgRequest, check_job, with_seeds
from orchestrator.pipeline.refiner import check_refiner
from orchestrator.pipeline.seeds import MAX_SEED
from orchestrator.replicas import Replica, Replicas


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
    # More Tritons serving the same repository (orchestrator.replicas): jobs go to whichever is up and least busy
    replica_urls: tuple[str, ...] = ()
    replica_check_s: float = 2.0  # how often the replicas' readiness is probed (with more than one)
    # A job store and queue shared with other orchestrators (orchestrator.shared); "": this process's own
    redis_url: str = ""
    lease_s: float = 15.0  # a job whose orchestrator stops renewing this long is claimed by another

    @property
    def triton_urls(self) -> tuple[str, ...]:
        return (self.triton_url, *self.replica_urls)


class Engine:
    """The checkpoints' pipelines (connected lazily, so the service starts before Triton is up), batcher and queue.

    `connect` makes the pipelines (default: over the Triton at `options.triton_url`; one, or {checkpoint: pipeline}
    with the default first); with `control` (orchestrator.checkpoints.ModelControl) checkpoints are loaded on demand
    through `connect_one`. `connect_at(url)` makes those of another Triton (`options.replica_urls`; default: its
    pipelines over gRPC); each Triton has its own pipelines and step batcher (orchestrator.replicas). The engine
    knows nothing of HTTP.
    """

    def __init__(self, options: EngineOptions, metrics: Metrics,
                 connect: Callable[[], Pipeline | Mapping[str, Pipeline]] | None = None,
                 connect_one: Callable[[SDModels], Pipeline] | None = None,
                 control: ModelControl | None = None,
                 connect_at: Callable[[str], Pipeline | Mapping[str, Pipeline]] | None = None) -> None:
        from orchestrator.pipeline.sampling import preload

        preload()  # before any worker thread exists
        if control is not None and options.replica_urls:
            raise ConfigError("checkpoints loaded on demand (--max-checkpoints) manage one Triton's models; with "
                              "several --triton-url, every Triton serves its whole repository")
        self.options = options
        self.metrics = metrics
        connect_at = connect_at or (lambda url: Pipeline.from_triton(url, limits=options.limits,
                                                                     shared_memory=options.shared_memory))
        connects = [connect or (lambda: connect_at(options.triton_url))]
        connects += [lambda url=url: connect_at(url) for url in options.replica_urls]
        self._batcher_ready = False
        self.replicas = Replicas([Replica(url, Checkpoints(how, connect_one if index == 0 else None, control,
                                                           busy=self._busy_checkpoints), self._new_batcher(url))
                                  for index, (url, how) in enumerate(zip(options.triton_urls, connects))],
                                 every_s=options.replica_check_s, on_state=metrics.replica_state)
        if options.redis_url:
            from orchestrator.shared import SharedQueue

            self.queue: JobQueue | SharedQueue = SharedQueue(
                options.redis_url, self._run_job, max_queue=options.max_queue, workers=options.workers,
                metrics=metrics, lease_s=options.lease_s)
        else:
            self.queue = JobQueue(self._run_job, max_queue=options.max_queue, workers=options.workers,
                                  metrics=metrics)

    def _new_batcher(self, url: str) -> StepBatcher:
        return StepBatcher(max_rows=self.options.max_batch_rows or 16, window_s=self.options.batch_window_s,
                           enabled=self.options.step_batching,
                           on_batch=lambda rows, seconds: self.metrics.unet_batch(rows, seconds, url))

    @property
    def checkpoints(self) -> Checkpoints:
        """What listings and request checks read: the checkpoints of the first Triton that is up."""
        return self.replicas.primary.checkpoints

    @property
    def batcher(self) -> StepBatcher:
        """The first Triton's step batcher (its statistics)."""
        return self.replicas.all[0].batcher

    def _busy_checkpoints(self) -> set[str]:
        active = [job for job in self.queue.jobs() if job.status in (Status.QUEUED, Status.RUNNING)]
        return {job.checkpoint for job in active} | {job.refiner for job in active if job.refiner is not None}

    def pipelines(self) -> dict[str, Pipeline]:
        """The connected checkpoints' pipelines, by checkpoint name ("": the repository's default)."""
        pipelines = self.checkpoints.pipelines()
        if not self._batcher_ready:
            self._batcher_ready = True
            contract = next(iter(pipelines.values())).contract
            for batcher in (replica.batcher for replica in self.replicas.all):  # the same repository on each
                if not self.options.max_batch_rows:
                    batcher.max_rows = contract.unet_max_batch
                # the row counts and shapes the UNet replays from CUDA graphs
                batcher.buckets, batcher.bucket_shapes = contract.row_buckets, contract.bucket_row_shapes
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
        """Discover every Triton's checkpoints again (a Triton that is down now is read when it is used)."""
        self.checkpoints.refresh()
        for replica in self.replicas.all:
            if replica.checkpoints is not self.checkpoints and replica.up:
                try:
                    replica.checkpoints.refresh()
                except KilnError:
                    self.replicas.check(replica)

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
        refiner = None
        if request.refiner is not None:  # AUTOMATIC1111's refiner_checkpoint: another served checkpoint
            refiner = self.checkpoint(request.refiner.checkpoint, "refiner_checkpoint")
            self.checkpoints.check_together((key, refiner), "refiner_checkpoint")  # before the refiner loads
        pipeline = self.checkpoints.get(key)
        check_job(request, n_iter, pipeline.limits)
        pipeline.check(request)
        if refiner is not None:
            check_refiner(pipeline, self.checkpoints.get(refiner), request)
        request = with_seeds(request)  # drawn once: n_iter chains from them
        job = Job(kind=kind, request=request, n_iter=n_iter, client_id=client_id, context=context or {},
                  checkpoint=key, refiner=refiner)
        if job_id is not None:
            job.id = job_id
        return job

    def _run_job(self, job: Job) -> None:
        """Run a job on a replica; where that Triton fails under it, its unfinished runs again on another one."""
        self.pipelines()
        done, tried = 0, ()
        while True:
            replica = self.replicas.pick(job.checkpoint, tried)
            try:
                with self.replicas.running(replica):
                    done = self._run_on(replica, job, done)
                return
            except ServerError as exc:
                if job.cancel_event.is_set() or not self.replicas.failed(replica, exc, tried):
                    raise
                tried += (replica,)
                job.emit({"event": "restarted", "reason": f"Triton {replica.url} failed: {exc}"})

    def _run_on(self, replica: Replica, job: Job, done: int) -> int:
        """Runs `done` to n_iter - 1 of a job on one replica; the runs finished (all of them, or what an error left)."""
        def loaded(key: str) -> Pipeline:  # unloaded while the job waited (model control): loaded again, its
            return replica.checkpoints.get(key, on_load=lambda: job.emit(  # progress saying so
                {"event": "loading", "checkpoint": key or "default"}))

        pipeline = loaded(job.checkpoint)
        refiner = loaded(job.refiner) if job.refiner is not None else None
        request = job.request
        batch = request.batch_size
        for iteration in range(done, job.n_iter):
            if job.interrupted:
                break
            job.iteration, job.step, job.steps, job.skipped = iteration, 0, 0, False
            run = replace(request, seed=(request.seed + iteration * batch) % (MAX_SEED + 1),
                          subseed=(request.subseed + iteration * batch) % (MAX_SEED + 1))
            progress = self._progress(job)
            result = pipeline.generate(run, progress, job.cancel_event.is_set, unet_call=replica.batcher,
                                       stop_early=lambda: job.interrupted or job.skipped,
                                       denoising=lambda: self._denoising(replica.batcher), refiner=refiner)
            for position, (image, seed) in enumerate(zip(result.images, result.seeds)):
                index = len(job.images)
                job.images.append(image)
                job.infos.append(result.info | {"seed": seed, "index": index})
                job.before.append({name: kept[position] for name, kept in result.before.items()})
            self.metrics.images.inc(len(result.images))
            done = iteration + 1
        return done

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
    def _denoising(self, batcher: StepBatcher):
        """Held by a job for its denoising loop: it makes the job a participant of its replica's step batcher."""
        with batcher.participant():
            self.metrics.denoising_jobs.inc()
            try:
                yield
            finally:
                self.metrics.denoising_jobs.dec()

    def close(self, timeout_s: float = 60.0) -> None:
        self.queue.close(timeout_s)
        self.replicas.close()
