"""AUTOMATIC1111's names for saved files (orchestrator.server.filenames): samples_filename_pattern's tags,
save_to_dirs and directories_filename_pattern, the sequence number, grid names; and samples_save and grid_save, over
real HTTP against the session's Triton; the client's own saved files (clients.api.save_images)."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from kiln.errors import InputError
from orchestrator.server.filenames import Naming, Picture, applied, check_pattern, saved_path

IMAGE = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
INFO = {"prompt": "a photo, of a cat: red/blue?", "negative_prompt": "blurry", "seed": 7, "steps": 20,
        "cfg_scale": 7.5, "sampler": "Euler a", "model": "tiny sd", "model_hash": "abc123", "denoising_strength": 0.6}


def name(pattern: str, **picture) -> str:
    return applied(pattern, Picture(picture.pop("info", INFO), IMAGE, **picture), Naming())


def test_the_tags_read_the_picture_and_its_job():
    assert name("[seed]-[steps]-[cfg]-[sampler]-[width]x[height]") == "7-20-7.5-Euler a-6x8"
    # the prompt: sanitized (no path separators or characters a file system refuses); [prompt]'s spaces are _
    assert name("[prompt_spaces]") == "a photo, of a cat_ red_blue_"
    assert name("[prompt]") == "a_photo,_of_a_cat__red_blue_"
    assert name("[prompt_words]") == "a photo of a cat red blue"
    assert applied("[prompt_words]", Picture(INFO, IMAGE), Naming(prompt_words=3)) == "a photo of"
    assert name("[prompt_words]", info={"prompt": "!!"}) == "empty"
    assert name("[model_name]-[model_hash]-[denoising]") == "tiny sd-abc123-0.6"
    assert name("[prompt_hash]") == hashlib.sha256(INFO["prompt"].encode()).hexdigest()[:8]
    assert name("[full_prompt_hash]") == hashlib.sha256(f"{INFO['prompt']} blurry".encode()).hexdigest()[:8]
    assert name("[image_hash<6>]") == hashlib.sha256(IMAGE.tobytes()).hexdigest()[:6]
    assert name("[hasprompt<cat|nocat><dog|nodog><bird>]") == "catnodog"
    assert name("[datetime<%Y><UTC>]") == time.strftime("%Y", time.gmtime())
    assert name("[date]") == time.strftime("%Y-%m-%d") and name("[clip_skip]") == "1"
    assert name("[styles]-[prompt_no_styles]", info={"prompt": "a cat, oil painting"},
                styles=(("oil", "{prompt}, oil painting"),)) == "oil-a cat"
    # a batch: its number, the job's first and last seeds; in a batch of one they say nothing, nor the text before
    assert name("x-[batch_number]-[generation_number]", batch_size=2, index=1, seeds=(7, 8)) == "x-2-2"
    assert name("[seed]-[batch_number]_[seed_last]", seeds=(7,)) == "7"
    assert name("[seed_first]_[seed_last]", batch_size=2, seeds=(7, 8)) == "7_8"
    # a tag it does not know, or without a value here ([user] with auth off), is left as written, as there
    assert name("[nosuch]-[user]-[none]") == "[nosuch]-[user]-"
    assert name("[user]", user="alice") == "alice"
    assert name("[prompt_hash<4>]") == hashlib.sha256(INFO["prompt"].encode()).hexdigest()[:4]
    assert name("[hasprompt<dog|no dog|x>]") == "no_dog" and name("[nosuch<1>]") == "[nosuch]"
    assert name("[sampler_scheduler]", sampler="DPM++ 2M", scheduler="karras") == "DPM++ 2M_Karras"
    assert name("[datetime<%Y><America>]") == time.strftime("%Y")  # (a zone that is a folder: local time)


def test_names_stay_inside_the_outputs_folder_and_within_a_file_systems_limits(tmp_path):
    base = tmp_path / "txt2img-images"
    for pattern in ("[none]../[none]..", "[none]/tmp/x", ".[none]./.[none]./x", " ../x"):
        path = saved_path(base, "", Picture(INFO, IMAGE), Naming(dirs_pattern=pattern), "png")
        assert path.resolve().is_relative_to(base.resolve()), (pattern, path)
    # a long prompt (three bytes a character): each name at most 255 bytes, and it can be written
    long = Picture(INFO | {"prompt": "猫" * 200}, IMAGE)
    path = saved_path(base, "", long, Naming(to_dirs=False), "png", suffix="-mask-composite")
    assert len(path.name.encode()) <= 255 and path.name.endswith("-mask-composite.png")
    path.write_bytes(b"")
    deep = saved_path(base, "", long, Naming(dirs_pattern="[prompt_spaces]"), "png")
    assert len(deep.parent.name.encode()) <= 255 and deep.parent.is_dir()
    # a tag it does not know holding a folder, a lone surrogate, folders deeper than a path can be: names still
    escape = saved_path(base, "", Picture(INFO | {"prompt": "a\ud800b"}, IMAGE),
                        Naming(to_dirs=False, add_number=False, pattern="[x/../../../../evil]-[prompt_spaces]"), "png")
    assert escape.parent == base and escape.name == "[x_.._.._.._.._evil]-a_b.png"
    deepest = saved_path(base, "", long, Naming(dirs_pattern="[prompt_spaces]/" * 64), "png")
    assert deepest.parent.is_dir() and len(str(deepest.relative_to(base)).encode()) < 3000
    # a number of ten digits (a seed's name without numbering) leaves room for the rest of the name
    (base / "4294967295.png").write_bytes(b"")
    numbered = saved_path(base, "", long, Naming(to_dirs=False), "png")
    assert numbered.name.startswith("4294967296-") and len(numbered.name.encode()) <= 255
    # a name starting with a digit that is not 0-9 leaves the numbering alone
    own = tmp_path / "own"
    assert saved_path(own, "", Picture(INFO, IMAGE), Naming(to_dirs=False), "png").name == \
        "00000-7-a photo, of a cat_ red_blue_.png"
    (own / "².png").write_bytes(b"")
    assert saved_path(own, "", Picture(INFO, IMAGE), Naming(to_dirs=False), "png").name.startswith("00000-")
    # a pattern that says nothing: numbered, with or without save_images_add_number (as there)
    for naming in (Naming(pattern="[none]"), Naming(pattern="[none]", add_number=False)):
        assert saved_path(tmp_path / "quiet", "", Picture(INFO, IMAGE), naming, "png").name == "00000.png"


def test_saved_paths_are_named_and_numbered_as_automatic1111_saves_them(tmp_path):
    picture, day = Picture(INFO, IMAGE), time.strftime("%Y-%m-%d")
    # the defaults: a folder per date, <number>-<seed>, numbered on from the highest number there
    first = saved_path(tmp_path, "", picture, Naming(), "png")
    assert first == tmp_path / day / "00000-7.png"
    (tmp_path / day / "00041-3-something.jpg").touch()
    assert saved_path(tmp_path, "", picture, Naming(), "png", suffix="-mask").name == "00042-7-mask.png"
    # no folders: the prompt in the name; the pattern alone without the number
    assert saved_path(tmp_path, "", picture, Naming(to_dirs=False), "webp") == \
        tmp_path / "00000-7-a photo, of a cat_ red_blue_.webp"
    assert saved_path(tmp_path, "", picture, Naming(add_number=False, pattern="[seed]-[steps]"), "png") == \
        tmp_path / day / "7-20.png"
    # folders from a pattern (nested), and a grid: short (no pattern) unless grid_extended_filename
    nested = Naming(dirs_pattern="[model_name]/[steps]", pattern="[seed]_[sampler]")
    assert saved_path(tmp_path, "", picture, nested, "png") == tmp_path / "tiny sd" / "20" / "00000-7_Euler a.png"
    assert saved_path(tmp_path, "grid", picture, Naming(), "png", grid=True, short=True) == \
        tmp_path / day / "grid-0000.png"
    (tmp_path / day / "grid-0000.png").touch()
    assert saved_path(tmp_path, "grid", picture, Naming(grid_to_dirs=False), "png", grid=True).name == \
        "grid-0000-7.png"
    assert saved_path(tmp_path, "grid", picture, Naming(), "png", grid=True).name == "grid-0001-7.png"


def test_patterns_that_leave_the_outputs_folder_are_refused():
    check_pattern("directories_filename_pattern", "[date]/[prompt_words]")
    check_pattern("samples_filename_pattern", "[seed]-[prompt_spaces]")
    check_pattern("samples_filename_pattern", "[datetime<%Y/%m/%d>]")  # (a / inside a tag: its value's, sanitized)
    for value in ("a\x00b", "[seed]" * 200, "a\ud800"):
        with pytest.raises(InputError, match="1024 characters without control characters"):
            check_pattern("samples_filename_pattern", value)
    for key, value in (("directories_filename_pattern", "../elsewhere"), ("directories_filename_pattern", "/etc"),
                       ("directories_filename_pattern", "[date]/../../x"), ("samples_filename_pattern", "a/[seed]"),
                       ("directories_filename_pattern", "C:[date]")):
        with pytest.raises(InputError, match=key):
            check_pattern(key, value)


def test_the_client_writes_the_generated_images_not_the_grid_or_the_masks(tmp_path):
    """clients.api.save_images (kiln generate --api): an answer's grid first and a mask after each image, as a server
    with return_grid and return_mask answers, leave two images paired with their seeds."""
    import base64
    import json

    from clients.api import save_images
    from kiln import schemas
    from kiln.imaging import PNG

    def b64(value: int, text: str | None) -> str:
        return base64.b64encode(PNG.encode(np.full((4, 4, 3), value, np.uint8),
                                           {"parameters": text} if text else None)).decode()

    answer = schemas.GenerationResponse(
        images=[b64(0, "grid"), b64(1, "a cat, Seed: 7"), b64(2, None), b64(3, "a cat, Seed: 8"), b64(4, None)],
        parameters={}, info=json.dumps({"all_seeds": [7, 8], "index_of_first_image": 1}))
    written = save_images(answer, tmp_path / "cat.png")
    assert [(path.name, seed) for path, seed in written] == [("cat-1.png", 7), ("cat-2.png", 8)]
    from PIL import Image

    assert [np.asarray(Image.open(path))[0, 0, 0] for path, _ in written] == [1, 3]
    # a server that writes no infotext (AUTOMATIC1111 with enable_pnginfo off): the first images, one per seed
    bare = schemas.GenerationResponse(images=[b64(5, None), b64(6, None)], parameters={},
                                      info=json.dumps({"all_seeds": [9]}))
    assert np.asarray(Image.open(save_images(bare, tmp_path / "bare.png")[0][0]))[0, 0, 0] == 5
    # a script's grid first without index_of_first_image (the loopback's, as AUTOMATIC1111's): the last ones
    loopback = schemas.GenerationResponse(images=[b64(0, "grid"), b64(1, "loop 1"), b64(2, "loop 2")], parameters={},
                                          info=json.dumps({"all_seeds": [7, 7]}))
    assert [np.asarray(Image.open(p))[0, 0, 0] for p, _ in save_images(loopback, tmp_path / "loop.png")] == [1, 2]


def test_a_done_jobs_answer_is_made_once_per_encoding():
    """a1111.to_response keeps a done task's answer (GET /v1/tasks/{id} asks for it on every poll): the same answer
    again, a list of its own each time, and made anew in another encoding or once interrupted; an /sdapi job's is
    not kept."""
    from kiln import schemas
    from kiln.imaging import ImageFormat
    from orchestrator.jobs import Job, Status
    from orchestrator.pipeline import Txt2ImgRequest
    from orchestrator.server.a1111 import to_response

    body = schemas.Txt2ImgBody(prompt="a cat", batch_size=2)
    job = Job(kind="txt2img", request=Txt2ImgRequest(prompt="a cat", batch_size=2), status=Status.DONE,
              images=[IMAGE, IMAGE[::-1]], infos=[INFO, INFO | {"seed": 8}],
              context={"body": body, "grid": True, "family": "tasks"})
    first = to_response(job, body, ImageFormat("png"))
    assert len(first["images"]) == 3  # the grid, then the two images
    first["images"].clear()
    again = to_response(job, body, ImageFormat("png"))
    assert len(again["images"]) == 3 and again["info"] == first["info"]
    assert again["images"][0] is to_response(job, body, ImageFormat("png"))["images"][0]  # (not encoded again)
    jpeg = to_response(job, body, ImageFormat("jpg"))
    assert all(image.startswith("/9j/") for image in jpeg["images"])
    job.interrupted = True
    assert '"interrupted": true' in to_response(job, body, ImageFormat("jpg"))["info"]
    job.context = {"body": body, "grid": True, "family": "sdapi"}
    assert to_response(job, body, ImageFormat("png")) and "answer" not in job.context


def test_the_task_answer_benchmark_runs(tmp_path):
    """benchmarks/task_answers.py at a small side: both arms timed, the table written."""
    from benchmarks.task_answers import ARMS
    from benchmarks.task_answers import main as bench_main

    rows = bench_main(["--sides", "32", "--repeats", "1", "--out", str(tmp_path)])["rows"]
    assert [row["arm"] for row in rows] == list(ARMS) and all(row["ms"] > 0 for row in rows)
    assert (tmp_path / "task_answers.json").exists()


@pytest.fixture(scope="module")
def api(own_api):
    return own_api


SMALL = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 2, "seed": 7, "batch_size": 2,
         "save_images": True}
NAMING = {"samples_filename_pattern": "[seed]-[steps]-[prompt_words]", "save_to_dirs": False,
          "grid_extended_filename": True, "grid_save_to_dirs": False}


@pytest.mark.slow
def test_saved_files_follow_the_name_settings_and_samples_save_and_grid_save(api):
    defaults = {key: value for key, value in Naming().__dict__.items()}
    with api.client() as client:
        try:
            assert client.post("/sdapi/v1/options", json=NAMING).is_success
            answer = client.post("/sdapi/v1/txt2img", json=SMALL)
            assert answer.status_code == 200, answer.text
            folder = api.outputs / "txt2img-images"
            assert sorted(p.name for p in folder.iterdir()) == ["00000-7-2-a photo of a cat.png",
                                                                "00001-8-2-a photo of a cat.png"]
            grids = api.outputs / "txt2img-grids"
            assert [p.name for p in grids.iterdir()] == ["grid-0000-7-2-a photo of a cat.png"]
            # the gallery lists them where they are (no date folder)
            listed = client.get("/v1/outputs").json()["items"]
            assert sorted(item["path"] for item in listed) == sorted(
                f"{p.parent.name}/{p.name}" for p in (*folder.iterdir(), *grids.iterdir()))
            assert {item["kind"] for item in listed} == {"txt2img-images", "txt2img-grids"}
            assert all(client.get(item["url"]).status_code == 200 for item in listed)  # (spaces in their names)

            # a request's own: the images alone (its answer still has the grid: return_grid), or the grid alone
            answer = client.post("/sdapi/v1/txt2img", json=SMALL | {"override_settings": {"grid_save": False}})
            assert answer.status_code == 200 and len(answer.json()["images"]) == 3, answer.text
            assert len(list(folder.iterdir())) == 4 and len(list(grids.iterdir())) == 1
            answer = client.post("/sdapi/v1/txt2img", json=SMALL | {"override_settings": {"samples_save": False}})
            assert answer.status_code == 200, answer.text
            assert len(list(folder.iterdir())) == 4 and len(list(grids.iterdir())) == 2

            # refused by name: a pattern that leaves the outputs folder, a setting sent where nothing is saved
            refused = client.post("/sdapi/v1/options", json={"directories_filename_pattern": "../x"})
            assert refused.status_code == 422 and "directories_filename_pattern" in refused.text
            refused = client.post("/sdapi/v1/txt2img", json=SMALL | {"save_images": False, "override_settings": {
                "samples_filename_pattern": "[seed]"}})
            assert refused.status_code == 422 and "samples_filename_pattern" in refused.text
            for overrides, flag in (({"grid_extended_filename": True}, "do_not_save_grid"),
                                    ({"samples_save": False}, "do_not_save_samples")):
                refused = client.post("/sdapi/v1/txt2img", json=SMALL | {flag: True, "override_settings": overrides})
                assert refused.status_code == 422 and next(iter(overrides)) in refused.text, refused.text
            refused = client.post("/sdapi/v1/options", json={"directories_max_prompt_words": 0})
            assert refused.status_code == 422 and "directories_max_prompt_words" in refused.text
            refused = client.post("/sdapi/v1/options", json={"img_downscale_threshold": 0})
            assert refused.status_code == 422 and "img_downscale_threshold" in refused.text
            assert client.get("/sdapi/v1/options").json()["save_to_dirs"] is False
        finally:
            from orchestrator.server.filenames import NAMING_SETTINGS

            client.post("/sdapi/v1/options", json={key: defaults[name] for key, name in NAMING_SETTINGS.items()})
