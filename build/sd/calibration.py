"""What a build measures by running its own models: calibration inputs captured from denoising runs, and a lower
precision's image against the fp32 build's. Both run the orchestrator's real loop, in process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from build.parity import psnr
from kiln.contract import DEFAULT_MODELS, SDModels
from orchestrator.pipeline import Pipeline, Txt2ImgRequest
from orchestrator.pipeline.components.local import REQUIRED, session_runners

CALIBRATION_PROMPTS = ("a photo of a cat", "a watercolor landscape with mountains, a lake and a boat at sunset",
                       "portrait of an old man, studio lighting, detailed")


def capture_unet_inputs(repository: Path, size: tuple[int, int], steps: int, models: SDModels = DEFAULT_MODELS,
                        prompts=CALIBRATION_PROMPTS) -> list[dict]:
    """The UNet's inputs (CFG pairs) at every step of real txt2img runs of the fp32 ONNX files at `size` (width,
    height): calibration data."""
    runners, _ = fp32_runners(repository, models)
    unet, captured = runners["unet"], []

    def recording(inputs: dict):
        captured.append({name: value.copy() for name, value in inputs.items()})
        return unet(inputs)

    runners["unet"] = recording
    pipeline = Pipeline.from_repository(repository, runners, models=models)
    for seed, prompt in enumerate(prompts):
        pipeline.generate(Txt2ImgRequest(prompt=prompt, negative_prompt="blurry", steps=steps, sampler="Euler a",
                                         cfg_scale=7.0, seed=seed, width=size[0], height=size[1]))
    return captured


def variant_image_parity(repository: Path, size: tuple[int, int], steps: int, variant: str,
                         log: Callable[[str], None] = print, models: SDModels = DEFAULT_MODELS) -> dict:
    """PSNR of a txt2img image (`size`: width, height) from the served variant against the fp32 ONNX files' image
    (same seed and loop)."""
    request = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=steps, sampler="Euler a",
                             cfg_scale=7.0, seed=0, width=size[0], height=size[1])
    images, kept = {}, []
    for name in ("fp32", "served"):  # one set of sessions at a time (full-size memory)
        if name == "fp32":
            runners, kept = fp32_runners(repository, models)
        else:
            runners, _ = session_runners(repository, components=REQUIRED, models=models)
        images[name] = Pipeline.from_repository(repository, runners, models=models).generate(request).images[0]
        del runners
    value = psnr(images["fp32"], images["served"])
    log(f"  image ({size[0]}x{size[1]}, {steps} steps, Euler a): {variant} vs fp32 PSNR "
        + ("identical" if value == float("inf") else f"{value:.1f} dB"))
    return {"against": "onnxruntime-fp32", "psnr_db": value if value != float("inf") else "inf",
            "width": size[0], "height": size[1], "steps": steps, "sampler": request.sampler, "seed": request.seed,
            **({"as_served": kept, "as_served_note": "torch programs (no fp32 ONNX export): the same in both images, "
                "so the PSNR is the other components' trade"} if kept else {})}


def fp32_runners(repository: Path, models: SDModels = DEFAULT_MODELS) -> tuple[dict, list[str]]:
    """Runners over each component's fp32 ONNX export; and the components that have none (a mix's torch programs:
    build.sd.mix), which run as served."""
    runners, kept = {}, []
    for component in REQUIRED:
        onnx = Path(repository) / models.component(component) / "1" / "model.onnx"
        fp32 = {"runtime": "onnxruntime", "artifact": "model.onnx", "inference_precision": "f32"} if onnx.exists() \
            else {}
        kept += [] if fp32 else [component]
        runners |= session_runners(repository, components=(component,), models=models, **fp32)[0]
    return runners, kept
