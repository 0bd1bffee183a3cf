"""SD 2.x: its tiny architecture (diffusers' SD 2 fast tests: linear attention projections, GELU text encoder,
v-prediction), built like SD 1.x and matching diffusers' own pipeline; its single files (OpenCLIP's text encoder
layout) and its service through the real Triton and the AUTOMATIC1111 API."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from build.sd import ImageRange, SDBuildOptions, build_sd
from build.sd.families import family_of
from build.sd.lora import random_lora, write_lora
from build.sd.single_file import OPEN_CLIP_PREFIX, TEXT_PREFIX, inspect_single_file, predicts_v, write_single_file
from build.sd.weights import load_sd, write_sd_checkpoint
from kiln.contract import SD_TOKENIZER, SD_UNET, SDContract
from kiln.errors import WeightsError
from kiln.paths import SAMPLE_IMAGES
from kiln.prompts import load_tokenizer, tokenize_prompt
from kiln.triton_server import free_port
from orchestrator.pipeline import Img2ImgRequest, Pipeline, Txt2ImgRequest, make_scheduler
from tests.conftest import a1111_inpainting, diffusers_pipeline, start_triton

pytestmark = pytest.mark.slow
SIDES = ImageRange(32, 0, 128)  # opt 0: the checkpoint's own side (the tiny UNet's 32 latents: 64 pixels)


@pytest.fixture(scope="module")
def sd2_checkpoint(tmp_path_factory):
    return write_sd_checkpoint(tmp_path_factory.mktemp("sd2") / "tiny", size="tiny", seed=0, family_name="sd2")


@pytest.fixture(scope="module")
def sd2_loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2_loras")
    write_lora(folder / "detail2.safetensors", random_lora("tiny", seed=0, family_name="sd2"))
    return folder


@pytest.fixture(scope="module")
def sd2_repo(tmp_path_factory, sd2_checkpoint):
    repo = tmp_path_factory.mktemp("sd2_repo") / "repo"
    build_sd(SDBuildOptions(weights=str(sd2_checkpoint), repository=repo, images=SIDES, progress=False),
             log=lambda _m: None)
    return repo


@pytest.fixture(scope="module")
def sd2_local(sd2_repo, sd2_loras):
    return Pipeline.from_repository(sd2_repo, loras=sd2_loras)


@pytest.fixture(scope="module")
def reference(sd2_checkpoint):
    pipe = diffusers_pipeline(sd2_checkpoint)
    return pipe, dict(pipe.scheduler.config)


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _uint8(images) -> np.ndarray:
    return (np.asarray(images) * 255).round().astype(np.uint8)


def test_the_family_is_told_by_the_checkpoint_and_written_into_the_contract(sd2_checkpoint, sd2_repo, sd2_local):
    loaded = load_sd(sd2_checkpoint)
    assert loaded.family == "sd2" and loaded.tokenizer.pad_token == "!"
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert family_of(loaded.text_encoder.config).name == "sd2"  # without kiln's marker: the GELU text encoder
    contract: SDContract = sd2_local.contract
    assert (contract.family, contract.prediction_type, contract.a1111_config) == ("sd2", "v_prediction",
                                                                                  "v2-inference-v.yaml")
    assert contract.textual_inversion_dim == 32 and contract.lora_layers > 0
    # The profiles' optimal side is the checkpoint's own (64 pixels: 32 latents) where none was asked for
    config = (sd2_repo / SD_UNET / "config.pbtxt").read_text()
    assert "sd2" in config
    tokenizer = load_tokenizer(sd2_repo / SD_TOKENIZER / "1" / "tokenizer")  # what the served tokenizer model reads
    ids = tokenize_prompt(tokenizer, "a cat").ids
    assert list(ids[0, :4]) == [49406, 320, 2368, 49407] and (ids[0, 4:] == 0).all()  # "!" after the end token


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "DDIM", "UniPC"])
def test_txt2img_with_v_prediction_matches_diffusers(sd2_local, reference, sampler):
    """Measured: 0 or 1/255 apart."""
    pipe, config = reference
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=6, sampler=sampler,
                             cfg_scale=7.5, seed=1234, width=64, height=64)
    pipe.scheduler = make_scheduler(sampler, config, seed=1234)
    expected = _uint8(pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=6, guidance_scale=7.5,
                           height=64, width=64, generator=torch.Generator().manual_seed(1234),
                           output_type="np").images)
    assert _diff(sd2_local.txt2img(request).images, expected) <= 2


def test_the_prediction_type_and_the_padding_are_what_make_it_match(sd2_local, reference):
    """The same weights read as epsilon, or padded with the end token as SD 1.x is, give another image."""
    pipe, config = reference
    pipe.scheduler = make_scheduler("Euler", config | {"prediction_type": "epsilon"})
    as_epsilon = _uint8(pipe("a cat", num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                             generator=torch.Generator().manual_seed(3), output_type="np").images)
    pipe.scheduler = make_scheduler("Euler", config)
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids[ids == pipe.tokenizer.pad_token_id] = pipe.tokenizer.eos_token_id
    with torch.inference_mode():
        eos_padded = pipe.text_encoder(ids)[0]
    as_sd1 = _uint8(pipe(prompt_embeds=eos_padded, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                         generator=torch.Generator().manual_seed(3), output_type="np").images)
    ours = sd2_local.txt2img(Txt2ImgRequest(prompt="a cat", steps=4, sampler="Euler", seed=3, cfg_scale=7.5, width=64,
                                            height=64)).images
    assert _diff(ours, as_epsilon) > 10 and _diff(ours, as_sd1) > 2


def test_img2img_matches_diffusers(sd2_local, sd2_checkpoint):
    from diffusers import StableDiffusionImg2ImgPipeline

    photo = Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((64, 64), Image.LANCZOS)
    buffer = io.BytesIO()
    photo.save(buffer, "PNG")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(sd2_checkpoint), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("DDPM", dict(pipe.scheduler.config))  # AUTOMATIC1111's DDIM: test_compvis.py
    expected = _uint8(pipe("a dog", image=photo, strength=0.6, num_inference_steps=10, guidance_scale=7.0,
                           generator=torch.Generator().manual_seed(9), output_type="np").images)
    result = sd2_local.img2img(Img2ImgRequest(prompt="a dog", init_image=buffer.getvalue(), denoising_strength=0.6,
                                              steps=10, sampler="DDPM", cfg_scale=7.0, seed=9, width=64, height=64))
    assert _diff(result.images, expected) <= 2


def test_a_lora_for_sd2_matches_diffusers(sd2_local, sd2_checkpoint, sd2_loras):
    pipe = diffusers_pipeline(sd2_checkpoint)
    config = dict(pipe.scheduler.config)
    pipe.load_lora_weights(str(sd2_loras), weight_name="detail2.safetensors", adapter_name="detail2")
    pipe.set_adapters(["detail2"], adapter_weights=[0.8])
    pipe.scheduler = make_scheduler("Euler", config)
    expected = _uint8(pipe("a photo of a cat", num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                           generator=torch.Generator().manual_seed(4), output_type="np").images)
    request = Txt2ImgRequest(prompt="a photo of a cat <lora:detail2:0.8>", steps=4, sampler="Euler", seed=4,
                             cfg_scale=7.5, width=64, height=64)
    with_lora = sd2_local.txt2img(request).images
    assert _diff(with_lora, expected) <= 2
    plain = sd2_local.txt2img(replace(request, prompt="a photo of a cat")).images
    assert _diff(with_lora, plain) > 10


def test_single_files_hold_openclips_layout_and_load_back_equal(sd2_checkpoint, tmp_path):
    path = write_single_file(sd2_checkpoint, tmp_path / "sd2.safetensors")
    info = inspect_single_file(path)
    assert info["family"] == "sd2" and info["cross_attention_dim"] == 32
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        in_proj = handle.get_tensor(OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight")
    assert not any(k.startswith(TEXT_PREFIX) for k in keys) and in_proj.shape == (3 * 32, 32)
    folder, single = load_sd(sd2_checkpoint), load_sd(path, config=sd2_checkpoint)
    assert single.family == "sd2" and single.scheduler_config["prediction_type"] == "v_prediction"
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    # Without a config, the tiny file is not SD 2.1's architecture: said, with what to do
    with pytest.raises(WeightsError, match="cross-attention width 32 is not SD 2.x's 1024; pass --config"):
        load_sd(path)


def test_automatic1111s_v_prediction_test_reads_the_unets_output(sd2_checkpoint):
    """AUTOMATIC1111 tells an SD 2.x file's prediction type by running its UNet once (a file carries no config): a
    UNet whose output sits far below its input at t=999 predicts v. Random weights do not; the same UNet with its
    output convolution's bias at -5 does."""
    unet = load_sd(sd2_checkpoint).unet
    assert not predicts_v(unet)
    with torch.no_grad():
        unet.conv_out.bias.fill_(-5.0)
    assert predicts_v(unet)


def test_served_through_triton_and_the_automatic1111_api(sd2_repo, sd2_local, sd2_loras, tmp_path):
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    server = start_triton(sd2_repo, tmp_path / "tritonserver.log", loras=sd2_loras)
    api = BackgroundAPI(Settings(triton_url=server.grpc_url, port=free_port(), loras_dir=sd2_loras))
    try:
        with httpx.Client(base_url=api.url, timeout=120) as client:
            models = client.get("/sdapi/v1/sd-models").json()
            assert models[0]["config"] == "v2-inference-v.yaml"
            assert client.get("/v1/capabilities").json()["sd"]["family"] == "sd2"
            body = {"prompt": "a cat <lora:detail2:0.8>", "steps": 4, "sampler_name": "Euler", "seed": 11,
                    "width": 64, "height": 64}
            response = client.post("/sdapi/v1/txt2img", json=body)
            assert response.status_code == 200, response.text
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))
    finally:
        api.stop()
        server.stop()
    local = sd2_local.txt2img(Txt2ImgRequest(prompt="a cat <lora:detail2:0.8>", steps=4, sampler="Euler", seed=11,
                                             width=64, height=64)).images[0]
    assert _diff(image, local) <= 1


def test_a_controlnet_of_the_other_family_is_refused_by_name(sd2_checkpoint, tmp_path):
    from build.sd.specs import sd_specs
    from build.sd.weights import random_controlnet
    from kiln.errors import ExportError

    random_controlnet("tiny", seed=3).save_pretrained(str(tmp_path / "sd1-control"), safe_serialization=True)
    loaded = load_sd(sd2_checkpoint, controlnet=str(tmp_path / "sd1-control"))
    with pytest.raises(ExportError, match=r"use_linear_projection is False, the UNet's True .*looks like SD 1.x's, "
                                          r"the checkpoint SD 2.x"):
        sd_specs(loaded, SIDES)
    assert "controlnet" in sd_specs(load_sd(sd2_checkpoint), SIDES)  # its own (SD 2.x) ControlNet fits


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_controlnet_for_sd2_matches_diffusers(sd2_local, sd2_checkpoint):
    """The checkpoint's own SD 2.x ControlNet (linear projections, 32-wide cross-attention) through its ensemble."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from kiln.canny import canny
    from orchestrator.pipeline import ControlNetUnit

    photo = Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((64, 64), Image.LANCZOS)
    edges = canny(photo, 100, 200)
    base = diffusers_pipeline(sd2_checkpoint)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=ControlNetModel.from_pretrained(
        str(sd2_checkpoint / "controlnet")))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("DPM++ 2M Karras", dict(base.scheduler.config))
    expected = _uint8(pipe("a photo of a cat", image=edges, num_inference_steps=6, guidance_scale=7.5,
                           controlnet_conditioning_scale=0.8, height=64, width=64, output_type="np",
                           generator=torch.Generator().manual_seed(5)).images)
    request = Txt2ImgRequest(prompt="a photo of a cat", steps=6, sampler="DPM++ 2M Karras", cfg_scale=7.5, seed=5,
                             width=64, height=64, controlnet=ControlNetUnit(image=_png(edges), weight=0.8))
    result = sd2_local.txt2img(request).images
    assert _diff(result, expected) <= 2
    assert _diff(result, sd2_local.txt2img(replace(request, controlnet=None)).images) > 2


def test_an_sd2_inpainting_unet_matches_automatic1111(tmp_path):
    """SD 2.x inpainting (a 9-channel UNet, epsilon as stable-diffusion-2-inpainting) built and run like SD 1.x's
    (blended as AUTOMATIC1111: conftest.a1111_inpainting)."""
    from diffusers import StableDiffusionInpaintPipeline

    folder = write_sd_checkpoint(tmp_path / "inpaint", size="tiny", seed=3, controlnet=False, inpainting=True,
                                 family_name="sd2", prediction="epsilon")
    build_sd(SDBuildOptions(weights=str(folder), repository=tmp_path / "repo", images=SIDES, progress=False),
             log=lambda _m: None)
    pipeline = Pipeline.from_repository(tmp_path / "repo")
    assert pipeline.contract.a1111_config == "v2-inpainting-inference.yaml"
    photo = Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((64, 64), Image.LANCZOS)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 20, 48, 52))
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    expected = a1111_inpainting(pipe, "Euler a", dict(pipe.scheduler.config), photo, mask, seed=4, strength=0.5,
                                steps=6, mask_image=mask, prompt="a photo of a cat", guidance_scale=7.5, height=64,
                                width=64)
    result = pipeline.img2img(Img2ImgRequest(prompt="a photo of a cat", steps=6, sampler="Euler a", cfg_scale=7.5,
                                             seed=4, width=64, height=64, init_image=_png(photo),
                                             denoising_strength=0.5, mask=_png(mask), mask_blur=0))
    assert _diff(result.images, expected) <= 2
