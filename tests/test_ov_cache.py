"""OpenVINO's model cache: on by default beside the repository, so a second start of a served model reads the compiled
model back instead of compiling again; a folder that cannot be written is a warning, and serving goes on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.runtime import Session, SessionOptions, ov_cache_dir


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A small real network as OpenVINO IR (exported to ONNX by torch, converted by OpenVINO)."""
    import openvino as ov

    folder = tmp_path_factory.mktemp("ov")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 14 * 14, 4))
    torch.onnx.export(net.eval(), (torch.randn(1, 3, 16, 16),), str(folder / "net.onnx"), input_names=["x"],
                      output_names=["y"], dynamo=False)
    ov.save_model(ov.convert_model(str(folder / "net.onnx")), str(folder / "net.xml"))
    return folder / "net.xml"


def test_the_cache_is_written_once_and_read_back(artifact, tmp_path):
    cache = tmp_path / "repo.ov-cache"
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    first = Session(SessionOptions("openvino", artifact, cache_dir=cache)).run(x)["y"]
    blobs = sorted(cache.glob("*.blob"))
    assert len(blobs) == 1
    stamp = blobs[0].stat().st_mtime_ns
    second = Session(SessionOptions("openvino", artifact, cache_dir=cache)).run(x)["y"]
    assert sorted(cache.glob("*.blob")) == blobs and blobs[0].stat().st_mtime_ns == stamp  # read, not rewritten
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, Session(SessionOptions("openvino", artifact)).run(x)["y"])


def test_an_unwritable_cache_is_a_warning_and_serving_goes_on(artifact, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="a-file/cache is not writable .*compiling without it"):
        session = Session(SessionOptions("openvino", artifact, cache_dir=blocker / "cache"))
    assert session.run({"x": np.zeros((1, 3, 16, 16), np.float32)})["y"].shape == (1, 4)


def test_where_the_cache_goes(tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_OV_CACHE", raising=False)
    assert ov_cache_dir(tmp_path / "model_repository") == tmp_path / "model_repository.ov-cache"
    monkeypatch.setenv("KILN_OV_CACHE", str(tmp_path / "elsewhere"))
    assert ov_cache_dir(tmp_path / "model_repository") == tmp_path / "elsewhere"
    monkeypatch.setenv("KILN_OV_CACHE", "off")
    assert ov_cache_dir(tmp_path / "model_repository") is None
