"""Several orchestrators sharing one job store and queue in Redis (issue 15, `kiln serve --redis URL`), on loopback:
a real redis-server (Debian's), real Tritons, orchestrators as processes of their own where one is killed. Every
accepted task is answered once, with the image of a single-process run of the same seed; any orchestrator answers
for any task; the queue bound and the rate limit count across orchestrators; Redis restarting is a 503, not a loss."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from kiln.triton_server import free_port
from orchestrator.pipeline import Pipeline, Txt2ImgRequest
from orchestrator.security import SecurityOptions
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.conftest import serve_process, start_triton

pytestmark = pytest.mark.slow
BODY = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "steps": 8, "sampler_name": "Euler",
        "cfg_scale": 7.0, "width": 64, "height": 64}
KILN = Path(sys.executable).parent / "kiln"


def orchestrator(folder: Path, tritons: list[str], redis_url: str, *flags: str):
    """`kiln serve` without a Triton of its own (--triton-url) on the shared store, as a process; yields (url, process)
    once it is ready."""
    port = free_port()
    command = [str(KILN), "serve", "--port", str(port), "--redis", redis_url, *flags]
    for url in tritons:
        command += ["--triton-url", url]
    return serve_process(command, port, folder / f"orchestrator-{port}.log", timeout_s=120)


def _image(state: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(state["result"]["images"][0]))))


def _expected(repo: Path, seeds) -> dict[int, np.ndarray]:
    local = Pipeline.from_repository(repo)
    return {seed: local.txt2img(Txt2ImgRequest(prompt=BODY["prompt"], negative_prompt=BODY["negative_prompt"],
                                               steps=8, sampler="Euler", cfg_scale=7.0, seed=seed, width=64,
                                               height=64)).images[0] for seed in seeds}


def _wait_done(url: str, ids: list[str], timeout_s: float = 400) -> dict[str, dict]:
    states, deadline = {}, time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=30) as client:
        while len(states) < len(ids) and time.monotonic() < deadline:
            for task_id in [i for i in ids if i not in states]:
                response = client.get(f"/v1/tasks/{task_id}")
                if response.status_code == 503:  # the job store reconnecting (Redis back but slow): ask again
                    assert "Redis" in response.json()["detail"], response.text
                    continue
                assert response.status_code == 200, response.text
                state = response.json()
                if state["status"] in ("done", "failed", "cancelled"):
                    states[task_id] = state
            time.sleep(0.5)
    assert len(states) == len(ids), f"{len(ids) - len(states)} tasks never finished"
    return states


def test_a_triton_and_an_orchestrator_killed_under_load_lose_nothing(plain_repo, redis_server, tmp_path):
    """40 tasks over two orchestrators and two Tritons; one Triton is killed, then one orchestrator (SIGKILL, with
    jobs running on it): every task is done once, with the single-process image of its seed."""
    tritons = [start_triton(plain_repo, tmp_path / f"triton-{name}.log") for name in "ab"]
    seeds = list(range(200, 240))
    try:
        urls = [t.grpc_url for t in tritons]
        with orchestrator(tmp_path, urls, redis_server.url, "--redis-lease", "3", "--workers", "4") as (a, a_proc), \
                orchestrator(tmp_path, urls, redis_server.url, "--redis-lease", "3", "--workers", "4") as (b, _):
            ids: dict[str, int] = {}
            with httpx.Client(timeout=30) as client:
                for index, seed in enumerate(seeds):
                    response = client.post((a, b)[index % 2] + "/v1/tasks/txt2img", json=BODY | {"seed": seed})
                    assert response.status_code == 202, response.text
                    ids[response.json()["id"]] = seed
                    if index == 8:
                        os.kill(tritons[0].pid, signal.SIGKILL)  # its jobs start again on the other Triton
            store = redis_server.client()
            deadline = time.monotonic() + 120
            while not _running_on(store, ids, a_proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _running_on(store, ids, a_proc.pid), "no job ran on the first orchestrator"
            a_proc.kill()  # with jobs running on it: claimed by b after the lease
            states = _wait_done(b, list(ids))
            expected = _expected(plain_repo, seeds)
            for task_id, seed in ids.items():
                assert states[task_id]["status"] == "done", states[task_id]
                assert np.array_equal(_image(states[task_id]), expected[seed]), seed
                assert store.hget(f"kiln:job:{task_id}", "completions") == b"1"  # no job ran twice to completion
            restarted = sum(int(store.hget(f"kiln:job:{i}", "restarts") or 0) for i in ids)
            assert restarted >= 1  # the killed orchestrator's running jobs, claimed by the other one
            assert store.zcard("kiln:queued") == 0 and store.zcard("kiln:running") == 0
    finally:
        for server in tritons:  # a killed one too: stop() ends its orphaned stubs
            server.stop()


def _running_on(store, ids, pid: int) -> bool:
    """Whether a job runs on the orchestrator of process `pid` (its name: host-pid-suffix)."""
    for task_id in ids:
        owner = store.hget(f"kiln:job:{task_id}", "owner")
        if owner and f"-{pid}-" in owner.decode() and store.zscore("kiln:running", task_id) is not None:
            return True
    return False


@pytest.fixture(scope="module")
def triton(plain_repo, tmp_path_factory):
    """One Triton of the plain tiny checkpoint, for the orchestrators in this process."""
    server = start_triton(plain_repo, tmp_path_factory.mktemp("triton") / "tritonserver.log")
    yield server
    server.stop()


@contextmanager
def apps(triton, redis_server, count: int = 2, **settings):
    """`count` orchestrators in this process on one Triton and the shared store."""
    started = []
    try:
        for _ in range(count):
            started.append(BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(),
                                                  redis_url=redis_server.url, **settings)))
        yield started
    finally:
        for app in started:
            app.stop()


@pytest.fixture
def two_apps(triton, redis_server):
    with apps(triton, redis_server, workers=2, max_queue=2) as both:
        yield both


def test_a_task_submitted_on_one_is_followed_and_cancelled_on_the_other(two_apps):
    from websockets.sync.client import connect

    a, b = two_apps
    with a.client() as ca, b.client() as cb:
        accepted = ca.post("/v1/tasks/txt2img", json=BODY | {"steps": 150, "seed": 5})
        assert accepted.status_code == 202, accepted.text
        task_id = accepted.json()["id"]
        assert cb.get(f"/v1/tasks/{task_id}").json()["status"] in ("queued", "running")
        with connect(b.url.replace("http", "ws") + f"/v1/tasks/{task_id}/events?preview_every=1") as socket:
            event = json.loads(socket.recv(timeout=30))
            assert event["event"] == "state"
            while event["event"] != "progress":
                event = json.loads(socket.recv(timeout=30))
            assert event["preview"]  # the latents of a job running anywhere
            assert cb.delete(f"/v1/tasks/{task_id}").status_code == 200
            while event["event"] != "cancelled":
                event = json.loads(socket.recv(timeout=30))
        assert ca.get(f"/v1/tasks/{task_id}").json()["status"] == "cancelled"
        assert cb.delete(f"/v1/tasks/{task_id}").status_code == 409  # finished, wherever it is asked


def test_synchronous_requests_are_answered_where_they_came_wherever_they_run(triton, plain_repo, redis_server):
    """Four /sdapi/v1/txt2img at once to one orchestrator: some of them run on the other one (two workers each)."""
    from concurrent.futures import ThreadPoolExecutor

    seeds = [31, 32, 33, 34]
    with apps(triton, redis_server, workers=2) as (a, _b):
        def send(seed: int) -> httpx.Response:
            with a.client() as client:
                return client.post("/sdapi/v1/txt2img", json=BODY | {"seed": seed})

        with ThreadPoolExecutor(4) as pool:
            answers = dict(zip(seeds, pool.map(send, seeds)))
    expected = _expected(plain_repo, seeds)
    for seed, response in answers.items():
        assert response.status_code == 200, response.text
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))
        assert np.array_equal(image, expected[seed]), seed
    store = redis_server.client()
    owners = {store.hget(f"kiln:job:{task_id.decode()}", "owner") for task_id in store.zrange("kiln:recent", 0, -1)}
    assert len(owners) == 2  # both orchestrators ran some


def test_the_queue_bound_holds_across_orchestrators(two_apps, redis_server):
    a, b = two_apps
    store = redis_server.client()
    with a.client() as ca, b.client() as cb:
        running = [c.post("/v1/tasks/txt2img", json=BODY | {"steps": 150}).json()["id"] for c in (ca, cb, ca, cb)]
        deadline = time.monotonic() + 60
        while store.zcard("kiln:running") < 4 and time.monotonic() < deadline:  # 2 workers on each
            time.sleep(0.05)
        queued = [c.post("/v1/tasks/txt2img", json=BODY | {"steps": 150}) for c in (ca, cb)]
        assert [r.status_code for r in queued] == [202, 202]
        assert queued[1].json()["queue_position"] == 2
        for client in (ca, cb):  # the shared bound (2 waiting), whichever orchestrator is asked
            full = client.post("/v1/tasks/txt2img", json=BODY)
            assert full.status_code == 429 and full.headers["retry-after"], full.text
        for task_id in running + [r.json()["id"] for r in queued]:
            ca.delete(f"/v1/tasks/{task_id}")


def test_the_rate_limit_counts_across_orchestrators(triton, redis_server):
    security = SecurityOptions(rate_limit_per_minute=3, redis_url=redis_server.url)
    with apps(triton, redis_server, security=security) as (a, b):
        codes = []
        for app in (a, b, a, b):
            with app.client() as client:
                response = client.post("/sdapi/v1/interrupt")
                codes.append(response.status_code)
        assert codes == [200, 200, 200, 429]
        assert int(response.headers["retry-after"]) >= 1


def test_redis_restarting_is_a_503_and_loses_no_acknowledged_job(triton, redis_server):
    with apps(triton, redis_server, count=1, workers=2) as (app,), app.client() as client:
        ids = [client.post("/v1/tasks/txt2img", json=BODY | {"seed": seed}).json()["id"] for seed in range(6)]
        redis_server.kill()  # mid-load: some running, some waiting in Redis
        down = client.post("/v1/tasks/txt2img", json=BODY)
        assert down.status_code == 503 and "Redis" in down.json()["detail"], down.text
        assert client.get(f"/v1/tasks/{ids[0]}").status_code == 503
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["job_store"] == "unreachable"
        time.sleep(1)
        redis_server.start()  # the same folder: what it acknowledged is on disk
        states = _wait_done(app.url, ids, timeout_s=120)
        assert all(state["status"] == "done" for state in states.values()), states
        assert client.get("/health/ready").status_code == 200


def test_a_job_this_version_cannot_read_fails_alone(triton, redis_server):
    """A stored job that does not unpickle here (another kiln version's, mid-upgrade; here: bytes that are no pickle)
    fails with its reason; the orchestrator goes on taking jobs."""
    store = redis_server.client()
    with apps(triton, redis_server, count=1, workers=1) as (app,), app.client() as client:
        state = {"status": "queued", "iteration": 0, "step": 0, "steps": 0, "n_iter": 1, "started": None,
                 "finished": None, "error": None, "error_type": None}
        store.hset("kiln:job:unreadable", mapping={"spec": b"not a pickle", "state": json.dumps(state)})
        store.zadd("kiln:queued", {"unreadable": 0})
        store.xadd("kiln:stream", {"id": "unreadable"})
        accepted = client.post("/v1/tasks/txt2img", json=BODY | {"seed": 3})
        assert accepted.status_code == 202, accepted.text
        assert _wait_done(app.url, [accepted.json()["id"]], timeout_s=60)[accepted.json()["id"]]["status"] == "done"
        stored = json.loads(store.hget("kiln:job:unreadable", "state"))
        assert stored["status"] == "failed" and "cannot read the job" in stored["error"], stored
        assert store.zcard("kiln:queued") == 0 and store.xlen("kiln:stream") == 0  # acknowledged, not retried


def test_tasks_whose_records_redis_lost_fail_and_their_socket_ends(triton, redis_server):
    """Redis restarted without its data (here: flushed) under a running task and a queued one: each fails naming the
    loss (nothing could follow or answer them: a socket on one waited for ever), the running one stops, and the
    orchestrator goes on taking jobs (new ids: the lost one's stays taken until what its run wrote expires)."""
    from websockets.sync.client import connect

    store = redis_server.client()
    with apps(triton, redis_server, count=1, workers=1) as (app,), app.client() as client:
        running = client.post("/v1/tasks/txt2img", json=BODY | {"steps": 150}).json()["id"]
        queued = client.post("/v1/tasks/txt2img", json=BODY | {"steps": 150, "seed": 2}).json()["id"]
        with connect(app.url.replace("http", "ws") + f"/v1/tasks/{running}/events") as socket:
            event = json.loads(socket.recv(timeout=30))
            while event["event"] != "progress":
                event = json.loads(socket.recv(timeout=30))
            store.flushall()
            while event["event"] not in ("done", "failed", "cancelled"):
                event = json.loads(socket.recv(timeout=30))
        assert event["event"] == "failed" and "lost task" in event["error"], event
        for task_id in (running, queued):
            state = client.get(f"/v1/tasks/{task_id}").json()
            assert state["status"] == "failed" and f"lost task {task_id}" in state["error"], state
        deadline = time.monotonic() + 30  # the running one stopped: its end, written where its steps rewrote a state
        while b"cancelled" not in (store.hget(f"kiln:job:{running}", "state") or b"") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert json.loads(store.hget(f"kiln:job:{running}", "state"))["status"] == "cancelled"
        # its id stays taken (what its run wrote on after the loss expires with its end: a run still going could
        # otherwise write into a new job of that id); a new task runs
        assert client.post("/v1/tasks/txt2img", json=BODY | {"force_task_id": running}).status_code == 422
        after = client.post("/v1/tasks/txt2img", json=BODY | {"seed": 4})
        assert after.status_code == 202, after.text
        assert _wait_done(app.url, [after.json()["id"]], timeout_s=120)[after.json()["id"]]["status"] == "done"


def test_a_scripts_cells_go_through_the_shared_queue_and_an_interrupt_ends_them(triton, redis_server):
    """An X/Y/Z plot's four cells submitted to the job store (off the event loop: round trips to Redis), one worker:
    an interrupt during the first cell's steps ends the script, its three waiting cells never run (as with a local
    queue: test_script_interrupt)."""
    from tests.test_script_interrupt import LONG, interrupted

    plot = LONG | {"script_name": "x/y/z plot", "script_args": ["Seed", "1, 2, 3, 4", None, "Nothing", "", None,
                                                                "Nothing", "", None, False, True]}
    with apps(triton, redis_server, count=1, workers=1) as (app,), app.client() as client:
        images, info, _tasks = interrupted(client, "/sdapi/v1/txt2img", plot)
        assert info["xyz"]["cells"] == 4 and info["xyz"]["done"] == 1 and info["xyz"]["interrupted"] == 3, info["xyz"]
        assert info["interrupted"] is True and len(images) == 2
