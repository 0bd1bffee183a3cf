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


@pytest.mark.slow
def test_the_classify_api_benchmark_runs_on_the_tiny_vit(tmp_path):
    from benchmarks.classify_api import ARMS, ClassifyBenchOptions, run_classify_benchmark

    result = run_classify_benchmark(ClassifyBenchOptions(out=tmp_path, clients=(1, 2), requests_per_client=3,
                                                         rounds=1), log=lambda _m: None)
    rows = {(r["clients"], r["arm"]): r for r in result["rows"]}
    assert set(rows) == {(n, arm) for n in (1, 2) for arm in ARMS}  # every answer checked by the benchmark itself
    assert all(row["requests"] == 3 * n and row["images_per_s"] > 0 for (n, _), row in rows.items())
    assert rows[(2, "triton")]["images_per_s_vs_triton"] == 1.0 and rows[(2, "api")]["p50_vs_triton"] > 0
    assert "| 2 | api | 6 |" in (tmp_path / "classify-api.md").read_text()
    assert (tmp_path / "classify-api.png").stat().st_size > 10_000


def test_the_answers_benchmark_runs_both_arms_and_checks_their_answers(tmp_path):
    from benchmarks.answers import ARMS, AnswersBenchOptions, run_answers_benchmark

    result = run_answers_benchmark(AnswersBenchOptions(out=tmp_path, images=3, mb=0.1, clients=1,
                                                       requests_per_client=2, rounds=1), log=lambda _m: None)
    rows = {row["arm"]: row for row in result["rows"]}
    assert set(rows) == set(ARMS) and all(row["answers"] == 2 and row["answer_mb"] >= 0.3 for row in rows.values())
    assert rows["default"]["poll_max_vs_default"] == 1.0 and rows["pieces"]["answer_p50_ms"] > 0
    assert "| pieces | " in (tmp_path / "answers.md").read_text() and (tmp_path / "answers.png").stat().st_size > 5_000


def test_the_shared_listing_benchmark_lists_the_same_jobs_both_ways(tmp_path):
    from benchmarks.shared_listing import run_listing_benchmark

    result = run_listing_benchmark(jobs=20, rounds=1, out=tmp_path, log=lambda _m: None)
    assert result["listed"] == 20 and [r["arm"] for r in result["rows"]] == ["one round trip each", "jobs(), pipelined"]
    assert result["rows"][0]["vs_baseline"] == 1.0 and all(r["ms"] > 0 for r in result["rows"])
    assert (tmp_path / "shared-listing.png").stat().st_size > 5_000
