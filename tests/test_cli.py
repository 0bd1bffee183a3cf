"""The `kiln` command line: real subprocesses, clear errors without tracebacks, clean shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kiln.triton_server import TritonOptions, TritonServer, free_port, free_ports

ROOT = Path(__file__).resolve().parent.parent
KILN = [sys.executable, "-m", "kiln.cli"]


def run(*args, timeout=300):
    return subprocess.run([*KILN, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_errors_are_one_line_without_traceback(tmp_path, kiln):
    result = run("build", "vit", "--weights", str(tmp_path / "missing"))  # the real entry point, in its own process
    assert result.returncode == 2 and "no such file or folder" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    cases = [
        (["build", "vit", "--random-weights", "--backend", "onnxruntime", "--precision", "bf16"],
         "valid backend-precision pairs"),
        (["serve", "--repo", str(tmp_path / "nothing")], "does not exist"),
        (["classify", str(tmp_path / "nope.jpg")], "no such image file"),
        (["generate", "x", "--mask", str(tmp_path / "mask.png")], "--mask needs --init-image"),
        (["generate", "x", "--init-image", str(tmp_path / "i.png"), "--soft-mask", "--inpainting-fill", "0"],
         "--soft-mask, --inpainting-fill: inpainting options; pass --mask"),
        (["weights", "sd", "--tiny", str(tmp_path / "w"), "--single-file", str(tmp_path / "w.ckpt")],
         "must end in .safetensors"),
        (["generate", "x", "--extra-noise", "0.2"], "--extra-noise is added to img2img's start or the hires pass's"),
        (["generate", "x", "--init-image", str(tmp_path / "i.png"), "--soft-inpainting"],
         "--soft-inpainting: inpainting options; pass --mask"),
        (["generate", "x", "--init-image", str(tmp_path / "m.png"), "--mask", str(tmp_path / "m.png"),
          "--soft-inpainting-settings", "bias=2"], "'bias' is not one of its settings: schedule_bias, "),
        (["generate", "x", "--init-image", str(tmp_path / "m.png"), "--mask", str(tmp_path / "m.png"),
          "--soft-inpainting-settings", "schedule_bias=high"], "'schedule_bias=high' is not NAME=NUMBER"),
    ]
    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    for args, message in cases:
        code, _, err = kiln(*args)
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("args, message", [
    (["build", "vit", "--random-weights", "--threads", "-2"], "--threads: must be at least 0, got '-2'"),
    (["build", "sd", "--weights", "w", "--threads", "two"], "--threads: expected an integer, got 'two'"),
    (["build", "sd", "--weights", "w", "--min-size", "0"], "--min-size: must be at least 1"),
    (["bench", "sd", "--repeats", "0"], "--repeats: must be at least 1"),
    (["bench", "vit", "--seconds", "-1"], "--seconds: must be at least 0"),
    (["serve", "--checkpoint-memory-gb", "inf"], "--checkpoint-memory-gb: must be finite"),
    (["serve", "--workers", "0"], "--workers: must be at least 1"),
    (["serve", "--request-timeout", "nan"], "--request-timeout: must be above 0"),
    (["classify", "x.jpg", "--top-k", "0"], "--top-k: must be at least 1"),
    (["weights", "lora", "--tiny", "l.safetensors", "--alpha", "-1"], "--alpha: must be above 0"),
])
def test_counts_out_of_range_are_refused_before_anything_runs(kiln, args, message):
    code, _, err = kiln(*args)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_a_build_refuses_negative_threads_called_as_a_library(tmp_path):
    """build_vit/build_sd/build_upscaler are called without the CLI (the GPU check, benchmarks): they check too."""
    from build.sd import SDBuildOptions, build_sd
    from build.upscaler import build_upscaler
    from build.vit import ViTBuildOptions, build_vit
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="--threads must be at least 0"):
        build_vit(ViTBuildOptions(random_weights=True, repository=tmp_path, threads=-1))
    with pytest.raises(ConfigError, match="--threads must be at least 0"):
        build_sd(SDBuildOptions(weights=str(tmp_path / "missing"), repository=tmp_path, threads=-1))
    with pytest.raises(ConfigError, match="--threads must be at least 0"):
        build_upscaler(tmp_path / "missing.pth", tmp_path, threads=-1)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_the_ports_a_server_is_given_differ():
    """Triton's three ports (and `kiln serve`'s four) are chosen together: asked for one at a time, the kernel may
    hand the same free port out twice, and Triton then refuses to start (seen once in CI)."""
    for _ in range(200):
        options = TritonOptions.on_free_ports(Path("repo"))
        assert len({options.http_port, options.grpc_port, options.metrics_port}) == 3
    assert len(set(free_ports(64))) == 64


def test_classify_with_no_server_says_so(sample_images):
    result = run("classify", str(sample_images[0]), "--url", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "is `kiln serve` running?" in result.stdout and "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_classify_and_embed_commands(triton, sample_images):
    result = run("classify", *map(str, sample_images[:2]), "--url", triton.grpc_url, "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [len(item["top"]) for item in payload] == [3, 3]
    result = run("classify", str(sample_images[0]), "--protocol", "http", "--url", triton.http_url)
    assert result.returncode == 0 and "1." in result.stdout
    result = run("embed", str(sample_images[0]), "--url", triton.grpc_url, "--tokens", "all", "--layer", "3", "--json")
    assert result.returncode == 0, result.stderr
    item = json.loads(result.stdout)[0]
    assert item["layer"] == 3 and item["tokens_shape"] == [197, 64] and len(item["embedding"]) == 64  # the tests' ViT


@pytest.mark.slow
def test_serve_starts_and_stops_on_sigterm(vit_repo):
    """Triton, then the API; SIGTERM stops the API (draining), then Triton, and exits 0."""
    ports = [str(port) for port in free_ports(4)]
    process = subprocess.Popen([*KILN, "serve", "--repo", str(vit_repo), "--http-port", ports[0],
                                "--grpc-port", ports[1], "--metrics-port", ports[2], "--port", ports[3]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = ""
        while not line.startswith("API ready:"):  # readline returns "" once the process exits
            line = process.stdout.readline()
            assert line or process.poll() is None, process.stderr.read()
        assert f":{ports[3]}" in line, line
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "Triton stopped" in out
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_a_model_that_fails_to_load_is_explained(vit_repo, tmp_path):
    import shutil

    broken = tmp_path / "repo"
    broken.mkdir()
    for entry in vit_repo.iterdir():  # every model as built, but `vit`, whose artifact is garbage
        if entry.name != "vit":
            (broken / entry.name).symlink_to(entry.resolve())
    (broken / "vit" / "1").mkdir(parents=True)
    shutil.copy(vit_repo / "vit" / "config.pbtxt", broken / "vit")
    shutil.copy(vit_repo / "vit" / "1" / "model.py", broken / "vit" / "1")
    (broken / "vit" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    server = TritonServer(TritonOptions.on_free_ports(broken))  # its log in a temporary folder
    from kiln.errors import ServerError

    with pytest.raises(ServerError) as info:
        server.start()
    assert "'vit'" in str(info.value) and f"(full log: {server.log_path})" in str(info.value)
    assert not server.is_running() and server.log_path.is_file()  # kept for the error to point at
    shutil.rmtree(server.log_path.parent)
    refused = TritonServer(TritonOptions.on_free_ports(tmp_path / "no-repo"))
    with pytest.raises(ServerError, match="does not exist"):
        refused.start()
    assert not refused.log_path.parent.exists()  # refused before it started: no folder made
    # A server that stops cleanly takes its temporary log folder with it; one given a log file keeps it.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "vit_preprocess").symlink_to((vit_repo / "vit_preprocess").resolve())
    for log in (None, tmp_path / "kept.log"):
        clean = TritonServer(TritonOptions.on_free_ports(alone, log)).start()
        assert clean.log_path.is_file() and clean.stop() == 0
        assert clean.log_path.exists() == (log is not None), clean.log_path


@pytest.mark.slow
def test_build_from_a_weights_folder_written_by_kiln(tmp_path, kiln):
    """`kiln weights vit` then `kiln build vit --weights DIR`: the user's path, end to end."""
    code, _, err = kiln("weights", "vit", "--random", tmp_path / "ckpt", "--seed", "7")
    assert code == 0, err
    code, out, err = kiln("build", "vit", "--weights", tmp_path / "ckpt", "--variants", "served", "--no-extra-exports",
                          "--repo", tmp_path / "repo")
    assert code == 0, err
    # the folder's kiln-weights.json says the weights are random: the build says so too
    assert "RANDOM WEIGHTS" in out and "served: vit = onnxruntime-fp32 (model.onnx)" in out
    report = json.loads((tmp_path / "repo" / "build-report.json").read_text())["vit"]
    assert report["weights"] == {"source": str(tmp_path / "ckpt"), "random": True, "parameters": 86_567_656}
