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
                         env=os.environ | {"OUT": str(tmp_path)}, timeout=600)
    result = json.loads((tmp_path / "gpu-check" / "results.json").read_text())
    assert run.returncode == 0 and not result["errors"] and not result["skipped"], run.stderr[-3000:]
    phases = result["phases"]
    assert list(phases) == ["weights", "build", "serve", "vit", "sd", "batching"]
    assert phases["build"]["variant"] == "torch-fp32" and phases["build"]["vit_parity"]["cosine"] > 0.99999
    for batch in ("1", "2"):
        row = phases["vit"]["batches"][batch]
        assert all(row[arm]["images_per_s"] > 0 for arm in ("triton_tensor", "triton_jpeg", "in_process_eager"))
    sd = phases["sd"]
    assert all(sd[path]["image_s"] > 0 for path in ("triton", "in_process", "diffusers"))
    assert 0 < sd["triton"]["triton_compute_s"] < sd["triton"]["model_calls_s"] < sd["triton"]["image_s"]
    assert sd["triton"]["model_calls"] == 1 + 3 + 1  # the text encoder (both prompts), 3 UNet steps, the VAE
    arms = {(r["arm"], r["clients"]) for r in phases["batching"]["rows"]}
    assert arms == {(a, n) for a in ("unbatched", "step") for n in (1, 2)}
    assert set(result["verdict"]) and all(v is not None for v in result["verdict"].values())
    assert {"torch", "diffusers", "tritonclient", "pytriton"} <= set(result["imported"])
    assert "| sd_served_s |" in (tmp_path / "gpu-check" / "results.md").read_text()
