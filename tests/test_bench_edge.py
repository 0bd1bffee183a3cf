"""`kiln bench edge` on the tiny pipeline: every row really runs (diffusers' torch pipeline, kiln's served OpenVINO
builds through Triton, OpenVINO GenAI on the converted checkpoint), each image is compared with the torch image, and
the table, JSON and plot are written. Its figures are not judged here (benchmarks/RESULTS.md holds the full-size run):
only what must hold whatever the machine, such as fp32 images that agree."""

from __future__ import annotations

import json

import pytest

from benchmarks.edge import EdgeBenchOptions, run_edge_benchmark

pytestmark = pytest.mark.slow


def test_bench_edge_runs_every_row_on_the_tiny_pipeline(tmp_path):
    result = run_edge_benchmark(EdgeBenchOptions(out=tmp_path, pipeline="tiny", size=64, steps=2,
                                                 variants=("openvino-fp32", "openvino-int4"), log=lambda _m: None))
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == ["diffusers torch-fp32", "kiln openvino-fp32", "GenAI fp32", "kiln openvino-int4",
                          "GenAI int4"]
    # The same weights, sampler, seed and size everywhere: fp32 agrees with torch, int4 costs something but not all.
    assert rows["kiln openvino-fp32"]["psnr_db"] >= 45 and rows["GenAI fp32"]["psnr_db"] >= 40
    for name in ("kiln openvino-int4", "GenAI int4"):
        assert 25 <= rows[name]["psnr_db"] < rows["kiln openvino-fp32"]["psnr_db"]
    for name in ("kiln openvino-fp32", "GenAI fp32", "kiln openvino-int4", "GenAI int4"):
        row = rows[name]
        assert len(row["ready_s"]) == 2 and row["image_s"] > 0 and row["peak_rss_mb"] > 100
    # kiln's peak is sampled over its whole process tree (Triton, its stubs, the loop); each process's own peaks summed
    # count peaks that never happened together, so they bound it from above.
    kiln = rows["kiln openvino-fp32"]
    assert kiln["peak_rss_mb"] <= kiln["sum_of_process_peaks_mb"] * 1.05
    assert set(result["versus_genai"]) == {"fp32", "int4"}
    stem = tmp_path / "edge-tiny-64"
    assert json.loads(stem.with_suffix(".json").read_text())["steps"] == 2
    assert "| kiln openvino-int4 |" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 10_000
