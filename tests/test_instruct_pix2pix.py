"""instruct-pix2pix: an 8-channel UNet that takes the image it edits, with AUTOMATIC1111's image_cfg_scale.

The tiny SD 1.x architecture with an 8-channel UNet (seeded random weights), built like any checkpoint; the loop
matches diffusers' StableDiffusionInstructPix2PixPipeline started from AUTOMATIC1111's img2img latents, and serves
through the real Triton and the AUTOMATIC1111 API.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from build.sd import SDBuildOptions, build_sd
from build.sd.weights import load_sd, write_sd_checkpoint
from kiln.errors import InputError, WeightsError
from kiln.infotext import parse_infotext
from kiln.paths import SAMPLE_IMAGES
from kiln.triton_server import free_port
from orchestrator.pipeline import ControlNetUnit, Img2ImgRequest, Pipeline, Txt2ImgRequest, make_scheduler
from tests.conftest import IMAGES, start_triton
from tests.test_ui import generate, open_page

pytestmark = pytest.mark.slow
PROMPT, NEGATIVE = "turn it into a watercolour", "blurry"


@pytest.fixture(scope="module")
def ip2p_checkpoint(tmp_path_factory):
    return write_sd_checkpoint(tmp_path_factory.mktemp("ip2p") / "tiny", size="tiny", seed=5, edit=True)


@pytest.fixture(scope="module")
def ip2p_repo(ip2p_checkpoint):
    repo = ip2p_checkpoint.parent / "repo"
    build_sd(SDBuildOptions(weights=str(ip2p_checkpoint), repository=repo, images=IMAGES, progress=False),
             log=lambda _m: None)
    return repo


@pytest.fixture(scope="module")
def ip2p(ip2p_repo):
    return Pipeline.from_repository(ip2p_repo)


def _request(init: bytes, **fields) -> Img2ImgRequest:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=6, sampler="Euler", cfg_scale=7.5, seed=21,
                width=64, height=64, init_image=init, denoising_strength=1.0)
    return Img2ImgRequest(**(base | fields))


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _diffusers_edit(checkpoint, init: bytes, image_guidance: float, seed: int = 21, steps: int = 6) -> np.ndarray:
    """diffusers' InstructPix2Pix pipeline from AUTOMATIC1111's img2img start at full strength: the init image's
    latents (sampled with the seed's generator, as diffusers' img2img pipeline draws them), plus the noise drawn next
    times the first sigma. diffusers multiplies given latents by init_noise_sigma, so they go in divided by it."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(checkpoint), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler = make_scheduler("Euler", dict(pipe.scheduler.config))
    scheduler.set_timesteps(steps)
    image = Image.open(io.BytesIO(init)).convert("RGB")
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        pixels = pipe.image_processor.preprocess(image)
        start = pipe.vae.encode(pixels).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
        start = start + torch.randn(start.shape, generator=generator) * scheduler.sigmas[0]
    images = pipe(PROMPT, image=image, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                  image_guidance_scale=image_guidance, latents=start / scheduler.init_noise_sigma,
                  output_type="np").images
    return (images * 255).round().astype(np.uint8)


def test_the_checkpoint_is_an_edit_checkpoint_in_the_contract(ip2p_checkpoint, ip2p, tmp_path):
    from build.sd.single_file import inspect_single_file, write_single_file

    loaded = load_sd(ip2p_checkpoint)  # diffusers' StableDiffusionInstructPix2PixPipeline folder
    assert loaded.unet.config.in_channels == 8
    single = write_single_file(ip2p_checkpoint, tmp_path / "ip2p.safetensors")  # AUTOMATIC1111's layout
    assert inspect_single_file(single)["in_channels"] == 8
    assert load_sd(single, config=ip2p_checkpoint).unet.config.in_channels == 8
    contract = ip2p.contract
    assert contract.edit_unet and not contract.inpainting_unet
    assert contract.a1111_config == "instruct-pix2pix.yaml"  # what AUTOMATIC1111 loads such a checkpoint with


@pytest.mark.parametrize("image_cfg_scale", [1.5, 2.5])
def test_image_guidance_matches_diffusers_instruct_pix2pix(ip2p, ip2p_checkpoint, init_image_png, image_cfg_scale):
    """Three rows an image (prompt + image, negative + image, negative + zeros), AUTOMATIC1111's
    combine_denoised_for_edit_model, which is diffusers' guidance too."""
    result = ip2p.img2img(_request(init_image_png, image_cfg_scale=image_cfg_scale))
    assert _diff(result.images, _diffusers_edit(ip2p_checkpoint, init_image_png, image_cfg_scale)) <= 2
    assert result.info["image_cfg_scale"] == image_cfg_scale


def test_without_image_guidance_the_image_conditions_every_row(ip2p, ip2p_checkpoint, init_image_png):
    """image_cfg_scale none (AUTOMATIC1111's API default) or 1: plain guidance with the image on both rows, which is
    diffusers' image guidance at 1; and the image matters (a different image, a different edit)."""
    plain = ip2p.img2img(_request(init_image_png))
    assert "image_cfg_scale" not in plain.info  # AUTOMATIC1111 writes no "Image CFG scale" then
    assert _diff(plain.images, _diffusers_edit(ip2p_checkpoint, init_image_png, 1.0)) <= 2
    assert _diff(ip2p.img2img(_request(init_image_png, image_cfg_scale=1.0)).images, plain.images) <= 1
    assert _diff(ip2p.img2img(_request(init_image_png, image_cfg_scale=1.5)).images, plain.images) > 2
    # AND's parts take the image too: two halves of one prompt are the prompt
    halves = ip2p.img2img(_request(init_image_png, prompt=f"{PROMPT} :0.5 AND {PROMPT} :0.5"))
    assert _diff(halves.images, plain.images) <= 2


def test_a_batch_and_an_inpainting_mask_edit_as_one_image_does(ip2p, init_image_png):
    one = ip2p.img2img(_request(init_image_png, image_cfg_scale=1.5))
    two = ip2p.img2img(_request(init_image_png, image_cfg_scale=1.5, batch_size=2))
    assert _diff(two.images[:1], one.images) <= 1  # image 0 of a batch: the seed's image
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    masked = ip2p.img2img(_request(init_image_png, image_cfg_scale=1.5, mask=buffer.getvalue(), mask_blur=0,
                                   overlay=True))
    original = np.asarray(Image.open(io.BytesIO(init_image_png)).convert("RGB"))
    assert _diff(masked.images[0][:8], original[:8]) == 0  # kept outside the mask (pasted back, as AUTOMATIC1111)
    assert _diff(masked.images[0][20:44, 20:44], one.images[0][20:44, 20:44]) > 0  # edited inside
    assert masked.info["image_cfg_scale"] == 1.5


def test_what_an_edit_checkpoint_refuses_by_name(ip2p, init_image_png):
    cases = [
        (Txt2ImgRequest(prompt="a cat", steps=2, width=64, height=64), "instruct-pix2pix model: it edits an image"),
        (_request(init_image_png, image_cfg_scale=1.5, prompt="a AND b"),
         "AND .* with image_cfg_scale 1.5 on an instruct-pix2pix checkpoint"),
        (_request(init_image_png, image_cfg_scale=2.0, s_min_uncond=2.0), "s_min_uncond with image_cfg_scale 2"),
        (_request(init_image_png, image_cfg_scale=1.5, controlnet=ControlNetUnit(image=init_image_png)),
         "ControlNet with image_cfg_scale 1.5"),
        (_request(init_image_png, latent_resize=True), "resize_mode 3 .* instruct-pix2pix"),
        (_request(init_image_png, image_cfg_scale=float("nan")), r"image_cfg_scale must be in \[0, 100\]"),
        (_request(init_image_png, image_cfg_scale=101), r"image_cfg_scale must be in \[0, 100\]"),
    ]
    for request, message in cases:
        with pytest.raises(InputError, match=message):
            ip2p.img2img(request) if isinstance(request, Img2ImgRequest) else ip2p.txt2img(request)
    from orchestrator.pipeline.refiner import check_refiner
    from orchestrator.pipeline.requests import Refiner

    with pytest.raises(InputError, match="refiner_checkpoint with an instruct-pix2pix UNet .* 8 channels"):
        check_refiner(ip2p, ip2p, _request(init_image_png, refiner=Refiner("other", 0.5)))
    # at 1 the plain path runs, which takes AND and s_min_uncond, as AUTOMATIC1111's
    ip2p.check(_request(init_image_png, image_cfg_scale=1.0, prompt="a AND b", s_min_uncond=2.0))


def test_a_checkpoint_that_edits_nothing_refuses_image_guidance(local, init_image_png):
    request = _request(init_image_png, denoising_strength=0.5)
    for accepted in (None, 1.5):  # 1.5: AUTOMATIC1111's UI default, sent by its clients whatever the checkpoint
        local.check(replace(request, image_cfg_scale=accepted))
    with pytest.raises(InputError, match="image_cfg_scale is instruct-pix2pix's image guidance; checkpoint .* takes "
                                         "no image to edit"):
        local.check(replace(request, image_cfg_scale=2.0))


def test_a_unet_of_other_input_channels_is_refused_at_load(tmp_path):
    from diffusers import UNet2DConditionModel

    folder = write_sd_checkpoint(tmp_path / "five", size="tiny", seed=1, controlnet=False)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    UNet2DConditionModel(**(dict(unet.config) | {"in_channels": 5})).save_pretrained(str(folder / "unet"))
    with pytest.raises(WeightsError, match="its UNet takes 5 input channels; kiln serves UNets of 4 .*, 9 "
                                           r"\(inpainting\) and 8 \(instruct-pix2pix\)"):
        load_sd(folder)


def test_served_through_triton_the_automatic1111_api_and_the_page(ip2p_repo, ip2p, init_image_png, tmp_path,
                                                                   browser, kiln):
    """The 8-channel sd_unet through Triton, image_cfg_scale through the API: the in-process image, AUTOMATIC1111's
    infotext (pasted back, the same image), its config name, its X/Y/Z axis; txt2img a 422 naming why. The web page
    offers Image CFG scale for this checkpoint and sends it."""
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    server = start_triton(ip2p_repo, tmp_path / "tritonserver.log")
    api = BackgroundAPI(Settings(triton_url=server.grpc_url, port=free_port(), outputs_dir=tmp_path / "outputs"))
    init = base64.b64encode(init_image_png).decode()
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 6, "sampler_name": "Euler", "cfg_scale": 7.5,
            "seed": 21, "width": 64, "height": 64, "init_images": [init], "denoising_strength": 1.0,
            "image_cfg_scale": 1.5}
    try:
        with httpx.Client(base_url=api.url, timeout=120) as client:
            assert client.get("/sdapi/v1/sd-models").json()[0]["config"] == "instruct-pix2pix.yaml"
            response = client.post("/sdapi/v1/img2img", json=body)
            assert response.status_code == 200, response.text
            served = _pixels(response.json()["images"][0])
            text = json.loads(response.json()["info"])["infotexts"][0]
            assert parse_infotext(text)["Image CFG scale"] == "1.5", text
            assert json.loads(response.json()["info"])["is_using_inpainting_conditioning"] is True  # image channels
            weighted = client.post("/sdapi/v1/img2img", json=body | {"override_settings": {
                "inpainting_mask_weight": 0.5}})  # AUTOMATIC1111's edit conditioning takes no mask: it cannot act
            assert weighted.status_code == 422 and "has no such UNet" in weighted.text
            pasted = client.post("/sdapi/v1/img2img", json={"infotext": text, "init_images": [init]})
            assert pasted.status_code == 200, pasted.text
            again = _pixels(pasted.json()["images"][0])
            # AUTOMATIC1111's "Image CFG Scale" axis: a cell per value, each its own request's image
            plot = client.post("/sdapi/v1/img2img", json=body | {"script_name": "x/y/z plot", "script_args": [
                "Image CFG Scale", "1.5, 3", None, "Nothing", "", None, "Nothing", "", None, False, True]})
            assert plot.status_code == 200, plot.text
            cells = plot.json()["images"][1:]
            assert len(cells) == 2 and _diff(_pixels(cells[0]), served) <= 2
            assert _diff(_pixels(cells[1]), served) > 2
            refused = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "width": 64,
                                                              "height": 64})
            assert refused.status_code == 422 and "instruct-pix2pix model: it edits an image" in refused.text
        # `kiln generate` straight to Triton, and through the API: the same edit
        (tmp_path / "init.png").write_bytes(init_image_png)
        for route in (("--url", server.grpc_url), ("--api", api.url)):
            code, _, err = kiln("generate", PROMPT, "--negative-prompt", NEGATIVE, "--steps", "6", "--sampler",
                                "Euler", "--cfg-scale", "7.5", "--seed", "21", "--width", "64", "--height", "64",
                                "--init-image", tmp_path / "init.png", "--strength", "1", "--image-cfg-scale", "1.5",
                                *route, "--out", tmp_path / "cli.png")
            assert code == 0, err
            assert _diff(np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")), served) <= 1, route[0]
        code, _, err = kiln("generate", PROMPT, "--image-cfg-scale", "1.5", "--url", server.grpc_url)
        assert code != 0 and "pass --init-image too" in err and "Traceback" not in err
        page = open_page(browser, api.url)
        page.click("[data-tab=img2img]")
        assert page.is_visible("#image-cfg-field")
        page.set_input_files("#init-file", str(SAMPLE_IMAGES / "chelsea.jpg"))
        page.wait_for_function("document.querySelector('#init-canvas').width > 0")
        for name, value in (("prompt", PROMPT), ("steps", "3"), ("width", "64"), ("height", "64"),
                            ("image_cfg_scale", "2.25")):
            page.fill(f"[name={name}]", value)
        generate(page)
        assert "Image CFG scale: 2.25" in page.inner_text("#info") and not page.errors
    finally:
        api.stop()
        server.stop()
    local = ip2p.img2img(_request(init_image_png, image_cfg_scale=1.5)).images[0]
    assert _diff(served, local) <= 1
    assert _diff(again, served) == 0
