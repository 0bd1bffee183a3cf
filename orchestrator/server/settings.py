"""The service's one settings object: what `kiln serve` flags (and tests) configure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.checkpoints import ModelControl
from orchestrator.engine import EngineOptions
from orchestrator.pipeline import Limits
from orchestrator.security import SecurityOptions


@dataclass
class Settings:
    triton_url: str = "127.0.0.1:8001"  # the Triton (gRPC) that runs every model
    replica_urls: tuple[str, ...] = ()  # more Tritons serving the same repository (orchestrator.replicas)
    # The job store and queue shared by several orchestrators (kiln serve --redis; orchestrator.shared), and the
    # lease after which an orchestrator's running jobs are claimed by another; "": this process's own queue
    redis_url: str = ""
    lease_s: float = 15.0
    max_queue: int = 64  # jobs waiting beyond the running ones; more is 429
    workers: int = 16  # generations running at once
    step_batching: bool = True  # merge the UNet steps of concurrent generations
    max_batch_rows: int = 0  # rows per merged UNet call; 0: the model's max batch size
    shared_memory: str = "auto"  # denoising steps through Triton's shared memory: auto, on, off
    request_timeout_s: float = 600.0  # a synchronous generation past this is a 504 (and cancelled)
    # SIGTERM's drain: open requests and queued jobs get this long to finish, then what is left is cancelled (5 s more
    # to stop); a Kubernetes pod's terminationGracePeriodSeconds should be at least this + 10
    drain_timeout_s: float = 60.0
    limits: Limits = field(default_factory=Limits)  # what one request may ask for (the CLI and library share them)
    cors_origins: tuple[str, ...] = ()  # browsers' origins allowed to call the API; none by default
    security: SecurityOptions = field(default_factory=SecurityOptions)  # auth, rate limit, body cap
    listen: str = "127.0.0.1"  # bind address; off loopback, auth is required
    port: int = 7860
    styles_file: Path | None = None  # AUTOMATIC1111's styles.csv: what a request's `styles` names (none: no styles)
    outputs_dir: Path = Path("outputs")  # where save_images writes (txt2img-images/<date>/, img2img-images/<date>/)
    embeddings_dir: Path | None = None  # textual-inversion embeddings prompts may name by file stem (none: none)
    loras_dir: Path | None = None  # LoRA files prompts may name in <lora:name:multiplier> tags (none: none)
    # Triton's models loaded on demand under a budget (kiln serve --max-checkpoints / --checkpoint-memory-gb; the
    # Triton started with explicit model control); None: every checkpoint Triton serves stays loaded
    model_control: ModelControl | None = None
    # What refresh-checkpoints runs first under model control: the checkpoints folder built into the repository
    # (kiln serve --checkpoints; build.sd.folder.sync_checkpoints, handed in: the service never imports the build)
    sync_checkpoints: Callable[[], list] | None = None

    @property
    def triton_urls(self) -> tuple[str, ...]:
        return (self.triton_url, *self.replica_urls)

    def engine_options(self) -> EngineOptions:
        return EngineOptions(triton_url=self.triton_url, replica_urls=self.replica_urls, max_queue=self.max_queue,
                             workers=self.workers, step_batching=self.step_batching,
                             max_batch_rows=self.max_batch_rows, limits=self.limits, shared_memory=self.shared_memory,
                             redis_url=self.redis_url, lease_s=self.lease_s)
