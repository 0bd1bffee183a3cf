"""Shared fixtures: seeded random weights, one built repository (tiny SD + ViT) and one real Triton server.

Built once per session (per process, under pytest-xdist): the tiny SD checkpoint with its own ControlNet and a
second one ("scribble"), the repository serving both and the ViT (ONNX Runtime fp32), and a Triton on it that
every module of the process shares. Parity tests run the loop in process on the same repository; the Triton
tests prove the transport.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import io
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

from kiln.machine import cores  # (no torch: it is imported after the thread share below is set)

# No hub here: every lookup fails at once instead of after retries (read when huggingface_hub is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# AOTInductor packages (and Inductor's own cache) are kept per session, not in the user's caches: every run
# compiles what it tests, and the ~2 GB they take is removed when the session ends.
os.environ["KILN_AOTI_CACHE"] = tempfile.mkdtemp(prefix="kiln-aoti-cache-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.environ["KILN_AOTI_CACHE"], "inductor")
# Under pytest-xdist each process takes its share of the cores (OMP_NUM_THREADS: read by torch and OpenMP, and by
# kiln.machine.threads for the ONNX Runtime and OpenVINO sessions told 0 threads, in this process and in its Triton's
# models): processes that each take every core wait on each other's spinning threads (on 2 cores, a fine-tune took
# 39 s beside another such process, 21 s with a thread each). Set it yourself to run them otherwise.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import numpy as np
import pytest
import torch
from PIL import Image

from build.convert import VIT_VARIANTS
from build.report import read_report, update_report
from build.sd import ImageRange, SDBuildOptions, build_sd
from build.sd.weights import random_controlnet, write_sd_checkpoint
from build.upscaler import build_upscaler
from build.vit import ViTBuildOptions, build_vit
from build.vit.weights import load_vit, write_random_vit
from kiln.paths import SAMPLE_IMAGES, list_images
from kiln.redis_server import RedisServer
from kiln.triton_server import TritonOptions, TritonServer, free_port

atexit.register(shutil.rmtree, os.environ["KILN_AOTI_CACHE"], ignore_errors=True)

IMAGES = ImageRange(32, 64, 128)  # the tiny repository's image sides
ALL_VIT_VARIANTS = tuple(k for k, v in VIT_VARIANTS.items() if not v.gpu_only and not v.compiler)


# What a whole run writes at its peak (builds, repositories, AOTInductor packages): 3.5 GB measured on 2026-11-30.
RUN_NEEDS_GB = 4.0


def _free_gb() -> float:
    return shutil.disk_usage(tempfile.gettempdir()).free / 2**30


def pytest_report_header(config) -> str:
    return f"kiln: {_free_gb():.1f} GB free in {tempfile.gettempdir()} (a whole run needs about {RUN_NEEDS_GB:g} GB)"


def pytest_collection_finish(session) -> None:
    """A whole run on a nearly full disk stops here, saying so, instead of failing mid-build with a torch or ONNX
    write error (a small selection of tests goes on). Under pytest-xdist the controller checks, as its workers
    report their collections (a worker that exits is an INTERNALERROR that does not say why)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        _stop_a_whole_run_on_a_full_disk(len(session.items),
                                         any(item.get_closest_marker("slow") for item in session.items))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    workers = node.config.option.numprocesses
    _stop_a_whole_run_on_a_full_disk(len(ids), "not slow" not in (node.config.option.markexpr or ""),
                                     workers if isinstance(workers, int) and workers > 1 else 1)


def _stop_a_whole_run_on_a_full_disk(count: int, slow: bool, processes: int = 1) -> None:
    """(Each process builds its own session fixtures: the need is per process, at most.)"""
    free, needs = _free_gb(), RUN_NEEDS_GB * processes
    if slow and count > 100 and free < needs:
        pytest.exit(f"only {free:.1f} GB free in {tempfile.gettempdir()}; the test run writes about "
                    f"{needs:g} GB of builds (free some space, point TMPDIR at a larger disk, or run fewer "
                    f"processes: make test TEST_WORKERS=1)", returncode=4)


# `make test` runs the tests on two processes (pytest-xdist, `--dist loadfile --no-loadscope-reorder`: a module's
# tests on one, each taking the next module as it finishes one). These modules take longest (their tests' seconds
# added up, from 455 s down to 90 s in a fresh-clone CI run on 2 AVX-512 cores, 2026-12-08; the whole suite's add up
# to 2,692 s):
# they go first, so that neither process is left running one of them alone at the end. Order only.
LONGEST_FIRST = ("test_sd_variants", "test_gpu_check", "test_api", "test_finetune", "test_checkpoints",
                 "test_shared_queue", "test_field_walk", "test_sdxl", "test_serve_install", "test_sd_pipeline",
                 "test_build_vit", "test_bench_edge")


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server of its own (the shared job store), on a free loopback port."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (the web page's tests)."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(chromium).exists(), "Debian's chromium is missing: `make test` installs it (scripts/setup_system.sh)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """The tests' ViT (`kiln weights vit --tiny`): ViT-B/16's architecture (timm's VisionTransformer, 224 px, 16 px
    patches, 197 tokens, 12 blocks, 1000 classes) 64 wide instead of 768, seeded random. Every variant builds from it
    in 8 s, where ViT-B/16 takes 51 s (tests/test_cli.py and the int8 test of test_build_vit build ViT-B/16 itself)."""
    return write_random_vit(tmp_path_factory.mktemp("vit") / "tiny", seed=0, tiny=True)


@pytest.fixture(scope="session")
def vit_model(tiny_vit):
    """The tests' ViT in PyTorch (the same weights the builds use)."""
    return load_vit(str(tiny_vit)).model


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    return list_images(SAMPLE_IMAGES)


@pytest.fixture(scope="session")
def sd_checkpoint(tmp_path_factory) -> Path:
    """The tiny SD 1.x checkpoint (seed 0), diffusers' format, its ControlNet in controlnet/."""
    return write_sd_checkpoint(tmp_path_factory.mktemp("sd") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def plain_checkpoint(tmp_path_factory) -> Path:
    """The tiny SD checkpoint without a ControlNet, as most users' are."""
    return write_sd_checkpoint(tmp_path_factory.mktemp("sd_plain") / "weights", size="tiny", seed=0, controlnet=False)


@pytest.fixture(scope="session")
def plain_repo(tmp_path_factory, plain_checkpoint) -> Path:
    """plain_checkpoint built (ONNX Runtime fp32) at the sizes the tiny benchmarks use."""
    repo = tmp_path_factory.mktemp("plain_repo") / "repo"
    build_sd(SDBuildOptions(weights=str(plain_checkpoint), repository=repo, images=IMAGES, progress=False),
             log=lambda _m: None)
    return repo


@pytest.fixture(scope="session")
def scribble(tmp_path_factory) -> Path:
    """A second ControlNet for the same UNet (its own seed), as a user's depth or scribble model would be."""
    folder = tmp_path_factory.mktemp("controlnets") / "control_scribble"
    random_controlnet("tiny", seed=11).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def extra_vae(tmp_path_factory) -> Path:
    """A second VAE for the tiny SD as AUTOMATIC1111's VAE files are (original layout; `kiln weights vae --tiny`)."""
    from build.sd.vae import random_vae, write_vae_file

    return write_vae_file(random_vae("tiny", seed=7), tmp_path_factory.mktemp("vae") / "anime-vae.safetensors")


@pytest.fixture(scope="session")
def upscaler_file(tmp_path_factory) -> Path:
    """A tiny seeded random ESRGAN x4 in the original key layout (`kiln weights upscaler --tiny`): "4x-tiny"."""
    from safetensors.torch import save_file

    from build.upscaler import random_esrgan

    path = tmp_path_factory.mktemp("upscaler") / "4x-tiny.safetensors"
    save_file(random_esrgan(), str(path))
    return path


@pytest.fixture(scope="session")
def all_variants_repo(tmp_path_factory, tiny_vit) -> tuple[Path, object]:
    """Every CPU variant of the tests' ViT and its extra exports, built once per session (seconds); it serves ONNX
    Runtime fp32. All but the AOTInductor packages (26 s of compile each): their path is the torch-fp32
    program's export (checked here) and the compile test_sd_variants checks on SD's components."""
    repo = tmp_path_factory.mktemp("repo_all")
    result = build_vit(ViTBuildOptions(weights=str(tiny_vit), repository=repo, progress=False,
                                       variants=ALL_VIT_VARIANTS), log=lambda _msg: None)
    return repo, result


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory, sd_checkpoint, scribble, extra_vae, upscaler_file, all_variants_repo) -> Path:
    """One repository: the tiny SD with two ControlNets ("controlnet", the default, and "scribble"), a second VAE
    (extra_vae, sd_vae "anime-vae.safetensors"), the seamless UNet and VAE (tiling), an upscaler network
    ("4x-tiny"), and the ViT.

    The ViT's models are those of the all-variants build (linked, and its report section copied): the same
    random weights and the same served variant, ONNX Runtime fp32, without exporting it twice.
    """
    repo = tmp_path_factory.mktemp("repo") / "repo"
    build_sd(SDBuildOptions(weights=str(sd_checkpoint), repository=repo, images=IMAGES, progress=False,
                            controlnet=(str(sd_checkpoint / "controlnet"), f"scribble={scribble}"),
                            vae=(str(extra_vae),), tiling=True),
             log=lambda _m: None)
    build_upscaler(upscaler_file, repo, log=lambda _m: None)
    vit_build, _ = all_variants_repo
    vit_report = read_report(vit_build)["vit"]
    for name in vit_report["models"]:
        (repo / name).symlink_to(vit_build / name)
    update_report(repo, "vit", vit_report)
    return repo


@pytest.fixture(scope="session")
def vit_repo(model_repo, tmp_path_factory) -> Path:
    """The ViT models of model_repo alone (linked): for tests that start a server and need only those."""
    repo = tmp_path_factory.mktemp("vit_repo")
    for entry in model_repo.iterdir():
        if entry.name.startswith("vit"):
            (repo / entry.name).symlink_to(entry.resolve())
    return repo


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory) -> Path:
    """LoRA files for the tiny SD in kohya's layout (`kiln weights lora --tiny`'s): detail (text encoder and UNet,
    rank 4, alpha 2) and sub/style (UNet only, rank 2). The session's Triton reads them (KILN_LORAS)."""
    from build.sd.lora import random_lora, write_lora

    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "detail.safetensors", random_lora("tiny", seed=0), {"ss_output_name": "detail-v1"})
    write_lora(folder / "sub" / "style.safetensors", random_lora("tiny", seed=1, rank=2, text_encoder=False))
    return folder


@pytest.fixture(scope="session")
def triton(model_repo, lora_dir, tmp_path_factory):
    """A real Triton server (the wheel's binary) serving model_repo on free loopback ports, its LoRA folder lora_dir."""
    server = start_triton(model_repo, tmp_path_factory.mktemp("triton") / "tritonserver.log", loras=lora_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def own_api(triton, tmp_path_factory):
    """An API of the module's own in front of the session's Triton, with its own outputs folder (own_api.outputs):
    for tests that change its options or count its saved files."""
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    outputs = tmp_path_factory.mktemp("outputs")
    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port(), outputs_dir=outputs))
    live.outputs = outputs
    yield live
    live.stop()


def start_triton(repo: Path, log: Path, loras: Path | None = None, exit_timeout_s: int = 5,
                 **ports: int) -> TritonServer:
    """A Triton on free ports. It waits at most 5 s for in-flight requests when stopped (Triton's own default, 30 s,
    sometimes elapses in full after a test's last call, whose client keeps its channel open); torch models take
    longer to unload on 2 busy cores (measured: 6 s for four AOTInductor packages)."""
    return TritonServer(TritonOptions.on_free_ports(
        repo, log, exit_timeout_s=exit_timeout_s, extra_env={"KILN_LORAS": str(loras)} if loras else {},
        **{f"{name}_port": port for name, port in ports.items() if port})).start()


@pytest.fixture(scope="session")
def init_image_png() -> bytes:
    """A real photograph, 64x64, as PNG bytes."""
    buffer = io.BytesIO()
    Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB").resize((64, 64), Image.LANCZOS).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def edge_map_png(init_image_png) -> bytes:
    """A Canny edge map of the photograph, made by the built-in preprocessor, as PNG bytes."""
    from kiln.canny import canny

    buffer = io.BytesIO()
    canny(Image.open(io.BytesIO(init_image_png)).convert("RGB"), 100, 200).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def local(model_repo, lora_dir):
    """The repository's SD models in process: the orchestrator's loop without the transport (LoRAs: lora_dir)."""
    from orchestrator.pipeline import Pipeline

    return Pipeline.from_repository(model_repo, loras=lora_dir)


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header declares width x height but carries almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def encode(image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def decode(b64: str) -> tuple[np.ndarray, dict]:
    """An API's base64 image: its RGB pixels and its metadata (a PNG's text chunks)."""
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return np.asarray(image.convert("RGB")), dict(image.info)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


WORKING_OUTPUTS = Path(__file__).resolve().parent.parent / "outputs"  # kiln serve's default --outputs


@pytest.fixture(autouse=True)
def _no_outputs_in_the_working_tree():
    """A test's API saves images in a temporary folder (Settings.outputs_dir), never in the checkout's outputs/."""
    before = WORKING_OUTPUTS.exists()
    yield
    assert before or not WORKING_OUTPUTS.exists(), f"this test saved images into {WORKING_OUTPUTS}"



@pytest.fixture
def kiln(capsys):
    """Run the `kiln` command in this process (its real main(), minus the interpreter start): returns (exit code,
    stdout, stderr). Tests that must see the real entry point start it as a subprocess instead."""
    from kiln.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def diffusers_pipeline(checkpoint: Path):
    """diffusers' own StableDiffusionPipeline over a checkpoint folder: the parity tests' reference."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(checkpoint), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_strength(sampler: str, steps: int, strength: float) -> float:
    """The strength at which diffusers' img2img pipelines run the steps kiln runs at `strength`: for AUTOMATIC1111's
    k-diffusion samplers its setup_img2img_steps, t_enc = int(min(strength, 0.999) * steps) and t_enc + 1 steps
    (diffusers runs int(strength' * steps)); for DDPM, UniPC and LCM, diffusers' own. (AUTOMATIC1111's DDIM and PLMS
    start where no strength of diffusers' does: tests/test_compvis.py.)"""
    if sampler in ("DDPM", "UniPC", "LCM"):
        return strength
    return min(1.0, (int(min(strength, 0.999) * steps) + 1.5) / steps)


def latent_keep(mask, latents, mask_round: bool = True) -> torch.Tensor:
    """AUTOMATIC1111's latent mask of the PIL mask `mask` for `latents`, as its `mask` (1 = keep): the mask resized
    to the latents' size with PIL's default filter (bicubic), divided by 255 and rounded if `mask_round`."""
    small = mask.convert("RGB").resize((latents.shape[3], latents.shape[2]))
    repaint = np.moveaxis(np.array(small, dtype=np.float32), 2, 0) / 255
    return 1 - torch.from_numpy((np.around(repaint) if mask_round else repaint)[:1])


def soft_blend(init: torch.Tensor, current: torch.Tensor, t: torch.Tensor, power: float) -> torch.Tensor:
    """AUTOMATIC1111's soft inpainting blend, from its description: each latent vector (across channels) the linear
    mix of the two by t, rescaled to the mix by t of their magnitudes to `power` (then to 1 / power)."""
    def norm(v: torch.Tensor) -> torch.Tensor:
        return v.double().norm(dim=1, keepdim=True)

    mixed = torch.lerp(init, current, t)
    target = (norm(init) ** power * (1 - t.double()) + norm(current) ** power * t.double()) ** (1 / power)
    return mixed * (target / (norm(mixed) + 1e-5)).float()


def _sample_space(scheduler, timestep) -> tuple[float, float]:
    """(c0, c1): the scheduler's sample at this timestep is c0 x0 + c1 eps (sigma space: 1 and sigma)."""
    if not hasattr(scheduler, "sigmas"):  # DDPM
        cumprod = float(scheduler.alphas_cumprod[int(timestep)])
        return cumprod ** 0.5, (1 - cumprod) ** 0.5
    sigma = float(scheduler.sigmas[(scheduler.timesteps == timestep).nonzero()[0, 0]])
    if scheduler.init_noise_sigma > 1:
        return 1.0, sigma
    return (sigma ** 2 + 1) ** -0.5, sigma * (sigma ** 2 + 1) ** -0.5


def a1111_inpainting(pipe, sampler: str, scheduler_config: dict, image, mask, seed: int, strength: float,
                     steps: int, mask_round: bool = True, soft=None, **call) -> np.ndarray:
    """AUTOMATIC1111's whole-picture inpainting with a k-diffusion sampler (mask blur 0, masked content "original")
    on diffusers' own pipeline `pipe`: an img2img pipeline for a 4-channel UNet, an inpaint pipeline for a 9-channel
    one (`mask_image` in `call`; it does not blend then). Its CFGDenoiser blends the denoised prediction with the
    init latents where the latent mask keeps them; here the UNet's output there is the one whose denoised
    prediction is the init latents, for the scheduler's sample space at the call (x0 + sigma eps: Euler's, scaled
    into the UNet by 1 / sqrt(sigma^2 + 1); alpha x0 + sigma_t eps: DPM++ 2M's and DDPM's). UniPC is one of its
    timestep samplers, which paste the init latents into the model's input instead. Then its last blend, and the
    decode. uint8 images. With `soft` (SoftInpainting), its soft inpainting's blends (soft_blend by the latent mask
    to sigma ** schedule_bias x preservation_strength; UniPC's by the timestep), no last blend, no composite."""
    from orchestrator.pipeline import make_scheduler

    pipe.scheduler = scheduler = make_scheduler(sampler, scheduler_config, seed=seed)
    height, width = call["height"], call["width"]
    with torch.inference_mode():  # the init latents: the pipeline's first draw from its generator, as here
        pixels = pipe.image_processor.preprocess(image, height=height, width=width)
        init = pipe.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(seed))
        init = init * pipe.vae.config.scaling_factor
    keep = latent_keep(mask, init, mask_round)
    forward = pipe.unet.forward

    def blended(sample, timestep, *args, **kwargs):
        if sampler == "UniPC":  # a timestep sampler there: the init latents pasted into the model's input instead
            channels = init.shape[1]
            pasted = sample[:, :channels] * (1 - keep) + init * keep
            if soft is not None:
                weight = (1 - keep) ** (float(timestep) ** soft.schedule_bias * soft.preservation_strength)
                pasted = soft_blend(init, sample[:, :channels], weight, soft.transition_contrast_boost)
            return forward(torch.cat([pasted, sample[:, channels:]], dim=1), timestep, *args, **kwargs)
        output = forward(sample, timestep, *args, **kwargs)
        if soft is not None:  # blended after the guidance (soft_step): the blend is not linear
            return output
        x = sample[:, :init.shape[1]]
        c0, c1 = _sample_space(scheduler, timestep)
        if scheduler.init_noise_sigma > 1:  # the model's input was scaled by 1 / sqrt(sigma^2 + 1)
            x = x * (c1 ** 2 + 1) ** 0.5
        return (output[0] * (1 - keep) + (x - c0 * init) / c1 * keep, *output[1:])

    step = scheduler.step

    @functools.wraps(step)  # the pipeline reads the step's parameters (generator, eta) from its signature
    def soft_step(output, timestep, sample, *args, **kwargs):
        """Soft inpainting's blend of the guided denoised prediction (x0 = (x - c1 eps) / c0), the output that
        predicts the blend to the step."""
        c0, c1 = _sample_space(scheduler, timestep)
        weight = (1 - keep) ** ((c1 / c0) ** soft.schedule_bias * soft.preservation_strength)
        x0 = soft_blend(init, (sample - c1 * output) / c0, weight, soft.transition_contrast_boost)
        return step((sample - c0 * x0) / c1, timestep, sample, *args, **kwargs)

    if soft is not None and sampler != "UniPC":
        scheduler.step = soft_step
    pipe.unet.forward = blended
    try:
        latents = pipe(image=image, strength=diffusers_strength(sampler, steps, strength), num_inference_steps=steps,
                       generator=torch.Generator().manual_seed(seed), output_type="latent", **call).images
    finally:
        del pipe.unet.forward
    with torch.inference_mode():
        final = latents if soft is not None else latents * (1 - keep) + init * keep
        decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor).sample
    return (pipe.image_processor.postprocess(decoded, output_type="np") * 255).round().astype(np.uint8)


def diffusers_image(pipe, scheduler_config: dict, request: dict, init=None, strength: float = 0.5) -> np.ndarray:
    """diffusers' uint8 images for a request's fields (prompt, negative_prompt, steps, sampler, cfg_scale, seed,
    width, height): txt2img, or img2img from the PIL image `init` at kiln's `strength` (its own components)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from orchestrator.pipeline import make_scheduler

    common = dict(negative_prompt=request["negative_prompt"], num_inference_steps=request["steps"],
                  guidance_scale=request["cfg_scale"], generator=torch.Generator().manual_seed(request["seed"]),
                  output_type="np")
    if init is None:
        pipe.scheduler = make_scheduler(request["sampler"], scheduler_config)
        images = pipe(request["prompt"], height=request["height"], width=request["width"], **common).images
    else:
        img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
        img2img.scheduler = make_scheduler(request["sampler"], scheduler_config)
        strength = diffusers_strength(request["sampler"], request["steps"], strength)
        images = img2img(request["prompt"], image=init, strength=strength, **common).images
    return (images * 255).round().astype(np.uint8)


@contextlib.contextmanager
def kiln_serve(kiln: Path, repo: Path, folder: Path, env: dict | None = None, flags: tuple[str, ...] = (),
               timeout_s: float = 240):
    """`kiln serve` (the executable `kiln`) on `repo` as a process of its own on free ports, its log in `folder`;
    yields the API's URL once it is ready; stopped with SIGTERM (the drain) at the end."""
    port = free_port()
    command = [str(kiln), "serve", "--repo", str(repo), "--port", str(port), "--http-port", str(free_port()),
               "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), *flags]
    with serve_process(command, port, folder / "serve.log", env=env, cwd=folder, timeout_s=timeout_s) as (url, _):
        yield url


@contextlib.contextmanager
def serve_process(command: list[str], port: int, log: Path, env: dict | None = None, cwd: Path | None = None,
                  timeout_s: float = 240):
    """A `kiln serve` command line as a process of its own, its output in `log`; yields (the API's URL, the process)
    once /health/ready answers 200 on `port`; stopped with SIGTERM (the drain) at the end unless it has exited."""
    import httpx

    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"kiln serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"kiln serve not ready in {timeout_s} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
