"""Classify and embed images through the served ViT ensembles (vit_classify, vit_embed), over gRPC or HTTP.

Each image is its own request, sent concurrently: Triton's dynamic batcher merges them into
batches, and a bad image fails alone (its result carries the error).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from kiln.contract import VIT, VIT_CLASSIFY, VIT_EMBED
from kiln.errors import KilnError, Unreachable
from kiln.triton_client import TritonClient


@dataclass
class Classification:
    image: str  # name of the image (file path or caller's label)
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    error: str | None = None  # set instead of the results when this image's request failed
    unreachable: bool = False  # the error: no Triton was reached (it may be down), not this image's fault

    def as_dict(self) -> dict:
        if self.error:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "top": [{"label": label, "score": score, "index": index}
                                             for label, score, index in zip(self.labels, self.scores, self.indices)]}


@dataclass
class Embedding:
    image: str
    layer: int  # block whose tokens were returned (0..blocks-1)
    embedding: np.ndarray | None = None  # (width,) pooled features after the final norm (768 for ViT-B)
    tokens: np.ndarray | None = None  # (tokens, width) of block `layer` (197x768 for ViT-B/16), when asked for
    error: str | None = None
    unreachable: bool = False  # as Classification's

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


POOL_THREADS = 64  # a ViTClient's threads for many images' calls, all its calls together (each its own connection)


class ViTClient:
    """A small, thread-safe client for the two ViT ensembles."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", *, timeout_s: float = 120.0,
                 concurrency: int = 8) -> None:
        self.triton = TritonClient(url, protocol, timeout_s=timeout_s)
        self.url, self.protocol = self.triton.url, protocol
        self.concurrency = concurrency
        self._blocks: int | None = None
        # many images' calls: on threads kept for the client's life, as each thread's gRPC connection is (a pool made
        # per call opened new connections to Triton for every request), up to POOL_THREADS for all calls at once
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closed = False

    def blocks(self) -> int:
        """The served ViT's depth (12 for ViT-B/16, 24 for ViT-L): `layer` is 0..blocks-1, or negative from the end."""
        if self._blocks is None:
            params, _ = self.triton.model_parameters(VIT)
            self._blocks = int(params["default_layer"]) + 1
        return self._blocks

    def is_ready(self, model: str | None = None) -> bool:
        """The server is ready (or, given a model, that model is)."""
        return self.triton.is_model_ready(model) if model else self.triton.is_server_ready()

    # -- one image ------------------------------------------------------------------------------
    def classify_one(self, data: bytes, top_k: int = 5, name: str = "image") -> Classification:
        out = self.triton.infer(VIT_CLASSIFY, {"image": np.array([[data]], dtype=object),
                                               "top_k": np.array([[top_k]], dtype=np.int32)},
                                ["labels", "scores", "indices"])
        return Classification(image=name,
                              labels=[v.decode() if isinstance(v, bytes) else str(v) for v in out["labels"][0]],
                              scores=[float(s) for s in out["scores"][0]], indices=[int(i) for i in out["indices"][0]])

    def embed_one(self, data: bytes, layer: int = -1, tokens: bool = False, name: str = "image") -> Embedding:
        wanted = ["embedding", "tokens"] if tokens else ["embedding"]
        out = self.triton.infer(VIT_EMBED, {"image": np.array([[data]], dtype=object),
                                            "layer": np.array([[layer]], dtype=np.int64)}, wanted)
        return Embedding(image=name, layer=layer % self.blocks() if layer < 0 else layer, embedding=out["embedding"][0],
                         tokens=out["tokens"][0] if tokens else None)

    # -- many images, concurrently --------------------------------------------------------------
    def classify(self, images: Sequence[tuple[str, bytes]], top_k: int = 5) -> list[Classification]:
        return self._each(images, lambda name, data: self.classify_one(data, top_k, name),
                          lambda name, **error: Classification(image=name, **error))

    def embed(self, images: Sequence[tuple[str, bytes]], layer: int = -1, tokens: bool = False) -> list[Embedding]:
        return self._each(images, lambda name, data: self.embed_one(data, layer, tokens, name),
                          lambda name, **error: Embedding(image=name, layer=layer, **error))

    def _each(self, images, run, failed):
        """run(name, data) of each image; an image that fails gets failed(name, error=...) instead. Once one reached
        no Triton (after TritonClient's wait for it to come back), the call's images not yet sent are not sent: each
        would wait as long again (a request of 64 images waited ~24 s, in waves of `concurrency`)."""
        gone: list[str] = []

        def one(item):
            name, data = item
            if gone:
                return failed(name, error=f"not sent: {gone[0]}", unreachable=True)
            try:
                return run(name, data)
            except Unreachable as exc:
                gone.append(str(exc))
                return failed(name, error=str(exc), unreachable=True)
            except KilnError as exc:
                return failed(name, error=str(exc))

        return self._map(one, images)

    def _map(self, fn, items):
        """fn of each item, in order: at most `concurrency` of a call's at a time, each run by one of `concurrency`
        runners on the client's kept threads (Triton's batcher gathers the images of concurrent calls, so these are
        not capped together below POOL_THREADS)."""
        items = list(items)
        if len(items) <= 1:  # on the caller's thread, and its connection
            return [fn(item) for item in items]
        with self._pool_lock:
            if self._closed:
                raise KilnError("this ViT client is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=max(POOL_THREADS, self.concurrency),
                                                thread_name_prefix="kiln-vit")
            pool = self._pool
        results: list = [None] * len(items)
        order, taking = iter(range(len(items))), threading.Lock()

        def runner() -> None:
            while True:
                with taking:
                    index = next(order, None)
                if index is None:
                    return
                results[index] = fn(items[index])

        try:
            runners = [pool.submit(runner) for _ in range(min(self.concurrency, len(items)))]
        except RuntimeError:  # closed meanwhile (the server shutting down)
            raise KilnError("this ViT client is closed") from None
        for running in runners:
            running.result()
        return results

    def close(self) -> None:
        """Its threads (and their connections to Triton) and its shared-memory regions."""
        with self._pool_lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.shutdown(wait=True)
        self.triton.close()
