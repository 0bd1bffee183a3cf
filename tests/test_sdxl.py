"""SDXL: its tiny architecture (diffusers' SDXL fast tests: two text encoders, the pooled text and time ids as added
conditions), built like SD 1.x and matching diffusers' StableDiffusionXL pipelines (txt2img, img2img, inpainting,
embeddings, kohya LoRAs, ControlNet, single files); its refiner, alone and taking over part way; all built beside an
SD 1.x checkpoint in one repository and served by one Triton and one API, picked per request."""

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
from safetensors.numpy import save_file

from build.sd import ImageRange, SDBuildOptions, build_sd
from build.sd.weights import load_sd, write_sd_checkpoint
from kiln.contract import SD_TEXT_ENCODE, SDModels
from kiln.errors import InputError, WeightsError
from kiln.model_config import read_config
from kiln.paths import SAMPLE_IMAGES
from kiln.triton_server import free_port
from orchestrator.pipeline import HiresFix, Img2ImgRequest, Pipeline, Refiner, Txt2ImgRequest, make_scheduler
from tests.conftest import a1111_inpainting, diffusers_strength, start_triton

pytestmark = pytest.mark.slow
SIDES = ImageRange(32, 0, 128)  # opt 0: the checkpoint's own side (the tiny UNet's 32 latents: 64 pixels)
XL = SDModels("xl-tiny")
REFINER = SDModels("xl-refiner")
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def xl_checkpoint(tmp_path_factory):
    return write_sd_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny", size="tiny", seed=0, family_name="sdxl")


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """An SDXL textual-inversion embedding (clip_l and clip_g: both encoders' vectors), 2 vectors."""
    folder = tmp_path_factory.mktemp("xl_embeddings")
    rng = np.random.default_rng(0)
    save_file({"clip_l": rng.normal(0, 0.05, (2, 32)).astype(np.float32),
               "clip_g": rng.normal(0, 0.05, (2, 48)).astype(np.float32)}, str(folder / "xl-style.safetensors"))
    return folder


@pytest.fixture(scope="module")
def refiner_checkpoint(tmp_path_factory):
    return write_sd_checkpoint(tmp_path_factory.mktemp("sdxl_refiner") / "tiny", size="tiny", seed=7,
                               family_name="sdxl-refiner")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, plain_checkpoint, xl_checkpoint, refiner_checkpoint):
    """The tiny SD 1.x as the default checkpoint, the tiny SDXL beside it as xl-tiny, its refiner as xl-refiner."""
    repo = tmp_path_factory.mktemp("xl_repo") / "repo"
    for weights, checkpoint in ((plain_checkpoint, ""), (xl_checkpoint, XL.checkpoint),
                                (refiner_checkpoint, REFINER.checkpoint)):
        build_sd(SDBuildOptions(weights=str(weights), repository=repo, images=SIDES, progress=False,
                                checkpoint=checkpoint), log=lambda _m: None)
    return repo


@pytest.fixture(scope="module")
def xl_local(repo, embeddings):
    from kiln.embeddings import EmbeddingLibrary
    from orchestrator.pipeline.components.local import local_components

    return Pipeline(local_components(repo, embeddings=EmbeddingLibrary(embeddings), models=XL))


@pytest.fixture(scope="module")
def reference(xl_checkpoint):
    pipe = _pipe(xl_checkpoint)
    return pipe, dict(pipe.scheduler.config)


def _pipe(checkpoint):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(checkpoint))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _uint8(images) -> np.ndarray:
    return (np.asarray(images) * 255).round().astype(np.uint8)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _theirs(pipe, config, sampler: str, seed: int, steps: int = 6, **kwargs) -> np.ndarray:
    pipe.scheduler = make_scheduler(sampler, config, seed=seed)
    if "strength" in kwargs:  # kiln's strength -> the one at which diffusers runs kiln's (AUTOMATIC1111's) steps
        kwargs["strength"] = diffusers_strength(sampler, steps, kwargs["strength"])
    return _uint8(pipe(kwargs.pop("prompt", PROMPT), num_inference_steps=steps, guidance_scale=7.5, height=64,
                       width=64, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images)


def test_the_family_two_encoders_and_added_conditions_reach_the_contract_and_the_models(xl_checkpoint, repo,
                                                                                        xl_local):
    loaded = load_sd(xl_checkpoint)
    assert loaded.family == "sdxl" and loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token != "!"
    contract = xl_local.contract
    assert (contract.family, contract.text_split, contract.textual_inversion_dim) == ("sdxl", 32, 32 + 48)
    assert contract.a1111_config == "sd_xl_base.yaml" and contract.lora_layers > 0
    assert contract.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    unet = read_config(repo / XL.component("unet") / "config.pbtxt")
    assert [i.name for i in unet.input][:5] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                "time_ids"]
    ensemble = read_config(repo / XL(SD_TEXT_ENCODE) / "config.pbtxt")
    assert "pooled" in [o.name for o in ensemble.output]


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "DDIM", "UniPC"])
def test_txt2img_matches_diffusers(xl_local, reference, sampler):
    """Measured: 0/255 apart."""
    pipe, config = reference
    expected = _theirs(pipe, config, sampler, 1234, negative_prompt="blurry")
    request = Txt2ImgRequest(prompt=PROMPT, negative_prompt="blurry", steps=6, sampler=sampler, cfg_scale=7.5,
                             seed=1234, width=64, height=64)
    assert _diff(xl_local.txt2img(request).images, expected) <= 2


def test_an_empty_negative_prompt_is_zeros_and_the_time_ids_are_the_images_size(xl_local, reference):
    """As diffusers' force_zeros_for_empty_prompt and AUTOMATIC1111's SDXL; the encoding of "", or other time ids,
    give another image (so the test can fail)."""
    pipe, config = reference
    request = Txt2ImgRequest(prompt=PROMPT, steps=4, sampler="Euler", cfg_scale=7.5, seed=8, width=64, height=64)
    ours = xl_local.txt2img(request).images
    assert _diff(ours, _theirs(pipe, config, "Euler", 8, steps=4)) <= 2
    assert _diff(ours, _theirs(pipe, config, "Euler", 8, steps=4, negative_prompt="")) > 2
    assert _diff(ours, _theirs(pipe, config, "Euler", 8, steps=4, original_size=(1024, 1024))) > 2


def test_clip_skip_goes_back_from_the_penultimate_layer_as_diffusers(xl_local, reference):
    """No negative prompt: diffusers' SDXL applies clip_skip to the prompt only (its negative prompt always reads the
    penultimate layers); AUTOMATIC1111's, and ours, to both."""
    pipe, config = reference
    request = Txt2ImgRequest(prompt=PROMPT, steps=4, sampler="Euler", cfg_scale=7.5, seed=2, width=64, height=64,
                             clip_skip=2)
    ours = xl_local.txt2img(request).images
    assert _diff(ours, _theirs(pipe, config, "Euler", 2, steps=4, clip_skip=1)) <= 2
    assert _diff(ours, xl_local.txt2img(replace(request, clip_skip=1)).images) > 2


def test_long_prompts_emphasis_and_embeddings(xl_local, reference, xl_checkpoint, embeddings):
    """A prompt past 75 tokens is chunks side by side, its pooled text its first chunk's (AUTOMATIC1111); emphasis
    acts; an SDXL embedding (clip_l + clip_g) matches diffusers loading each part into its encoder."""
    long = xl_local.encode_prompts([PROMPT + ", detailed" * 60], Txt2ImgRequest(prompt="", width=64, height=64))
    first = xl_local.encode_prompts([PROMPT + ", detailed" * 70], Txt2ImgRequest(prompt="", width=64, height=64))
    assert long.context.shape == (1, 77 * 2, 32 + 48) and long.added["text_embeds"].shape == (1, 32)
    assert np.array_equal(long.added["time_ids"], [[64, 64, 0, 0, 64, 64]])
    # its first chunk's: the same as a prompt's whose first chunk is the same
    assert np.allclose(long.added["text_embeds"], first.added["text_embeds"], atol=1e-5)
    assert not np.allclose(long.context, first.context[:, :77 * 2], atol=1e-3)
    base = Txt2ImgRequest(prompt=PROMPT, steps=3, sampler="Euler", seed=4, width=64, height=64)
    # Emphasis scales positions, then restores each encoder's own mean (AUTOMATIC1111: each embedder on its own)
    plain = xl_local.encode_prompts([PROMPT], base).context
    weighted = xl_local.encode_prompts(["a (photo:1.9) of a (cat:0.2)"], base).context
    assert np.abs(weighted - plain).max() > 0.5
    for part in (slice(0, 32), slice(32, None)):
        assert abs(weighted[..., part].mean() - plain[..., part].mean()) < 1e-5

    from safetensors.torch import load_file

    pipe = _pipe(xl_checkpoint)  # its own: the tokens stay added
    vectors = load_file(str(embeddings / "xl-style.safetensors"))
    pipe.load_textual_inversion(vectors["clip_l"], token="xl-style", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token="xl-style", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt = "a photo of xl-style cat"
    expected = _theirs(pipe, reference[1], "Euler", 4, steps=3, prompt=prompt, negative_prompt="x")
    ours = xl_local.txt2img(replace(base, prompt=prompt, negative_prompt="x")).images
    # Euler starts at k-diffusion's sigma 14.6 (not "leading"'s 11.0), which carries the export's float differences a
    # little further: one value in 12288 reaches 3/255 here
    assert _diff(ours, expected) <= 3 and (np.abs(ours.astype(int) - expected.astype(int)) > 2).mean() < 1e-3
    assert _diff(ours, xl_local.txt2img(replace(base, prompt="a photo of cat", negative_prompt="x")).images) > 2


def test_img2img_matches_diffusers_and_inpainting_automatic1111(xl_local, xl_checkpoint, reference):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe, config = reference
    photo = Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((64, 64), Image.LANCZOS)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 20, 48, 52))
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    expected = _theirs(img2img, config, "DDPM", 9, steps=10, prompt="a dog", negative_prompt="blurry", image=photo,
                       strength=0.6)
    request = Img2ImgRequest(prompt="a dog", negative_prompt="blurry", init_image=_png(photo), denoising_strength=0.6,
                             steps=10, sampler="DDPM", cfg_scale=7.5, seed=9, width=64, height=64)
    assert _diff(xl_local.img2img(request).images, expected) <= 2

    # AUTOMATIC1111's inpainting blend on diffusers' img2img pipeline (conftest.a1111_inpainting)
    expected = a1111_inpainting(img2img, "Euler a", config, photo, mask, seed=11, strength=0.75, steps=8,
                                prompt=PROMPT, negative_prompt="blurry", guidance_scale=7.5, height=64, width=64)
    result = xl_local.img2img(replace(request, prompt=PROMPT, mask=_png(mask), mask_blur=0, denoising_strength=0.75,
                                      sampler="Euler a", seed=11, steps=8))
    assert _diff(result.images, expected) <= 2


def test_single_files_hold_both_encoders_and_load_back_equal(xl_checkpoint, tmp_path):
    """kiln writes SDXL's original layout (conditioner.embedders.0: CLIP ViT-L, .1: OpenCLIP with its projection) and
    reads it back through diffusers' from_single_file, offline, every tensor equal; a refiner's file is named as one."""
    from safetensors.torch import save_file as save_torch

    from build.sd.single_file import inspect_single_file, write_single_file

    path = write_single_file(xl_checkpoint, tmp_path / "xl.safetensors")
    info = inspect_single_file(path)
    assert (info["family"], info["cross_attention_dim"]) == ("sdxl", 32 + 48)
    folder, single = load_sd(xl_checkpoint), load_sd(path, config=xl_checkpoint)
    assert single.family == "sdxl" and single.tokenizer_2.pad_token == "!"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    with pytest.raises(WeightsError, match="cross-attention width 80 is not SDXL's 2048; pass --config"):
        load_sd(path)  # SDXL base's released configs: not the tiny architecture
    save_torch({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3),
                "first_stage_model.decoder.conv_in.weight": torch.zeros(1),
                "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)},  # the refiner's OpenCLIP alone
               str(tmp_path / "refiner.safetensors"))
    with pytest.raises(WeightsError, match="an SDXL refiner"):
        inspect_single_file(tmp_path / "refiner.safetensors")


def test_a_controlnet_of_another_family_is_refused_naming_both(xl_checkpoint, tmp_path):
    from build.sd.specs import sd_specs
    from build.sd.weights import random_controlnet
    from kiln.errors import ExportError

    random_controlnet("tiny", seed=3).save_pretrained(str(tmp_path / "sd1-control"), safe_serialization=True)
    loaded = load_sd(xl_checkpoint, controlnet=str(tmp_path / "sd1-control"))
    with pytest.raises(ExportError, match=r"looks like SD 1.x's, the checkpoint SDXL"):
        sd_specs(loaded, SIDES)


def test_served_beside_sd1_by_one_triton_and_api_and_picked_per_request(repo, xl_local, tmp_path, kiln):
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    body = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 4, "sampler_name": "Euler a", "seed": 7,
            "cfg_scale": 7.5, "width": 64, "height": 64}
    request = Txt2ImgRequest(prompt=PROMPT, negative_prompt="blurry", steps=4, sampler="Euler a", seed=7,
                             cfg_scale=7.5, width=64, height=64)
    sd1 = Pipeline.from_repository(repo).txt2img(request).images[0]
    xl = xl_local.txt2img(request).images[0]
    server = start_triton(repo, tmp_path / "tritonserver.log")
    api = BackgroundAPI(Settings(triton_url=server.grpc_url, port=free_port()))
    try:
        with httpx.Client(base_url=api.url, timeout=120) as client:
            models = {m["model_name"]: m["config"] for m in client.get("/sdapi/v1/sd-models").json()}
            assert (models["xl-tiny"], models["xl-refiner"]) == ("sd_xl_base.yaml", "sd_xl_refiner.yaml")
            answers = {}
            for name in (None, "xl-tiny"):
                extra = {"override_settings": {"sd_model_checkpoint": name}} if name else {}
                response = client.post("/sdapi/v1/txt2img", json=body | extra)
                assert response.status_code == 200, response.text
                answers[name] = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))
            assert json.loads(response.json()["info"])["sd_model_name"] == "xl-tiny"
            # AUTOMATIC1111's refiner: another served checkpoint takes over part way
            refined = client.post("/sdapi/v1/txt2img", json=body | extra | {"refiner_checkpoint": "xl-refiner",
                                                                             "refiner_switch_at": 0.5})
            assert refined.status_code == 200, refined.text
            infotext = json.loads(refined.json()["info"])["infotexts"][0]
            assert "Refiner: xl-refiner [" in infotext and "Refiner switch at: 0.5" in infotext
            answers["refined"] = np.asarray(Image.open(io.BytesIO(base64.b64decode(refined.json()["images"][0]))))
            unknown = client.post("/sdapi/v1/txt2img", json=body | extra | {"refiner_checkpoint": "nope"})
            assert unknown.status_code == 422 and "refiner_checkpoint 'nope'" in unknown.text
            latents = client.post("/sdapi/v1/txt2img", json=body | {"refiner_checkpoint": "xl-tiny"})  # from SD 1.x
            assert latents.status_code == 200, latents.text  # the same latent space: AUTOMATIC1111 allows it too
        code, out, err = kiln("generate", PROMPT, "--negative-prompt", "blurry", "--steps", 4, "--sampler", "Euler a",
                              "--seed", 7, "--cfg-scale", 7.5, "--width", 64, "--height", 64, "--checkpoint",
                              "xl-tiny", "--refiner", "xl-refiner", "--refiner-switch-at", 0.5, "--url",
                              server.grpc_url, "--out", tmp_path / "refined.png")
        assert code == 0, err
        answers["cli"] = np.asarray(Image.open(tmp_path / "refined.png"))
    finally:
        api.stop()
        server.stop()
    assert _diff(answers[None], sd1) <= 1 and _diff(answers["xl-tiny"], xl) <= 1 and _diff(sd1, xl) > 10
    refined = xl_local.txt2img(replace(request, refiner=Refiner("xl-refiner", 0.5)),
                               refiner=Pipeline.from_repository(repo, models=REFINER)).images[0]
    assert _diff(answers["refined"], refined) <= 1 and _diff(answers["cli"], refined) <= 1


def test_bench_sd_measures_the_sdxl_family(tmp_path):
    """`kiln bench sd --family sdxl` on the tiny architecture: its own checkpoint and build, the components with their
    added inputs in torch eager and ONNX Runtime, parity between them."""
    from benchmarks.sd import SDBenchOptions, run_sd_benchmark

    run_sd_benchmark(SDBenchOptions(out=tmp_path, pipeline="tiny", family="sdxl", steps=2, repeats=1, triton=False,
                                    variants=("torch-fp32", "onnxruntime-fp32")), log=lambda _m: None)
    saved = json.loads((tmp_path / "sd-sdxl-tiny-64.json").read_text())
    assert saved["family"] == "sdxl" and not saved["failed"]
    direct = {r["variant"]: r for r in saved["variants"]}["onnxruntime-fp32"]
    assert direct["parity"]["unet"]["cosine"] > 0.99999 and direct["parity"]["image_psnr_db"] > 40


def test_a_kohya_sdxl_lora_matches_diffusers(xl_checkpoint, repo, tmp_path):
    """kohya's SDXL layout: lora_te1_/lora_te2_ for the two text encoders, the UNet's layers by their original (SGM)
    names; applied per request to the built models, as diffusers' load_lora_weights applies it."""
    from build.sd.lora import random_lora, write_lora
    from kiln.lora import LoraLibrary
    from orchestrator.pipeline.components.local import local_components

    folder = tmp_path / "loras"
    tensors = random_lora("tiny", seed=2, family_name="sdxl")
    assert any(k.startswith("lora_te2_text_model_") for k in tensors) and any(
        k.startswith("lora_unet_input_blocks_") for k in tensors)
    write_lora(folder / "xl-detail.safetensors", tensors)
    pipeline = Pipeline(local_components(repo, loras=LoraLibrary(folder), models=XL))
    assert pipeline.contract.lora_layers > 0
    pipe = _pipe(xl_checkpoint)
    config = dict(pipe.scheduler.config)
    pipe.load_lora_weights(str(folder), weight_name="xl-detail.safetensors", adapter_name="xl-detail")
    pipe.set_adapters(["xl-detail"], adapter_weights=[0.8])
    expected = _theirs(pipe, config, "Euler", 4, steps=4, negative_prompt="blurry")
    request = Txt2ImgRequest(prompt=PROMPT + " <lora:xl-detail:0.8>", negative_prompt="blurry", steps=4,
                             sampler="Euler", seed=4, cfg_scale=7.5, width=64, height=64)
    with_lora = pipeline.txt2img(request).images
    assert _diff(with_lora, expected) <= 2
    assert _diff(with_lora, pipeline.txt2img(replace(request, prompt=PROMPT)).images) > 10


def test_an_sdxl_controlnet_matches_diffusers(xl_local, xl_checkpoint):
    """The checkpoint's own SDXL ControlNet (it takes the pooled text and time ids too) through its ensemble, and two
    units as diffusers' MultiControlNet."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from kiln.canny import canny
    from orchestrator.pipeline import ControlNetUnit

    photo = Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((64, 64), Image.LANCZOS)
    edges = canny(photo, 100, 200)
    control = ControlNetModel.from_pretrained(str(xl_checkpoint / "controlnet"))
    assert xl_local.contract.controlnet(None).ensemble  # ControlNet -> UNet in one Triton call where served
    base = _pipe(xl_checkpoint)
    pipe = StableDiffusionXLControlNetPipeline(**base.components, controlnet=control)
    pipe.set_progress_bar_config(disable=True)
    expected = _theirs(pipe, dict(base.scheduler.config), "DPM++ 2M Karras", 5, negative_prompt="blurry",
                       image=edges, controlnet_conditioning_scale=0.8)
    request = Txt2ImgRequest(prompt=PROMPT, negative_prompt="blurry", steps=6, sampler="DPM++ 2M Karras",
                             cfg_scale=7.5, seed=5, width=64, height=64,
                             controlnet=ControlNetUnit(image=_png(edges), weight=0.8))
    result = xl_local.txt2img(request).images
    assert _diff(result, expected) <= 2
    assert _diff(result, xl_local.txt2img(replace(request, controlnet=None)).images) > 2


def test_the_refiner_alone_matches_diffusers_img2img(repo, refiner_checkpoint):
    """SDXL's refiner as a checkpoint of its own (OpenCLIP ViT-bigG alone, the aesthetic score in its time ids): its
    img2img as diffusers' StableDiffusionXLImg2ImgPipeline computes it."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner = Pipeline.from_repository(repo, models=REFINER)
    assert (refiner.contract.family, refiner.contract.time_ids, refiner.contract.text_split) == ("sdxl-refiner", 5, 0)
    photo = Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((64, 64), Image.LANCZOS)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(refiner_checkpoint))
    pipe.set_progress_bar_config(disable=True)
    expected = _theirs(pipe, dict(pipe.scheduler.config), "Euler", 9, steps=10, prompt="a dog",
                       negative_prompt="blurry", image=photo, strength=0.6)
    result = refiner.img2img(Img2ImgRequest(prompt="a dog", negative_prompt="blurry", init_image=_png(photo),
                                            denoising_strength=0.6, steps=10, sampler="Euler", cfg_scale=7.5, seed=9,
                                            width=64, height=64))
    assert _diff(result.images, expected) <= 2


def test_the_refiner_takes_over_as_diffusers_ensemble_of_experts(repo, xl_local, xl_checkpoint, refiner_checkpoint):
    """refiner_switch_at 0.75: the base denoises while (999 - t) / 1000 < 0.75, the refiner the rest with the same
    sampler and latents; as diffusers' base with denoising_end and refiner with denoising_start (Euler: stateless
    between steps; a multistep sampler goes on with its history, as AUTOMATIC1111's, where diffusers starts over)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = _pipe(xl_checkpoint)
    config = dict(base.scheduler.config)
    refiner_pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(refiner_checkpoint))
    refiner_pipe.set_progress_bar_config(disable=True)
    base.scheduler, refiner_pipe.scheduler = make_scheduler("Euler", config), make_scheduler("Euler", config)
    generator = torch.Generator().manual_seed(3)
    latents = base(PROMPT, negative_prompt="blurry", num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                   generator=generator, denoising_end=0.75, output_type="latent").images
    expected = _uint8(refiner_pipe(PROMPT, negative_prompt="blurry", image=latents, num_inference_steps=10,
                                   guidance_scale=7.5, denoising_start=0.75, generator=generator,
                                   output_type="np").images)
    refiner = Pipeline.from_repository(repo, models=REFINER)
    request = Txt2ImgRequest(prompt=PROMPT, negative_prompt="blurry", steps=10, sampler="Euler", cfg_scale=7.5, seed=3,
                             width=64, height=64, refiner=Refiner("xl-refiner", 0.75))
    result = xl_local.txt2img(request, refiner=refiner)
    assert _diff(result.images, expected) <= 2
    assert result.info["refiner"] == refiner.contract.title and result.info["refiner_switch_at"] == 0.75
    assert _diff(result.images, xl_local.txt2img(replace(request, refiner=None)).images) > 10
    never = xl_local.txt2img(replace(request, refiner=Refiner("xl-refiner", 1.0)), refiner=refiner).images
    assert _diff(never, xl_local.txt2img(replace(request, refiner=None)).images) == 0  # 1: the base runs every step
    with pytest.raises(InputError, match="refiner_checkpoint with the hires fix is not supported"):
        xl_local.txt2img(replace(request, hires=HiresFix()), refiner=refiner)
    # Inpainting "only masked" runs its crop through the same loop: the refiner goes with it
    photo = Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((64, 64), Image.LANCZOS)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 20, 48, 52))
    cropped = Img2ImgRequest(prompt=PROMPT, negative_prompt="blurry", steps=6, sampler="Euler", seed=3, width=64,
                             height=64, init_image=_png(photo), mask=_png(mask), inpaint_full_res=True,
                             refiner=Refiner("xl-refiner", 0.5))
    assert "refiner" in xl_local.img2img(cropped, refiner=refiner).info


def test_vaes_are_served_in_float32_where_a_gpu_variant_computes_in_float16():
    """SDXL's VAE overflows float16 (black images): as diffusers upcasts a VAE whose config says force_upcast (the
    default), a GPU float16 build serves its VAE models in float32 on the same runtime and device; CPU variants keep
    theirs (OpenVINO's fp16 holds float16 weights and computes in float32)."""
    from build.convert import SD_VARIANTS

    for name in ("torch-cuda-fp16", "torch-aoti-cuda-fp16", "onnxruntime-cuda-fp16", "onnxruntime-tensorrt-fp16"):
        upcast = SD_VARIANTS[name].upcast()
        assert (upcast.precision, upcast.runtime, upcast.accelerator, upcast.compiler) == (
            "fp32", SD_VARIANTS[name].runtime, SD_VARIANTS[name].accelerator, SD_VARIANTS[name].compiler), name
    for name in ("openvino-fp16", "onnxruntime-fp32", "openvino-int8", "torch-aoti-bf16"):
        assert SD_VARIANTS[name].upcast() == SD_VARIANTS[name]
    # An upcast VAE in torch on CUDA convolves in TF32 (cuDNN's default): judged by that, not by IEEE float32's 1e-3.
    from build.sd.specs import FP32_TOLERANCE

    assert SD_VARIANTS["torch-cuda-fp16"].upcast().tolerance_key == "tf32-compute" in FP32_TOLERANCE
    assert SD_VARIANTS["torch-fp32"].tolerance_key == "fp32"


@pytest.mark.parametrize("checkpoint", ["plain_checkpoint", "xl_checkpoint", "refiner_checkpoint"])
def test_export_modules_make_no_tensor_on_another_device(checkpoint, request):
    """torch's CUDA variants export each module on the GPU (AOTInductor's without a device pass): a tensor its forward
    makes without `device=` lands on the CPU and meets CUDA ones (SDXL's text encoder did, a GPU-only failure). On the
    meta device every such mix is an error, so this machine finds them without a GPU."""
    import copy

    from build.sd import axis_sizes, sd_specs
    from build.sd.export import export_modules
    from tests.conftest import IMAGES

    loaded = load_sd(str(request.getfixturevalue(checkpoint)), None, None)
    specs, sizes = sd_specs(loaded, IMAGES), axis_sizes(loaded, batch=2, height=64, width=64)
    for name, module in export_modules(loaded).items():
        sample = specs[name].sample_inputs(seed=0, **sizes)
        with torch.no_grad():  # raises "Tensor on device meta is not on the expected device cpu!" on a mix
            outputs = copy.deepcopy(module).to("meta")(*(torch.from_numpy(sample[n]).to("meta")
                                                         for n in specs[name].input_names))
        assert all(o.device.type == "meta" for o in (outputs if isinstance(outputs, tuple) else (outputs,))), name


def test_prompt_editing_switches_text_and_pooled_and_the_hires_pass_conditions_on_its_size(xl_local):
    """[a cat:a dog:2]: the encoding and the pooled text switch after step 2; the empty negative prompt stays zeros;
    the hires fix's second pass gets the time ids of its own size (AUTOMATIC1111's hr conditioning)."""
    request = Txt2ImgRequest(prompt="a photo of [a cat:a dog:2]", steps=4, sampler="Euler", cfg_scale=7.5, seed=8,
                             width=64, height=64)
    seen: list[dict] = []

    def recording(graph, inputs):
        seen.append({name: inputs[name].copy() for name in ("encoder_hidden_states", "text_embeds", "time_ids")})
        return graph(inputs)

    xl_local.txt2img(request, unet_call=recording)
    cat = xl_local.encode_prompts(["", "a photo of a cat"], request)
    dog = xl_local.encode_prompts(["", "a photo of a dog"], request)
    for step, call in enumerate(seen):
        expected = cat if step <= 2 else dog
        assert np.array_equal(call["encoder_hidden_states"], expected.context), step
        assert np.array_equal(call["text_embeds"], expected.added["text_embeds"]), step
        assert not call["encoder_hidden_states"][0].any() and not call["text_embeds"][0].any()  # the negative: zeros
    assert not np.array_equal(cat.context, dog.context)
    seen.clear()
    xl_local.txt2img(replace(request, prompt=PROMPT, hires=HiresFix(scale=2, steps=2, denoising_strength=0.5)),
                     unet_call=recording)
    assert [call["time_ids"][0].tolist() for call in seen] == [[64, 64, 0, 0, 64, 64]] * 4 + \
        [[128, 128, 0, 0, 128, 128]] * 2
    seen.clear()  # 128x96 covers 128x128 (then cropped): AUTOMATIC1111 conditions on the upscaled size, before the crop
    images = xl_local.txt2img(replace(request, prompt=PROMPT, hires=HiresFix(resize_x=128, resize_y=96, steps=2,
                                                                             denoising_strength=0.5)),
                              unet_call=recording).images
    assert images.shape == (1, 96, 128, 3) and seen[-1]["time_ids"][0].tolist() == [128, 128, 0, 0, 128, 128]


def test_a_long_prompt_runs_in_its_own_unet_call_with_its_pooled_text_and_time_ids(xl_local):
    """AUTOMATIC1111's default for a negative prompt and a prompt of different lengths: a UNet call each, each with
    its own rows of the added conditions; "Pad conds": one call, the negative prompt padded with empty chunks."""
    long = PROMPT + ", detailed" * 60
    request = Txt2ImgRequest(prompt=long, negative_prompt="x", steps=2, sampler="Euler", cfg_scale=7.5, seed=8,
                             width=64, height=64)
    seen: list[dict] = []

    def recording(graph, inputs):
        seen.append({name: inputs[name].copy() for name in ("encoder_hidden_states", "text_embeds", "time_ids")})
        return graph(inputs)

    split = xl_local.txt2img(request, unet_call=recording).images
    negative, prompt = (xl_local.encode_prompts([text], request) for text in ("x", long))
    assert len(seen) == 4
    for call, expected in zip(seen, [negative, prompt] * 2):
        assert np.allclose(call["encoder_hidden_states"], expected.context, atol=1e-6)
        assert np.allclose(call["text_embeds"], expected.added["text_embeds"], atol=1e-6)
        assert call["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]
    seen.clear()
    padded = xl_local.txt2img(replace(request, pad_conds="empty_chunks"), unet_call=recording)
    assert [call["encoder_hidden_states"].shape[:2] for call in seen] == [(2, 154)] * 2
    assert padded.info["pad_conds"] == "empty_chunks" and _diff(padded.images, split) > 0
