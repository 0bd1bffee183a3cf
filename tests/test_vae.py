"""AUTOMATIC1111's VAE choice: VAE files read into the checkpoint's architecture, built and checked like its own VAE,
chosen per request (sd_vae in options and override_settings), the same images as diffusers with that VAE, in process
and through Triton, and every wrong name or file refused by name.

The session repository serves a second VAE (conftest.extra_vae: "anime-vae.safetensors", original layout).
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

from build.sd.vae import load_vae, random_vae, vae_ldm_state_dict, vae_sources, write_vae_file
from kiln.contract import SDContract, ServedVAE
from kiln.errors import InputError, WeightsError
from orchestrator.pipeline import Img2ImgRequest, Pipeline, Txt2ImgRequest
from tests.conftest import diffusers_image, diffusers_pipeline, encode

NAME = "anime-vae.safetensors"
BASE = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=4, sampler="Euler a", cfg_scale=7.5, seed=3,
            width=64, height=64)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# -- files and names -------------------------------------------------------------------------------------------------
def test_sources_name_files_and_expand_folders(tmp_path):
    base = random_vae("tiny", seed=1)
    one = write_vae_file(base, tmp_path / "a" / "one.safetensors")
    write_vae_file(base, tmp_path / "a" / "two.safetensors")
    base.save_pretrained(str(tmp_path / "diffusers-vae"))
    assert vae_sources([str(tmp_path / "a")]) == {"one.safetensors": one, "two.safetensors": tmp_path / "a" /
                                                  "two.safetensors"}
    assert vae_sources([f"mine={one}", str(tmp_path / "diffusers-vae")]) == {
        "mine": one, "diffusers-vae": tmp_path / "diffusers-vae"}
    for bad, message in (([str(tmp_path / "nope")], "no such file"), ([f"x={tmp_path / 'a'}"], "takes no NAME"),
                         ([str(one), str(one)], "two VAEs named"), ([f"None={one}"], "no VAE name")):
        with pytest.raises(WeightsError, match=message):
            vae_sources(bad)


def test_original_layout_files_read_into_the_checkpoints_architecture(tmp_path):
    base, other = random_vae("tiny", seed=1), random_vae("tiny", seed=2)
    path = write_vae_file(other, tmp_path / "other.safetensors")
    loaded = load_vae(path, base)
    for name, tensor in other.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert len(loaded.sha256) == 64
    from safetensors.torch import save_file

    tensors = {("first_stage_model." + k): v.contiguous() for k, v in vae_ldm_state_dict(other).items()}
    save_file(tensors | {"loss.logvar": torch.zeros(1)}, str(tmp_path / "prefixed.safetensors"))
    assert torch.equal(load_vae(tmp_path / "prefixed.safetensors", base).model.decoder.conv_out.weight,
                       other.decoder.conv_out.weight)  # extracted with its prefix, training leftovers skipped
    tensors.pop("first_stage_model.decoder.conv_out.weight")
    save_file(tensors, str(tmp_path / "short.safetensors"))
    with pytest.raises(WeightsError, match="no decoder.conv_out.weight"):
        load_vae(tmp_path / "short.safetensors", base)
    save_file({"x": torch.zeros(1)} | {k: v.contiguous() for k, v in vae_ldm_state_dict(other).items()},
              str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsError, match="tensors no SD 1.x VAE has: x"):
        load_vae(tmp_path / "extra.safetensors", base)
    (tmp_path / "old.pt").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match=r"\.safetensors VAE files only"):
        load_vae(tmp_path / "old.pt", base)


def test_the_contract_names_the_vaes_and_round_trips():
    contract = SDContract(scheduler_config={}, vae_scale_factor=8, latent_channels=4, unet_in_channels=4,
                          scaling_factor=0.18215, min_size=64, max_size=128, size_multiple=8,
                          vaes=(ServedVAE(NAME, "_2", "ab" * 32),), tiling=True)
    assert SDContract.from_parameters(contract.to_parameters(), 16) == contract
    assert not SDContract.from_parameters({**contract.to_parameters(), "tiling": "False"}, 16).tiling
    assert contract.vae(None) is None and contract.vae("Automatic") is None and contract.vae("None") is None
    assert contract.vae(NAME).suffix == "_2" and contract.vae("anime-vae").short_hash == "ab" * 5
    with pytest.raises(InputError, match=rf"unknown VAE 'nope'; this build serves: Automatic, None, {NAME}"):
        contract.vae("nope")


# -- the loop: diffusers' images with that VAE -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(sd_checkpoint, extra_vae):
    pipe = diffusers_pipeline(sd_checkpoint)
    pipe.vae = load_vae(extra_vae, pipe.vae).model
    return pipe, dict(pipe.scheduler.config)


@pytest.mark.slow
def test_txt2img_and_img2img_with_another_vae_match_diffusers(local, reference):
    pipe, scheduler_config = reference
    chosen = local.txt2img(Txt2ImgRequest(**BASE, vae=NAME))
    assert _max_diff(chosen.images, diffusers_image(pipe, scheduler_config, BASE)) <= 2  # measured: 0
    assert chosen.info["vae"] == NAME and len(chosen.info["vae_hash"]) == 10
    own = local.txt2img(Txt2ImgRequest(**BASE)).images
    assert _max_diff(own, chosen.images) > 10 and "vae" not in local.txt2img(Txt2ImgRequest(**BASE)).info
    assert np.array_equal(local.txt2img(Txt2ImgRequest(**BASE, vae="Automatic")).images, own)

    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    result = local.img2img(Img2ImgRequest(**BASE, vae="anime-vae", init_image=encode(start), denoising_strength=0.5))
    expected = diffusers_image(pipe, scheduler_config, BASE, init=start)
    assert _max_diff(result.images, expected) <= 2  # the chosen VAE encodes the init image too


@pytest.mark.slow
def test_triton_gives_the_in_process_images(triton, local):
    from orchestrator.pipeline.components.triton import triton_components

    served = Pipeline(triton_components(triton.grpc_url))
    try:
        for request in (Txt2ImgRequest(**(BASE | {"batch_size": 2}), vae=NAME),
                        Txt2ImgRequest(**BASE, vae=NAME, hires=_image_hires())):
            assert np.array_equal(served.txt2img(request).images, local.txt2img(request).images)
        with pytest.raises(InputError, match="unknown VAE"):
            served.txt2img(Txt2ImgRequest(**BASE, vae="nope.safetensors"))
    finally:
        served.close()


def _image_hires():
    from orchestrator.pipeline import HiresFix

    return HiresFix(scale=1.5, upscaler="Lanczos", steps=2, denoising_strength=0.5)  # decodes and encodes again


# -- the API: sd-vae, options, override_settings ---------------------------------------------------------------------
@pytest.mark.slow
def test_the_api_lists_and_applies_the_vae(triton):
    from kiln.infotext import parse_infotext
    from kiln.triton_server import free_port
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port()))
    body = {"prompt": "a photo of a cat", "steps": 3, "seed": 4, "width": 64, "height": 64, "sampler_name": "Euler a"}
    try:
        with live.client() as client:
            assert client.get("/sdapi/v1/sd-vae").json() == [{"model_name": NAME,
                                                              "filename": f"triton://sd_vae_decoder_2/{NAME}"}]
            own = client.post("/sdapi/v1/txt2img", json=body).json()
            chosen = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"sd_vae": NAME}})
            assert chosen.status_code == 200, chosen.text
            infotext = parse_infotext(json.loads(chosen.json()["info"])["infotexts"][0])
            assert infotext["VAE"] == NAME and len(infotext["VAE hash"]) == 10
            assert chosen.json()["images"][0] != own["images"][0]
            refused = client.post("/sdapi/v1/txt2img", json=body | {"override_settings": {"sd_vae": "nope"}})
            assert refused.status_code == 422 and NAME in refused.text, refused.text
            assert client.post("/sdapi/v1/options", json={"sd_vae": "nope"}).status_code == 422
            assert client.post("/sdapi/v1/options", json={"sd_vae": NAME}).status_code == 200
            assert client.get("/sdapi/v1/options").json()["sd_vae"] == NAME
            again = client.post("/sdapi/v1/txt2img", json=body).json()
            assert base64.b64decode(again["images"][0]) == base64.b64decode(chosen.json()["images"][0])
            assert client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"}).status_code == 200
            assert client.post("/sdapi/v1/refresh-vae").status_code == 200
    finally:
        live.stop()
