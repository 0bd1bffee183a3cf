"""Several Tritons behind one service (issue 15, `kiln serve --triton-url A --triton-url B`), on loopback: two real
Triton processes of the same repository, one killed (SIGKILL) under load. Every accepted request is answered once,
with the image of a single-process run of the same seed, and no run completes twice."""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from kiln.triton_server import free_port
from orchestrator.engine import Engine, EngineOptions
from orchestrator.metrics import Metrics, read_metric
from orchestrator.pipeline import Pipeline, Txt2ImgRequest
from orchestrator.replicas import Replicas
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.conftest import start_triton

pytestmark = pytest.mark.slow
BODY = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "steps": 8, "sampler_name": "Euler",
        "cfg_scale": 7.0, "width": 64, "height": 64}


@pytest.fixture
def two_tritons(plain_repo, tmp_path):
    servers = [start_triton(plain_repo, tmp_path / f"triton-{name}.log") for name in "ab"]
    yield servers
    for server in servers:  # a killed one too: stop() ends its orphaned stubs
        server.stop()


def _image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))


def test_a_triton_killed_under_load_loses_nothing(two_tritons, plain_repo):
    first, second = two_tritons
    api = BackgroundAPI(Settings(triton_url=first.grpc_url, replica_urls=(second.grpc_url,), port=free_port(),
                                 workers=8))
    seeds = list(range(100, 112))
    answers: dict[int, httpx.Response] = {}

    def send(seed: int) -> None:
        with httpx.Client(base_url=api.url, timeout=300) as client:
            answers[seed] = client.post("/sdapi/v1/txt2img", json=BODY | {"seed": seed})

    try:
        with api.client() as client:  # both ready, and said so
            ready = client.get("/health/ready").json()
            assert ready["replicas"] == {first.grpc_url: "ready", second.grpc_url: "ready"}, ready
        threads = [threading.Thread(target=send, args=(seed,)) for seed in seeds]
        for thread in threads:
            thread.start()
        engine = api.app.state.engine
        deadline = time.monotonic() + 120
        while not (engine.replicas.all[0].jobs and engine.replicas.all[1].jobs) and time.monotonic() < deadline:
            time.sleep(0.02)  # jobs running on both Tritons
        assert engine.replicas.all[0].jobs and engine.replicas.all[1].jobs, "the jobs did not spread over both"
        regions = first.shared_memory_regions()  # its Python backend's, in /dev/shm under its own prefix
        assert regions and not set(regions) & set(second.shared_memory_regions())
        os.kill(first.pid, signal.SIGKILL)  # mid-denoising: its jobs must start again on the other one
        for thread in threads:
            thread.join(300)
        assert set(regions) <= set(first.shared_memory_regions())  # what a killed Triton leaves in memory...
        first.stop()
        assert not first.shared_memory_regions() and second.shared_memory_regions()  # ...until stop() removes it
        local = Pipeline.from_repository(plain_repo)
        for seed in seeds:
            expected = local.txt2img(Txt2ImgRequest(prompt=BODY["prompt"], negative_prompt=BODY["negative_prompt"],
                                                    steps=8, sampler="Euler", cfg_scale=7.0, seed=seed, width=64,
                                                    height=64)).images[0]
            assert np.array_equal(_image(answers[seed]), expected), seed
        with api.client() as client:
            metrics = client.get("/metrics").text
            ready = client.get("/health/ready")
        assert read_metric(metrics, "kiln_images_total") == len(seeds)  # every run completed once
        assert f'kiln_triton_replica_up{{replica="{first.grpc_url}"}} 0.0' in metrics
        assert ready.status_code == 200 and ready.json()["replicas"][first.grpc_url] == "not ready"
    finally:
        api.stop()


def test_jobs_go_where_the_triton_is_up_and_none_is_a_503(two_tritons):
    """A replica that is down is skipped; when none serves, a submission is a ServerError (503), not a hang."""
    from kiln.errors import ServerError

    first, second = two_tritons
    engine = Engine(EngineOptions(triton_url=first.grpc_url, replica_urls=(second.grpc_url,), workers=2,
                                  replica_check_s=0.2), Metrics())
    try:
        request = Txt2ImgRequest(prompt="a cat", steps=2, seed=1, width=64, height=64)
        assert engine.submit("txt2img", request).future.result(60).error is None
        second.stop()
        deadline = time.monotonic() + 10
        while engine.replicas.all[1].up and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.replicas.all[1].up
        for _ in range(3):
            job = engine.submit("txt2img", request).future.result(60)
            assert job.error is None
        first.stop()
        with pytest.raises(ServerError):
            job = engine.submit("txt2img", request).future.result(60)
            raise job.error
    finally:
        engine.close(5)


def test_replica_choice_is_the_least_busy_one_that_is_up():
    class Fake:
        def __init__(self, checkpoints):
            self._known = checkpoints

        def known(self):
            return self._known

        def close(self):
            pass

    from orchestrator.batching import StepBatcher
    from orchestrator.replicas import Replica

    a, b = (Replica(url, Fake({"": None}), StepBatcher()) for url in ("a:1", "b:1"))
    replicas = Replicas([a, b], probe=lambda url: url != "b:1", every_s=3600)
    try:
        a.jobs = 2
        assert replicas.pick("") is b  # fewer jobs
        replicas.check(b)
        assert replicas.pick("") is a and replicas.primary is a  # b is down now
        with pytest.raises(Exception, match="no Triton replica that serves checkpoint 'other'"):
            replicas.pick("other")
    finally:
        replicas.close()


def test_the_replica_benchmark_splits_the_cores_between_its_tritons(plain_repo, tmp_path):
    """`kiln bench serve --replicas 2` serves the same artifacts (linked) with each runtime's threads set."""
    from benchmarks.replicas import threaded_repository
    from kiln.model_config import read_parameters

    copy = threaded_repository(plain_repo, tmp_path / "repo-threads-1", 1)
    unet = copy / "sd_unet"
    assert read_parameters(unet / "config.pbtxt")[0]["threads"] == "1"
    assert read_parameters(plain_repo / "sd_unet" / "config.pbtxt")[0]["threads"] == "0"  # the original is untouched
    artifact = unet / "1"
    assert artifact.is_symlink() and artifact.resolve() == (plain_repo / "sd_unet" / "1").resolve()
    assert {p.name for p in copy.iterdir()} == {p.name for p in plain_repo.iterdir() if (p / "config.pbtxt").exists()}
