"""`kiln build sd`: export every SD component once to ONNX, derive the served variant, check each against PyTorch,
write the Triton repository and its contract.

Steps of `build_sd`:
 1. load the checkpoint (folder, single file, hub id) and its ControlNets; derive the specs from their configs
 2. export each component to ONNX and check it; derive the served variant (uncalibrated ones now) and check it
 3. write the Triton models, the contract in sd_unet's parameters, the tokenizer
 4. calibrated variants: capture UNet inputs from denoising runs of the fp32 build, quantize, check
 5. a lower precision's image against fp32's (PSNR), and the build report
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from build import report
from build.convert import ARTIFACTS, FP32, SD_VARIANTS, Variant, check_threads, derive
from build.native import check_target, cuda_graph_parameters, ov_target, parity_note, precision_caveat
from build.repository import remove_stale, write_models
from build.sd.auto import TIMED as AUTO_TIMED
from build.sd.auto import candidates as auto_candidates
from build.sd.auto import choose_variant
from build.sd.configs import sd_model_configs
from build.sd.export import check_component, export_component, export_modules
from build.sd.lora import LORA_COMPONENTS, LORA_RUNTIMES, write_lora_map
from build.sd.mix import parse_mix
from build.sd.specs import (
    ImageRange,
    axis_sizes,
    controlnet_components,
    extra_vaes,
    has_ensemble,
    native_side,
    sd_specs,
    size_multiple,
    text_widths,
    time_ids,
    two_encoders,
    vae_scale_factor,
    vae_tile,
)
from build.static import check_static, check_static_variant, size_label, static_plan
from build.torch_export import compile_packages, export_program
from kiln import contract as names
from kiln.contract import TILING, SDContract, SDModels, ServedControlNet, check_checkpoint_name
from kiln.errors import ConfigError
from kiln.paths import DEFAULT_REPOSITORY
from kiln.prompts import MAX_CHUNKS
from kiln.runtime.lora import MAP_SUFFIX

SERVED = ("text_encoder", "unet", "vae_decoder", "vae_encoder")  # txt2img and img2img


@dataclass(frozen=True)
class SDBuildOptions:
    """What `kiln build sd` was asked to do."""

    weights: str  # diffusers-format folder, original-layout .safetensors file, or hub id (where a network exists)
    # ControlNets: PATH or NAME=PATH each (build.sd.weights.controlnet_sources); default: <weights>/controlnet
    controlnet: str | tuple[str, ...] | None = None
    vae: tuple[str, ...] = ()  # more VAEs requests may choose (sd_vae): PATH or NAME=PATH each (build.sd.vae)
    tiling: bool = False  # also serve the UNet and the VAE with circular padding (AUTOMATIC1111's tiling)
    config: str | None = None  # a single file's architecture (a diffusers-format folder); default: SD 1.5's
    repository: Path = DEFAULT_REPOSITORY
    images: ImageRange = ImageRange()
    max_queue_delay_us: int = 2000  # how long the VAE and pre/post-processing models wait for batching partners
    step_queue_delay_us: int = 0  # the same for the UNet and ControlNets (none: the step batcher merges steps)
    threads: int = 0
    # torch.export programs in float16 on CUDA: the step models' 4-d weights channels-last (NHWC), as cuDNN's float16
    # kernels want (kiln.runtime.torch_session); False: contiguous (NCHW)
    channels_last: bool = True
    # torch.export programs on CUDA: the step models' CUDA graphs captured from torch.compile's kernels, compiled when
    # Triton loads them (kiln.runtime.torch_session)
    torch_compile: bool = False
    progress: bool = True
    # What the served models run: a key of SD_VARIANTS, or auto (build.sd.auto), optionally with parts that run another
    # (build.sd.mix: openvino-int8-hybrid+vae=openvino-bf16)
    variant: str = "onnxruntime-fp32"
    auto_candidates: tuple[str, ...] | None = None  # auto: the variants to time (default: all this device can run)
    triton_backend: str = "python"  # python (embedded Triton here) or native (NVIDIA's tritonserver image)
    device: str = "cpu"  # cpu or gpu: the instance kind of a native build's runtime models
    ov_device: str = "CPU"  # OpenVINO variants: the device the served models compile for (CPU, GPU, NPU, AUTO)
    # Build into the repository beside its other checkpoints, as NAME (its models NAME--sd_*, kiln.contract.SDModels;
    # what requests name in sd_model_checkpoint); "": the repository's default checkpoint (sd_*), named by its source
    checkpoint: str = ""
    # A static-shape build (build.static): the (width, height) sizes the OpenVINO models are compiled at, one row per
    # call, for devices that need fixed shapes (NPU); (): dynamic shapes
    static_sizes: tuple[tuple[int, int], ...] = ()
    image_check_steps: int = 4  # steps of the image a lower-precision variant is compared on (PSNR against fp32)
    calibration_steps: int = 8  # steps per calibration run (x 3 prompts: UNet inputs for calibrated variants)


def upcast_vae(loaded) -> bool:
    """Whether the VAE computes in float32 where the variant would compute in float16 (Variant.upcast): its config's
    force_upcast, true by default (as diffusers)."""
    return bool(loaded.vae.config.get("force_upcast", True))


def _model_name(source: str) -> str:
    """What /sdapi/v1/sd-models lists: a folder's name, or a file's without its extension (as AUTOMATIC1111)."""
    path = Path(source.rstrip("/"))
    return (path.stem if path.is_file() else path.name) or source


def build_sd(options: SDBuildOptions, log: Callable[[str], None] = print) -> dict:
    """Export the served components, check each against PyTorch, write the models; return the report section."""
    from tqdm import tqdm

    from build.sd.calibration import CALIBRATION_PROMPTS, capture_unet_inputs, variant_image_parity
    from build.sd.vae import load_vae, vae_sources
    from build.sd.weights import load_sd

    # 1. Load and derive the specs (auto: time the UNet, or a part named auto, in each candidate; build the fastest).
    mix = parse_mix(options.variant)
    check_threads(options.threads)
    if options.auto_candidates and not mix.auto_parts():
        raise ConfigError("--auto-candidates names what auto times; it goes with --variant auto (or a part's =auto) "
                          "only")
    keys = auto_candidates(options.device, options.auto_candidates, options.triton_backend) \
        if mix.auto_parts() else ()
    possible = [SD_VARIANTS[k] for k in (*keys, *mix.keys()) if k != "auto"]  # what any component may serve
    check_target(options.triton_backend, options.device, possible)
    target = ov_target(options.ov_device, options.triton_backend, possible)
    check_static_variant(options.static_sizes, possible, options.triton_backend)
    models = SDModels(check_checkpoint_name(options.checkpoint) if options.checkpoint else "")
    loaded = load_sd(options.weights, options.controlnet, options.config)
    loaded.vaes = {name: load_vae(path, loaded.vae) for name, path in vae_sources(options.vae).items()}
    loaded.tiling = options.tiling
    if loaded.random:
        log(f"!! RANDOM WEIGHTS: {options.weights} holds seeded random weights; images are noise-like, not art.")
    options = replace(options, images=options.images.resolved(native_side(loaded)))
    specs = sd_specs(loaded, options.images)
    static = {size_label(w, h): axis_sizes(loaded, batch=1, height=h, width=w) for w, h in options.static_sizes}
    for width, height in options.static_sizes:
        multiple, images = size_multiple(loaded), options.images
        if any(side % multiple or not images.min <= side <= images.max for side in (width, height)):
            raise ConfigError(f"--static-size {width}x{height}: sides must be multiples of {multiple} within the "
                              f"build's sizes [{images.min}, {images.max}] (--min-size, --max-size)")
    modules = export_modules(loaded)
    repository = Path(options.repository)
    side = min(options.images.opt, 256)
    image_size = options.static_sizes[0] if options.static_sizes else (side, side)  # what the build's images run at
    export_sizes = axis_sizes(loaded, batch=2, height=side, width=side)
    check_sizes = axis_sizes(loaded, batch=3, height=side + 8 * vae_scale_factor(loaded), width=side, chunks=2,
                             vectors=5)  # other sizes than the export's: every axis is dynamic
    choices = {}  # auto: by part of the mix, the candidates' figures and the reason for the choice
    for part in mix.auto_parts():
        component, rows, what = AUTO_TIMED[part]
        log(f"auto: timing the {what} in {len(keys)} variants ({', '.join(keys)}) ...")
        timing = axis_sizes(loaded, batch=rows, height=options.images.opt, width=options.images.opt)
        chosen, choices[part or "unet"] = choose_variant(
            keys, modules[component], specs[component], export_sizes, check_sizes, timing, log, what,
            upcast=component.startswith("vae_") and upcast_vae(loaded), graphs=component == "unet",
            channels_last=options.channels_last)
        mix = mix.choose(part, chosen)
    options = replace(options, variant=mix.label)
    controls = controlnet_components(specs)
    components = SERVED + (("unet_control", *controls) if controls else ()) + tuple(
        f"vae_{part}{served.suffix}" for served in extra_vaes(loaded) for part in ("decoder", "encoder")) + \
        (tuple(c + TILING for c in SERVED if c != "text_encoder") if options.tiling else ())
    variants = {c: mix.variant(c) for c in components}
    variants["unet"].check_torch_compile(options.torch_compile, "the UNet", mix.key("unet"))
    if upcast_vae(loaded):  # diffusers' default: the VAE in float32 (SDXL's needs it)
        variants |= {c: variants[c].upcast() for c in components if c.startswith("vae_")}

    # 2. Export and check each component: the fp32 ONNX file, then the served variant derived from it.
    artifacts: dict[str, dict] = {}

    def serve_variant(name: str, calibration: list[dict] | None = None) -> None:
        start = time.perf_counter()
        served, version = variants[name], repository / models.component(name) / "1"
        path = version / served.artifact
        derive(served, version / "model.onnx", path, calibration)
        figures = check_component(modules[name], specs[name], path, check_sizes, variant=served)
        artifacts[name]["served"] = {
            "variant": mix.key(name), "file": str(path.relative_to(repository)), "runtime": served.runtime,
            "precision": served.precision, "quantization": served.quantization,
            "inference_precision": served.inference_precision, "calibration_samples": len(calibration or ()),
            "size_bytes": report.artifact_size(path), "sha256": report.sha256(path),
            "parity": {k: v.as_dict() for k, v in figures.items()}, "parity_note": parity_note(served),
            "upcast": served.precision != mix.variant(name).precision,  # a VAE in float32 (Variant.upcast)
            "build_seconds": round(time.perf_counter() - start, 2)}
        reference = figures[specs[name].reference_output]
        log(f"  sd_{name:13s} {mix.key(name)}: cosine {reference.cosine:.6f}  max|diff| {reference.max_abs:.2e}"
            + (f"  ({len(calibration)} calibration samples)" if calibration else ""))

    def record(name: str, exported: Variant, path: Path, seconds: float, **extra) -> None:
        try:
            figures = check_component(modules[name], specs[name], path, check_sizes, variant=exported)
        except Exception:
            path.unlink(missing_ok=True)
            raise
        reference = figures[specs[name].reference_output]
        log(f"  sd_{name:13s} {exported.artifact}: cosine {reference.cosine:.6f}  max|diff| {reference.max_abs:.2e}")
        artifacts[name] = {
            "file": str(path.relative_to(repository)), "runtime": exported.runtime, "precision": exported.precision,
            "size_bytes": report.artifact_size(path), "sha256": report.sha256(path),
            "parity": {k: v.as_dict() for k, v in figures.items()}, "parity_shapes": dict(check_sizes),
            "build_seconds": round(seconds, 2), **extra}
        if (variants[name].derived or variants[name].gpu_only) and exported is FP32 and not variants[name].calibrated:
            serve_variant(name)

    programs: dict[str, tuple[Path, Path, float]] = {}  # AOTInductor: exported programs compiled side by side
    scratch = tempfile.TemporaryDirectory(prefix="kiln-programs-")  # removed when done, or when the build fails
    for name in tqdm(components, desc=f"build sd ({options.variant})", unit="component", disable=not options.progress):
        version = repository / models.component(name) / "1"
        exported = variants[name] if variants[name].runtime == "torch" else FP32  # a torch program, or the ONNX file
        path = version / exported.artifact
        for stale in ARTIFACTS - {path.name}:
            report.remove_artifact(version / stale)  # a previous build's variant must not linger beside this one
        for stale in version.glob(f"*{MAP_SUFFIX}"):
            stale.unlink()
        start = time.perf_counter()
        if exported.compiler:
            program = Path(scratch.name) / f"{name}.pt2"  # compiled into `path` below
            export_program(modules[name], specs[name], exported, program, export_sizes)
            programs[name] = (program, path, time.perf_counter() - start)
            continue
        if exported.runtime == "torch":
            export_program(modules[name], specs[name], exported, path, export_sizes)
        else:
            export_component(modules[name], specs[name], path, export_sizes)
        record(name, exported, path, time.perf_counter() - start)
    # One device per build (check_target: a GPU build's torch parts are CUDA variants, a CPU build's CPU ones)
    compiled = compile_packages({program: package for program, package, _ in programs.values()},
                                "cuda" if options.device == "gpu" else "cpu", log) if programs else {}
    scratch.cleanup()
    for name, (program, package, export_seconds) in programs.items():
        record(name, variants[name], package, export_seconds + compiled[program].seconds,
               compile_seconds=compiled[program].seconds, compile_cached=compiled[program].cached)

    # LoRA: where each module's weight is in the artifacts that can take one (build.sd.lora)
    lora_ready = options.triton_backend == "python"
    for name in (c for c in components if c in LORA_COMPONENTS):
        served = variants[name]
        if (lora_ready and served.runtime in LORA_RUNTIMES and not served.accelerator and not served.calibrated
                and served.quantization == "none"):
            artifacts[name]["lora"] = write_lora_map(modules[name], name, served.runtime,
                                                     repository / models.component(name) / "1" / served.artifact)
    lora_layers = min((artifacts[c].get("lora", {}).get("layers", 0) for c in ("text_encoder", "unet")), default=0)
    if lora_layers:
        log(f"  LoRA: {artifacts['unet']['lora']['layers']} UNet and {artifacts['text_encoder']['lora']['layers']} "
            "text encoder layers mapped")

    # 3. Triton models and the contract the service reads.
    contract = SDContract(
        scheduler_config=loaded.scheduler_config, vae_scale_factor=vae_scale_factor(loaded),
        latent_channels=loaded.vae.config.latent_channels, unet_in_channels=loaded.unet.config.in_channels,
        scaling_factor=float(loaded.vae.config.scaling_factor), min_size=options.images.min,
        max_size=options.images.max, size_multiple=size_multiple(loaded),
        model_name=options.checkpoint or _model_name(loaded.source), family=loaded.family,
        model_sha256=artifacts["unet"]["sha256"], variant=options.variant,
        max_prompt_chunks=1 if static else MAX_CHUNKS,  # a static text encoder takes one 75-token chunk
        unet_max_batch=specs["unet"].max_batch_size, clip_skip_layers=text_widths(loaded)[2],
        textual_inversion_dim=text_widths(loaded)[0],
        text_split=loaded.text_encoder.config.hidden_size if two_encoders(loaded) else 0, time_ids=time_ids(loaded),
        lora_layers=artifacts["unet"]["lora"]["layers"] if lora_layers else 0,
        **(cuda_graph_parameters(specs["unet"])
           if variants["unet"].runtime == "torch" and variants["unet"].accelerator == "cuda" else {}),
        vaes=extra_vaes(loaded), tiling=options.tiling, vae_tile=vae_tile(loaded), static_sizes=",".join(static),
        controlnets=tuple(ServedControlNet(name=label, model=models.component(name), sha256=artifacts[name]["sha256"],
                                           ensemble=models.controlnet_ensemble(index) if has_ensemble(specs, name)
                                           else "", global_pool=bool(control.config.global_pool_conditions))
                          for index, ((label, control), name) in enumerate(zip(loaded.controlnets.items(),
                                                                               controls))))
    plans = {name: static_plan(specs[name], static) for name in components} if static else {}
    configs = sd_model_configs(specs, contract, variants, options.max_queue_delay_us, options.threads,
                               options.step_queue_delay_us, options.triton_backend, options.device, options.ov_device,
                               models, plans, options.channels_last, options.torch_compile)
    remove_stale(repository, models("sd_*control*"), {c.name for c in configs})
    remove_stale(repository, models("sd_vae_*_*"), {c.name for c in configs})  # an earlier build's extra VAEs
    write_models(configs, repository)
    loaded.tokenizer.save_pretrained(str(repository / models(names.SD_TOKENIZER) / "1" / "tokenizer"))

    # 4. Calibrated variants: UNet inputs captured from denoising runs of the fp32 models just written.
    for name in (c for c in components if variants[c].calibrated):
        log(f"  capturing sd_{name} inputs from {len(CALIBRATION_PROMPTS)} txt2img runs of "
            f"{options.calibration_steps} steps for calibration ...")
        serve_variant(name, capture_unet_inputs(repository, image_size, options.calibration_steps, models))

    # The static models at a built size against the dynamic IR they come from (on this machine's CPU)
    for name, plan in plans.items():
        path = repository / models.component(name) / "1" / variants[name].artifact
        checked = artifacts[name]["static"] = check_static(specs[name], path, variants[name], plan,
                                                           next(iter(static.values())))
        log(f"  sd_{name:13s} static at {', '.join(static)}: max|diff| vs dynamic "
            f"{checked['vs_dynamic'][specs[name].reference_output]['max_abs']:.2e}")

    # 5. A lower precision is a trade we show: its image against the fp32 build's, same seed. Then the report.
    content = {"created": report.now(), "weights": {"source": loaded.source, "random": loaded.random},
               "family": loaded.family, "prediction_type": loaded.scheduler_config.get("prediction_type", "epsilon"),
               "image_range": asdict(options.images), "static_sizes": list(static), "variant": options.variant,
               "auto": choices.pop("unet", None), **({"auto_parts": choices} if choices else {}),
               "components": {c: mix.key(c) for c in components},
               "triton_backend": options.triton_backend, "device": options.device,
               "torch_compile": options.torch_compile,
               "caveat": "; ".join(dict.fromkeys(c for v in variants.values()
                                                  if (c := precision_caveat(v, options.triton_backend)))) or None,
               **(target if any(v.runtime == "openvino" for v in variants.values()) else {}),
               "vae_scale_factor": contract.vae_scale_factor, "versions": report.tool_versions(),
               "machine": report.machine(), "artifacts": artifacts, "models": [c.name for c in configs]}
    if any(v.derived for v in variants.values()):
        content["image_parity"] = variant_image_parity(repository, image_size, options.image_check_steps,
                                                       options.variant, log, models)
    if content.get("note"):
        log(f"!! --ov-device {options.ov_device}: {content['note']}")
    if content["caveat"]:
        log(f"!! {content['caveat']}")
    report.update_report(repository, models.report_section, content)
    log(f"wrote {len(configs)} Triton models to {repository}")
    return content

