"""The serving install (`make setup-serve`, requirements-serve.txt), as an edge box gets it: a fresh venv, its size
measured and printed (at most 1.5 GB, against the development venv's 6.7), no CUDA library in it, and `kiln serve`
from it on an OpenVINO repository that the development install built: txt2img equal to the development install's
image of the same request, img2img, hires fix, classification, and what it leaves out refused by name."""

from __future__ import annotations

import base64
import io
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from build.sd import SDBuildOptions, build_sd
from build.vit import ViTBuildOptions, build_vit
from orchestrator.pipeline import Pipeline, Txt2ImgRequest
from tests.conftest import IMAGES, encode, kiln_serve

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 1_500_000_000  # the issue's 1.5 GB, on disk (du's blocks, a little more than the files' sizes)
BODY = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 4, "sampler_name": "Euler", "seed": 21,
        "cfg_scale": 7.5, "width": 64, "height": 64}


def _du(folder: Path) -> tuple[int, int]:
    """(bytes on disk, bytes of the files) under folder, links not followed, as `du -s` and `du -s --apparent-size`."""
    disk = apparent = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            stat = os.lstat(os.path.join(root, name))
            disk, apparent = disk + stat.st_blocks * 512, apparent + stat.st_size
    return disk, apparent


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory) -> Path:
    """A fresh serving venv, made by the README's command (the pip cache makes it about 35 s here)."""
    venv = tmp_path_factory.mktemp("serve") / "venv"
    done = subprocess.run(["make", "-s", "setup-serve", f"SERVE_VENV={venv}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return venv


@pytest.fixture(scope="module")
def edge_repo(tmp_path_factory, plain_checkpoint, tiny_vit) -> Path:
    """The tiny SD and the tests' ViT, both OpenVINO fp32, built by the development install."""
    repo = tmp_path_factory.mktemp("edge") / "repo"
    build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=repo, images=IMAGES, progress=False,
                            variant="openvino-fp32"), log=lambda _m: None)
    build_vit(ViTBuildOptions(weights=str(tiny_vit), repository=repo, backend="openvino", variants=("openvino-fp32",),
                              extra_exports=(), progress=False), log=lambda _m: None)
    return repo


def test_the_serving_install_is_small_and_has_no_cuda(serve_venv):
    disk, apparent = _du(serve_venv)
    print(f"\nserving install: {disk / 1e9:.2f} GB on disk ({apparent / 1e9:.2f} GB of files) in {serve_venv}")
    assert disk <= LIMIT_BYTES, f"the serving install is {disk / 1e9:.2f} GB, over {LIMIT_BYTES / 1e9} GB"
    python = serve_venv / "bin" / "python"
    probe = ("import importlib.metadata as m, importlib.util as u, torch\n"
             "names = sorted(d.metadata['Name'] for d in m.distributions())\n"
             "cuda = [n for n in names if n.lower().startswith('nvidia') and n != 'nvidia-pytriton']\n"
             "print(torch.version.cuda, cuda,"
             " [n for n in ('onnx', 'nncf', 'timm', 'transformers', 'torchvision', 'pytest') if u.find_spec(n)])")
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "None [] []", out  # a CPU torch, no CUDA wheels, no build or test tooling


@pytest.fixture(scope="module")
def served(serve_venv, edge_repo, tmp_path_factory):
    """`kiln serve` of the serving venv on edge_repo (its own ports); yields the API's URL."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with kiln_serve(serve_venv / "bin" / "kiln", edge_repo, tmp_path_factory.mktemp("serve_log"), env) as url:
        yield url


def _image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))


def test_the_serving_install_serves_sd_and_the_vit(served, edge_repo):
    request = Txt2ImgRequest(prompt=BODY["prompt"], negative_prompt=BODY["negative_prompt"], steps=4, sampler="Euler",
                             seed=21, cfg_scale=7.5, width=64, height=64)
    development = Pipeline.from_repository(edge_repo).txt2img(request).images[0]
    with httpx.Client(base_url=served, timeout=300) as client:
        image = _image(client.post("/sdapi/v1/txt2img", json=BODY))
        # The same OpenVINO models and the same seeded noise (the CPU torch's generator is the development one's).
        assert image.shape == development.shape
        assert int(np.abs(image.astype(int) - development.astype(int)).max()) <= 1
        init = base64.b64encode(encode(Image.fromarray(image))).decode()
        again = _image(client.post("/sdapi/v1/img2img", json=BODY | {"init_images": [init],
                                                                      "denoising_strength": 0.6}))
        assert again.shape == (64, 64, 3) and not np.array_equal(again, image)
        hires = _image(client.post("/sdapi/v1/txt2img", json=BODY | {"enable_hr": True, "hr_scale": 2,
                                                                     "hr_upscaler": "Latent",
                                                                     "hr_second_pass_steps": 2}))
        assert hires.shape == (128, 128, 3)
        files = {"files": ("cat.png", encode(Image.fromarray(image)), "image/png")}
        top = client.post("/v1/classify", files=files)
        assert top.status_code == 200, top.text
        assert len(top.json()["results"][0]["top"]) >= 1
        # ControlNet's canny is numpy (OpenCV's algorithm): the serving install runs it too
        detected = client.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                           "controlnet_input_images": [init],
                                                           "controlnet_processor_res": 64})
        assert detected.status_code == 200, detected.text
        edges = np.asarray(Image.open(io.BytesIO(base64.b64decode(detected.json()["images"][0]))))
        assert edges.shape == (64, 64, 3) and set(np.unique(edges)) <= {0, 255}


def test_the_serving_install_runs_the_samplers_it_has_and_names_what_another_needs(served):
    """diffusers' LMS needs scipy, which the serving install leaves out: it is refused by name (on any schedule
    type), and the service still starts and runs every other sampler, eta included; the SDE samplers' Brownian tree
    (torchsde, without scipy) is in it."""
    with httpx.Client(base_url=served, timeout=300) as client:
        for name in ("LMS", "LMS Karras"):
            refused = client.post("/sdapi/v1/txt2img", json=BODY | {"sampler_name": name})
            assert refused.status_code == 404 and "it needs scipy, which this install lacks" in refused.text
        for name in ("Euler a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"):
            _image(client.post("/sdapi/v1/txt2img", json=BODY | {"sampler_name": name, "eta": 0.5, "steps": 2}))
        churned = client.post("/sdapi/v1/txt2img", json=BODY | {"sampler_name": "Euler a", "s_churn": 0.5})
        assert churned.status_code == 422 and "the Euler a sampler has no churn (samplers that take it: Euler" in \
            churned.text  # the samplers that run here, not a 404 for the one that does not


def test_the_serving_install_refuses_builds_by_name(serve_venv, tmp_path):
    done = subprocess.run([str(serve_venv / "bin" / "kiln"), "build", "vit", "--random-weights", "--repo",
                           str(tmp_path / "repo")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "serving install (make setup-serve) leaves out" in done.stderr and "timm" in done.stderr
