"""The half of SharedQueue that runs jobs here: pulling them from the stream while a worker is free, starting them on
the local JobQueue, writing their progress and their end to Redis, renewing their leases and claiming those of
orchestrators that stopped (the design: orchestrator.shared)."""

from __future__ import annotations

import json
import logging
import pickle
import threading
import time

from kiln.errors import KilnError
from orchestrator.jobs import Job, JobQueue, Status
from orchestrator.metrics import Metrics
from orchestrator.shared.store import (
    EVENTS,
    GROUP,
    KEEP_S,
    QUEUED,
    RUNNING,
    STREAM,
    P,
    apply_control,
    failed_state,
    job_of,
    state_of,
)

log = logging.getLogger("kiln.shared")


class Runner:
    """Runs the store's jobs on this orchestrator; SharedQueue (its subclass) sets what it reads: the Redis client
    and scripts, this consumer's name, the local JobQueue, the lock and the jobs executing here."""

    redis: object
    name: str
    workers: int
    lease_s: float
    _scripts: dict
    _redis_errors: tuple
    _metrics: Metrics
    _local: JobQueue
    _lock: threading.Condition
    _executing: dict[str, tuple[str, Job]]  # job id: (stream entry id, the job running here)
    _lost: set[str]  # jobs running here that another orchestrator claimed
    _closed: bool
    _stopped: bool
    _release_at: float

    def waiting(self) -> int:
        raise NotImplementedError

    def _ensure_group(self) -> None:
        import redis

        try:
            self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _publish(self, event: dict) -> None:
        self.redis.publish(EVENTS, json.dumps(event))

    # -- running jobs here ----------------------------------------------------------------------------------
    def _pull(self) -> None:
        while not self._closed:
            with self._lock:
                if len(self._executing) >= self.workers:
                    self._lock.wait(0.2)
                    continue
            try:
                read = self.redis.xreadgroup(GROUP, self.name, {STREAM: ">"}, count=1, block=500)
                entries = [(entry_id, fields) for _stream, items in read or [] for entry_id, fields in items]
                for entry_id, fields in entries:
                    self._start(entry_id.decode(), fields[b"id"].decode(), restarted=False)
            except self._redis_errors as exc:
                log.warning("job store: reading the queue failed (%s); retrying", exc)
                time.sleep(0.5)
                if "NOGROUP" in str(exc):  # Redis came back empty (it did not persist): the group again
                    try:
                        self._ensure_group()
                    except self._redis_errors:
                        pass
            except Exception:  # noqa: BLE001 - a bug (a job that cannot be read) must not stop the pulling
                log.exception("job store: starting a job failed; its entry is claimed again after the lease")
                time.sleep(0.5)

    def _start(self, entry_id: str, job_id: str, *, restarted: bool) -> None:
        key = P + "job:" + job_id
        with self._lock:
            if job_id in self._executing:  # claimed back while it runs here (its lease lapsed): it goes on
                return
        spec = self.redis.hget(key, "spec")
        if spec is None:  # expired
            self._ack(entry_id)
            return
        try:
            job = job_of(spec)
        except Exception as exc:  # noqa: BLE001 - one this version cannot read (another's, mid-upgrade) fails alone
            error = f"this orchestrator cannot read the job as stored ({type(exc).__name__}: {exc})"
            self._scripts["finish"](keys=[key, QUEUED, RUNNING, P + "latents:" + job_id],
                                    args=[job_id, json.dumps(failed_state(error)), pickle.dumps(([], [])), KEEP_S])
            self._publish({"task_id": job_id, "event": "failed", "error": error})
            self._ack(entry_id)
            return
        job.status, job.started = Status.RUNNING, time.time()
        if not self._scripts["start"](keys=[key, QUEUED, RUNNING],
                                      args=[job_id, json.dumps(state_of(job)), self.name, job.started]):
            self._ack(entry_id)  # cancelled while queued, or finished by an orchestrator that died after
            return
        for op in ("cancel", "interrupt", "skip"):  # asked for while it was in transit
            if self.redis.hexists(key, "control:" + op):
                apply_control(job, op)
        job.status = Status.QUEUED  # the local queue starts it
        job.subscribe(lambda event: self._mirror_out(job, entry_id, event))
        with self._lock:
            self._executing[job_id] = (entry_id, job)
        if restarted:
            self.redis.hincrby(key, "restarts", 1)
            self._publish({"task_id": job_id, "event": "restarted",
                           "reason": "its orchestrator stopped renewing its lease"})
        self._metrics.queue_depth.set(self.waiting())
        try:  # again: it may have run here before, until another orchestrator claimed it (and then stopped)
            self._local.submit(job, again=True)
        except KilnError as exc:  # shutting down (or a bug): another orchestrator claims the entry after the lease
            log.warning("job %s: not started here (%s)", job_id, exc)
            with self._lock:
                self._executing.pop(job_id, None)
                self._lock.notify_all()

    def _ack(self, entry_id) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(STREAM, GROUP, entry_id)
            pipe.xdel(STREAM, entry_id)
            pipe.execute()

    def _mirror_out(self, job: Job, entry_id: str, event: dict) -> None:
        """The running job's events to Redis: progress (with the latents for previews) best effort, the finish
        until it is written (or the orchestrator is leaving it to another one)."""
        kind = event.get("event")
        if kind == "queued":
            return
        if kind not in ("done", "failed", "cancelled"):
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hset(P + "job:" + job.id, "state", json.dumps(state_of(job)))
                    if kind == "progress" and job.latents is not None:
                        pipe.set(P + "latents:" + job.id, pickle.dumps(job.latents), ex=KEEP_S)
                    pipe.publish(EVENTS, json.dumps(event))
                    pipe.execute()
            except self._redis_errors:
                pass
            return
        # (the images' kept pictures only where there are some: an orchestrator from before them reads two fields)
        result = pickle.dumps((job.images, job.infos, *([job.before] if any(job.before) else [])))
        while True:
            if kind == "cancelled" and time.monotonic() >= self._release_at:
                log.warning("job %s left to another orchestrator (drain over)", job.id)
                break
            if job.id in self._lost:  # another orchestrator runs it now: its end is that one's to write
                self._lost.discard(job.id)
                break
            try:
                if self._scripts["finish"](keys=[P + "job:" + job.id, QUEUED, RUNNING, P + "latents:" + job.id],
                                           args=[job.id, json.dumps(state_of(job)), result, KEEP_S]):
                    self._publish(event)
                self._ack(entry_id)
                break
            except self._redis_errors as exc:
                log.warning("job %s: writing its end failed (%s); retrying", job.id, exc)
                time.sleep(1.0)
        with self._lock:
            self._executing.pop(job.id, None)
            self._lock.notify_all()

    def _renew(self) -> None:
        """Reset the idle time of the entries of the jobs running here, where this orchestrator still owns them. One
        that another claimed meanwhile (Redis away longer than the lease, or this process stalled) is cancelled
        here: the other one runs it again and writes its end. One whose record is gone is cancelled too."""
        with self._lock:
            executing = list(self._executing.items())
        if not executing:
            return
        owners = self.redis.pipeline(transaction=False)
        for job_id, _running in executing:
            owners.hget(P + "job:" + job_id, "owner")
            owners.hexists(P + "job:" + job_id, "spec")
        read = owners.execute()
        mine = []
        for (job_id, (entry_id, job)), owner, kept in zip(executing, read[::2], read[1::2]):
            if not kept:  # its record is gone (Redis restarted without its data, or flushed): nobody can follow it
                log.warning("job %s: its record is gone from the job store; stopping it here", job_id)
                job.cancel()
            elif owner is not None and owner.decode() != self.name:
                log.warning("job %s: claimed by %s; stopping it here", job_id, owner.decode())
                self._lost.add(job_id)
                job.cancel()
            else:
                mine.append(entry_id)
        if mine:
            self.redis.xclaim(STREAM, GROUP, self.name, 0, mine, justid=True)

    def _keep_leases(self) -> None:
        """Renew the leases of the jobs running here; claim those of orchestrators that stopped renewing."""
        while not self._stopped:
            time.sleep(self.lease_s / 3)
            try:
                self._renew()
                with self._lock:
                    free = self.workers - len(self._executing)
                if free <= 0 or self._closed:
                    continue
                claimed = self.redis.xautoclaim(STREAM, GROUP, self.name, int(self.lease_s * 1000), count=free,
                                                justid=True)
                for entry_id in claimed:
                    entry = self.redis.xrange(STREAM, entry_id, entry_id)
                    if entry:
                        log.warning("job %s: claimed from an orchestrator that stopped", entry[0][1][b"id"].decode())
                        self._start(entry_id.decode(), entry[0][1][b"id"].decode(), restarted=True)
                    else:
                        self._ack(entry_id)
            except self._redis_errors as exc:
                log.warning("job store: renewing leases failed (%s); retrying", exc)
            except Exception:  # noqa: BLE001 - a bug must not stop the leases of the jobs running here
                log.exception("job store: renewing leases failed")
