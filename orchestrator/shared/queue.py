"""SharedQueue: JobQueue's interface over the job store in Redis (the design: orchestrator.shared)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from kiln.errors import InputError, ServerError
from orchestrator.jobs import FINISHED, Job, JobQueue, QueueFull, Status
from orchestrator.metrics import Metrics
from orchestrator.shared.runner import Runner
from orchestrator.shared.store import (
    CONTROL,
    EVENTS,
    KEEP_S,
    QUEUED,
    RECENT,
    RUNNING,
    SCRIPTS,
    SEQ,
    STREAM,
    P,
    apply_control,
    apply_state,
    job_of,
    spec_of,
    state_of,
)

log = logging.getLogger("kiln.shared")
FIELDS = ("spec", "state", "result")  # what a mirror is made from


class SharedQueue(Runner):
    """JobQueue's interface over Redis; `run(job)` runs a job here, as JobQueue's does."""

    def __init__(self, url: str, run: Callable[[Job], None], *, max_queue: int, workers: int, metrics: Metrics,
                 lease_s: float = 15.0) -> None:
        import redis

        self.url, self.max_queue, self.workers, self.lease_s = url, max_queue, workers, lease_s
        self._redis_errors = (redis.RedisError, OSError)
        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10)
        self._scripts = {name: self.redis.register_script(text) for name, text in SCRIPTS.items()}
        where = self.redis.connection_pool.connection_kwargs
        self._where = f"{where.get('host', '?')}:{where.get('port', '?')}"
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._metrics = metrics
        self._local = JobQueue(run, max_queue=10**6, workers=workers, metrics=metrics)
        self._mirrors: OrderedDict[str, Job] = OrderedDict()
        self._executing: dict[str, tuple[str, Job]] = {}  # job id: (stream entry id, the job running here)
        self._lost: set[str] = set()  # jobs running here that another orchestrator claimed
        self._lock = threading.Condition()
        self._closed = self._stopped = False  # closed: no more submits or pulls; stopped: the threads end
        self._release_at = float("inf")  # draining: from then on a job cancelled here is left to another
        try:
            self._call(self._ensure_group)
        except ServerError as exc:  # the service starts anyway (not ready); the puller makes the group later
            log.warning("%s", exc)
        self._threads = [threading.Thread(target=target, name=f"kiln-shared-{target.__name__}", daemon=True)
                         for target in (self._pull, self._keep_leases, self._listen)]
        for thread in self._threads:
            thread.start()

    # -- calls --------------------------------------------------------------------------------------------------
    def _call(self, fn):
        try:
            return fn()
        except self._redis_errors as exc:
            raise ServerError(f"the job store (Redis at {self._where}) is unreachable: {type(exc).__name__}") \
                from exc

    # -- JobQueue's interface -------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        if self._closed:
            raise ServerError("the service is shutting down; not accepting new jobs")
        spec = spec_of(job)
        seq = self._call(lambda: self._scripts["submit"](
            keys=[P + "job:" + job.id, QUEUED, STREAM, RECENT, SEQ],
            args=[job.id, spec, json.dumps(state_of(job)), self.max_queue, job.created]))
        if seq == -1:
            raise InputError(f"force_task_id {job.id!r} names a task this server already has")
        if seq == -2:
            raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting)")
        self._remember(job)
        self._metrics.queue_depth.set(self.waiting())
        job.emit({"event": "queued", "queue_position": self.position(job)})
        return job

    def get(self, job_id: str) -> Job | None:
        """The job's mirror, its state read again from Redis (None: unknown, or finished and forgotten)."""
        settled = self._settled(job_id)
        if settled is not None:
            return settled
        return self._mirror_of(job_id, self._call(lambda: self.redis.hmget(P + "job:" + job_id, *FIELDS)))

    def _settled(self, job_id: str) -> Job | None:
        """The job's mirror where it finished and its end was read here (nothing more to read), else None."""
        mirror = self._mirrors.get(job_id)
        return mirror if mirror is not None and mirror.status in FINISHED and mirror.future.done() else None

    def _mirror_of(self, job_id: str, fields: list) -> Job | None:
        """The job's mirror made or updated from its record's FIELDS as read."""
        mirror = self._mirrors.get(job_id)
        if fields[0] is None:
            if mirror is not None and mirror.status not in FINISHED:
                self._record_lost(mirror)
            return mirror
        if mirror is None:
            mirror = job_of(fields[0])
            self._remember(mirror)
        self._update(mirror, json.loads(fields[1]), fields[2])
        return mirror

    def position(self, job: Job) -> int:
        rank = self._call(lambda: self.redis.zrank(QUEUED, job.id))
        return 0 if rank is None else rank + 1

    def jobs(self) -> list[Job]:
        """The newest 512 jobs of every orchestrator (those still kept): the records not yet finished here read in
        one round trip (one each took 512 round trips for a listing)."""
        ids = [i.decode() for i in self._call(lambda: self.redis.zrevrange(RECENT, 0, 511))]
        known = {i: m for i in ids if (m := self._settled(i)) is not None}
        unread = [i for i in ids if i not in known]

        def read() -> list:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in unread:
                    pipe.hmget(P + "job:" + job_id, *FIELDS)
                return pipe.execute()

        read_now = dict(zip(unread, self._call(read))) if unread else {}
        # (one the listener settled since the read keeps what it read: the read may be older)
        jobs = [known.get(i) or self._settled(i) or self._mirror_of(i, read_now[i]) for i in ids]
        return [job for job in jobs if job is not None]

    def running(self) -> list[Job]:
        ids = self._call(lambda: self.redis.zrange(RUNNING, 0, -1))
        return [job for job in (self.get(i.decode()) for i in ids) if job is not None and job.status == Status.RUNNING]

    def waiting(self) -> int:
        return self._call(lambda: self.redis.zcard(QUEUED))

    def cancel(self, job: Job) -> None:
        """A queued job is cancelled at once; a running one stops before its next step (wherever it runs)."""
        if self._call(lambda: self._scripts["cancel"](keys=[P + "job:" + job.id, QUEUED],
                                                      args=[job.id, "cancelled while queued", time.time(), KEEP_S])):
            self._call(lambda: self._publish({"task_id": job.id, "event": "cancelled",
                                              "error": "cancelled while queued"}))
            self.get(job.id)
            return
        self._control(job, "cancel")

    def interrupt(self, job: Job) -> None:
        self._control(job, "interrupt")

    def skip(self, job: Job) -> None:
        self._control(job, "skip")

    def reachable(self) -> bool:
        """Whether Redis answers (readiness)."""
        try:
            return bool(self.redis.ping())
        except self._redis_errors:
            return False

    def latents(self, job: Job) -> np.ndarray | None:
        """The latents of the job's latest step (previews), wherever it runs."""
        raw = self._call(lambda: self.redis.get(P + "latents:" + job.id))
        return None if raw is None else pickle.loads(raw)

    def close(self, timeout_s: float = 60.0, grace_s: float = 5.0) -> None:
        """Stop pulling; let the jobs running here finish up to timeout_s. Those still running then are left to
        another orchestrator (not acknowledged: claimed after the lease), not cancelled."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._release_at = time.monotonic() + timeout_s
        self._local.close(timeout_s, grace_s)
        self._stopped = True
        for thread in self._threads:
            thread.join(2)
        self.redis.close()

    # -- mirrors --------------------------------------------------------------------------------------------
    def _remember(self, job: Job) -> None:
        with self._lock:
            self._mirrors[job.id] = job
            self._mirrors.move_to_end(job.id)
            while len(self._mirrors) > 1024:
                old_id, old = next(iter(self._mirrors.items()))
                if old.status not in FINISHED:
                    break
                del self._mirrors[old_id]

    def _record_lost(self, mirror: Job) -> None:
        """An unfinished job whose record is gone from Redis (restarted without its data, or flushed; a finished one's
        expires after KEEP_S): nothing can follow or answer it any more, and its socket and its request would wait
        for ever. It fails, naming why; where it runs here, it stops (its end would be written nowhere)."""
        with self._lock:  # (once: the listener's sync and a request's read may find it at once)
            if mirror.status in FINISHED:
                return
            running = self._executing.get(mirror.id)
            if running is not None:
                running[1].cancel()
            log.warning("job %s: its record is gone from the job store; failed", mirror.id)
            mirror.context["record_lost"] = True  # (the events of what ran on meanwhile are not its)
            mirror.finish(Status.FAILED, ServerError(f"the job store (Redis at {self._where}) lost task {mirror.id} "
                                                     "(restarted without its data, or flushed); submit it again under "
                                                     "a new id"))

    def _update(self, mirror: Job, state: dict, result: bytes | None) -> None:
        finished = Status(state["status"]) in FINISHED
        if finished and result is None and state["status"] != "cancelled":
            result = self._call(lambda: self.redis.hget(P + "job:" + mirror.id, "result"))
        if result is not None and not mirror.images:
            mirror.images, mirror.infos, *kept = pickle.loads(result)  # (and the kept pictures, where any)
            mirror.before = kept[0] if kept else []
        apply_state(mirror, state)
        if finished and not mirror.future.done():
            mirror.future.set_result(mirror)

    def _control(self, job: Job, op: str) -> None:
        self._call(lambda: (self.redis.hset(P + "job:" + job.id, "control:" + op, 1),
                            self.redis.publish(CONTROL, json.dumps({"task_id": job.id, "op": op}))))

    def _listen(self) -> None:
        """Events to the mirrors (and their listeners: WebSockets), control to the jobs running here; every 2 s the
        unfinished mirrors are read again (pub/sub loses what is sent while the connection is away)."""
        pubsub, last_sync = None, 0.0
        while not self._stopped:
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(EVENTS, CONTROL)
                message = pubsub.get_message(timeout=0.5)
                if message is not None:
                    self._on_message(message["channel"].decode(), json.loads(message["data"]))
                if time.monotonic() - last_sync > 2:
                    last_sync = time.monotonic()
                    for mirror in [m for m in list(self._mirrors.values()) if m.status not in FINISHED]:
                        self.get(mirror.id)
            except (*self._redis_errors, ServerError) as exc:
                log.warning("job store: %s; retrying", exc)
                pubsub = None
                time.sleep(0.5)
            except Exception:  # noqa: BLE001 - a bug (a malformed message) must not stop the events
                log.exception("job store: handling an event failed")

    def _on_message(self, channel: str, message: dict) -> None:
        task_id = message["task_id"]
        if channel == CONTROL:
            running = self._executing.get(task_id)
            if running is not None:
                apply_control(running[1], message["op"])
            return
        mirror = self._mirrors.get(task_id)
        if mirror is None or mirror.context.get("record_lost"):  # (its end was the loss: _record_lost)
            return
        event = message.copy()
        kind = event.get("event")
        if kind == "progress":
            mirror.iteration, mirror.step, mirror.steps = event["iteration"], event["step"], event["steps"]
        elif kind == "started":
            mirror.status, mirror.started = Status.RUNNING, mirror.started or time.time()
        elif kind in ("done", "failed", "cancelled"):
            self.get(task_id)
            if mirror.context.get("record_lost"):  # (read now: its failure is its one final event)
                return
        mirror.emit(event)
