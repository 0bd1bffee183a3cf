"""Several Triton endpoints behind one engine (`kiln serve --triton-url A --triton-url B ...`).

Each replica has its own checkpoints' pipelines (connected lazily) and its own step batcher: a tick waits only for
the jobs denoising on that Triton, and one Triton's calls are never sent to another. A job runs on the replica that is
up, serves its checkpoint and runs the fewest jobs; when its Triton fails under it (an error that leaves the replica
not ready), the job's unfinished run starts again on another replica (same seeds: the same image) and the client
sees one answer. A watcher probes every replica's readiness every few seconds (only with more than one), so a
replica that went away is skipped and one that came back is used again.

One Triton reached through a name that resolves to several (`--triton-url dns:///triton-headless:8001`) is the other
way: gRPC itself spreads each call over the addresses (kiln.triton_client.GRPC_CHANNEL_ARGS), with no per-job
placement.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kiln.errors import KilnError, ServerError
from orchestrator.batching import StepBatcher
from orchestrator.checkpoints import Checkpoints

log = logging.getLogger("kiln.replicas")


@dataclass(eq=False)
class Replica:
    url: str  # its Triton's gRPC address
    checkpoints: Checkpoints
    batcher: StepBatcher
    up: bool = True  # ready at the last probe (or not probed yet)
    jobs: int = 0  # jobs running on it now


def triton_ready(url: str) -> bool:
    """Whether the Triton at `url` answers ready within 2 s."""
    from kiln.triton_client import TritonClient

    try:
        return TritonClient(url, "grpc", timeout_s=2).is_server_ready()
    except KilnError:
        return False


class Replicas:
    def __init__(self, replicas: list[Replica], probe: Callable[[str], bool] = triton_ready, every_s: float = 2.0,
                 on_state: Callable[[str, bool], None] | None = None) -> None:
        self.all = replicas
        self._probe, self._every_s, self._on_state = probe, every_s, on_state or (lambda _url, _up: None)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher = None
        for replica in replicas:
            self._on_state(replica.url, replica.up)
        if len(replicas) > 1:
            self._watcher = threading.Thread(target=self._watch, name="kiln-replicas", daemon=True)
            self._watcher.start()

    @property
    def primary(self) -> Replica:
        """What listings and checks read: the first replica that is up (the first one when none is)."""
        return next((r for r in self.all if r.up), self.all[0])

    def check(self, replica: Replica) -> bool:
        """Probe one replica now; its state, as recorded."""
        up = self._probe(replica.url)
        if up != replica.up:
            log.warning("Triton %s is %s", replica.url, "ready again" if up else "not ready: its jobs go elsewhere")
        replica.up = up
        self._on_state(replica.url, up)
        return up

    def pick(self, checkpoint: str, exclude: tuple[Replica, ...] = ()) -> Replica:
        """The replica a job of `checkpoint` runs on: up, serving it, with the fewest jobs; a ServerError when none
        is."""
        alone = len(self.all) == 1  # one Triton: its own errors, as they come
        candidates = [r for r in self.all if (r.up or alone) and r not in exclude]
        with self._lock:
            candidates.sort(key=lambda r: r.jobs)
        for replica in candidates:
            try:
                if checkpoint in replica.checkpoints.known():
                    return replica
            except KilnError:  # cannot connect: not a candidate now
                if alone:
                    raise
                self.check(replica)
        tried = ", ".join(r.url for r in exclude)
        raise ServerError(f"no Triton replica that serves checkpoint {checkpoint or 'default'!r} is ready"
                          + (f" (failed: {tried})" if tried else ""))

    @contextmanager
    def running(self, replica: Replica) -> Iterator[Replica]:
        with self._lock:
            replica.jobs += 1
        try:
            yield replica
        finally:
            with self._lock:
                replica.jobs -= 1

    def failed(self, replica: Replica, error: ServerError, others_tried: tuple[Replica, ...]) -> bool:
        """Whether a job whose run failed with `error` on `replica` should run again elsewhere: the replica is not
        ready now (probed) and another one is."""
        if len(self.all) == 1 or self.check(replica):
            return False  # one Triton, or it is fine: the error is the request's, as with one Triton
        log.warning("Triton %s failed under a job (%s): running it again on another replica", replica.url, error)
        return any(r.up for r in self.all if r is not replica and r not in others_tried)

    def _watch(self) -> None:
        while not self._stop.wait(self._every_s):
            for replica in self.all:
                self.check(replica)

    def close(self) -> None:
        self._stop.set()
        for replica in self.all:
            replica.batcher.close()
            replica.checkpoints.close()
