"""The scripts' benchmarks (X/Y/Z plot, prompts from file, loopback) run end to end on the test pipeline, one short
round each, so that they cannot rot: each arm answers, and the tables and charts are made."""

from __future__ import annotations

import pytest

from benchmarks import scripts, xyz


@pytest.mark.slow
def test_the_script_benchmarks_run_on_the_tiny_pipeline(model_repo, tmp_path):
    with xyz.tiny_api(tmp_path, repo=model_repo) as (client, side):
        result, grid = xyz.run(1, 1, client, side)
        timed = scripts.run(1, 2, 2, 2, 2, client, side)  # 1 round, 2 steps, 2 lines, 2 chains of 2 loops
    assert grid.startswith(b"\x89PNG") and result["cells_info"]["done"] == 9 and result["speedup"] > 0
    assert "3x3 X/Y/Z plot" in xyz.table(result)
    xyz.plot(result, tmp_path / "xyz.png")
    assert set(timed["seconds"]) == {"Prompts from file, 2 lines", "Loopback, 2 chains x 2 loops"}
    assert all(seconds > 0 for arms in timed["seconds"].values() for seconds in arms.values())
    assert "| Loopback, 2 chains x 2 loops |" in scripts.table(timed)
    scripts.plot(timed, tmp_path / "scripts.png")
    assert (tmp_path / "scripts.png").stat().st_size > 0
