"""Authentication, per-client rate limiting and a request-size cap, as one ASGI middleware.

- HTTP Basic (`--api-auth user:pass[,user:pass]`, compared in constant time) and/or API keys
  (`--api-keys`, sent as `X-API-Key: KEY` or `Authorization: Bearer KEY`). Without a valid
  credential: 401 with `WWW-Authenticate: Basic`. The health probes stay open; /metrics also takes its own
  token (`--metrics-token`, sent as `Authorization: Bearer TOKEN`), so Prometheus holds no API credential.
- A token bucket per client (the authenticated user or key, else the peer address) on the
  requests that start work (POST, DELETE, WebSocket): beyond it, 429 with Retry-After.
- A body larger than the cap is refused with 413 from its Content-Length, before it is read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import math
import threading
import time
from dataclasses import dataclass

from kiln.errors import KilnError, ServerError

OPEN_PATHS = ("/health/live", "/health/ready")
METRICS_PATH = "/metrics"  # open to the metrics token too (SecurityOptions.metrics_token)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(listen: str, options: SecurityOptions) -> None:
    """Off the loopback interface, the API must require credentials."""
    if not is_loopback(listen) and not options.auth_required:
        raise KilnError(f"the API would listen on {listen} without authentication; "
                        "pass --api-auth user:password and/or --api-keys KEY (or listen on 127.0.0.1)")


def parse_credentials(text: str | None) -> list[tuple[str, str]]:
    """'user:pass,user2:pass2' -> [(user, pass), ...]; a malformed entry is an error naming it (not its password)."""
    pairs = []
    for entry in (text or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise KilnError(f"--api-auth entries must be user:password; got an entry for {user or '(empty user)'!r} "
                            "without both parts")
        pairs.append((user, password))
    return pairs


@dataclass
class SecurityOptions:
    credentials: tuple[tuple[str, str], ...] = ()
    api_keys: tuple[str, ...] = ()
    rate_limit_per_minute: float = 0.0  # 0: no limit
    rate_burst: int = 0  # bucket size; 0: the per-minute figure (at least 1)
    max_body_bytes: int = 64 * 1024 * 1024
    # Prometheus' credential for /metrics alone (`Authorization: Bearer TOKEN`), so a scraper needs none of the API's;
    # "": /metrics takes the API's credentials (open where the API is)
    metrics_token: str = ""
    redis_url: str = ""  # the rate limit's buckets in this Redis, shared by every orchestrator using it ("": here)

    @property
    def auth_required(self) -> bool:
        return bool(self.credentials or self.api_keys)


class _Buckets:
    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.size = float(burst or max(1, math.ceil(per_minute)))
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 when allowed; else the seconds until a token is free."""
        now = time.monotonic()
        with self._lock:
            tokens, then = self._state.get(client, (self.size, now))
            tokens = min(self.size, tokens + (now - then) * self.rate)
            if tokens >= 1:
                self._state[client] = (tokens - 1, now)
                return 0.0
            self._state[client] = (tokens, now)
            if len(self._state) > 10000:  # forget idle clients
                self._state = {k: v for k, v in self._state.items() if now - v[1] < 3600}
            return (1 - tokens) / self.rate


class _RedisBuckets(_Buckets):
    """The same token buckets in Redis (one script reads, refills and takes), so every orchestrator counts a
    client's requests together. Redis away: the request is refused with 503 rather than let through uncounted."""

    SCRIPT = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local size, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens = tonumber(state[1]) or size
local at = tonumber(state[2]) or t
tokens = math.min(size, tokens + (t - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(t))
redis.call('EXPIRE', KEYS[1], math.ceil(size / rate) + 60)
return tostring(wait)
"""

    def __init__(self, per_minute: float, burst: int, url: str) -> None:
        import redis

        super().__init__(per_minute, burst)
        self.redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
        self.script = self.redis.register_script(self.SCRIPT)

    def take(self, client: str) -> float:
        import redis

        try:
            return float(self.script(keys=["kiln:rate:" + client], args=[self.size, self.rate]))
        except (redis.RedisError, OSError) as exc:
            raise ServerError(f"the rate limit's store (Redis) is unreachable: {type(exc).__name__}") from exc


class SecurityMiddleware:
    def __init__(self, app, options: SecurityOptions) -> None:
        self.app = app
        self.options = options
        self.buckets = None
        if options.rate_limit_per_minute > 0:
            self.buckets = _RedisBuckets(options.rate_limit_per_minute, options.rate_burst, options.redis_url) \
                if options.redis_url else _Buckets(options.rate_limit_per_minute, options.rate_burst)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        if path in OPEN_PATHS or (path == METRICS_PATH and self._scraper(headers)):
            return await self.app(scope, receive, send)

        identity = None
        if self.options.auth_required:
            identity = self._authenticate(headers)
            if identity is None:
                return await _reject(scope, send, 401, "authentication required: HTTP Basic or an API key",
                                     {"www-authenticate": 'Basic realm="kiln"'})
        scope.setdefault("state", {})["client_id"] = identity or _peer(scope)

        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _reject(scope, send, 400, "Content-Length is not a number")
            if int(length) > self.options.max_body_bytes:
                return await _reject(scope, send, 413, f"request body of {length} bytes exceeds the "
                                                       f"{self.options.max_body_bytes}-byte limit")

        if self.buckets is not None and method in ("POST", "DELETE", "PUT", "WEBSOCKET"):
            try:
                wait = await asyncio.to_thread(self.buckets.take, scope["state"]["client_id"]) \
                    if isinstance(self.buckets, _RedisBuckets) else self.buckets.take(scope["state"]["client_id"])
            except ServerError as exc:
                return await _reject(scope, send, 503, str(exc), {"retry-after": "5"})
            if wait > 0:
                return await _reject(scope, send, 429, "rate limit exceeded; retry later",
                                     {"retry-after": str(max(1, math.ceil(wait)))})
        return await self.app(scope, receive, send)

    def _scraper(self, headers: dict[str, str]) -> bool:
        """Whether the request carries the metrics token (compared in constant time)."""
        token = self.options.metrics_token
        sent = headers.get("authorization", "").removeprefix("Bearer ").strip()
        return bool(token) and hmac.compare_digest(sent.encode(), token.encode())

    def _authenticate(self, headers: dict[str, str]) -> str | None:
        authorization = headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        key = headers.get("x-api-key") or (value.strip() if scheme.lower() == "bearer" else None)
        if key:
            for known in self.options.api_keys:
                if hmac.compare_digest(key.encode(), known.encode()):
                    return "key:" + hmac.new(b"kiln", known.encode(), "sha256").hexdigest()[:12]
            return None
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
            if not sep:
                return None
            matched = None
            for known_user, known_password in self.options.credentials:  # compare all: no early exit on a match
                ok = hmac.compare_digest(user.encode(), known_user.encode()) & \
                    hmac.compare_digest(password.encode(), known_password.encode())
                if ok:
                    matched = known_user
            return None if matched is None else "user:" + matched
        return None


def _peer(scope) -> str:
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:unknown"


async def _reject(scope, send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    if scope["type"] == "websocket":
        # Refuse the handshake (the client sees an HTTP 403; the close reason says why).
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    kind = {401: "unauthorized", 413: "too_large", 429: "rate_limited", 503: "unavailable"}.get(status, "bad_request")
    body = json.dumps({"error": kind, "detail": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
