"""AUTOMATIC1111's /sdapi/v1/interrupt ends a whole script, keeping what is done: a script's cells that wait in the
queue (more cells than workers) are not run after it, and each script answers with the images made. Real Triton, a
server of one worker (so the cells wait one behind the other), the interrupt sent while the first cell denoises."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kiln.triton_server import free_port
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.test_outpainting import body as outpainting_body
from tests.test_xyz import pixels

LONG = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 150, "seed": 3, "save_images": False}


@pytest.fixture(scope="module")
def one_worker(triton, tmp_path_factory):
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), workers=1,
                                  outputs_dir=tmp_path_factory.mktemp("outputs")))
    yield live
    live.stop()


def interrupted(client, route: str, request: dict) -> tuple[list[np.ndarray], dict, list[dict]]:
    """The script's answer to `request` when /sdapi/v1/interrupt comes during its first cell's steps: its pictures,
    its info, and the caller's tasks after it (newest first)."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.post, route, json=request)
        deadline = time.monotonic() + 60
        while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline and not future.done(), \
                f"the first cell did not start ({future.result().text if future.done() else 'no answer'})"
            time.sleep(0.05)
        assert client.post("/sdapi/v1/interrupt").status_code == 200
        answer = future.result(timeout=120)
    assert answer.status_code == 200, answer.text
    return [pixels(b64) for b64 in answer.json()["images"]], json.loads(answer.json()["info"]), \
        client.get("/v1/tasks").json()["tasks"]


@pytest.mark.slow
def test_an_interrupt_ends_the_script_not_only_its_running_cell(one_worker):
    with one_worker.client() as client:
        # X/Y/Z plot of four cells: the first keeps its image (stopped at the step it was at), three are never run and
        # stay black in the grid; the lone images are the one made
        plot = LONG | {"script_name": "x/y/z plot", "script_args": ["Seed", "1, 2, 3, 4", None, "Nothing", "", None,
                                                                    "Nothing", "", None, False, True]}
        images, info, tasks = interrupted(client, "/sdapi/v1/txt2img", plot)
        assert info["xyz"]["cells"] == 4 and info["xyz"]["done"] == 1 and info["xyz"]["interrupted"] == 3
        assert info["interrupted"] is True and not info["xyz"]["failed"]
        assert len(images) == 1 + 1 and images[0].shape[1] >= 4 * 64
        grid = images[0]
        assert grid[:, -64:].max() == 0 < grid[:, :64].max()  # the last cell black, the first drawn
        assert [task["status"] for task in tasks[:4]] == ["done"] * 4
        assert sum(task["iteration"] == 0 and task["step"] == 0 for task in tasks[:4]) >= 3  # three never stepped

        # Prompts from file: the line running keeps its image, the others are left out
        lines = LONG | {"script_name": "prompts from file or textbox",
                        "script_args": [False, False, "start", "red\ngreen\nblue"]}
        images, info, _ = interrupted(client, "/sdapi/v1/txt2img", lines)
        assert len(images) == 1 and info["prompts_from_file"] == info["prompts_from_file"] | {
            "lines": 3, "images": 1, "interrupted": 2}
        assert info["all_prompts"] == ["red a photo of a cat"] and info["interrupted"] is True

        # Prompt matrix: the grid with the combinations not run black, then the one image made
        matrix = LONG | {"prompt": "a cat|red|blue", "script_name": "prompt matrix"}
        images, info, _ = interrupted(client, "/sdapi/v1/txt2img", matrix)
        assert info["prompt_matrix"]["images"] == 1 and info["prompt_matrix"]["interrupted"] == 3
        assert len(images) == 1 + 1 and info["all_prompts"] == ["a cat"]

        # Poor man's outpainting: the tile not run stays as drawn (the fill), the image is still answered
        grow = outpainting_body([32, 4, 0, ["right"]], prompt="a cat", steps=150, seed=11, denoising_strength=0.9)
        images, info, _ = interrupted(client, "/sdapi/v1/img2img", grow.model_dump(exclude_defaults=True))
        assert info["poor_mans_outpainting"]["tiles"] == 2 and info["poor_mans_outpainting"]["interrupted"] == 1
        assert len(images) == 1 and images[0].shape == (64, 128, 3)

        # Loopback, two chains, interrupted in the first chain's first loop: AUTOMATIC1111 drops an interrupted
        # loop's image, and the second chain never starts, so no image at all (as AUTOMATIC1111 answers), not an error
        loops = outpainting_body([], prompt="a cat", steps=150, denoising_strength=0.5, n_iter=2).model_dump(
            exclude_defaults=True) | {"script_name": "loopback", "script_args": [3, 0.3, "Linear", "None"]}
        images, info, _ = interrupted(client, "/sdapi/v1/img2img", loops)
        assert images == [] and info["interrupted"] is True

        # The interrupt is spent: the next request runs in full. (With the web UI's built-in scripts, checked against
        # the request as sent: its cells, whose seeds the plot sets, do not carry them.)
        again = client.post("/sdapi/v1/txt2img", json=plot | {"steps": 4, "alwayson_scripts": {
            "Seed": {"args": [3, False, -1, 0, 0, 0]}, "Sampler": {"args": [4, "Euler"]}}})
        assert again.status_code == 200 and json.loads(again.json()["info"])["xyz"]["done"] == 4


@pytest.mark.slow
def test_skip_ends_the_current_image_not_every_running_cell(triton, tmp_path):
    """/sdapi/v1/skip ends AUTOMATIC1111's current image, the oldest running (what /progress shows): a plot's other
    cell, running beside it on a second worker, goes on to its last step."""
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), workers=2, outputs_dir=tmp_path))
    try:
        with live.client() as client, ThreadPoolExecutor(1) as pool:
            plot = LONG | {"steps": 100, "script_name": "x/y/z plot",
                           "script_args": ["Seed", "1, 2", None, "Nothing", "", None, "Nothing", "", None]}
            future = pool.submit(client.post, "/sdapi/v1/txt2img", json=plot)
            deadline = time.monotonic() + 60
            while sum(task["status"] == "running" and task["step"] >= 1
                      for task in client.get("/v1/tasks").json()["tasks"]) < 2:
                assert time.monotonic() < deadline and not future.done(), "the two cells did not run side by side"
                time.sleep(0.05)
            assert client.post("/sdapi/v1/skip").status_code == 200
            answer = future.result(timeout=120)
            assert answer.status_code == 200, answer.text
            cells = client.get("/v1/tasks").json()["tasks"][:2]
        assert sorted(task["step"] < 100 for task in cells) == [False, True], cells  # one skipped, one whole
        assert json.loads(answer.json()["info"])["xyz"]["done"] == 2  # the skipped cell keeps its image
    finally:
        live.stop()
