"""The security middleware on its own, over real HTTP: a tiny app behind it on uvicorn, called with httpx.

Credentials (HTTP Basic, API keys), open probes, per-client rate limits, the body-size cap, WebSockets,
and the rule that off loopback the service refuses to start without credentials.
"""

from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest
from fastapi import FastAPI, Request, WebSocket

from kiln.errors import KilnError
from kiln.triton_server import free_port
from orchestrator.security import SecurityMiddleware, SecurityOptions, check_exposure, is_loopback, parse_credentials


def _app(options: SecurityOptions) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SecurityMiddleware, options=options)

    @app.get("/whoami")
    async def whoami(request: Request):
        return {"client": request.scope["state"]["client_id"]}

    @app.post("/work")
    async def work(request: Request):
        return {"bytes": len(await request.body())}

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    return app


@pytest.fixture
def serve():
    """Start an app on a real uvicorn server in a thread; yield its URL; stop it."""
    import uvicorn

    servers = []

    def start(options: SecurityOptions) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(_app(options), host="127.0.0.1", port=port, log_level="warning",
                                               ws="websockets-sansio"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
            time.sleep(0.02)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def test_without_credentials_configured_everyone_is_known_by_address(serve):
    url = serve(SecurityOptions())
    response = httpx.get(f"{url}/whoami")
    assert response.status_code == 200 and response.json()["client"] == "addr:127.0.0.1"


def test_basic_auth_and_api_keys(serve):
    url = serve(SecurityOptions(credentials=(("alice", "s3cret"), ("bob", "pw")), api_keys=("key-1",)))
    refused = httpx.get(f"{url}/whoami")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Basic realm="kiln"'
    assert refused.json() == {"error": "unauthorized", "detail": "authentication required: HTTP Basic or an API key"}
    assert httpx.get(f"{url}/whoami", auth=("alice", "s3cret")).json()["client"] == "user:alice"
    assert httpx.get(f"{url}/whoami", auth=("bob", "pw")).json()["client"] == "user:bob"
    for bad in (("alice", "pw"), ("mallory", "s3cret"), ("alice", "")):
        assert httpx.get(f"{url}/whoami", auth=bad).status_code == 401, bad
    broken = {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}
    assert httpx.get(f"{url}/whoami", headers=broken).status_code == 401
    assert httpx.get(f"{url}/whoami", headers={"Authorization": "Basic %%%"}).status_code == 401
    by_header = httpx.get(f"{url}/whoami", headers={"X-API-Key": "key-1"}).json()["client"]
    by_bearer = httpx.get(f"{url}/whoami", headers={"Authorization": "Bearer key-1"}).json()["client"]
    assert by_header == by_bearer and by_header.startswith("key:") and "key-1" not in by_header  # never echoed
    assert httpx.get(f"{url}/whoami", headers={"X-API-Key": "key-2"}).status_code == 401
    assert httpx.get(f"{url}/health/live").status_code == 200  # the probes stay open


def test_rate_limit_is_per_client_and_says_when_to_retry(serve):
    url = serve(SecurityOptions(credentials=(("alice", "a"), ("bob", "b")), rate_limit_per_minute=2))
    statuses = [httpx.post(f"{url}/work", auth=("alice", "a")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    limited = httpx.post(f"{url}/work", auth=("alice", "a"))
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert httpx.post(f"{url}/work", auth=("bob", "b")).status_code == 200  # her bucket is not his
    assert httpx.get(f"{url}/whoami", auth=("alice", "a")).status_code == 200  # reads do not spend tokens


def test_a_body_over_the_cap_is_refused_before_it_is_read(serve):
    url = serve(SecurityOptions(max_body_bytes=1000))
    assert httpx.post(f"{url}/work", content=b"x" * 1000).json() == {"bytes": 1000}
    too_big = httpx.post(f"{url}/work", content=b"x" * 1001)
    assert too_big.status_code == 413 and "exceeds the 1000-byte limit" in too_big.json()["detail"]


def test_websockets_need_credentials_too(serve):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = serve(SecurityOptions(api_keys=("key-1",))).replace("http://", "ws://")
    with pytest.raises(InvalidStatus):
        connect(f"{url}/ws", open_timeout=5)
    with connect(f"{url}/ws", additional_headers={"X-API-Key": "key-1"}, open_timeout=5) as ws:
        assert ws.recv(timeout=5) == "hello"


def test_credentials_are_parsed_strictly_and_exposure_needs_them():
    assert parse_credentials("alice:s3cret, bob:pw:with:colons") == [("alice", "s3cret"), ("bob", "pw:with:colons")]
    assert parse_credentials(None) == []
    with pytest.raises(KilnError, match="'alice'") as info:
        parse_credentials("alice")
    assert "s3cret" not in str(info.value)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.3.4.5")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")
    check_exposure("127.0.0.1", SecurityOptions())
    check_exposure("0.0.0.0", SecurityOptions(api_keys=("k",)))
    with pytest.raises(KilnError, match="without authentication"):
        check_exposure("0.0.0.0", SecurityOptions())
