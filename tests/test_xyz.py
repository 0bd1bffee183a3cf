"""AUTOMATIC1111's X/Y/Z plot through the API (cells as tasks through the step batcher, the labelled grid), and the
public endpoints the web page reads: the caller's task list, the outputs gallery, the server's capabilities."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from kiln import schemas
from kiln.errors import InputError
from kiln.triton_server import free_port
from orchestrator.security import SecurityOptions
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from orchestrator.server.xyz import A1111_AXES, cell_bodies, parse


def body(args, **fields) -> schemas.Txt2ImgBody:
    return schemas.Txt2ImgBody(prompt="a cat on a mat", script_name="x/y/z plot", script_args=args, **fields)


def test_axis_types_are_automatic1111s_indices_or_labels():
    # AUTOMATIC1111 1.10's lists differ by route: CFG Scale is 6 in txt2img (after Hires steps), 5 in img2img.
    assert A1111_AXES["txt2img"][6] == "CFG Scale" == A1111_AXES["img2img"][5]
    assert A1111_AXES["txt2img"][9] == "Sampler" == A1111_AXES["img2img"][9]
    plot = parse(body([6, "5, 7.5", None, "Steps", "1-3", None, 0, "", None]), "txt2img")
    assert [a.label for a in plot.axes] == ["CFG Scale", "Steps", "Nothing"]
    assert plot.axes[0].values == [5.0, 7.5] and plot.axes[1].values == [1, 2, 3]
    ranges = parse(body(["Steps", "10-30 (+10)", None, "CFG Scale", "1-2 [3]", None]), "txt2img")
    assert ranges.axes[0].values == [10, 20, 30] and ranges.axes[1].values == [1.0, 1.5, 2.0]
    dropdown = parse(body(["Sampler", "", ["Euler", "DDIM"], 0, "", None, 0, "", None, True, False, False, False, 0,
                           False]), "txt2img")
    assert dropdown.axes[0].values == ["Euler", "DDIM"]


def test_cells_vary_what_their_axes_name():
    plot = parse(body(["Seed", "-1, 7", None, "Prompt S/R", "cat, dog", None, "Denoising", "0.5", None]), "txt2img")
    seeds = plot.axes[0].values
    assert seeds[1] == 7 and 0 <= seeds[0] < 2**32 - 1  # -1 fixed to one random seed for every cell of its column
    cells = cell_bodies(body([], seed=-1), plot)
    assert [index for index, _ in cells] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]  # x innermost
    assert [c.prompt for _, c in cells] == ["a cat on a mat", "a cat on a mat", "a dog on a mat", "a dog on a mat"]
    assert [c.seed for _, c in cells] == [seeds[0], 7, seeds[0], 7]
    varied = cell_bodies(body([], seed=-1, subseed=-1, subseed_strength=0.5), plot)  # fix_seed: the subseed too
    assert len({c.subseed for _, c in varied}) == 1 and varied[0][1].subseed != -1
    assert all(c.denoising_strength == 0.5 and c.script_name is None and c.script_args == [] for _, c in cells)
    lines = parse(body(["Prompt S/R", "cat\nred, big dog", None, 0, "", None, 0, "", None, True, False, False, False,
                        0, True, True]), "txt2img")
    assert lines.axes[0].values == ["cat", "red, big dog"]  # raw_mode: one value per line
    refined = parse(body(["Refiner checkpoint", "sdxl_refiner", None, "Refiner switch at", "0.5, 0.8"]), "txt2img")
    assert [(c.refiner_checkpoint, c.refiner_switch_at) for _, c in cell_bodies(body([]), refined)] == \
        [("sdxl_refiner", 0.5), ("sdxl_refiner", 0.8)]
    noise = schemas.Img2ImgBody(prompt="a cat", init_images=["x"], script_name="x/y/z plot",
                                script_args=["Initial noise multiplier", "0.9, 1.1"])
    assert [c.initial_noise_multiplier for _, c in cell_bodies(noise, parse(noise, "img2img"))] == [0.9, 1.1]
    schedule = parse(body(["Schedule rho", "3, 5", None, "Schedule max sigma", "8"]), "txt2img")  # Settings values
    assert [c.override_settings for _, c in cell_bodies(body([]), schedule)] == [{"rho": 3.0, "sigma_max": 8.0},
                                                                               {"rho": 5.0, "sigma_max": 8.0}]
    discard = parse(body(["Always discard next-to-last sigma", "False, True", None, "SGM noise multiplier", "True"]),
                    "txt2img")  # their boolean choices
    assert [c.override_settings for _, c in cell_bodies(body([]), discard)] == \
        [{"always_discard_next_to_last_sigma": False, "sgm_noise_multiplier": True},
         {"always_discard_next_to_last_sigma": True, "sgm_noise_multiplier": True}]
    order = parse(body(["Prompt order", "cat, on, mat", None, "RNG source", "CPU, NV"]), "txt2img")
    assert len(order.axes[0].values) == 6 and order.axes[0].names()[:2] == ["cat, on, mat", "cat, mat, on"]
    orders = cell_bodies(body([]), order)  # each order put back in the places the values held, the rest kept
    assert [c.prompt for _, c in orders[:6]] == ["a cat on a mat", "a cat mat a on", "a on cat a mat",
                                                 "a on mat a cat", "a mat cat a on", "a mat on a cat"]
    assert [c.override_settings["randn_source"] for _, c in orders] == ["CPU"] * 6 + ["NV"] * 6
    assert order.axes[1].names() == ["RNG source: CPU", "RNG source: NV"]
    kept = parse(body(["Seed", "-1", None, 0, "", None, 0, "", None, True, False, False, True]), "txt2img")
    assert kept.axes[0].values == [-1]  # no_fixed_seeds: -1 stays -1


@pytest.mark.parametrize(("args", "message"), [
    (["Token merging ratio", "0.1"], "axis 'Token merging ratio' is not supported by this server; it plots: Nothing, "
                                     "Seed"),
    (["Prompt order", "cat, horse"], "Prompt order did not find 'horse' in the prompt"),
    (["Prompt order", "a, b, c, d, e"], "Prompt order of 5 values makes 120 cells"),
    ([30, "x"], "axis 'Face restore' is not supported"),  # txt2img's index 30
    ([99, "1"], "X type 99 is not an axis (0 to 37"),
    (["Steps", "a few"], "the X axis (Steps) value 'a few' is not a int or a range"),
    (["Always discard next-to-last sigma", "yes"], "value 'yes' is not a boolean"),
    (["Steps", ""], "the X axis (Steps) has no values"),
    (["Prompt S/R", "horse, dog"], "Prompt S/R did not find 'horse'"),
    (["[ControlNet] Weight", "0.5, 1"], "needs a ControlNet unit"),
    (["Seed", "1-9", None, "Steps", "1-8"], "72 cells; this server plots at most 64"),
    ([0] * 17, "at most 16 values"),
    (["Image CFG Scale", "1.5, 3"], "the X axis 'Image CFG Scale' is img2img's (AUTOMATIC1111 lists it there only)"),
    ([0, "", None, "Cond. Image Mask Weight", "0.5"], "the Y axis 'Cond. Image Mask Weight' is img2img's"),
])
def test_what_cannot_be_plotted_is_refused_by_name(args, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        cell_bodies(body([]), parse(body(args), "txt2img"))


def test_txt2img_only_axes_are_refused_on_img2img():
    for axis in ("Hires steps", "Hires sampler", "Hires upscaler"):
        plot = schemas.Img2ImgBody(prompt="a cat", init_images=["x"], script_name="x/y/z plot", script_args=[axis, "2"])
        with pytest.raises(InputError, match=f"the X axis '{axis}' is txt2img's"):
            parse(plot, "img2img")


@pytest.fixture(scope="module")
def api(triton, tmp_path_factory):
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(),
                                  outputs_dir=tmp_path_factory.mktemp("outputs")))
    yield live
    live.stop()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.mark.slow
def test_the_plot_through_the_api(api):
    request = {"prompt": "a photo of a cat", "width": 64, "height": 64, "seed": 5, "save_images": True,
               "script_name": "x/y/z plot",
               "script_args": [1, "1, 2", None, 4, "3, 5", None, 0, "", None, True, True, False, False, 0, True]}
    with api.client() as client:
        answer = client.post("/sdapi/v1/txt2img", json=request)
        assert answer.status_code == 200, answer.text
        images, info = answer.json()["images"], json.loads(answer.json()["info"])
        assert len(images) == 1 + 4  # the grid, then the cells (include_lone_images)
        grid = pixels(images[0])
        assert grid.shape[0] > 2 * 64 and grid.shape[1] > 2 * 64  # two cells each way, plus the labels' margins
        assert 'X Type: Seed, X Values: "1, 2", Y Type: Steps, Y Values: "3, 5"' in info["infotexts"][0]
        assert info["xyz"]["cells"] == 4 and info["xyz"]["done"] == 4 and not info["xyz"]["failed"]
        # A cell is the image its own request gives (step batching changes no pixel beyond rounding).
        single = client.post("/sdapi/v1/txt2img", json={"prompt": "a photo of a cat", "width": 64, "height": 64,
                                                        "seed": 2, "steps": 5})
        assert np.abs(pixels(images[4]).astype(int) - pixels(single.json()["images"][0])).max() <= 2
        # Each cell and the grid were saved; the cells are the caller's tasks.
        listing = client.get("/v1/outputs").json()
        kinds = sorted(item["kind"] for item in listing["items"])
        assert kinds.count("txt2img-images") == 4 and kinds.count("txt2img-grids") == 1
        saved_grid = next(item for item in listing["items"] if item["kind"] == "txt2img-grids")
        assert saved_grid["path"].split("/")[-1].startswith("xyz_grid-") and saved_grid["fields"]["X Type"] == "Seed"
        assert client.get(saved_grid["url"]).content[:8] == b"\x89PNG\r\n\x1a\n"
        assert client.get("/v1/outputs/file/../../../etc/passwd").status_code == 404
        tasks = client.get("/v1/tasks").json()
        assert len(tasks["tasks"]) >= 4 and {t["status"] for t in tasks["tasks"]} == {"done"}
        # A bad cell is refused before anything is queued.
        before = len(client.get("/v1/tasks").json()["tasks"])
        bad = client.post("/sdapi/v1/txt2img", json=request | {"script_args": ["Steps", "4, 0"]})
        assert bad.status_code == 422 and "X/Y/Z plot cell Steps: 0: steps must be" in bad.json()["detail"]
        assert len(client.get("/v1/tasks").json()["tasks"]) == before
        task = client.post("/v1/tasks/txt2img", json=request)
        assert task.status_code == 422 and "runs through /sdapi/v1/txt2img" in task.json()["detail"]
        assert "x/y/z plot" in client.get("/sdapi/v1/scripts").json()["txt2img"]
        caps = client.get("/v1/capabilities").json()
        assert caps["sd"]["min_size"] == 32 and caps["sd"]["max_size"] == 128 and caps["classify"] is True
        assert "Steps" in client.get("/v1/xyz-axes").json()["img2img"]
        # A Z axis with sub-grids: the whole grid, then one grid per Z value.
        z = client.post("/sdapi/v1/txt2img", json=request | {"save_images": False, "script_args": [
            "Seed", "1, 2", None, "Nothing", "", None, "CFG Scale", "3, 6", None, True, False, True]}).json()
        assert len(z["images"]) == 3 and pixels(z["images"][0]).shape[1] > pixels(z["images"][1]).shape[1]
        # A cell of two images is their grid (as AUTOMATIC1111 draws it); do_not_save_grid keeps the plot unsaved.
        grids = [i for i in client.get("/v1/outputs").json()["items"] if i["kind"] == "txt2img-grids"]
        pair = client.post("/sdapi/v1/txt2img", json=request | {"batch_size": 2, "do_not_save_grid": True,
                                                                "script_args": ["Seed", "1, 2", None, 0, "", None, 0,
                                                                                "", None, True, True]}).json()
        assert len(pair["images"]) == 1 + 2 * 2 and pixels(pair["images"][0]).shape[1] >= 2 * 2 * 64
        assert [i for i in client.get("/v1/outputs").json()["items"] if i["kind"] == "txt2img-grids"] == grids


@pytest.mark.slow
def test_the_task_list_shows_others_as_counts_only(triton, tmp_path):
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), outputs_dir=tmp_path, workers=1,
                                  security=SecurityOptions(credentials=(("alice", "a"), ("bob", "b")))))
    try:
        with live.client(auth=("alice", "a")) as alice, live.client(auth=("bob", "b")) as bob:
            slow = {"prompt": "private prompt", "width": 64, "height": 64, "steps": 150}
            first = alice.post("/v1/tasks/txt2img", json=slow).json()["id"]
            second = alice.post("/v1/tasks/txt2img", json=slow).json()["id"]
            mine = alice.get("/v1/tasks").json()
            assert [t["id"] for t in mine["tasks"]] == [second, first] and mine["tasks"][0]["queue_position"] == 1
            theirs = bob.get("/v1/tasks").json()
            assert theirs["tasks"] == [] and theirs["others"]["queued"] + theirs["others"]["running"] == 2
            assert "private prompt" not in json.dumps(theirs)
            for task in (first, second):
                alice.delete(f"/v1/tasks/{task}")
    finally:
        live.stop()
