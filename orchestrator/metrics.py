"""Prometheus metrics of the API service (one registry per service, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def read_metric(text: str, name: str) -> float | None:
    """The value of an unlabelled sample `name` in Prometheus text (what /metrics returns), or None."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("kiln_queue_depth", "Generation jobs waiting for a worker", registry=r)
        self.queue_wait_seconds = Histogram("kiln_queue_wait_seconds", "From a job's submission to its start",
                                            buckets=WAIT_BUCKETS, registry=r)
        self.running_jobs = Gauge("kiln_running_jobs", "Generation jobs being worked on", registry=r)
        self.denoising_jobs = Gauge("kiln_denoising_jobs",
                                    "Jobs inside their denoising loop (step-batching participants)",
                                    registry=r)
        self.unet_batch_rows = Histogram("kiln_unet_batch_rows",
                                         "Rows per UNet call sent to Triton (after step batching)",
                                         buckets=ROW_BUCKETS, registry=r)
        self.active_batch_rows = Gauge("kiln_unet_active_batch_rows", "Rows of the latest UNet call", registry=r)
        self.unet_seconds = Histogram("kiln_unet_call_seconds", "Latency of one (merged) UNet call to Triton",
                                      buckets=STEP_BUCKETS, registry=r)
        self.step_seconds = Histogram("kiln_step_seconds", "Wall time of one denoising step of one job",
                                      buckets=STEP_BUCKETS, registry=r)
        self.requests = Counter("kiln_requests_total", "API requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.images = Counter("kiln_images_total", "Images generated", registry=r)
        self.replica_seconds = Histogram("kiln_triton_unet_call_seconds", "UNet call latency per Triton replica",
                                         ["replica"], buckets=STEP_BUCKETS, registry=r)
        self.replica_up = Gauge("kiln_triton_replica_up", "Whether a Triton replica was ready at its last probe",
                                ["replica"], registry=r)

    def unet_batch(self, rows: int, seconds: float, replica: str = "") -> None:
        self.unet_batch_rows.observe(rows)
        self.active_batch_rows.set(rows)
        self.unet_seconds.observe(seconds)
        if replica:
            self.replica_seconds.labels(replica=replica).observe(seconds)

    def replica_state(self, replica: str, up: bool) -> None:
        self.replica_up.labels(replica=replica).set(1 if up else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
