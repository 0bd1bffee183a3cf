"""Answers that carry images (base64 in JSON, megabytes each): made off the event loop and sent in pieces as the
client takes them.

Made whole on the loop (FastAPI's default: pydantic's dump_json, then one write of the body), a batch of twelve
1024-pixel upscales (21 MB of JSON) held the loop about 90 ms on this machine, and over a second under load: every
other request (a /progress poll, a health check) waited for it. With `response_class=ImagesJSON` on a route, FastAPI
still checks the answer against the route's model (cheap: the strings are not copied), then the JSON is made in the
thread pool, each long base64 string copied as it is (base64's alphabet needs no escaping: checked, not assumed), the
rest by json.dumps; and the body goes out in CHUNK pieces, with its Content-Length: the loop serves other requests
between two pieces, and waits while uvicorn's write buffer is over its high-water mark (its flow control).
"""

from __future__ import annotations

import functools
import json
import string
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

CHUNK = 256 * 1024  # bytes of the body written at a time
BIG = 16 * 1024  # strings at least this long are checked for base64's alphabet and copied without JSON's escaping
_BASE64 = (string.ascii_letters + string.digits + "+/=").encode("ascii")
_dumps = functools.partial(json.dumps, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _base64(text: str) -> bytes | None:
    """The text's bytes where it is all base64's alphabet (so JSON needs no escape in it), else None."""
    if len(text) < BIG or not text.isascii():
        return None
    data = text.encode("ascii")
    return None if data.translate(None, _BASE64) else data


def json_parts(value: Any) -> list[bytes]:
    """`value` (dicts, lists, strings, numbers, booleans, None) as compact JSON, in pieces whose concatenation is what
    json.dumps writes: the small values joined, each long base64 string a piece of its own."""
    parts: list[bytes] = []
    pending: list[str] = []

    def walk(item: Any) -> None:
        if isinstance(item, str) and (data := _base64(item)) is not None:
            pending.append('"')
            parts.append("".join(pending).encode())
            parts.append(data)
            pending[:] = ['"']
        elif isinstance(item, dict):
            pending.append("{")
            for index, (key, member) in enumerate(item.items()):
                # (json's keys: a number, boolean or None is written as its JSON text, quoted)
                pending.append(("," if index else "") + _dumps(key if isinstance(key, str) else _dumps(key)) + ":")
                walk(member)
            pending.append("}")
        elif isinstance(item, (list, tuple)):
            pending.append("[")
            for index, member in enumerate(item):
                if index:
                    pending.append(",")
                walk(member)
            pending.append("]")
        else:
            pending.append(_dumps(item))

    walk(value)
    parts.append("".join(pending).encode())
    return parts


class ImagesJSON(Response):
    """A JSON response made in the thread pool and sent in pieces (the module's docstring says why)."""

    media_type = "application/json"

    def __init__(self, content: Any, status_code: int = 200, headers=None, media_type=None, background=None):
        self.content = content
        super().__init__(None, status_code, headers, media_type, background)

    def render(self, content: Any) -> None:  # type: ignore[override]  (made in __call__; its length set there)
        return None

    async def __call__(self, scope, receive, send) -> None:
        bodiless = self.status_code < 200 or self.status_code in (204, 304)  # (HTTP's: no body, no length)
        parts = [] if bodiless else await run_in_threadpool(json_parts, self.content)
        if not bodiless:
            self.headers["content-length"] = str(sum(len(part) for part in parts))
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), CHUNK):
                await send({"type": "http.response.body", "body": view[start:start + CHUNK], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.background is not None:
            await self.background()
