"""Classify and embed images through the served ViT ensembles, over gRPC or HTTP (tritonclient).

Each image is its own request, sent concurrently: Triton's dynamic batcher merges them into
batches, and a bad image fails alone.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from build.errors import KilnError
from build.vit import NUM_BLOCKS

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
CLASSIFY_MODEL = "vit_classify"
EMBED_MODEL = "vit_embed"


class RequestError(KilnError):
    """Triton answered a request with an error, or could not be reached."""


@dataclass
class Classification:
    image: str  # name of the image (file path or caller's label)
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    error: str | None = None  # set instead of the results when this image's request failed

    def as_dict(self) -> dict:
        if self.error:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "top": [{"label": l, "score": s, "index": i}
                                             for l, s, i in zip(self.labels, self.scores, self.indices)]}


@dataclass
class Embedding:
    image: str
    layer: int  # block whose tokens were returned (0..11)
    embedding: np.ndarray | None = None  # (768,) pooled CLS features after the final norm
    tokens: np.ndarray | None = None  # (197, 768) tokens of block `layer`, when asked for
    error: str | None = None

    def as_dict(self, *, with_values: bool = True) -> dict:
        if self.error:
            return {"image": self.image, "error": self.error}
        out: dict = {"image": self.image, "layer": self.layer, "embedding_dim": int(self.embedding.shape[-1])}
        if self.tokens is not None:
            out["tokens_shape"] = list(self.tokens.shape)
        if with_values:
            out["embedding"] = [round(float(v), 6) for v in self.embedding]
            if self.tokens is not None:
                out["tokens"] = np.round(self.tokens, 6).tolist()
        return out


class ViTClient:
    """A small, thread-safe client for the two ViT ensembles."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", *, timeout_s: float = 120.0,
                 concurrency: int = 8) -> None:
        if protocol not in DEFAULT_URLS:
            raise KilnError(f"unknown protocol {protocol!r}; valid: grpc, http")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self._local = threading.local()
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self._module.InferenceServerClient(self.url)
            else:
                client = self._module.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                            network_timeout=self.timeout_s)
            self._local.client = client
        return client

    def _input(self, name: str, array: np.ndarray, dtype: str):
        tensor = self._module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        return tensor

    def _infer(self, model: str, inputs: list, outputs: list[str]) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        requested = [self._module.InferRequestedOutput(name) for name in outputs]
        try:
            if self.protocol == "grpc":
                result = self._client().infer(model, inputs, outputs=requested, client_timeout=self.timeout_s)
            else:
                result = self._client().infer(model, inputs, outputs=requested)
        except InferenceServerException as exc:
            raise RequestError(_describe(exc, self.url)) from None
        except (ConnectionError, OSError) as exc:
            raise RequestError(f"cannot reach Triton at {self.url} ({exc}); is `kiln serve` running?") from None
        return {name: result.as_numpy(name) for name in outputs}

    def is_ready(self) -> bool:
        try:
            return bool(self._client().is_server_ready())
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    # -- one image ------------------------------------------------------------------------------
    def classify_one(self, data: bytes, top_k: int = 5, name: str = "image") -> Classification:
        inputs = [self._input("image", np.array([[data]], dtype=object), "BYTES"),
                  self._input("top_k", np.array([[top_k]], dtype=np.int32), "INT32")]
        out = self._infer(CLASSIFY_MODEL, inputs, ["labels", "scores", "indices"])
        return Classification(
            image=name,
            labels=[l.decode() if isinstance(l, bytes) else str(l) for l in out["labels"][0]],
            scores=[float(s) for s in out["scores"][0]],
            indices=[int(i) for i in out["indices"][0]],
        )

    def embed_one(self, data: bytes, layer: int = -1, tokens: bool = False, name: str = "image") -> Embedding:
        inputs = [self._input("image", np.array([[data]], dtype=object), "BYTES"),
                  self._input("layer", np.array([[layer]], dtype=np.int64), "INT64")]
        wanted = ["embedding", "tokens"] if tokens else ["embedding"]
        out = self._infer(EMBED_MODEL, inputs, wanted)
        return Embedding(image=name, layer=layer % NUM_BLOCKS if layer < 0 else layer, embedding=out["embedding"][0],
                         tokens=out["tokens"][0] if tokens else None)

    # -- many images, concurrently --------------------------------------------------------------
    def classify(self, images: Sequence[tuple[str, bytes]], top_k: int = 5) -> list[Classification]:
        def one(item):
            name, data = item
            try:
                return self.classify_one(data, top_k, name)
            except RequestError as exc:
                return Classification(image=name, error=str(exc))

        return self._map(one, images)

    def embed(self, images: Sequence[tuple[str, bytes]], layer: int = -1, tokens: bool = False) -> list[Embedding]:
        def one(item):
            name, data = item
            try:
                return self.embed_one(data, layer, tokens, name)
            except RequestError as exc:
                return Embedding(image=name, layer=layer, error=str(exc))

        return self._map(one, images)

    def _map(self, fn, items):
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(items)))) as pool:
            return list(pool.map(fn, items))


def print_classifications(results: Sequence[Classification], indent: str = "", name=str) -> None:
    """The human-readable form `kiln classify` and `kiln demo` print: the image, then its ranked labels."""
    for r in results:
        print(f"{indent}{name(r.image)}")
        if r.error:
            print(f"{indent}  error: {r.error}")
            continue
        for rank, (label, score) in enumerate(zip(r.labels, r.scores), 1):
            print(f"{indent}  {rank}. {score:7.4f}  {label}")


def read_images(paths: Sequence[str | Path]) -> list[tuple[str, bytes]]:
    out = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise KilnError(f"{p}: no such image file")
        out.append((str(p), p.read_bytes()))
    return out


def _describe(exc, url: str) -> str:
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    message = message or str(exc)
    if "UNAVAILABLE" in str(exc.status()) or "failed to connect" in message.lower() or "connection refused" in message.lower():
        return f"cannot reach Triton at {url}; is `kiln serve` running? ({message})"
    return message
