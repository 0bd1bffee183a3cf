"""Shared fixtures: seeded random ViT weights, built repositories and a real Triton server."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from build.vit import SAMPLE_IMAGES, ViTBuildOptions, build_vit, list_images
from build.weights import load_vit
from orchestrator.triton_server import TritonOptions, TritonServer, free_port


@pytest.fixture(scope="session")
def vit_model():
    """The real ViT-B/16 architecture with seeded random weights (the same the builds use)."""
    return load_vit(random_weights=True, seed=0).model


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    return list_images(SAMPLE_IMAGES)


@pytest.fixture(scope="session")
def served_repo(tmp_path_factory) -> Path:
    """A repository serving ONNX Runtime fp32, built once per session (about 20 s)."""
    repo = tmp_path_factory.mktemp("repo_served")
    build_vit(ViTBuildOptions(random_weights=True, variants=(), extra_exports=(), repository=repo, progress=False),
              log=lambda _msg: None)
    return repo


@pytest.fixture(scope="session")
def all_variants_repo(tmp_path_factory) -> tuple[Path, object]:
    """Every variant and export, built once per session (a few minutes on 2 cores)."""
    repo = tmp_path_factory.mktemp("repo_all")
    result = build_vit(ViTBuildOptions(random_weights=True, repository=repo, progress=False), log=lambda _msg: None)
    return repo, result


@pytest.fixture(scope="session")
def triton(served_repo, tmp_path_factory):
    """A real Triton server (the wheel's binary) serving `served_repo` on free loopback ports."""
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer(TritonOptions(repository=served_repo, http_port=free_port(), grpc_port=free_port(),
                                        metrics_port=free_port(), log_path=log))
    server.start()
    yield server
    server.stop()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header declares width x height but carries almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def encode(image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
