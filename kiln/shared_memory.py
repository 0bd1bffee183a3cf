"""Triton's system shared memory for the tensors of one thread's calls, when Triton shares this host.

A denoising step sends the latents and text embeddings to sd_unet and reads noise_pred back: at SD 1.5's 512x512
with classifier-free guidance about 0.7 MB each way, which gRPC serializes, copies and parses in about 3 ms, and
shared memory moves in about 1 ms (../shared/ENVIRONMENT.md). Each thread gets two regions (inputs, outputs),
created and registered with Triton on first use and grown when a call needs more; the client unregisters and
removes them all when it closes (and at exit). When Triton cannot map them (it runs on another host, or in a
container without --ipc=host) the first registration fails and the client keeps to the network for good.
"""

from __future__ import annotations

import itertools
import os
import threading

import numpy as np

from kiln.errors import Unreachable, first_line, is_unreachable

_COUNTER = itertools.count()


class Unavailable(Exception):
    """Triton could not map this process's shared memory."""


class Region:
    """One POSIX shared-memory region registered with one Triton."""

    def __init__(self, connection, byte_size: int) -> None:
        import tritonclient.utils.shared_memory as shm

        self.name = f"kiln-{os.getpid()}-{next(_COUNTER)}"
        self.byte_size = byte_size
        self._connection = connection
        self._closed = False
        self.handle = shm.create_shared_memory_region(self.name, f"/{self.name}", byte_size)
        try:
            self.register()
        except Exception as exc:  # noqa: BLE001 - any refusal means: no shared memory with this Triton
            shm.destroy_shared_memory_region(self.handle)
            if is_unreachable(str(exc)):  # not a refusal: Triton was not reached (down, or reconnecting)
                raise Unreachable(f"cannot reach Triton to register a region: {first_line(exc)}") from None
            raise Unavailable(str(exc)) from None

    def register(self) -> None:
        """Tell Triton about the region (again, after Triton restarted and forgot it)."""
        self._connection.register_system_shared_memory(self.name, f"/{self.name}", self.byte_size,
                                                       client_timeout=10)

    def close(self) -> None:
        import tritonclient.utils.shared_memory as shm

        if self._closed:
            return
        self._closed = True
        try:
            self._connection.unregister_system_shared_memory(self.name, client_timeout=2)
        except Exception:  # noqa: BLE001 - Triton gone or restarted: it holds nothing of ours any more
            pass
        shm.destroy_shared_memory_region(self.handle)


class ThreadRegions:
    """A thread's input and output regions, each grown to the largest call so far (twice what is asked, so that a
    growing batch does not re-register every step)."""

    def __init__(self, connection, registry: Registry) -> None:
        self._connection = connection
        self._registry = registry  # the client's: it closes every region still open
        self.regions: dict[str, Region] = {}

    def region(self, kind: str, byte_size: int) -> Region:
        current = self.regions.get(kind)
        if current is not None and current.byte_size >= byte_size:
            return current
        if current is not None:
            self._registry.discard(current)
            current.close()
        region = Region(self._connection, max(byte_size * 2, 1 << 16))
        self.regions[kind] = region
        self._registry.add(region)
        return region

    def register_again(self) -> None:
        for region in self.regions.values():
            region.register()

    def write_inputs(self, arrays: list[np.ndarray]) -> tuple[Region, list[int]]:
        """Copy `arrays` into the input region back to back; their offsets."""
        import tritonclient.utils.shared_memory as shm

        offsets = list(itertools.accumulate((a.nbytes for a in arrays[:-1]), initial=0))
        region = self.region("in", max(1, sum(a.nbytes for a in arrays)))
        shm.set_shared_memory_region(region.handle, arrays)
        return region, offsets


class Registry:
    """Every region a client made, for closing; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: list[Region] = []

    def add(self, region: Region) -> None:
        with self._lock:
            self._regions.append(region)

    def discard(self, region: Region) -> None:
        with self._lock:
            self._regions = [r for r in self._regions if r is not region]

    @property
    def names(self) -> set[str]:
        with self._lock:
            return {r.name for r in self._regions}

    def close(self) -> None:
        with self._lock:
            regions, self._regions = self._regions, []
        for region in regions:
            region.close()
