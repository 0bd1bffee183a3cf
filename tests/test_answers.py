"""orchestrator.server.answers: the JSON of answers with images, made in pieces (the routes' HTTP answers are tested
with the routes: test_routes_extra, test_api)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from orchestrator.server.answers import BIG, json_parts


def _dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _b64(size: int, seed: int = 0) -> str:
    return base64.b64encode(np.random.default_rng(seed).bytes(size)).decode()


def test_the_pieces_are_what_json_dumps_writes_and_each_long_base64_string_is_its_own():
    images = [_b64(BIG, seed) for seed in range(3)]
    wrapped = "\n".join(images[0][i:i + 76] for i in range(0, len(images[0]), 76))  # MIME's lines: escaped
    value = {"images": images, "parameters": {"init_images": [images[1]], "prompt": 'a "cat"\n\u00e9\u732b' * 3000,
                                              "seed": 1, "cfg": 0.1, "none": None, "ok": True, "n": [1, 2.5, -3]},
             "info": json.dumps({"seeds": [1]}), "wrapped": wrapped, "short": images[0][:100], "tuple": (1, "two"),
             3: "int key", 2.5: "float key", True: "bool key", None: "null key", "\u00e9\u732b": "unicode key",
             "empty": {}, "nothing": []}
    parts = json_parts(value)
    assert b"".join(parts) == _dumps(value)
    assert json.loads(b"".join(parts))["images"] == images
    for image in images:
        assert image.encode() in parts  # copied as it is, not through json's escaping
    assert wrapped.encode() not in parts and json.loads(b"".join(parts))["wrapped"] == wrapped


@pytest.mark.parametrize("value", [{}, [], "", 0, None, [_b64(BIG)], _b64(BIG), {"a": [[_b64(BIG), _b64(BIG, 1)]]}])
def test_any_json_value_comes_out_whole(value):
    assert b"".join(json_parts(value)) == _dumps(value)


def test_what_json_refuses_is_refused():
    with pytest.raises(ValueError):
        json_parts({"images": [_b64(BIG)], "x": float("nan")})
    with pytest.raises(TypeError):
        json_parts({"x": object()})


def test_the_response_sends_its_length_and_no_body_where_http_has_none():
    """ImagesJSON through Starlette's test client (the routes' answers go over real HTTP in test_routes_extra)."""
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from orchestrator.server.answers import ImagesJSON

    content = {"images": [_b64(BIG), _b64(3 * BIG, 1)], "info": "x"}
    app = Starlette(routes=[Route("/answer", lambda _request: ImagesJSON(content)),
                            Route("/unchanged", lambda _request: ImagesJSON(content, status_code=304))])
    with TestClient(app) as client:
        answer = client.get("/answer")
        assert answer.json() == content and answer.headers["content-length"] == str(len(_dumps(content)))
        unchanged = client.get("/unchanged")
        assert unchanged.status_code == 304 and unchanged.content == b"" and "content-length" not in unchanged.headers
