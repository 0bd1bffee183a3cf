"""AUTOMATIC1111's "Prompts from file or textbox" script: each line a generation of its own (a prompt, or options
as its cmdargs reads them), all queued at once through the step batcher; the lines' images in order."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from kiln import schemas
from kiln.errors import InputError
from kiln.infotext import read_png_info
from kiln.triton_server import free_port
from orchestrator.server.prompts_from_file import MAX_LINES, bodies, parse, read_line
from orchestrator.server.service import BackgroundAPI
from orchestrator.server.settings import Settings
from tests.test_xyz import pixels


def body(text, iterate=False, same_seed=False, position="start", **fields) -> schemas.Txt2ImgBody:
    return schemas.Txt2ImgBody(script_name="prompts from file or textbox",
                               script_args=[iterate, same_seed, position, text], **fields)


def run_lines(text, **fields) -> list[schemas.Txt2ImgBody]:
    base = body(text, **fields)
    return bodies(base, parse(base))


def test_a_line_is_a_prompt_or_options_as_automatic1111_reads_them():
    assert read_line("a cat -- on a mat") == {"prompt": "a cat -- on a mat"}  # not starting with --: a prompt
    line = ('--prompt "a photo" of a cat --negative_prompt blurry --steps 12 --cfg_scale 4.5 --seed 3 '
            '--sampler_name "Euler a" --tiling true --styles "warm, film" --sd_model other')
    assert read_line(line) == {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 12,
                               "cfg_scale": 4.5, "seed": 3, "sampler_name": "Euler a", "tiling": True,
                               "styles": ["warm", "film"], "sd_model": "other"}
    assert read_line("--tiling FALSE") == {"tiling": False}


@pytest.mark.parametrize(("line", "message"), [
    ("--steps many", "--steps 'many' is not a whole number"),
    ("--cfg_scale high", "--cfg_scale 'high' is not a number"),
    ("--tiling yes", "--tiling 'yes' is not true or false"),
    ("--steps", "--steps has no value"),
    ("--size 5", "unknown option --size"),
    ("--steps 3 extra", "'extra' is not an option"),
    ("--outpath_samples /tmp/x", "--outpath_samples is not supported by this server"),
    ("--prompt 'unclosed", "No closing quotation"),
])
def test_a_line_that_cannot_be_read_is_refused_naming_it(line, message):
    with pytest.raises(InputError, match=f"line 2 .*{message}"):
        parse(body(f"a dog\n{line}"))


def test_prompts_join_the_requests_and_options_replace_its_fields():
    text = "red\n\n  --prompt blue --negative_prompt dark --steps 9 --sd_model other\n--sampler_index 3\n"
    start = run_lines(text, prompt="a cat", negative_prompt="blurry", sampler_name="Euler")
    assert [(b.prompt, b.negative_prompt) for b in start] == [("red a cat", "blurry"), ("blue a cat", "dark blurry"),
                                                              ("a cat", "blurry")]
    assert [b.steps for b in start] == [50, 9, 50] and start[1].override_settings == {"sd_model_checkpoint": "other"}
    assert (start[2].sampler_index, start[2].sampler_name) == (3, None)  # the index names the sampler
    assert all(b.script_name is None and b.script_args == [] for b in start)
    end = run_lines("red", position="end", prompt="a cat")
    assert end[0].prompt == "a cat red"
    alone = run_lines("red\n--negative_prompt dark")
    assert [(b.prompt, b.negative_prompt) for b in alone] == [("red", ""), ("", "dark")]  # no request prompt


def test_seeds_as_automatic1111_counts_them():
    text = "a\nb\n--seed 100\nc"
    iterate = run_lines(text, iterate=True, seed=10, batch_size=2, n_iter=3)
    assert [b.seed for b in iterate] == [10, 16, 100, 28]  # + batch_size x n_iter per line; a line's own wins
    drawn = run_lines(text, same_seed=True)
    assert len({b.seed for b in drawn if b.prompt != ""}) == 1 and drawn[0].seed != -1
    assert [b.seed for b in run_lines("a\nb")] == [-1, -1]  # each line draws its own


@pytest.mark.parametrize(("fields", "message"), [
    ({"text": "--restore_faces true"}, "line 1: restore_faces is not supported by this server"),
    ({"text": "--steps -- --width 7.5"}, "--steps '--' is not a whole number"),
    ({"position": "middle"}, "prompt_position must be start or end"),
    ({"text": " \n \n"}, "prompt_txt has no line to run"),
    ({"text": "a\n" * (MAX_LINES + 1)}, f"{MAX_LINES + 1} lines; this server runs at most {MAX_LINES}"),
])
def test_what_cannot_run_is_named(fields, message):
    with pytest.raises(InputError, match=message):
        run_lines(fields.pop("text", "a cat"), **fields)


def test_script_args_take_automatic1111_110s_four_values():
    with pytest.raises(InputError, match=r"takes 4 values .*got 3"):  # the older [iterate, same seed, text]
        parse(schemas.Txt2ImgBody(script_name="prompts from file or textbox", script_args=[False, False, "a"]))


@pytest.mark.slow
def test_the_lines_through_the_api(triton, tmp_path):
    api = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), outputs_dir=tmp_path / "outputs"))
    text = "red\n--prompt blue --steps 2 --seed 40 --batch_size 2\n--negative_prompt dark --cfg_scale 3"
    request = {"prompt": "a photo of a cat", "width": 64, "height": 64, "seed": 7, "steps": 3, "save_images": True,
               "script_name": "prompts from file or textbox", "script_args": [True, False, "end", text]}
    try:
        with api.client() as client:
            answer = client.post("/sdapi/v1/txt2img", json=request)
            assert answer.status_code == 200, answer.text
            images, info = answer.json()["images"], json.loads(answer.json()["info"])
            assert len(images) == 1 + 2 + 1  # each line's images in order, no grid
            assert info["all_prompts"] == ["a photo of a cat red", "a photo of a cat blue", "a photo of a cat blue",
                                           "a photo of a cat"]
            assert info["all_negative_prompts"][3] == "dark" and info["all_seeds"] == [7, 40, 41, 9]
            text_of = [read_png_info(base64.b64decode(image))["info"] for image in images]
            assert "Steps: 2" in text_of[1] and "CFG scale: 3.0" in text_of[3]
            # each image is its own request's (step batching changes no pixel beyond rounding)
            alone = client.post("/sdapi/v1/txt2img", json={"prompt": "a photo of a cat", "negative_prompt": "dark",
                                                            "width": 64, "height": 64, "seed": 9, "steps": 3,
                                                            "cfg_scale": 3})
            assert np.abs(pixels(images[3]).astype(int) - pixels(alone.json()["images"][0])).max() <= 2
            saved = client.get("/v1/outputs").json()["items"]
            assert len([item for item in saved if item["kind"] == "txt2img-images"]) == 4
            assert not [item for item in saved if item["kind"] == "txt2img-grids"]
            assert "prompts from file or textbox" in client.get("/sdapi/v1/scripts").json()["img2img"]
            listed = [s for s in client.get("/sdapi/v1/script-info").json()
                      if s["name"] == "prompts from file or textbox"]
            assert len(listed) == 2 and [a["label"] for a in listed[0]["args"]][2] == "Insert prompts at the"
            refused = client.post("/sdapi/v1/txt2img", json=request | {
                "script_args": [False, False, "start", "a\n--steps 2 --upscale 2"]})
            assert refused.status_code == 422 and "line 2" in refused.text and "--upscale" in refused.text
            task = client.post("/v1/tasks/txt2img", json=request)
            assert task.status_code == 422 and "runs through /sdapi/v1/txt2img" in task.text
    finally:
        api.stop()
