"""AUTOMATIC1111's Prompt matrix script through the API: every combination of the prompt's variable parts an image of
its own (tasks through the step batcher), the labelled grid first."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln import schemas
from kiln.errors import InputError
from kiln.triton_server import free_port
from orchestrator.server.prompt_matrix import bodies, draw, parse
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.test_xyz import pixels


def body(args, prompt="a cat|red|on a mat", **fields) -> schemas.Txt2ImgBody:
    return schemas.Txt2ImgBody(prompt=prompt, script_name="prompt matrix", script_args=args, **fields)


def test_the_combinations_are_automatic1111s():
    """Combination i has variable part k where bit k of i is set; parts are stripped of spaces and commas."""
    assert parse(body([])).prompts == ("a cat", "a cat, red", "a cat, on a mat", "a cat, red, on a mat")
    at_start = parse(body([True, False, "positive", "space"], prompt="a cat| red,|on a mat"))
    assert at_start.prompts == ("a cat", "red a cat", "on a mat a cat", "red on a mat a cat")
    negative = parse(body([False, False, "negative"], negative_prompt="blurry|dark"))
    assert negative.negative and negative.prompts == ("blurry", "blurry, dark")
    assert parse(body([], prompt="no bars")).prompts == ("no bars",)  # one image, the prompt's


def test_the_seed_is_fixed_once_and_counts_up_with_different_seeds():
    same = bodies(body([], seed=-1, subseed=-1), parse(body([])))
    assert len({cell.seed for cell in same}) == 1 and same[0].seed != -1
    assert len({cell.subseed for cell in same}) == 1 and same[0].subseed != -1  # AUTOMATIC1111's fix_seed: both
    counting = bodies(body([False, True], seed=10), parse(body([False, True])))
    assert [cell.seed for cell in counting] == [10, 11, 12, 13]
    assert [cell.prompt for cell in counting] == list(parse(body([])).prompts)
    assert all(cell.script_name is None and cell.batch_size == 1 for cell in counting)


@pytest.mark.parametrize(("fields", "message"), [
    ({"script_args": [False, False, "both"]}, "prompt_type must be positive or negative"),
    ({"script_args": [False, False, "positive", "tab"]}, "variations_delimiter must be comma or space"),
    ({"script_args": [False, False, "positive", "comma", 900]}, r"margin_size must be within \[0, 500\]"),
    ({"script_args": [False] * 6}, "at most 5 values"),
    ({"n_iter": 2}, "its batch count is its own"),
    ({"prompt": "a" + "|b" * 7}, "7 variable parts make 128 images; this server makes at most 64"),
])
def test_what_cannot_run_is_named(fields, message):
    with pytest.raises(InputError, match=message):
        parse(body(fields.pop("script_args", []), **fields))


def test_the_grid_is_laid_out_as_automatic1111s():
    """2^ceil(n/2) columns for the first half of the parts, 2^floor(n/2) rows for the rest; labels above and left."""
    matrix = parse(body([False, False, "positive", "comma", 4], prompt="a|b|c|d"))
    images = [np.full((128, 192, 3), 10 * i, np.uint8) for i in range(8)]
    grid = draw(matrix, images)
    cols, rows, left = 4, 2, 192 * 3 // 4
    assert grid.shape[1] == left + cols * 192 + 3 * 4
    top = grid.shape[0] - rows * 128 - 4
    assert top > 0
    for index in range(8):  # image i at row i // cols, column i % cols
        row, col = divmod(index, cols)
        y, x = top + row * (128 + 4), left + col * (192 + 4)
        assert (grid[y:y + 128, x:x + 192] == 10 * index).all(), index
    labels = grid[:top, left:]  # black text where a column has its part, grey (struck through) where not
    assert (labels.max(axis=2) < 60).any() and (labels == 153).all(axis=2).any()
    assert (grid[top:, :left].max(axis=2) < 60).any()  # the rows' labels, left of them


@pytest.mark.slow
def test_the_matrix_through_the_api(triton, tmp_path, monkeypatch):
    import threading

    from orchestrator.server import cells

    made, real = [], cells.made_answer  # the script's answer: its thread seen (never the event loop's, kiln-api)
    monkeypatch.setattr(cells, "made_answer", lambda *args: made.append(threading.current_thread().name) or real(*args))
    outputs = tmp_path / "outputs"
    api = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), outputs_dir=outputs))
    request = {"prompt": "a photo of a cat|red|at night", "width": 64, "height": 64, "seed": 7, "steps": 3,
               "save_images": True, "script_name": "prompt matrix", "script_args": [False, True]}
    try:
        with api.client() as client:
            answer = client.post("/sdapi/v1/txt2img", json=request)
            assert answer.status_code == 200, answer.text
            images, info = answer.json()["images"], json.loads(answer.json()["info"])
            assert len(images) == 1 + 4  # the grid, then each combination's image
            assert len(made) == 1 and made[0] != api.thread.name  # encoded off the event loop
            prompts = ["a photo of a cat", "a photo of a cat, red", "a photo of a cat, at night",
                       "a photo of a cat, red, at night"]
            assert info["all_prompts"] == prompts and info["all_seeds"] == [7, 8, 9, 10]
            assert info["infotexts"][0] == info["infotexts"][1] and info["prompt_matrix"]["images"] == 4
            assert info["index_of_first_image"] == 1  # (as AUTOMATIC1111's prompt matrix: its grid first)
            grid = pixels(images[0])
            assert grid.shape[0] > 2 * 64 and grid.shape[1] > 2 * 64
            # each image is its own request's (step batching changes no pixel beyond rounding)
            alone = client.post("/sdapi/v1/txt2img", json={"prompt": prompts[3], "width": 64, "height": 64,
                                                            "seed": 10, "steps": 3})
            assert np.abs(pixels(images[4]).astype(int) - pixels(alone.json()["images"][0])).max() <= 2
            saved = [item["path"].split("/")[-1] for item in client.get("/v1/outputs").json()["items"]
                     if item["kind"] == "txt2img-grids"]
            assert saved == ["prompt_matrix-0000-7.png"]  # (the seed after the number, as there)
            assert "prompt matrix" in client.get("/sdapi/v1/scripts").json()["txt2img"]
            listed = [s for s in client.get("/sdapi/v1/script-info").json() if s["name"] == "prompt matrix"]
            assert len(listed) == 2 and len(listed[0]["args"]) == 5
            refused = client.post("/sdapi/v1/txt2img", json=request | {"n_iter": 3})
            assert refused.status_code == 422 and "its batch count is its own" in refused.text
            task = client.post("/v1/tasks/txt2img", json=request)
            assert task.status_code == 422 and "runs through /sdapi/v1/txt2img" in task.text
    finally:
        api.stop()


@pytest.mark.slow
def test_a_script_past_its_timeout_cancels_every_cell(triton, tmp_path):
    import time

    from orchestrator.pipeline import Limits

    api = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), outputs_dir=tmp_path / "outputs",
                                 request_timeout_s=1.0, limits=Limits(max_steps=2000)))
    request = {"prompt": "a photo of a cat|red|at night", "width": 64, "height": 64, "seed": 7, "steps": 2000,
               "script_name": "prompt matrix", "script_args": [False, True]}
    try:
        with api.client() as client:
            answer = client.post("/sdapi/v1/txt2img", json=request)
            assert answer.status_code == 504 and "did not finish within 1 s" in answer.text, answer.text
            cells = api.app.state.engine.queue.jobs()
            assert len(cells) == 4  # every combination's cell, each cancelled (one watch for them all)
            deadline = time.monotonic() + 30
            while any(cell.status.value != "cancelled" for cell in cells):
                assert time.monotonic() < deadline, [cell.status.value for cell in cells]
                time.sleep(0.05)
            assert all(cell.step < 2000 for cell in cells)
    finally:
        api.stop()
