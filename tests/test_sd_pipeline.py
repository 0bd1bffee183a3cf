"""txt2img over a real Triton server matches diffusers' StableDiffusionPipeline (tiny seeded weights, fp32)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from build.errors import InputError
from build.sd import ImageRange, SDBuildOptions, build_sd
from build.sd_weights import write_sd_checkpoint
from orchestrator.diffusion import Cancelled, TritonDiffusion, Txt2ImgRequest
from orchestrator.samplers import make_scheduler
from orchestrator.triton_server import TritonOptions, TritonServer, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_sd_checkpoint(tmp_path_factory.mktemp("sd_pipe") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="module")
def second_controlnet(tmp_path_factory):
    """Another ControlNet for the same UNet (its own seed), as a user's second model would be (depth, scribble ...)."""
    from build.sd_weights import random_controlnet

    folder = tmp_path_factory.mktemp("scribble") / "control_scribble"
    random_controlnet("tiny", seed=11).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd_server(tiny_checkpoint, second_controlnet, tmp_path_factory):
    """The tiny checkpoint with two ControlNets: its own (the default, "controlnet") and "scribble"."""
    repo = tmp_path_factory.mktemp("sd_repo")
    build_sd(SDBuildOptions(weights=str(tiny_checkpoint), repository=repo, images=ImageRange(32, 64, 128),
                            controlnet=(str(tiny_checkpoint / "controlnet"), f"scribble={second_controlnet}"),
                            progress=False), log=lambda _m: None)
    server = TritonServer(TritonOptions(repository=repo, http_port=free_port(), grpc_port=free_port(),
                                        metrics_port=free_port(), log_path=repo.parent / "triton.log"))
    with server:
        yield server


@pytest.fixture(scope="module")
def reference_pipe(tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)  # the checkpoint's own config: each sampler starts from it


def _diffusers_image(reference, sampler: str, prompt: str, negative: str, steps: int, cfg: float, seed: int,
                     size=(64, 64)) -> np.ndarray:
    pipe, checkpoint_scheduler_config = reference
    pipe.scheduler = make_scheduler(sampler, checkpoint_scheduler_config)
    images = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg,
                  height=size[0], width=size[1], generator=torch.Generator().manual_seed(seed), output_type="np").images
    return (images * 255).round().astype(np.uint8)  # diffusers' own numpy_to_pil rounding


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "DDIM"])
def test_txt2img_matches_diffusers(sd_server, reference_pipe, sampler):
    pipeline = TritonDiffusion(sd_server.grpc_url)
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=6, sampler=sampler,
                             cfg_scale=7.5, seed=1234, width=64, height=64)
    result = pipeline.txt2img(request)
    expected = _diffusers_image(reference_pipe, sampler, "a photo of a cat", "blurry", 6, 7.5, 1234)
    assert result.images.shape == expected.shape == (1, 64, 64, 3) and result.images.dtype == np.uint8
    diff = np.abs(result.images.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"{sampler}: max pixel difference {diff}/255"
    assert result.seeds == [1234] and result.info["sampler"] == sampler


def test_cfg_one_has_no_negative_branch_and_non_square_sizes(sd_server, reference_pipe):
    pipeline = TritonDiffusion(sd_server.grpc_url)
    calls = []
    original = pipeline.unet
    pipeline.unet = lambda sample, t, context, **kw: calls.append(len(sample)) or original(sample, t, context, **kw)
    result = pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=3, sampler="Euler", cfg_scale=1.0, seed=7,
                                             width=96, height=64))
    assert calls == [1, 1, 1]  # batch of one: no unconditional half at scale 1
    expected = _diffusers_image(reference_pipe, "Euler", "a cat", "", 3, 1.0, 7, size=(64, 96))
    assert np.abs(result.images.astype(int) - expected.astype(int)).max() <= 2


def test_seeds_follow_automatic1111(sd_server):
    pipeline = TritonDiffusion(sd_server.grpc_url)
    pair = pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=2, seed=100, batch_size=2, width=64, height=64))
    assert pair.seeds == [100, 101]
    single = pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=2, seed=101, width=64, height=64))
    assert np.abs(pair.images[1].astype(int) - single.images[0].astype(int)).max() <= 1
    drawn = pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=1, seed=-1, width=64, height=64))
    assert 0 <= drawn.seeds[0] < 2**32 and drawn.info["seed"] == drawn.seeds[0]


def test_long_prompts_are_chunked_not_cut(sd_server):
    pipeline = TritonDiffusion(sd_server.grpc_url)
    embeddings = pipeline.encode_prompts(["a photo of a cat " * 30, ""])
    assert embeddings.shape[:2] == (2, 77 * 2)


@pytest.mark.parametrize("field, value, message", [
    ("width", 60, "multiple of 8"),
    ("height", 256, "within the built profile"),
    ("steps", 0, "steps must be between"),
    ("steps", 10_000, "steps must be between"),
    ("cfg_scale", float("nan"), "cfg_scale must be a finite"),
    ("cfg_scale", float("inf"), "cfg_scale must be a finite"),
    ("sampler", "Euler z", "Sampler not found.*valid samplers: Euler, Euler a"),
    ("seed", 2**32, "seed must be"),
])
def test_bad_requests_are_clear_errors(sd_server, field, value, message):
    pipeline = TritonDiffusion(sd_server.grpc_url)
    request = Txt2ImgRequest(**({"prompt": "a cat", "width": 64, "height": 64} | {field: value}))
    with pytest.raises(InputError, match=message):
        pipeline.txt2img(request)
    assert pipeline.txt2img(Txt2ImgRequest(prompt="ok", steps=1, seed=1, width=64, height=64)).images.shape == (1, 64, 64, 3)


def test_progress_and_cancellation(sd_server):
    pipeline = TritonDiffusion(sd_server.grpc_url)
    seen = []
    pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=3, seed=1, width=64, height=64),
                     progress=lambda step, total, latents: seen.append((step, total, latents.shape)))
    assert seen == [(1, 3, (1, 4, 32, 32)), (2, 3, (1, 4, 32, 32)), (3, 3, (1, 4, 32, 32))]
    with pytest.raises(Cancelled, match="after 2 of 5 steps"):
        pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=5, seed=1, width=64, height=64),
                         progress=lambda *a: None, cancelled=lambda: len(seen) >= 5 or bool(seen.append(0)) )


def test_generate_command_writes_a_png_with_parameters(sd_server, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "cat.png"
    result = subprocess.run([sys.executable, "-m", "clients.cli", "generate", "a photo of a cat", "--steps", "3",
                             "--sampler", "DDIM", "--seed", "42", "--width", "64", "--height", "64",
                             "--url", sd_server.grpc_url, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (64, 64)
    assert image.text["parameters"].startswith("a photo of a cat\nSteps: 3, Sampler: DDIM, CFG scale: 7.0, Seed: 42, Size: 64x64")
    again = tmp_path / "cat2.png"
    result = subprocess.run([sys.executable, "-m", "clients.cli", "generate", "a painting of a cat", "--steps", "4",
                             "--init-image", str(out), "--strength", "0.5", "--seed", "3", "--width", "64",
                             "--height", "64", "--url", sd_server.grpc_url, "--out", str(again)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Seed: 3" in Image.open(again).text["parameters"]
    controlled = tmp_path / "cat3.png"
    result = subprocess.run([sys.executable, "-m", "clients.cli", "generate", "a cat", "--steps", "2",
                             "--control-image", str(out), "--control-module", "canny", "--control-weight", "0.5",
                             "--width", "64", "--height", "64", "--url", sd_server.grpc_url, "--out", str(controlled)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(controlled).size == (64, 64)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    result = subprocess.run([sys.executable, "-m", "clients.cli", "generate", "a dog", "--steps", "2", "--init-image",
                             str(out), "--mask", str(mask), "--mask-blur", "2", "--strength", "1.0", "--width", "64",
                             "--height", "64", "--url", sd_server.grpc_url, "--out", str(tmp_path / "dog.png")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "dog.png").size == (64, 64)
    bad = subprocess.run([sys.executable, "-m", "clients.cli", "generate", "x", "--sampler", "Nope", "--width", "64",
                          "--height", "64", "--url",
                          sd_server.grpc_url], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Sampler not found" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def init_image_png():
    """A real photograph, 64x64, as PNG bytes."""
    import io

    from PIL import Image

    from build.vit import SAMPLE_IMAGES

    buffer = io.BytesIO()
    Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((64, 64), Image.LANCZOS).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("sampler, strength", [("Euler a", 0.6), ("DDIM", 0.75), ("DPM++ 2M Karras", 0.5)])
def test_img2img_matches_diffusers(sd_server, tiny_checkpoint, reference_pipe, init_image_png, sampler, strength):
    import io

    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from orchestrator.diffusion import Img2ImgRequest

    pipe, checkpoint_scheduler_config = reference_pipe
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = make_scheduler(sampler, checkpoint_scheduler_config)
    expected = img2img("a photo of a cat", image=Image.open(io.BytesIO(init_image_png)), strength=strength,
                       num_inference_steps=10, guidance_scale=7.5, negative_prompt="blurry", output_type="np",
                       generator=torch.Generator().manual_seed(99)).images
    expected = (expected * 255).round().astype(np.uint8)
    result = TritonDiffusion(sd_server.grpc_url).img2img(Img2ImgRequest(
        prompt="a photo of a cat", negative_prompt="blurry", steps=10, sampler=sampler, cfg_scale=7.5, seed=99,
        width=64, height=64, init_image=init_image_png, denoising_strength=strength))
    diff = np.abs(result.images.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"{sampler}: max pixel difference {diff}/255"
    assert result.info["denoising_strength"] == strength


def test_img2img_bad_inputs(sd_server, init_image_png):
    from orchestrator.diffusion import Img2ImgRequest

    pipeline = TritonDiffusion(sd_server.grpc_url)
    base = dict(prompt="a cat", steps=2, seed=1, width=64, height=64, init_image=init_image_png)
    for change, message in [({"denoising_strength": 1.5}, "denoising_strength must be in"),
                            ({"denoising_strength": float("nan")}, "denoising_strength must be in"),
                            ({"init_image": b"not an image"}, "init image: .*cannot decode image"),
                            ({"init_image": b""}, "init_image is empty")]:
        with pytest.raises(InputError, match=message):
            pipeline.img2img(Img2ImgRequest(**(base | change)))
    unchanged = pipeline.img2img(Img2ImgRequest(**(base | {"denoising_strength": 0.0})))
    assert unchanged.images.shape == (1, 64, 64, 3)  # no denoising step: the init image through the VAE


def test_no_server_is_a_clear_error():
    from build.errors import KilnError

    with pytest.raises(KilnError, match="is `kiln serve` running"):
        TritonDiffusion(f"127.0.0.1:{free_port()}")


@pytest.fixture(scope="module")
def edge_map_png(init_image_png):
    """A Canny edge map of the photograph, made by the built-in preprocessor, as PNG bytes."""
    import io

    from PIL import Image

    from orchestrator.diffusion import canny

    buffer = io.BytesIO()
    canny(Image.open(io.BytesIO(init_image_png)).convert("RGB"), 100, 200).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("sampler, start, end", [("Euler a", 0.0, 1.0), ("DDIM", 0.2, 0.8)])
def test_controlnet_matches_diffusers(sd_server, tiny_checkpoint, reference_pipe, edge_map_png, sampler, start, end):
    import io

    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    from orchestrator.diffusion import ControlNetUnit

    pipe, checkpoint_scheduler_config = reference_pipe
    controlnet = ControlNetModel.from_pretrained(str(tiny_checkpoint / "controlnet"))
    control_pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    control_pipe.set_progress_bar_config(disable=True)
    control_pipe.scheduler = make_scheduler(sampler, checkpoint_scheduler_config)
    expected = control_pipe("a photo of a cat", image=Image.open(io.BytesIO(edge_map_png)), num_inference_steps=8,
                            guidance_scale=7.5, negative_prompt="blurry", controlnet_conditioning_scale=0.8,
                            control_guidance_start=start, control_guidance_end=end, height=64, width=64,
                            output_type="np", generator=torch.Generator().manual_seed(5)).images
    expected = (expected * 255).round().astype(np.uint8)
    unit = ControlNetUnit(image=edge_map_png, weight=0.8, guidance_start=start, guidance_end=end)
    result = TritonDiffusion(sd_server.grpc_url).txt2img(Txt2ImgRequest(
        prompt="a photo of a cat", negative_prompt="blurry", steps=8, sampler=sampler, cfg_scale=7.5, seed=5,
        width=64, height=64, controlnet=unit))
    diff = np.abs(result.images.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"{sampler}: max pixel difference {diff}/255"
    plain = TritonDiffusion(sd_server.grpc_url).txt2img(Txt2ImgRequest(
        prompt="a photo of a cat", negative_prompt="blurry", steps=8, sampler=sampler, cfg_scale=7.5, seed=5,
        width=64, height=64))
    assert np.abs(plain.images.astype(int) - result.images.astype(int)).max() > 2  # the ControlNet did act


def test_several_controlnet_units_match_diffusers_multicontrolnet(sd_server, tiny_checkpoint, second_controlnet,
                                                                 reference_pipe, edge_map_png, init_image_png):
    """Two units of two different ControlNets (an edge map, and a photo through the canny preprocessor), with their
    own scales and windows: diffusers' MultiControlNetModel sums their residuals, and so does the orchestrator."""
    import io

    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    from orchestrator.diffusion import ControlNetUnit, control_image

    pipe, checkpoint_scheduler_config = reference_pipe
    controlnet = ControlNetModel.from_pretrained(str(tiny_checkpoint / "controlnet"))
    scribble = ControlNetModel.from_pretrained(str(second_controlnet))
    control_pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=[controlnet, scribble])
    control_pipe.set_progress_bar_config(disable=True)
    control_pipe.scheduler = make_scheduler("DPM++ 2M Karras", checkpoint_scheduler_config)
    second = Image.fromarray((control_image(ControlNetUnit(image=init_image_png, module="canny", low_threshold=50,
                                                           high_threshold=150), 64, 64) * 255)
                             .astype(np.uint8).transpose(1, 2, 0))
    expected = control_pipe("a photo of a cat", image=[Image.open(io.BytesIO(edge_map_png)), second],
                            num_inference_steps=8, guidance_scale=7.5, negative_prompt="blurry",
                            controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.25],
                            control_guidance_end=[1.0, 0.75], height=64, width=64, output_type="np",
                            generator=torch.Generator().manual_seed(5)).images
    expected = (expected * 255).round().astype(np.uint8)
    units = (ControlNetUnit(image=edge_map_png, weight=0.8),
             ControlNetUnit(image=init_image_png, module="canny", weight=0.5, guidance_start=0.25, guidance_end=0.75,
                            low_threshold=50, high_threshold=150, model="scribble"))
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=8, sampler="DPM++ 2M Karras",
                             cfg_scale=7.5, seed=5, width=64, height=64, controlnet=units)
    result = TritonDiffusion(sd_server.grpc_url).txt2img(request)
    diff = np.abs(result.images.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    one = TritonDiffusion(sd_server.grpc_url).txt2img(replace(request, controlnet=units[0]))
    assert np.abs(one.images.astype(int) - result.images.astype(int)).max() > 2  # the second unit did act
    assert len(result.info["controlnet"]) == 2 and "Model: scribble [" in result.info["controlnet"][1]
    same_model = TritonDiffusion(sd_server.grpc_url).txt2img(
        replace(request, controlnet=(units[0], replace(units[1], model=None))))
    assert np.abs(same_model.images.astype(int) - result.images.astype(int)).max() > 2  # the model choice matters
    with pytest.raises(InputError, match="at most 4 per request"):
        TritonDiffusion(sd_server.grpc_url).txt2img(replace(request, controlnet=units * 3))
    with pytest.raises(InputError, match="controlnet unit 1 weight"):
        TritonDiffusion(sd_server.grpc_url).txt2img(replace(request, controlnet=(units[0], replace(units[1], weight=3.0))))


def test_a_second_controlnet_by_name_matches_diffusers(sd_server, tiny_checkpoint, second_controlnet, reference_pipe,
                                                      edge_map_png):
    """One unit naming the second ControlNet by its sd-webui-controlnet title runs that model's own ensemble."""
    import io

    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    from orchestrator.diffusion import ControlNetUnit

    pipeline = TritonDiffusion(sd_server.grpc_url)
    assert [c.name for c in pipeline.controlnets.values()] == ["controlnet", "scribble"]
    scribble = pipeline.controlnets["scribble"]
    assert (scribble.model, scribble.ensemble) == ("sd_controlnet_2", "sd_controlnet_unet_2")
    pipe, checkpoint_scheduler_config = reference_pipe
    control_pipe = StableDiffusionControlNetPipeline(
        **pipe.components, controlnet=ControlNetModel.from_pretrained(str(second_controlnet)))
    control_pipe.set_progress_bar_config(disable=True)
    control_pipe.scheduler = make_scheduler("Euler a", checkpoint_scheduler_config)
    expected = control_pipe("a photo of a cat", image=Image.open(io.BytesIO(edge_map_png)), num_inference_steps=6,
                            guidance_scale=7.5, controlnet_conditioning_scale=0.9, height=64, width=64,
                            output_type="np", generator=torch.Generator().manual_seed(9)).images
    expected = (expected * 255).round().astype(np.uint8)
    request = Txt2ImgRequest(prompt="a photo of a cat", steps=6, sampler="Euler a", cfg_scale=7.5, seed=9, width=64,
                             height=64, controlnet=ControlNetUnit(image=edge_map_png, weight=0.9, model=scribble.title))
    result = pipeline.txt2img(request)
    diff = np.abs(result.images.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    with pytest.raises(InputError, match=r"unknown ControlNet model 'depth'; this build serves: controlnet \[.*scribble"):
        pipeline.txt2img(replace(request, controlnet=replace(request.controlnet, model="depth")))


def test_canny_preprocessor_and_bad_units(sd_server, init_image_png):
    from orchestrator.diffusion import ControlNetUnit, control_image

    edges = control_image(ControlNetUnit(image=init_image_png, module="canny"), 64, 64)
    assert edges.shape == (3, 64, 64) and set(np.unique(edges)) == {0.0, 1.0}
    assert 0.01 < edges.mean() < 0.5  # a photograph has edges, not everywhere
    pipeline = TritonDiffusion(sd_server.grpc_url)
    for unit, message in [(ControlNetUnit(image=init_image_png, module="depth"), "module 'depth' is unknown"),
                          (ControlNetUnit(image=init_image_png, weight=float("nan")), "weight must be in"),
                          (ControlNetUnit(image=init_image_png, guidance_start=0.9, guidance_end=0.1), "start < end"),
                          (ControlNetUnit(image=b"junk"), "controlnet image: cannot decode")]:
        with pytest.raises(InputError, match=message):
            pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=2, seed=1, width=64, height=64, controlnet=unit))


@pytest.fixture(scope="module")
def mask_png():
    """White (repaint) rectangle in the middle of a black (keep) 64x64 mask."""
    import io

    from PIL import Image

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 20, 48, 52))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("sampler, strength", [("Euler a", 1.0), ("DDIM", 0.75), ("DPM++ 2M Karras", 0.9)])
def test_inpainting_matches_diffusers(sd_server, reference_pipe, init_image_png, mask_png, sampler, strength):
    import io

    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from orchestrator.diffusion import Img2ImgRequest

    pipe, checkpoint_scheduler_config = reference_pipe
    inpaint = StableDiffusionInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    inpaint.scheduler = make_scheduler(sampler, checkpoint_scheduler_config)
    expected = inpaint("a photo of a cat", image=Image.open(io.BytesIO(init_image_png)),
                       mask_image=Image.open(io.BytesIO(mask_png)), strength=strength, num_inference_steps=8,
                       guidance_scale=7.5, negative_prompt="blurry", height=64, width=64, output_type="np",
                       generator=torch.Generator().manual_seed(11)).images
    expected = (expected * 255).round().astype(np.uint8)
    result = TritonDiffusion(sd_server.grpc_url).img2img(Img2ImgRequest(
        prompt="a photo of a cat", negative_prompt="blurry", steps=8, sampler=sampler, cfg_scale=7.5, seed=11,
        width=64, height=64, init_image=init_image_png, denoising_strength=strength, mask=mask_png, mask_blur=0))
    diff = np.abs(result.images.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"{sampler}: max pixel difference {diff}/255"


def test_inpainting_mask_options(sd_server, init_image_png, mask_png):
    from orchestrator.diffusion import Img2ImgRequest, inpaint_mask

    mask = inpaint_mask(mask_png, 64, 64, blur=0, invert=False)
    assert mask.shape == (1, 64, 64) and mask[0, 30, 30] == 1 and mask[0, 2, 2] == 0
    inverted = inpaint_mask(mask_png, 64, 64, blur=0, invert=True)
    assert np.array_equal(inverted, 1 - mask)
    blurred = inpaint_mask(mask_png, 64, 64, blur=4, invert=False)
    assert blurred.sum() != mask.sum()  # blurring then binarizing moves the edge
    pipeline = TritonDiffusion(sd_server.grpc_url)
    with pytest.raises(InputError, match="mask: cannot decode"):
        pipeline.img2img(Img2ImgRequest(prompt="a cat", steps=2, seed=1, width=64, height=64,
                                        init_image=init_image_png, mask=b"junk"))
    with pytest.raises(InputError, match="at least one denoising step"):
        pipeline.img2img(Img2ImgRequest(prompt="a cat", steps=2, seed=1, width=64, height=64,
                                        init_image=init_image_png, mask=mask_png, denoising_strength=0.2))
    with pytest.raises(InputError, match="mask_blur must be"):
        pipeline.img2img(Img2ImgRequest(prompt="a cat", steps=2, seed=1, width=64, height=64,
                                        init_image=init_image_png, mask=mask_png, mask_blur=-1))


@pytest.fixture(scope="module")
def inpainting_server(tmp_path_factory):
    """A second repository, built from a checkpoint whose UNet is a 9-channel inpainting UNet (with a ControlNet in
    controlnet/, which takes the 4-channel latents: no ControlNet -> UNet ensemble there)."""
    folder = write_sd_checkpoint(tmp_path_factory.mktemp("sd_inpaint") / "tiny", size="tiny", seed=3,
                                 controlnet=True, inpainting=True)
    repo = folder.parent / "repo"
    build_sd(SDBuildOptions(weights=str(folder), repository=repo, images=ImageRange(32, 64, 128), progress=False),
             log=lambda _m: None)
    with TritonServer(TritonOptions(repository=repo, http_port=free_port(), grpc_port=free_port(),
                                    metrics_port=free_port(), log_path=folder.parent / "triton.log")) as server:
        yield server, folder


def test_nine_channel_inpainting_unet_matches_diffusers(inpainting_server, init_image_png, mask_png):
    import io

    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from orchestrator.diffusion import Img2ImgRequest

    server, folder = inpainting_server
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("Euler a", dict(pipe.scheduler.config))
    expected = pipe("a photo of a cat", image=Image.open(io.BytesIO(init_image_png)),
                    mask_image=Image.open(io.BytesIO(mask_png)), strength=1.0, num_inference_steps=6,
                    guidance_scale=7.5, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(4)).images
    expected = (expected * 255).round().astype(np.uint8)
    pipeline = TritonDiffusion(server.grpc_url)
    assert pipeline.unet_in_channels == 9
    result = pipeline.img2img(Img2ImgRequest(prompt="a photo of a cat", steps=6, sampler="Euler a", cfg_scale=7.5,
                                             seed=4, width=64, height=64, init_image=init_image_png,
                                             denoising_strength=1.0, mask=mask_png, mask_blur=0))
    diff = np.abs(result.images.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    with pytest.raises(InputError, match="inpainting UNet: it needs init_image and mask"):
        pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=2, width=64, height=64))


def test_controlnet_with_a_nine_channel_inpainting_unet_matches_diffusers(inpainting_server, init_image_png, mask_png,
                                                                         edge_map_png):
    """The ControlNet sees the latents, the UNet the latents + mask + masked image (diffusers'
    StableDiffusionControlNetInpaintPipeline); the orchestrator makes the two calls, the UNet's in the step batcher."""
    import io

    from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline
    from PIL import Image

    from orchestrator.diffusion import ControlNetUnit, Img2ImgRequest

    server, folder = inpainting_server
    pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(
        str(folder), controlnet=ControlNetModel.from_pretrained(str(folder / "controlnet")), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("DPM++ 2M Karras", dict(pipe.scheduler.config))
    expected = pipe("a photo of a cat", image=Image.open(io.BytesIO(init_image_png)),
                    mask_image=Image.open(io.BytesIO(mask_png)), control_image=Image.open(io.BytesIO(edge_map_png)),
                    strength=1.0, num_inference_steps=6, guidance_scale=7.5, controlnet_conditioning_scale=0.9,
                    height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(4)).images
    expected = (expected * 255).round().astype(np.uint8)
    pipeline = TritonDiffusion(server.grpc_url)
    assert pipeline.controlnets["controlnet"].ensemble == ""  # the ControlNet takes 4 channels, the UNet 9
    request = Img2ImgRequest(prompt="a photo of a cat", steps=6, sampler="DPM++ 2M Karras", cfg_scale=7.5, seed=4,
                             width=64, height=64, init_image=init_image_png, denoising_strength=1.0, mask=mask_png,
                             mask_blur=0, controlnet=ControlNetUnit(image=edge_map_png, weight=0.9))
    result = pipeline.img2img(request)
    diff = np.abs(result.images.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    plain = pipeline.img2img(replace(request, controlnet=None))
    assert np.abs(plain.images.astype(int) - result.images.astype(int)).max() > 2  # the ControlNet did act


def test_transparent_mask_is_read_by_its_alpha():
    import io

    from PIL import Image

    from orchestrator.diffusion import inpaint_mask

    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent: keep
    rgba.paste((0, 0, 0, 255), (0, 0, 32, 64))  # opaque left half: repaint
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    mask = inpaint_mask(buffer.getvalue(), 64, 64, blur=0, invert=False)
    assert mask[0, 10, 5] == 1 and mask[0, 10, 60] == 0


def test_more_bad_requests(sd_server):
    from orchestrator.diffusion import ControlNetUnit

    pipeline = TritonDiffusion(sd_server.grpc_url)
    with pytest.raises(InputError, match="LCM cannot run 60 steps"):
        pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=60, sampler="LCM", width=64, height=64))
    with pytest.raises(InputError, match="sd_tokenizer: prompt of .* tokens needs 9 chunks; the limit is 8"):
        pipeline.txt2img(Txt2ImgRequest(prompt="cat " * 650, steps=1, width=64, height=64))
    with pytest.raises(InputError, match="canny thresholds"):
        pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=1, width=64, height=64,
                                        controlnet=ControlNetUnit(image=b"x", low_threshold=200, high_threshold=100)))
    with pytest.raises(InputError, match="txt2img got an img2img request"):
        from orchestrator.diffusion import Img2ImgRequest

        pipeline.txt2img(Img2ImgRequest(prompt="a cat", init_image=b"x", width=64, height=64))


def test_sampler_names_ignore_the_checkpoints_own_scheduler_options():
    scheduler = make_scheduler("Euler", {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                         "use_karras_sigmas": True, "_class_name": "EulerDiscreteScheduler"})
    assert type(scheduler).__name__ == "EulerDiscreteScheduler" and not scheduler.config.use_karras_sigmas
    karras = make_scheduler("DPM++ 2M Karras", {"beta_schedule": "scaled_linear"})
    assert type(karras).__name__ == "DPMSolverMultistepScheduler" and karras.config.use_karras_sigmas


def test_only_masked_crop_region_follows_automatic1111():
    from orchestrator.diffusion import crop_region

    mask = np.zeros((100, 200), bool)
    mask[40:50, 90:110] = True  # 20 wide, 10 high
    assert crop_region(np.zeros((8, 8), bool), 4, 64, 64) is None
    left, top, right, bottom = crop_region(mask, 5, 64, 64)  # padded to 30 x 20, then squared to 30 x 30
    assert (right - left, bottom - top) == (30, 30) and left == 85 and top <= 35 and bottom >= 55
    left, top, right, bottom = crop_region(mask, 0, 128, 32)  # 4:1 -> 40 x 10, centred on the mask
    assert (right - left, bottom - top) == (40, 10) and (left, top) == (80, 40)
    left, top, right, bottom = crop_region(mask, 80, 64, 64)  # wider than the image allows: clamped inside
    assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
