"""The GPU check (scripts/gpu_check.sh -> benchmarks/gpu_check.py) end to end on the CPU, with tiny weights.

No GPU here: this runs the very script a lent GPU machine runs, on torch-fp32 and the CPU, so that it cannot rot
before one is lent. The figures it prints are CPU figures; what the test checks is that every phase ran and
measured what it claims to (its targets are the GPU's and are only reported).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "cpu"], cwd=ROOT, capture_output=True, text=True,
                         env=os.environ | {"OUT": str(tmp_path), "KILN_GPU_CHECK_WORK": str(tmp_path / "work")},
                         timeout=600)
    result = json.loads((tmp_path / "gpu-check" / "results.json").read_text())
    assert run.returncode == 0 and not result["errors"] and not result["skipped"], (run.stdout + run.stderr)[-3000:]
    phases = result["phases"]
    assert list(phases) == ["philox", "weights", "build", "serve", "sd_served", "unet_rows", "vit_served", "batching",
                            "sd_in_process", "vit_in_process", "finetune", "unet_compiled"]
    assert phases["philox"]["compared"] is False  # torch's CUDA generator: on a GPU only
    assert phases["build"]["variant"] == "torch-fp32" and phases["build"]["vit_parity"]["cosine"] > 0.99999
    served, local = phases["vit_served"]["batches"]["1"], phases["vit_in_process"]["batches"]["1"]
    assert all(served[arm]["images_per_s"] > 0 for arm in ("triton_tensor", "triton_uint8", "triton_jpeg"))
    assert phases["vit_served"]["instances"] == 1  # copies of vit: one on a CPU, two on a GPU (the build's auto)
    assert local["eager"]["images_per_s"] > 0 and phases["vit_in_process"]["served_over_eager_at_max_batch"] > 0
    # Triton's split of each request (the tensor path: `vit` alone; JPEG: the three models of vit_classify)
    assert all(set(served[arm]["triton_ms_per_request"]) == {"vit"} for arm in ("triton_tensor", "triton_uint8"))
    assert set(served["triton_jpeg"]["triton_ms_per_request"]) == {"vit_preprocess", "vit", "vit_postprocess"}
    assert served["triton_tensor"]["triton_ms_per_request"]["vit"]["compute_infer_ms"] > 0
    for arm in ("concurrent", "concurrent_uint8", "concurrent_uint8_other_instances"):
        concurrent = phases["vit_served"][arm]
        assert concurrent["clients"] == 2 and concurrent["requests"] > 0 and concurrent["images_per_s"] > 0, arm
    assert "not_run" in phases["vit_served"]["cuda_shm_uint8"]  # a client's CUDA shared memory: on a GPU only
    decoded = phases["vit_served"]["jpeg_torch_decode"]  # vit_preprocess reloaded to decode with torchvision
    assert decoded["images_per_s"] > 0 and 0 < decoded["pixels_max_abs_levels_vs_pil"] <= 16, decoded
    # vit reloaded by Triton's explicit model control at the other count of copies: two here
    assert phases["vit_served"]["concurrent_uint8_other_instances"]["instances"] == 2
    assert set(phases["vit_in_process"]["host_copy_ms_at_max_batch"]) == {"cast_on_host", "cast_on_device"}
    unet = phases["unet_rows"]  # no graphs on the CPU: 2 and 4 rows, and 3; the program also channels-last
    assert unet["runtime"] == "torch" and set(unet["served"]) == set(unet["channels_last"]) == {"2", "3", "4"}
    assert all(row["ms_per_row"] > 0 and row["graph"] is False for row in unet["served"].values())
    assert set(unet["channels_last_speedup"]) == {"2", "3", "4"}
    assert "not_run" in phases["unet_compiled"]  # torch.compile's arm: what a CUDA graph captures, on a GPU only
    assert phases["build"]["torch_compile"] is False
    session = phases["vit_in_process"]["kiln_session"]  # the served artifact in process, as the Triton model opens it
    assert session["runtime"] == "torch" and session["batches"]["1"]["images_per_s"] > 0
    assert session["batches"]["1"]["graph"] is False  # CUDA graphs: on a GPU only
    assert session["batch_vs_alone_max_abs_diff"] < 1e-4  # (on a GPU: the batch arrives through pinned staging)
    # uint8 pixels scaled by the session: the very floats of the eval transform (on a GPU: scaled there)
    assert session["uint8_vs_float32_max_abs_diff"] == 0 and session["batches"]["1_uint8"]["images_per_s"] > 0
    served, local = phases["sd_served"], phases["sd_in_process"]
    assert served["image_s"] > 0 and local["in_process"]["image_s"] > 0 and local["diffusers"]["image_s"] > 0
    assert 0 < served["model_calls_s"] < served["image_s"]
    # Triton's compute is within the client's calls; its statistics settle after the responses, and on a loaded
    # machine the snapshot before the run can miss the warm-up's last few ms (3.4 ms of 6.9 s once, on 2 busy cores)
    assert 0 < served["triton_compute_s"] < served["model_calls_s"] * 1.01
    assert served["model_calls"] == 1 + 3 + 1  # the text encoder (both prompts), 3 UNet steps, the VAE
    # Triton's compute_infer taken apart by the served models themselves (KILN_EXECUTE_TIMING): the inputs, the
    # session's copy in, compute and copy out, the responses; and the stub's CPUs and torch threads
    unet_split, vit_split = served["unet_execute_split"], phases["vit_served"]["execute_split"]
    assert unet_split["2"]["executes"] >= 3 and unet_split["2"]["compute_ms"] > 0
    assert vit_split["stub"]["cpus"] >= 1 and vit_split["stub"]["torch_threads"] >= 1
    assert vit_split["1"]["run_ms"] >= vit_split["1"]["compute_ms"] > 0 and vit_split["1"]["inputs_ms"] >= 0
    assert local["served_vs_in_process_psnr_db"] == float("inf")  # the same torch program, served or not
    arms = {(r["arm"], r["clients"]) for r in phases["batching"]["rows"]}
    assert arms == {(a, n) for a in ("unbatched", "triton", "step") for n in (1, 2)}
    # Triton's own count of the UNet's rows per execution: the baseline runs each request's CFG pair alone
    assert all(r["unet_rows_per_execution"] == 2.0 for r in phases["batching"]["rows"] if r["arm"] == "unbatched")
    assert set(phases["batching"]["triton_over_unbatched"]) == {"1", "2"}
    assert phases["finetune"]["fp32"]["images_per_s"] > 0 and phases["finetune"]["bf16_over_fp32"] > 0
    assert set(result["verdict"]) and all(v is not None for v in result["verdict"].values())
    assert {"torch", "diffusers", "tritonclient"} <= set(result["imported"])
    assert all(version != "missing" for version in result["modules"].values())
    assert not list(tmp_path.glob("gpu-check/*.npy")) and (tmp_path / "work" / "repo").is_dir()  # $OUT: results only
    assert "| sd_served_s |" in (tmp_path / "gpu-check" / "results.md").read_text()
    assert (tmp_path / "gpu-check" / "results.png").stat().st_size > 10_000  # the three panels (benchmarks.gpu_plot)


def test_the_gpu_check_runs_the_phases_and_variant_it_is_given(tmp_path, monkeypatch):
    """`--phases` runs those alone, in order (a second run on a lent machine measures what changed, in less of its
    time), and the build phase builds the ViT only for a ViT phase; `--variant` chooses what is built and served, a
    mix of parts too (the UNet compiled, say, and the rest not); a phase it does not have is a usage error."""
    from benchmarks.gpu_check import main

    mix = "torch-fp32+vae=onnxruntime-fp32"
    monkeypatch.setenv("KILN_GPU_CHECK_LIMIT_S", "300")  # less machine time left: no phase starts after 220 s
    assert main(["--device", "cpu", "--out", str(tmp_path), "--work", str(tmp_path / "work"),
                 "--phases", "unet_rows,weights,build", "--variant", mix]) == 0
    result = json.loads((tmp_path / "gpu-check" / "results.json").read_text())
    assert list(result["phases"]) == ["weights", "build", "unet_rows"] and not result["skipped"]
    assert result["options"]["budget_s"] == 220
    build, unet = result["phases"]["build"], result["phases"]["unet_rows"]
    assert result["options"]["variant"] == build["variant"] == mix and "vit_parity" not in build
    assert not (tmp_path / "work" / "repo" / "vit").exists()
    assert unet["artifact"] == "model.pt2" and unet["served"]["2"]["ms_per_call"] > 0
    # --torch-compile reaches the build, which refuses it for a CPU variant (its compile is in the CUDA graphs)
    assert main(["--device", "cpu", "--out", str(tmp_path / "compiled"), "--work", str(tmp_path / "work"),
                 "--phases", "weights,build", "--torch-compile"]) == 1
    error = json.loads((tmp_path / "compiled" / "gpu-check" / "results.json").read_text())["errors"]["build"]
    assert "--torch-compile compiles the CUDA graphs" in error and "the UNet serves torch-fp32" in error
    with pytest.raises(SystemExit) as exited:
        main(["--device", "cpu", "--out", str(tmp_path), "--phases", "weights,warp"])
    assert exited.value.code == 2
