"""Several checkpoints in one repository, of different families: the tiny SD 1.x as the default checkpoint and the
tiny SD 2.x built beside it (`kiln build sd --checkpoint sd2-tiny`), served by one Triton and one API, picked per
request with AUTOMATIC1111's sd_model_checkpoint."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from build.sd import SDBuildOptions, build_sd
from build.sd.weights import write_sd_checkpoint
from kiln.contract import DEFAULT_MODELS, SDModels
from kiln.errors import ConfigError
from kiln.triton_server import free_port
from orchestrator.pipeline import Pipeline, Txt2ImgRequest, make_scheduler
from tests.conftest import IMAGES, diffusers_pipeline, start_triton
from tests.test_ui import generate, open_page

pytestmark = pytest.mark.slow
SD2 = SDModels("sd2-tiny")


@pytest.fixture(scope="module")
def sd2_weights(tmp_path_factory):
    return write_sd_checkpoint(tmp_path_factory.mktemp("sd2w") / "tiny", size="tiny", seed=5, family_name="sd2",
                               controlnet=False)


@pytest.fixture(scope="module")
def two_repo(tmp_path_factory, plain_checkpoint, sd2_weights):
    repo = tmp_path_factory.mktemp("two") / "repo"
    for weights, checkpoint in ((plain_checkpoint, ""), (sd2_weights, SD2.checkpoint)):
        build_sd(SDBuildOptions(weights=str(weights), repository=repo, images=IMAGES, progress=False,
                                checkpoint=checkpoint), log=lambda _m: None)
    return repo


@pytest.fixture(scope="module")
def two_triton(two_repo, tmp_path_factory):
    server = start_triton(two_repo, tmp_path_factory.mktemp("two_triton") / "tritonserver.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(two_triton, tmp_path_factory):
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    # The web page sends save_images: its PNGs go to a temporary folder, not to outputs/ in the working tree.
    live = BackgroundAPI(Settings(triton_url=two_triton.grpc_url, port=free_port(),
                                  outputs_dir=tmp_path_factory.mktemp("outputs")))
    yield live
    live.stop()


BODY = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 4, "sampler_name": "Euler", "seed": 21,
        "cfg_scale": 7.5, "width": 64, "height": 64}


def _image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))


def _local(repo, models: SDModels = DEFAULT_MODELS) -> np.ndarray:
    request = Txt2ImgRequest(prompt=BODY["prompt"], negative_prompt=BODY["negative_prompt"], steps=4, sampler="Euler",
                             seed=21, cfg_scale=7.5, width=64, height=64)
    return Pipeline.from_repository(repo, models=models).txt2img(request).images[0]


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_each_checkpoint_has_its_own_models_contract_and_report(two_repo, sd2_weights):
    names = {p.name for p in two_repo.iterdir() if p.is_dir()}
    assert {"sd_unet", "sd_tokenizer", "sd2-tiny--sd_unet", "sd2-tiny--sd_tokenizer", "sd2-tiny--sd_text_encode",
            "sd2-tiny--sd_vae_decode"} <= names
    steps = (two_repo / "sd2-tiny--sd_text_encode" / "config.pbtxt").read_text()
    assert '"sd2-tiny--sd_tokenizer"' in steps and '"sd_tokenizer"' not in steps  # an ensemble never crosses them
    default, other = (Pipeline.from_repository(two_repo, models=m).contract for m in (DEFAULT_MODELS, SD2))
    assert (default.family, other.family, other.model_name) == ("sd1", "sd2", "sd2-tiny")
    from build.report import read_report

    assert {"sd", "sd--sd2-tiny"} <= set(read_report(two_repo))
    # The namespaced build is the SD 2.x checkpoint itself: diffusers' image of it
    pipe = diffusers_pipeline(sd2_weights)
    pipe.scheduler = make_scheduler("Euler", dict(pipe.scheduler.config))
    expected = (pipe(BODY["prompt"], negative_prompt=BODY["negative_prompt"], num_inference_steps=4, guidance_scale=7.5,
                     height=64, width=64, generator=torch.Generator().manual_seed(21), output_type="np").images[0]
                * 255).round().astype(np.uint8)
    assert _diff(_local(two_repo, SD2), expected) <= 2


def test_a_checkpoint_name_is_checked_before_anything_is_built(tmp_path, plain_checkpoint):
    for bad in ("a--b", "-x", "x y", ""):
        if bad:
            with pytest.raises(ConfigError, match="checkpoint name"):
                build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=tmp_path, images=IMAGES,
                                        progress=False, checkpoint=bad), log=lambda _m: None)
    assert not any(tmp_path.iterdir())


def test_one_api_serves_both_and_requests_pick_one(api, two_repo):
    default_image, sd2_image = _local(two_repo), _local(two_repo, SD2)
    assert _diff(default_image, sd2_image) > 10
    with httpx.Client(base_url=api.url, timeout=120) as client:
        models = client.get("/sdapi/v1/sd-models").json()
        assert [(m["model_name"], m["config"]) for m in models] == [("weights", "v1-inference.yaml"),
                                                                    ("sd2-tiny", "v2-inference-v.yaml")]
        titles = [m["title"] for m in models]
        assert client.get("/v1/capabilities").json()["sd"]["checkpoints"] == titles
        assert _diff(_image(client.post("/sdapi/v1/txt2img", json=BODY)), default_image) <= 1
        for name in ("sd2-tiny", titles[1]):  # by name or by title
            picked = client.post("/sdapi/v1/txt2img", json=BODY | {"override_settings": {"sd_model_checkpoint": name}})
            assert _diff(_image(picked), sd2_image) <= 1
            assert json.loads(picked.json()["info"])["sd_model_name"] == "sd2-tiny"
        unknown = client.post("/sdapi/v1/txt2img", json=BODY | {"override_settings": {"sd_model_checkpoint": "sdxl"}})
        assert unknown.status_code == 422 and "override_settings.sd_model_checkpoint 'sdxl'" in unknown.text
        assert titles[0] in unknown.text and titles[1] in unknown.text
        # Both at once: each its own image (the step batcher merges steps of one checkpoint's models only)
        with ThreadPoolExecutor(4) as pool:
            bodies = [BODY, BODY | {"override_settings": {"sd_model_checkpoint": "sd2-tiny"}}] * 2
            answers = list(pool.map(lambda body: client.post("/sdapi/v1/txt2img", json=body), bodies))
        for answer, expected in zip(answers, [default_image, sd2_image] * 2):
            assert _diff(_image(answer), expected) <= 1
        # The X/Y/Z plot's "Checkpoint name" axis: each cell on its own checkpoint
        plot = client.post("/sdapi/v1/txt2img", json=BODY | {
            "script_name": "x/y/z plot", "script_args": ["Checkpoint name", "weights, sd2-tiny", None, "Nothing", "",
                                                         None, "Nothing", "", None, True, True]})  # + the cells
        assert plot.status_code == 200, plot.text
        cells = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in plot.json()["images"][1:]]
        assert _diff(cells[0], default_image) <= 1 and _diff(cells[1], sd2_image) <= 1
        # The option sets the default (kept as the title, as AUTOMATIC1111 keeps it); refresh keeps both
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd2-tiny"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles[1]
        assert _diff(_image(client.post("/sdapi/v1/txt2img", json=BODY)), sd2_image) <= 1
        assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        assert [m["title"] for m in client.get("/sdapi/v1/sd-models").json()] == titles
        refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
        assert refused.status_code == 422 and "sd_model_checkpoint 'nope'" in refused.text


def _ready(server, model: str) -> bool:
    from kiln.triton_client import TritonClient

    client = TritonClient(server.grpc_url, "grpc", timeout_s=10)
    try:
        return client.is_model_ready(model)
    finally:
        client.close()


def _controlled_triton(repo, log_dir, max_loaded: int):
    """A Triton under explicit model control on `repo` (kiln serve --max-checkpoints's): started with the default
    checkpoint and the models of no checkpoint; the ModelControl a service uses on it."""
    from kiln.triton_server import TritonOptions, TritonServer
    from orchestrator.checkpoints import ModelControl

    options = TritonOptions.on_free_ports(repo, log_dir / "tritonserver.log", exit_timeout_s=5)
    control = ModelControl(repo, f"127.0.0.1:{options.grpc_port}", max_loaded=max_loaded)
    server = TritonServer(replace(options, load_models=control.startup_models())).start()
    return server, control


def test_model_control_loads_on_demand_and_unloads_the_least_recently_used(two_repo, tmp_path):
    """kiln serve --max-checkpoints 1: Triton starts with the default checkpoint only; naming the other loads it and
    unloads the default (idle), and back; unload-checkpoint empties Triton, reload-checkpoint loads the default."""
    from orchestrator.checkpoints import ModelControl, checkpoint_bytes
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    server, control = _controlled_triton(two_repo, tmp_path, max_loaded=1)
    url = control.triton_url
    api = BackgroundAPI(Settings(triton_url=url, port=free_port(), model_control=control))
    small = BackgroundAPI(Settings(triton_url=url, port=free_port(), model_control=ModelControl(
        two_repo, url, budget_bytes=checkpoint_bytes(two_repo, SD2.checkpoint) - 1)))
    try:
        assert "sd_unet" in control.startup_models() and not any("sd2-tiny" in m for m in control.startup_models())
        assert _ready(server, "sd_unet") and not _ready(server, "sd2-tiny--sd_unet")
        with httpx.Client(base_url=api.url, timeout=120) as client:
            # Listed before it is loaded: the repository's checkpoints
            assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["weights", "sd2-tiny"]
            picked = client.post("/sdapi/v1/txt2img", json=BODY | {"override_settings": {"sd_model_checkpoint":
                                                                                          "sd2-tiny"}})
            assert _diff(_image(picked), _local(two_repo, SD2)) <= 1
            assert _ready(server, "sd2-tiny--sd_unet") and not _ready(server, "sd_unet")
            assert _diff(_image(client.post("/sdapi/v1/txt2img", json=BODY)), _local(two_repo)) <= 1
            assert _ready(server, "sd_unet") and not _ready(server, "sd2-tiny--sd_unet")
            # A refiner runs loaded beside the checkpoint it finishes: a pair over the budget is refused before the
            # refiner loads (it used to unload the default to load the refiner, then run with both loaded)
            refused = client.post("/sdapi/v1/txt2img", json=BODY | {"refiner_checkpoint": "sd2-tiny",
                                                                    "refiner_switch_at": 0.5})
            assert refused.status_code == 422 and "loads at most 1 checkpoint at once" in refused.text, refused.text
            assert _ready(server, "sd_unet") and not _ready(server, "sd2-tiny--sd_unet")
            assert client.post("/sdapi/v1/unload-checkpoint").json() == {"unloaded": ["default"]}
            assert not _ready(server, "sd_unet") and not _ready(server, "sd_tokenizer")
            ready = client.get("/health/ready")  # nothing loaded, yet ready: checkpoints load on demand
            assert ready.status_code == 200 and ready.json()["checkpoints"] == [], ready.text
            assert client.post("/sdapi/v1/reload-checkpoint").status_code == 200
            assert _ready(server, "sd_unet") and _ready(server, "sd_vae_decode")
        with httpx.Client(base_url=small.url, timeout=120) as client:
            refused = client.post("/sdapi/v1/txt2img", json=BODY | {"override_settings": {"sd_model_checkpoint":
                                                                                           "sd2-tiny"}})
            assert refused.status_code == 422 and "over the memory budget" in refused.text
            refused = client.post("/sdapi/v1/txt2img", json=BODY | {"refiner_checkpoint": "sd2-tiny"})
            assert refused.status_code == 422 and "run loaded together and take" in refused.text, refused.text
            assert _diff(_image(client.post("/sdapi/v1/txt2img", json=BODY)), _local(two_repo)) <= 1
    finally:
        small.stop()
        api.stop()
        server.stop()


def test_a_checkpoint_that_fails_to_load_is_a_503_with_tritons_reason_and_the_others_serve_on(two_repo, tmp_path):
    """A checkpoint whose UNet file is broken (a copy of sd2-tiny's build as "broken", its model.onnx overwritten):
    naming it is a 503 carrying Triton's reason, its models that did load are unloaded again, and the default
    checkpoint still answers."""
    import shutil

    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    repo = tmp_path / "repo"
    shutil.copytree(two_repo, repo, symlinks=True)
    for folder in sorted(repo.glob("sd2-tiny--*")):
        copy = repo / folder.name.replace("sd2-tiny--", "broken--")
        shutil.copytree(folder, copy)
        config = copy / "config.pbtxt"
        config.write_text(config.read_text().replace("sd2-tiny--", "broken--").replace('"sd2-tiny"', '"broken"'))
    (repo / "broken--sd_unet" / "1" / "model.onnx").write_bytes(b"not an ONNX file")
    server, control = _controlled_triton(repo, tmp_path, max_loaded=3)
    api = BackgroundAPI(Settings(triton_url=control.triton_url, port=free_port(), model_control=control))
    try:
        with httpx.Client(base_url=api.url, timeout=120) as client:
            failed = client.post("/sdapi/v1/txt2img", json=BODY | {"override_settings": {"sd_model_checkpoint":
                                                                                          "broken"}})
            assert failed.status_code == 503 and "broken--sd_unet" in failed.text, failed.text
            assert not any(_ready(server, f.name) for f in repo.glob("broken--*"))
            assert _diff(_image(client.post("/sdapi/v1/txt2img", json=BODY)), _local(two_repo)) <= 1
            picked = client.post("/sdapi/v1/txt2img", json=BODY | {"override_settings": {"sd_model_checkpoint":
                                                                                          "sd2-tiny"}})
            assert _diff(_image(picked), _local(two_repo, SD2)) <= 1
    finally:
        api.stop()
        server.stop()


def test_a_checkpoints_folder_is_built_once_and_rebuilt_when_a_file_changes(tmp_path, sd2_weights):
    """kiln serve --checkpoints DIR: each checkpoint of the folder built as its own named checkpoint, reused while its
    files are the same; what cannot be served is skipped with its reason, leaving nothing half-built."""
    import os

    from build.sd.folder import sync_checkpoints

    folder, repo = tmp_path / "checkpoints", tmp_path / "repo"
    folder.mkdir()
    (folder / "My Model v2").symlink_to(sd2_weights, target_is_directory=True)
    (folder / "old.ckpt").write_bytes(b"pickle")
    (folder / "notes").mkdir()
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    lines: list[str] = []
    first = {s.name: s for s in sync_checkpoints(folder, repo, IMAGES, lines.append, progress=False)}
    assert first["My-Model-v2"].status == "built"
    assert {name: s.status for name, s in first.items()} == {"My-Model-v2": "built", "broken": "skipped",
                                                             "notes": "skipped", "old": "skipped"}
    assert "pickle" in first["old"].reason and "model_index.json" in first["notes"].reason
    assert "not a readable .safetensors file" in first["broken"].reason
    assert not list(repo.glob("broken--*"))
    contract = Pipeline.from_repository(repo, models=SDModels("My-Model-v2")).contract
    assert (contract.model_name, contract.family) == ("My-Model-v2", "sd2")
    again = {s.name: s.status for s in sync_checkpoints(folder, repo, IMAGES, lines.append, progress=False)}
    assert again["My-Model-v2"] == "reused"
    unet = sd2_weights / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(unet, ns=(unet.stat().st_atime_ns, unet.stat().st_mtime_ns + 10**9))
    changed = {s.name: s.status for s in sync_checkpoints(folder, repo, IMAGES, lines.append, progress=False)}
    assert changed["My-Model-v2"] == "built"


def test_the_page_offers_the_checkpoints_and_runs_the_one_picked(api, browser):
    """The web page on a server of two checkpoints: a Checkpoint field listing both (hidden with one, as in
    tests/test_ui.py), and the task it submits runs on the one picked."""
    page = open_page(browser, api.url)
    titles = page.eval_on_selector_all("[name=sd_model_checkpoint] option", "options => options.map(o => o.value)")
    assert page.is_visible("#checkpoint-field") and len(titles) == 2 and titles[1].startswith("sd2-tiny")
    page.select_option("[name=sd_model_checkpoint]", titles[1])
    page.fill("[name=prompt]", "a photo of a cat")
    page.fill("[name=steps]", "2")
    task = generate(page)
    with httpx.Client(base_url=api.url, timeout=60) as client:
        result = client.get(f"/v1/tasks/{task}").json()["result"]
    assert json.loads(result["info"])["sd_model_name"] == "sd2-tiny"
    assert not page.errors, page.errors


def test_kiln_generate_runs_the_checkpoint_it_names(two_triton, two_repo, kiln, tmp_path):
    args = ["generate", BODY["prompt"], "--negative-prompt", BODY["negative_prompt"], "--steps", "4", "--sampler",
            "Euler", "--seed", "21", "--cfg-scale", "7.5", "--width", "64", "--height", "64", "--url",
            two_triton.grpc_url]
    code, out, err = kiln(*args, "--checkpoint", "sd2-tiny", "--out", str(tmp_path / "sd2.png"))
    assert code == 0, err
    assert _diff(np.asarray(Image.open(tmp_path / "sd2.png")), _local(two_repo, SD2)) <= 1
    code, out, err = kiln(*args, "--checkpoint", "sdxl", "--out", str(tmp_path / "none.png"))
    assert code != 0 and "checkpoint 'sdxl': no such model" in err and "sd2-tiny [" in err


def test_refresh_builds_the_folders_new_checkpoint_and_a_request_loads_it(two_repo, sd2_weights, tmp_path):
    """kiln serve --checkpoints DIR --max-checkpoints 1: a checkpoint added to the folder while serving is built by
    refresh-checkpoints (the answer lists it) and loads when a request names it."""
    import shutil

    from build.sd.folder import sync_checkpoints
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    repo, folder = tmp_path / "repo", tmp_path / "checkpoints"
    shutil.copytree(two_repo, repo, symlinks=True)
    folder.mkdir()
    server, control = _controlled_triton(repo, tmp_path, max_loaded=1)
    api = BackgroundAPI(Settings(triton_url=control.triton_url, port=free_port(), model_control=control,
                                 sync_checkpoints=lambda:
                                 sync_checkpoints(folder, repo, IMAGES, log=lambda _m: None, progress=False)))
    try:
        with httpx.Client(base_url=api.url, timeout=120) as client:
            assert len(client.get("/sdapi/v1/sd-models").json()) == 2
            (folder / "late").symlink_to(sd2_weights, target_is_directory=True)
            refreshed = client.post("/sdapi/v1/refresh-checkpoints").json()
            assert refreshed == {"checkpoints": [{"name": "late", "source": "late", "status": "built",
                                                  "reason": None}]}
            assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["weights", "late",
                                                                                            "sd2-tiny"]
            picked = client.post("/sdapi/v1/txt2img", json=BODY | {"override_settings": {"sd_model_checkpoint":
                                                                                          "late"}})
            assert _diff(_image(picked), _local(two_repo, SD2)) <= 1  # the same weights as sd2-tiny
            assert _ready(server, "late--sd_unet") and not _ready(server, "sd_unet")
    finally:
        api.stop()
        server.stop()


@pytest.mark.parametrize("flags, message", [
    (["--checkpoints", "."], "--checkpoints builds into the repository of the Triton kiln serve starts"),
    (["--max-checkpoints", "2"], "--max-checkpoints and --checkpoint-memory-gb control the Triton kiln serve starts"),
    (["--max-checkpoints", "-1"], "--max-checkpoints: must be at least 0"),
    (["--checkpoint-memory-gb", "nan"], "--checkpoint-memory-gb: must be at least 0"),
])
def test_serve_refuses_checkpoint_flags_it_cannot_honour(kiln, flags, message):
    code, _out, err = kiln("serve", "--triton-url", "127.0.0.1:1", *flags)
    assert code == 2 and message in err
