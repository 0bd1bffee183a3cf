"""OpenVINO at the edge: its model cache (on by default beside the repository, so a second start reads the compiled
model back; a folder that cannot be written is a warning, and serving goes on) and its target devices (--ov-device:
CPU, GPU, NPU, AUTO; only the CPU runs here, the others are checked by name and by OpenVINO's own device query)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from build.convert import VIT_VARIANTS
from build.native import ov_target
from kiln.errors import ConfigError, KilnError
from kiln.runtime import Session, SessionOptions, check_ov_device, ov_cache_dir


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


def test_a_device_this_machine_lacks_is_refused_naming_the_ones_it_has(artifact):
    import openvino as ov

    have = ", ".join(ov.Core().available_devices)
    x = {"x": np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    if "NPU" not in have:  # the lent machines have no NPU either; a machine that has one runs it
        with pytest.raises(ConfigError, match=f"device 'NPU' is not on this machine; it has: {have}"):
            Session(SessionOptions("openvino", artifact, ov_device="NPU"))
    auto = Session(SessionOptions("openvino", artifact, ov_device="AUTO")).run(x)["y"]  # OpenVINO chooses: the CPU
    np.testing.assert_allclose(auto, Session(SessionOptions("openvino", artifact)).run(x)["y"], atol=1e-5)
    for name in ("CPU", "GPU", "GPU.1", "NPU", "AUTO", "AUTO:GPU,CPU"):
        assert check_ov_device(name) == name
    for bad in ("TPU", "CPU:GPU", "GPU.x", "AUTO:TPU", "cpu"):
        with pytest.raises(ConfigError, match="is not an OpenVINO device; valid: CPU, GPU, GPU.N, NPU, AUTO"):
            check_ov_device(bad)


def test_the_target_is_checked_before_a_build():
    openvino, onnx = VIT_VARIANTS["openvino-int8"], VIT_VARIANTS["onnxruntime-fp32"]
    with pytest.raises(ConfigError, match="--ov-device GPU targets OpenVINO variants; this build serves onnxruntime"):
        ov_target("GPU", "python", [onnx])
    with pytest.raises(ConfigError, match="NVIDIA's image runs OpenVINO on its CPU"):
        ov_target("NPU", "native", [openvino])
    assert ov_target("CPU", "python", [onnx]) == {"ov_device": "CPU", "available_here": None, "note": None}  # not asked
    if "NPU" not in ov_target("CPU", "python", [openvino])["available_here"]:
        assert ov_target("NPU", "python", [openvino])["note"].startswith("not run on this device here")


@pytest.mark.slow
def test_a_build_for_another_device_says_so_and_serving_it_here_is_refused(tmp_path):
    """kiln build vit --backend openvino --ov-device NPU|AUTO on a small ViT: the device in the served config and the
    report; Triton refuses to load the NPU build here naming the devices OpenVINO has; the AUTO build serves."""
    import timm

    from build.report import read_report
    from build.vit import ViTBuildOptions, build_vit
    from build.vit.weights import save_vit_checkpoint
    from kiln.model_config import read_config
    from kiln.vit import ViTClient
    from tests.conftest import start_triton

    torch.manual_seed(0)
    weights = save_vit_checkpoint(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3),
                                  tmp_path / "weights", "vit_tiny_patch16_224", labels=["a", "b", "c"])
    for device in ("NPU", "AUTO"):
        repo = tmp_path / device
        build_vit(ViTBuildOptions(weights=str(weights), backend="openvino", ov_device=device, variants=(),
                                  extra_exports=(), repository=repo, progress=False), log=lambda _m: None)
        params = {k: v.string_value for k, v in read_config(repo / "vit" / "config.pbtxt").parameters.items()}
        assert params["ov_device"] == device and params["runtime"] == "openvino"
        served = read_report(repo)["vit"]["served"]
        assert served["ov_device"] == device and "CPU" in served["available_here"]
        if device == "NPU" and "NPU" not in served["available_here"]:
            assert served["note"].startswith("not run on this device here")
            with pytest.raises(KilnError, match="OpenVINO device 'NPU' is not on this machine; it has: CPU"):
                start_triton(repo, tmp_path / "npu.log")
        if device == "AUTO":
            server = start_triton(repo, tmp_path / "auto.log")
            try:
                image = (Path(__file__).resolve().parent.parent / "assets" / "images" / "chelsea.jpg").read_bytes()
                assert sorted(ViTClient(server.grpc_url).classify_one(image, top_k=3).labels) == ["a", "b", "c"]
            finally:
                server.stop()
