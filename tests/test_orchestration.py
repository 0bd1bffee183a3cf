"""What an orchestrator (Kubernetes, a load balancer, Prometheus) needs from the service (issue 15): readiness that
reflects what Triton serves (a ViT-only Triton is a ready classification service), /metrics with a token of its
own, a drain bounded by a setting, and gRPC channels to Triton set in one place (keepalive, message sizes,
round-robin over every address of a `dns:///` name). Real Triton servers and real HTTP, on loopback."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from kiln.errors import KilnError, ServerError
from kiln.triton_client import GRPC_CHANNEL_ARGS, TritonClient, _is_local
from kiln.triton_server import free_port
from orchestrator.security import SecurityOptions
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.conftest import start_triton


@pytest.fixture(scope="module")
def vit_triton(vit_repo, tmp_path_factory):
    """A Triton serving the ViT alone."""
    server = start_triton(vit_repo, tmp_path_factory.mktemp("vit_triton") / "tritonserver.log")
    yield server
    server.stop()


def _api(triton_url: str, **settings) -> BackgroundAPI:
    return BackgroundAPI(Settings(triton_url=triton_url, port=free_port(), **settings))


def test_a_vit_only_triton_is_ready(vit_triton):
    api = _api(vit_triton.grpc_url)
    try:
        with api.client() as client:
            answer = client.get("/health/ready")
        assert answer.status_code == 200, answer.text
        assert answer.json()["vit"] is True and answer.json()["checkpoints"] == []
    finally:
        api.stop()


def test_readiness_names_what_is_served(triton):
    api = _api(triton.grpc_url)
    try:
        with api.client() as client:
            body = client.get("/health/ready").json()
        assert body["status"] == "ready" and body["vit"] is True and body["checkpoints"] == ["default"]
    finally:
        api.stop()


def test_a_triton_that_is_gone_is_not_ready():
    api = _api(f"127.0.0.1:{free_port()}")
    try:
        with api.client() as client:
            answer = client.get("/health/ready")
        assert answer.status_code == 503 and answer.json()["triton"] == "unreachable or not ready"
    finally:
        api.stop()


def test_metrics_take_their_own_token_and_it_opens_nothing_else(triton):
    api = _api(triton.grpc_url, security=SecurityOptions(api_keys=("api-key",), metrics_token="scrape"))
    try:
        with api.client() as client:
            assert client.get("/metrics").status_code == 401
            assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
            scraped = client.get("/metrics", headers={"Authorization": "Bearer scrape"})
            assert scraped.status_code == 200 and "kiln_queue_depth" in scraped.text
            assert client.get("/metrics", headers={"X-API-Key": "api-key"}).status_code == 200  # the API's still do
            assert client.get("/sdapi/v1/options", headers={"Authorization": "Bearer scrape"}).status_code == 401
    finally:
        api.stop()


def test_grpc_channels_take_dns_names_and_one_set_of_options(triton):
    options = dict(GRPC_CHANNEL_ARGS)
    assert options["grpc.lb_policy_name"] == "round_robin" and options["grpc.max_receive_message_length"] == -1
    assert options["grpc.keepalive_time_ms"] > 0 and options["grpc.keepalive_permit_without_calls"] == 0
    client = TritonClient(f"dns:///{triton.grpc_url}")  # gRPC's resolver: every address of the name, round-robin
    assert client.is_server_ready() and "vit" in client.ready_models()
    assert _is_local(f"dns:///{triton.grpc_url}") and not _is_local("dns:///triton-headless:8001")


def test_a_new_client_reaches_a_triton_on_a_port_an_old_client_was_refused_on(vit_repo, tmp_path):
    """A client that was refused (nothing listened on the port yet, or a Triton there had stopped) must not make a new
    client to that address fail: in gRPC's process-wide subchannel pool the new channel took over the old one's
    connection in its reconnect backoff and was refused at once, though a Triton now listened there (a CI run failed
    on it, when the kernel handed a test's Triton a port an earlier test's Triton had had)."""
    port = free_port()
    old = TritonClient(f"127.0.0.1:{port}")
    assert not old.is_server_ready()  # refused: the old channel's connection backs off
    server = start_triton(vit_repo, tmp_path / "tritonserver.log", grpc=port)
    try:
        assert server.grpc_url == f"127.0.0.1:{port}"
        assert TritonClient(server.grpc_url).is_server_ready(), "a new client was refused by the old one's backoff"
    finally:
        server.stop()


def test_a_call_on_a_channel_backing_off_reaches_a_triton_that_is_back(vit_repo, tmp_path):
    """A thread's channel that failed while Triton was away tries again up to 2.4 s later; a call in between is sent
    again every 0.1 s for 3 s, instead of failing with the error of an attempt made while Triton was down. Each
    thread has its own channel, so the generating thread's is not connected by a probe that saw Triton back
    (test_api's restart test: ready, then a 503). Triton down: the call fails after that wait."""
    port = free_port()
    client = TritonClient(f"127.0.0.1:{port}")
    with pytest.raises(ServerError, match="cannot reach Triton"):
        client.model_config("vit")
    started, answers = threading.Event(), {}

    def call() -> None:  # in a thread of its own (Triton, started here, would end with the thread that started it)
        while not started.is_set():  # this thread's channel fails until Triton listens, then backs off
            client.is_server_ready(timeout_s=0.5)
            time.sleep(0.05)
        try:
            answers["config"] = client.model_config("vit")
        except ServerError as exc:
            answers["error"] = exc

    calling = threading.Thread(target=call)
    calling.start()
    server = start_triton(vit_repo, tmp_path / "tritonserver.log", grpc=port)
    try:
        started.set()
        calling.join()
        assert answers.get("config", {}).get("name") == "vit", answers
    finally:
        server.stop()


def test_a_triton_not_reached_leaves_shared_memory_on():
    """Registering a region with a Triton that is not reached (down, or this channel reconnecting) is no refusal to
    map shared memory: the client keeps it for when Triton answers (it used to fall back to the network for good)."""
    client = TritonClient(f"127.0.0.1:{free_port()}", shared_memory="auto")
    assert client.uses_shared_memory
    with pytest.raises(ServerError, match="cannot reach Triton"):
        client.infer("vit", {"pixel_values": np.zeros((1, 3, 8, 8), np.float32)}, ["logits"])
    assert client.uses_shared_memory and client.shared_memory_error is None


def test_a_client_tries_a_triton_that_went_away_again_every_few_seconds():
    """While Triton is away, a client's channel tries to connect again at most 2.4 s apart (2 s and gRPC's jitter),
    so it reaches a Triton that came back within seconds; gRPC's own backoff grows 1.6-fold to 120 s (gaps of 1, 1.6,
    2.6, 4.1 s, the fourth at least 3.3 s with jitter, within 11.1 s). A Triton that is down accepts no connection; to
    count the attempts, a listening socket here accepts each and closes it at once (a peer that fails the handshake,
    which gRPC backs off from as from a refusal)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        attempts: list[float] = []

        def accept() -> None:
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:  # closed: the test is over
                    return
                attempts.append(time.monotonic())
                connection.close()

        threading.Thread(target=accept, daemon=True).start()
        client = TritonClient(f"127.0.0.1:{listener.getsockname()[1]}")
        start = time.monotonic()
        while time.monotonic() - start < 13:
            assert not client.is_server_ready(timeout_s=1)
            time.sleep(0.1)
    gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:])]
    assert len(gaps) >= 4 and max(gaps) < 3.2, gaps


def test_kiln_serve_flags_for_orchestration(tmp_path, monkeypatch, capsys):
    from kiln.cli import build_parser
    from kiln.cli.serve import settings_from

    def settings(*flags: str):
        return settings_from(build_parser().parse_args(["serve", "--repo", str(tmp_path), *flags]))

    assert settings().drain_timeout_s == 60 and settings("--drain-timeout", "20").drain_timeout_s == 20
    assert settings("--metrics-token", "scrape").security.metrics_token == "scrape"
    monkeypatch.setenv("KILN_METRICS_TOKEN", "from-env")
    assert settings().security.metrics_token == "from-env"
    assert settings().redis_url == "" and settings().lease_s == 15  # the in-memory queue by default
    shared = settings("--redis", "redis://store:6379/0", "--redis-lease", "5", "--rate-limit", "60")
    assert (shared.redis_url, shared.lease_s, shared.security.redis_url) == ("redis://store:6379/0", 5.0,
                                                                             "redis://store:6379/0")
    monkeypatch.setenv("KILN_REDIS_URL", "redis://from-env:6379/1")
    assert settings().redis_url == "redis://from-env:6379/1"
    with pytest.raises(KilnError, match="expected a URL such as redis://"):
        settings("--redis", "store:6379")
    with pytest.raises(SystemExit):  # argparse's error: the flag's type refuses it
        settings("--redis-lease", "0")
    assert "--redis-lease: must be above 0" in capsys.readouterr().err
