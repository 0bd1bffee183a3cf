"""The checkpoints a service runs on: one pipeline per checkpoint Triton serves, picked by a request's name, and,
when `kiln serve` controls Triton's models (`--max-checkpoints`, `--checkpoint-memory-gb`), checkpoints loaded on
demand and the least recently used idle ones unloaded to stay within the budget.

Model control reads the repository's files (it runs beside the Triton `kiln serve` started): every `*sd_unet`
folder is a checkpoint (kiln.contract.SDModels), its contract read from its config, its size the size of its
models' files. A checkpoint is loaded (its models through Triton's repository API, the ensembles last) before the
first job that names it is queued; a job whose checkpoint was unloaded while it waited loads it again when it
starts, saying so in its progress events.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kiln.contract import CHECKPOINT_SEPARATOR, SD_UNET, SDContract, SDModels, base_name, read_sd_contract
from kiln.errors import InputError, KilnError, NotFoundError
from kiln.triton_client import TritonClient
from orchestrator.pipeline import Pipeline

log = logging.getLogger("kiln.checkpoints")
GB = 2**30
LOAD_THREADS = 4  # Triton's own default --model-load-thread-count


def repository_checkpoints(repository: Path) -> dict[str, SDContract]:
    """{checkpoint: contract} of every SD build in the repository, the default one first."""
    found = [SDModels.of(folder.name) for folder in Path(repository).glob(f"*{SD_UNET}")
             if base_name(folder.name) == SD_UNET and (folder / "config.pbtxt").is_file()]
    found.sort(key=lambda models: models.checkpoint)  # "" (the default) sorts first
    return {models.checkpoint: read_sd_contract(repository, models) for models in found}


def checkpoint_models(repository: Path, checkpoint: str) -> list[str]:
    """The Triton models of a checkpoint's build, those that serve artifacts first and the ensembles last."""
    def belongs(name: str) -> bool:
        if checkpoint:
            return name.startswith(checkpoint + CHECKPOINT_SEPARATOR)
        return name.startswith("sd_") and CHECKPOINT_SEPARATOR not in name

    folders = [f for f in Path(repository).iterdir() if f.is_dir() and belongs(f.name)
               and (f / "config.pbtxt").is_file()]
    return [f.name for f in sorted(folders, key=lambda f: (_is_ensemble(f), f.name))]


def _is_ensemble(folder: Path) -> bool:
    return 'platform: "ensemble"' in (Path(folder) / "config.pbtxt").read_text()


def checkpoint_bytes(repository: Path, checkpoint: str) -> int:
    """What a checkpoint's models hold on disk: about what loading them takes in memory."""
    return sum(path.stat().st_size for name in checkpoint_models(repository, checkpoint)
               for path in (Path(repository) / name).rglob("*") if path.is_file())


@dataclass(frozen=True)
class ModelControl:
    """Triton's explicit model control over a local repository: at most `max_loaded` checkpoints loaded at once
    (0: any number) and at most `budget_bytes` of their models (0: no byte budget)."""

    repository: Path
    triton_url: str
    max_loaded: int = 0
    budget_bytes: int = 0

    def startup_models(self) -> tuple[str, ...]:
        """What Triton loads at start: every model that belongs to no checkpoint (the ViT, the upscalers) and the
        default checkpoint (the first, where the repository has no unnamed one)."""
        checkpoints = repository_checkpoints(self.repository)
        first = next(iter(checkpoints), None)
        others = [f.name for f in Path(self.repository).iterdir() if (f / "config.pbtxt").is_file()
                  and not f.name.startswith("sd_") and CHECKPOINT_SEPARATOR not in f.name]
        return tuple(sorted(others)) + (tuple(checkpoint_models(self.repository, first)) if first is not None else ())


class Checkpoints:
    """The pipelines of the served checkpoints, by checkpoint name ("": the repository's default), connected on
    first use (the service starts before Triton is up). `connect` gives the pipelines Triton serves now; with
    `control`, `connect_one` connects a checkpoint once its models are loaded."""

    def __init__(self, connect: Callable[[], Pipeline | Mapping[str, Pipeline]],
                 connect_one: Callable[[SDModels], Pipeline] | None = None, control: ModelControl | None = None,
                 busy: Callable[[], Iterable[str]] = tuple) -> None:
        self._connect, self._connect_one, self.control, self._busy = connect, connect_one, control, busy
        self._pipelines: dict[str, Pipeline] | None = None
        self._lock = threading.Lock()  # the pipelines dict
        self._loading = threading.Lock()  # one load (and its unloads) at a time
        self._used: OrderedDict[str, None] = OrderedDict()  # loaded checkpoints, least recently used first
        self._built: dict[str, SDContract] | None = None  # the repository's checkpoints, read again on refresh
        self._client = TritonClient(control.triton_url, "grpc", timeout_s=600) if control is not None else None

    def pipelines(self) -> dict[str, Pipeline]:
        """The connected pipelines (with model control: those of the loaded checkpoints)."""
        with self._lock:
            if self._pipelines is None:
                connected = self._connect()
                self._pipelines = dict(connected) if isinstance(connected, Mapping) else {"": connected}
                self._used.update((key, None) for key in self._pipelines)
            return self._pipelines

    def known(self) -> dict[str, SDContract]:
        """Every checkpoint a request may name: the connected ones and, with model control, the repository's."""
        known = {key: pipeline.contract for key, pipeline in self.pipelines().items()}
        if self.control is not None:
            if self._built is None:  # read once, not per request
                self._built = repository_checkpoints(self.control.repository)
            known = self._built | known
        return known

    def resolve(self, name: str | None = None, what: str = "sd_model_checkpoint") -> str:
        """The checkpoint a client's name picks (AUTOMATIC1111's sd_model_checkpoint: a title "name [hash]", a
        name, or a build's checkpoint name; None or "": the default); InputError listing what is served."""
        known = self.known()
        if not name:
            return next(iter(known))
        wanted = name.strip()
        for key, contract in known.items():
            if wanted in (contract.title, contract.model_name) or (key and wanted == key):
                return key
        titles = ", ".join(repr(contract.title) for contract in known.values())
        raise InputError(f"{what} {name!r}: no such model; this server serves {titles}")  # a 422, as a bad field

    def get(self, key: str, on_load: Callable[[], None] | None = None) -> Pipeline:
        """The checkpoint's pipeline, its models loaded first where model control unloaded them (`on_load` is
        called before a load starts)."""
        pipelines = self.pipelines()
        if key in pipelines:
            self._touch(key)
            return pipelines[key]
        if self.control is None or self._connect_one is None:
            raise NotFoundError(f"checkpoint {key!r} is no longer served")
        with self._loading:
            if key in self.pipelines():
                return self.pipelines()[key]
            if on_load is not None:
                on_load()
            self._load(key)
            pipeline = self._connect_one(SDModels(key))
            with self._lock:
                self._pipelines[key] = pipeline
            self._touch(key)
            return pipeline

    def check_together(self, keys: Sequence[str], what: str) -> None:
        """InputError (a 422) where model control can never hold `keys` loaded at once: a refiner and the checkpoint
        it finishes run side by side, so a pair over --max-checkpoints or the byte budget is refused before the
        refiner loads (the API has loaded the request's own checkpoint by then, as for any request), not loaded past
        the budget."""
        control, keys = self.control, list(dict.fromkeys(keys))
        if control is None or len(keys) < 2:
            return
        names = " and ".join(repr(key or "default") for key in keys)
        if control.max_loaded and len(keys) > control.max_loaded:
            raise InputError(f"{what}: {names} run loaded together, and this server loads at most "
                             f"{control.max_loaded} checkpoint{'s' if control.max_loaded > 1 else ''} at once "
                             "(kiln serve --max-checkpoints)")
        total = sum(checkpoint_bytes(control.repository, key) for key in keys) if control.budget_bytes else 0
        if total > control.budget_bytes:
            raise InputError(f"{what}: {names} run loaded together and take {total / GB:.2f} GB, over the memory "
                             f"budget of {control.budget_bytes / GB:.2f} GB (kiln serve --checkpoint-memory-gb)")

    def _touch(self, key: str) -> None:
        with self._lock:
            self._used[key] = None
            self._used.move_to_end(key)

    def _load(self, key: str) -> None:
        control = self.control
        size = checkpoint_bytes(control.repository, key)
        if control.budget_bytes and size > control.budget_bytes:
            raise InputError(f"checkpoint {key or 'default'!r} takes {size / GB:.2f} GB, over the memory budget of "
                             f"{control.budget_bytes / GB:.2f} GB (kiln serve --checkpoint-memory-gb)")
        busy = set(self._busy())
        sizes = {k: checkpoint_bytes(control.repository, k) for k in self._used} if control.budget_bytes else {}
        for victim in list(self._used):
            loaded = [k for k in self._used if k in (self._pipelines or {})]
            used = sum(sizes.get(k, 0) for k in loaded)
            over_count = control.max_loaded and len(loaded) >= control.max_loaded
            over_bytes = control.budget_bytes and used + size > control.budget_bytes
            if not (over_count or over_bytes):
                break
            if victim in busy or victim == key:
                continue
            self.unload(victim)
        log.info("loading checkpoint %r (%.2f GB)", key, size / GB)
        models = checkpoint_models(control.repository, key)
        ensembles = [m for m in models if _is_ensemble(Path(control.repository) / m)]
        try:
            with ThreadPoolExecutor(LOAD_THREADS) as pool:  # each model's Python-backend stub starts in parallel
                list(pool.map(self._client.load_model, [m for m in models if m not in ensembles]))
            for model in ensembles:  # once what they call is there
                self._client.load_model(model)
        except KilnError:  # Triton's reason is in the message; what did load goes again, the others serve on
            for model in reversed(models):
                if self._client.is_model_ready(model):
                    self._client.unload_model(model)
            raise

    def unload(self, key: str) -> None:
        """Unload a checkpoint's models from Triton (ensembles first) and drop its pipeline."""
        with self._lock:
            pipeline = (self._pipelines or {}).pop(key, None)
            self._used.pop(key, None)
        if pipeline is not None:
            pipeline.close()
        log.info("unloading checkpoint %r", key)
        for model in reversed(checkpoint_models(self.control.repository, key)):
            self._client.unload_model(model)

    def unload_idle(self) -> list[str]:
        """AUTOMATIC1111's unload-checkpoint: every loaded checkpoint no job is using is unloaded."""
        if self.control is None:
            raise InputError("unload-checkpoint: this server does not control Triton's models (start it with "
                             "kiln serve --max-checkpoints or --checkpoint-memory-gb)")
        busy = set(self._busy())
        with self._loading:
            idle = [key for key in list(self.pipelines()) if key not in busy]
            for key in idle:
                self.unload(key)
        return idle

    def refresh(self) -> None:
        """Discover the served checkpoints again: new ones are connected, those gone are dropped, the others keep
        their pipelines (and the jobs running on them)."""
        with self._lock:
            self._built = None
            if self._pipelines is None:
                return
        connected = self._connect()
        fresh = dict(connected) if isinstance(connected, Mapping) else {"": connected}
        with self._lock:
            for key, pipeline in fresh.items():
                if key in self._pipelines:
                    pipeline.close()  # the one already served stays
            self._pipelines = {key: self._pipelines.get(key, pipeline) for key, pipeline in fresh.items()}

    def close(self) -> None:
        with self._lock:
            for pipeline in (self._pipelines or {}).values():
                pipeline.close()
        if self._client is not None:
            self._client.close()
