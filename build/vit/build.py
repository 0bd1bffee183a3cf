"""`kiln build vit`: ViT-B/16 -> ONNX once -> OpenVINO IR / int8 variants -> parity -> Triton repository.

Steps of `build_vit`:
 1. load weights (folder, .safetensors, hub id or seeded random) and resolve timm's eval transform
 2. reference outputs from PyTorch on real images (the shipped samples or --calibration images)
 3. export ONNX (dynamic batch) and check it; derive every requested variant and check each
 4. write the Triton models: vit_preprocess, vit, vit_postprocess and the two ensembles
 5. write build-report.json
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from build import auto, parity, report
from build.convert import VIT_VARIANTS, Variant, check_threads, derive, open_session
from build.native import check_target, ov_target, parity_note, precision_caveat
from build.repository import write_models
from build.specs import ComponentSpec
from build.static import check_static, check_static_variant
from build.torch_export import export_artifact
from build.vit.configs import check_decode, pixel_wire, vit_instances, vit_model_configs, vit_static_plan
from build.vit.draft import decode_figures, decode_summary, draft_figures, draft_summary
from build.vit.labels import class_labels, write_labels
from build.vit.spec import EXTRA_EXPORTS, NUM_BLOCKS, VIT_MODEL_NAME, VIT_SPEC, spec_facts, spec_for
from kiln.contract import VIT, VIT_POSTPROCESS
from kiln.errors import ConfigError, ParityError
from kiln.imaging import EvalTransform, decode_image
from kiln.paths import DEFAULT_REPOSITORY, SAMPLE_IMAGES, list_images


@dataclass(frozen=True)
class ViTBuildOptions:
    """What `kiln build vit` was asked to do."""

    weights: str | None = None  # folder, .safetensors file or hub id
    random_weights: bool = False  # build the real architecture with seeded random weights
    seed: int = 0
    backend: str = "onnxruntime"  # which runtime the served `vit` model uses; auto: the fastest built (build.auto)
    precision: str = "fp32"  # which precision the served `vit` model uses
    variants: tuple[str, ...] | None = None  # variant keys to build; None: all
    extra_exports: tuple[str, ...] = EXTRA_EXPORTS  # also write these non-served exports
    calibration: Path | None = None  # folder of images for int8 calibration and parity; default: assets/images
    calibration_size: int = 32  # int8 calibration samples (augmented crops of the images)
    repository: Path = DEFAULT_REPOSITORY
    triton_backend: str = "python"  # python (embedded Triton here) or native (NVIDIA's tritonserver image)
    device: str = "cpu"  # cpu or gpu: the instance kind of a native build's `vit`
    ov_device: str = "CPU"  # OpenVINO variants: the device the served model compiles for (CPU, GPU, NPU, AUTO)
    # A static-shape build (build.static): the served OpenVINO model compiled at its image size, one image per call,
    # for devices that need fixed shapes (NPU); (): dynamic batches
    static_sizes: tuple[tuple[int, int], ...] = ()
    max_queue_delay_us: int = 2000
    threads: int = 0  # runtime threads inside Triton, and vit_preprocess's decode pool; 0: where it runs
    jpeg_draft: bool = False  # vit_preprocess decodes large JPEGs reduced (libjpeg's DCT scaling), near timm's pixels
    pixel_wire: str = "auto"  # how vit_preprocess hands images to vit: uint8, float32, auto (build.vit.configs)
    decode: str = "pil"  # vit_preprocess's JPEG decode: pil (a thread pool) or torch (torchvision, nvJPEG on a GPU)
    instances: int = 0  # copies of the served `vit` Triton runs (its instance_group count); 0: auto (vit_instances)
    torch_compile: bool = False  # torch-cuda-fp16: vit's CUDA graphs captured from torch.compile's kernels at load
    progress: bool = True

    @property
    def auto(self) -> bool:
        return self.backend == "auto"

    @property
    def served_key(self) -> str:
        if self.auto:
            raise ConfigError("--backend auto: the served variant is chosen by measurement after the build")
        key = f"{self.backend}-{self.precision}"
        if key not in VIT_VARIANTS:
            raise ConfigError(f"no {self.precision} variant for backend {self.backend}; valid backend-precision pairs: "
                              f"{', '.join(sorted(VIT_VARIANTS))}")
        return key

    @property
    def served(self) -> Variant:
        return VIT_VARIANTS[self.served_key]

    def variant_keys(self) -> list[str]:
        """The variants to build: those asked for ("all": every one this device can serve), and what they need."""
        keys = list(self.variants) if self.variants is not None else [
            k for k, v in VIT_VARIANTS.items() if not v.gpu_only or self.device == "gpu"]
        for key in keys:
            if key not in VIT_VARIANTS:
                raise ConfigError(f"unknown variant {key!r}; valid: {', '.join(VIT_VARIANTS)}")
        if not self.auto and self.served_key not in keys:
            keys.append(self.served_key)
        # Every variant derives from the ONNX export; bf16 runs the fp32 IR.
        needed = {"onnxruntime-fp32"} | ({"openvino-fp32"} if any(k.startswith("openvino") for k in keys) else set())
        return [k for k in VIT_VARIANTS if k in set(keys) | needed]


def parity_batch(images: list[Path], transform: EvalTransform, blocks: int = NUM_BLOCKS,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The eval-transformed images, plus a spread of `layer` values so every block index is exercised."""
    pixels = np.stack([transform(decode_image(p.read_bytes())) for p in images])
    layers = (np.arange(len(images), dtype=np.int64) * 5 + blocks - 1) % blocks
    return pixels, layers.reshape(-1, 1)


def calibration_samples(images: list[Path], transform: EvalTransform, count: int, seed: int,
                        blocks: int = NUM_BLOCKS) -> list[dict]:
    """`count` in-distribution inputs: the eval view of each image, then random crops and flips of them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    decoded = [decode_image(p.read_bytes()) for p in images]
    samples = [transform(img) for img in decoded]
    while len(samples) < count:
        img = decoded[len(samples) % len(decoded)]
        w, h = img.size
        scale = rng.uniform(0.5, 1.0)
        cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = img.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        samples.append(transform(view))
    last_layer = np.array([[blocks - 1]], dtype=np.int64)
    return [{"pixel_values": sample[None].astype(np.float32), "layer": last_layer} for sample in samples[:count]]


PARITY_IMAGES = 16  # parity runs on at most this many of the images (spread over them)


def spread(images: list[Path], count: int) -> list[Path]:
    """At most `count` of `images`, evenly spaced (every class of a sorted class-folder tree is represented)."""
    if len(images) <= count:
        return list(images)
    return [images[int(i * len(images) / count)] for i in range(count)]


@dataclass
class BuildResult:
    repository: Path
    report_path: Path
    served_key: str
    artifacts: dict[str, dict] = field(default_factory=dict)

    @property
    def served(self) -> Variant:
        return VIT_VARIANTS[self.served_key]


def build_vit(options: ViTBuildOptions, log: Callable[[str], None] = print) -> BuildResult:
    """Build the ViT model repository; raise a KilnError subclass with a clear message on failure."""
    from build.vit import export  # torch is imported here, not when the spec or configs are
    from build.vit.transform import eval_transform
    from build.vit.weights import load_vit

    # 1. Check inputs and load weights.
    keys = options.variant_keys()
    if options.auto and options.device == "gpu" and not _has_cuda():
        raise ConfigError("--backend auto with --device gpu times the candidates on the GPU they will run on, and this "
                          "machine has none: pick its variant (torch-cuda, onnxruntime-cuda or onnxruntime-tensorrt, "
                          "fp16)")
    # What may serve (the ONNX export every build makes, the parity anchor, is not served by a GPU build).
    check_target(options.triton_backend, options.device,
                 [VIT_VARIANTS[k] for k in keys if options.device == "cpu" or VIT_VARIANTS[k].gpu_only]
                 if options.auto else [options.served])
    target = ov_target(options.ov_device, options.triton_backend,
                       [VIT_VARIANTS[k] for k in keys] if options.auto else [options.served])
    check_static_variant(options.static_sizes, [VIT_VARIANTS[k] for k in keys] if options.auto else [options.served],
                         options.triton_backend)
    check_threads(options.threads)
    wire, instances = pixel_wire(options), vit_instances(options)
    check_decode(options, wire)
    if not options.auto:  # (auto: once the served variant is chosen, by vit_model_configs)
        options.served.check_torch_compile(options.torch_compile, "the ViT", options.served_key)
    if options.calibration_size < 1:
        raise ConfigError(f"--calibration-size must be at least 1, got {options.calibration_size}")
    for name in options.extra_exports:
        if name not in EXTRA_EXPORTS:
            raise ConfigError(f"unknown extra export {name!r}; valid: {', '.join(EXTRA_EXPORTS)}")
    repository = Path(options.repository)
    loaded = load_vit(options.weights, random_weights=options.random_weights, seed=options.seed)
    model = loaded.model
    spec = spec_for(model, VIT_SPEC)  # the shapes of this model (any timm ViT), the tolerances of the ViT spec
    facts = spec_facts(spec)
    for width, height in options.static_sizes:
        if (width, height) != (facts["size"], facts["size"]):
            raise ConfigError(f"--static-size {width}x{height}: this ViT takes {facts['size']}x{facts['size']} images "
                              "only (the preprocessing resizes every image to it)")
    labels = class_labels(loaded.labels, facts["classes"], log)
    if loaded.random:
        log("!" * 78)
        log(f"!! RANDOM WEIGHTS, {loaded.source}: the real {VIT_MODEL_NAME}")
        log("!! architecture with seeded random parameters. Labels and scores are meaningless;")
        log("!! pass --weights with a real checkpoint for a real classifier.")
        log("!" * 78)
    try:
        transform = eval_transform(model)
    except ConfigError as exc:
        raise ConfigError(f"cannot serve this model's preprocessing: {exc}") from None

    # 2. Reference outputs on real images.
    # The user's images when given (--calibration) or known (the training split of a kiln finetune folder).
    images = list_images(Path(options.calibration)) if options.calibration else \
        list(loaded.images) or list_images(SAMPLE_IMAGES)
    checked = spread(images, PARITY_IMAGES)
    pixels, layers = parity_batch(checked, transform, facts["blocks"])
    reference = export.reference_outputs(model, pixels, layers)
    version_dir = repository / VIT / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / VIT_VARIANTS["onnxruntime-fp32"].artifact

    # 3. Export, derive, check: every artifact once (bf16 runs the fp32 IR), checked against PyTorch.
    artifacts: dict[str, dict] = {}
    rejected: dict[str, str] = {}
    made: set[str] = set()
    steps = [*keys, *options.extra_exports]
    with tqdm(steps, desc="build vit", unit="artifact", disable=not options.progress) as bar:
        for key in bar:
            bar.set_postfix_str(key)
            start = time.perf_counter()
            if key == "safetensors":
                export.export_safetensors(model, version_dir / "model.safetensors", artifacts, repository)
                continue
            if key == "torchscript":
                export.export_torchscript(model, version_dir / "model.torchscript.pt", pixels, layers, reference,
                                          artifacts, repository, spec)
                continue
            variant = VIT_VARIANTS[key]
            produced = variant.artifact not in made
            if key == "onnxruntime-fp32":
                export.export_onnx(model, onnx_path, spec)
            elif variant.runtime == "torch":
                compiled = export_artifact(export.ViTExport(model).eval(), spec, variant,
                                           version_dir / variant.artifact, spec.sizes("opt"), log=bar.write)
            elif produced:
                calibration = calibration_samples(spread(images, options.calibration_size), transform,
                                                  options.calibration_size, options.seed, facts["blocks"]) \
                    if variant.calibrated else None
                # The head in float: without VNNI its int8 dot products saturate (NNCF's overflow fix covers the
                # first layer only) and its error is the logits'. Logit cosine in the build's parity check (AVX2):
                # fine-tuned 3-class ViT-Tiny, seed 3 0.33 -> 0.95, seed 0 0.9954 -> 0.9994; ViT-B/16 0.9977 ->
                # 0.9980, at the same speed (the head is 0.004% of its multiplies).
                derive(variant, onnx_path, version_dir / variant.artifact, calibration, float_outputs=("logits",))
            made.add(variant.artifact)
            try:
                artifacts[key] = _check(key, variant, spec, version_dir, repository, pixels, layers, reference, log,
                                        remove_on_failure=produced)
            except ParityError as exc:
                if not options.auto or key in ("onnxruntime-fp32", "openvino-fp32"):
                    raise  # the exports every other variant is derived from: nothing to choose from without them
                rejected[key] = str(exc)  # auto: a candidate outside its tolerance is not served, and said so
                bar.write(f"  {key:18s} outside its tolerance: not a candidate")
                continue
            artifacts[key]["build_seconds"] = round(time.perf_counter() - start, 2)
            if variant.compiler:
                artifacts[key] |= {"compile_seconds": compiled.seconds, "compile_cached": compiled.cached}
            logits = artifacts[key]["parity"]["logits"]
            bar.write(f"  {key:18s} cosine {logits['cosine']:.6f}  max|diff| {logits['max_abs']:.2e}  "
                      f"top-1 {logits.get('top1', float('nan')):.2f}")

    # 4. Triton models (auto: of what serves, the fastest here).
    choice = None
    if options.auto:
        options, choice = _choose(options, spec, keys, artifacts, rejected, version_dir, pixels, layers, log)
    configs = vit_model_configs(options, transform, spec)
    write_models(configs, repository)
    static = None
    if options.static_sizes:  # the static model at its size against the dynamic IR it comes from
        static = check_static(spec, version_dir / options.served.artifact, options.served, vit_static_plan(spec),
                              {"batch": 1})
        log(f"  static at {facts['size']}x{facts['size']}: max|diff| vs dynamic "
            f"{static['vs_dynamic']['logits']['max_abs']:.2e}")
    write_labels(repository / VIT_POSTPROCESS / "1" / "labels.json", labels.names)

    # 5. Report.
    served = options.served
    draft = draft_figures(model, checked, transform, pixels, layers, reference) if options.jpeg_draft else \
        {"enabled": False}
    if options.jpeg_draft:
        log(f"  --jpeg-draft: {draft_summary(draft)}")
    decode = decode_figures(model, checked, transform, layers, reference, options.device) \
        if options.decode == "torch" else {"decode": "pil"}
    if options.decode == "torch":
        log(f"  --decode torch: {decode_summary(decode)}")
    content = {
        "model": _model_name(model),
        "shape": facts,
        "labels": {"source": labels.source, "count": len(labels.names), "first": list(labels.names[:10])},
        "created": report.now(),
        "weights": {"source": loaded.source, "random": loaded.random,
                    "parameters": int(sum(p.numel() for p in model.parameters()))},
        "served": {"backend": served.runtime, "precision": served.precision, "artifact": served.artifact,
                   "triton_backend": options.triton_backend, "device": options.device, "instances": instances,
                   "torch_compile": options.torch_compile,
                   "caveat": precision_caveat(served, options.triton_backend),
                   **(target if served.runtime == "openvino" else {}), **({"static": static} if static else {})},
        "auto": choice,
        "preprocess": json.loads(transform.to_json()) | {"jpeg_draft": draft, "pixel_wire": wire, "decode": decode},
        "parity_images": [p.name for p in checked],
        "versions": report.tool_versions(),
        "machine": report.machine(),
        "artifacts": artifacts,
        "models": [c.name for c in configs],
    }
    if content["served"].get("note"):
        log(f"!! --ov-device {options.ov_device}: {content['served']['note']}")
    if content["served"]["caveat"]:
        log(f"!! {content['served']['caveat']}")
    report_path = report.update_report(repository, "vit", content)
    log(f"wrote {len(configs)} Triton models and {len(artifacts)} artifacts to {repository} (report: {report_path})")
    return BuildResult(repository=repository, report_path=report_path, served_key=options.served_key,
                       artifacts=artifacts)


def _check(key: str, variant: Variant, spec: ComponentSpec, version_dir: Path, repository: Path, pixels: np.ndarray,
           layers: np.ndarray, reference: dict[str, np.ndarray], log: Callable[[str], None],
           remove_on_failure: bool) -> dict:
    """Run the artifact on the parity batch, compare with PyTorch, refuse it outside its tolerance; its report entry."""
    path = version_dir / variant.artifact
    session = open_session(variant, path)
    outputs, executed_in = session.run({"pixel_values": pixels, "layer": layers}, spec.output_names), \
        session.execution_precision
    if variant.inference_precision != "f32" and executed_in.split("+")[-1] != variant.inference_precision:
        log(f"  note: {key}: this CPU has no {variant.inference_precision} instructions, so OpenVINO "
            f"executes it in {executed_in}; its figures equal the fp32 variant's here")
    figures = parity.compare_outputs(reference, outputs, classify={"logits"})
    tolerance = spec.tolerance(variant.tolerance_key)
    try:
        parity.check(f"{key} ({spec.reference_output})", figures[spec.reference_output], tolerance)
    except ParityError:
        if remove_on_failure:  # never remove a file another variant made (bf16 shares fp32's IR)
            report.remove_artifact(path)
        raise
    return {
        "file": str(path.relative_to(repository)),
        "runtime": variant.runtime,
        "precision": variant.precision,
        "inference_precision": variant.inference_precision,
        "executed_precision": executed_in,
        "size_bytes": report.artifact_size(path),
        "sha256": report.sha256(path),
        "parity": {name: fig.as_dict() for name, fig in figures.items()},
        "tolerance": {"output": spec.reference_output, "min_cosine": tolerance.min_cosine,
                      "max_abs": tolerance.max_abs, "min_top1": tolerance.min_top1, "why": tolerance.why},
        "parity_samples": int(len(pixels)),
        "parity_note": parity_note(variant),
    }


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _choose(options: ViTBuildOptions, spec: ComponentSpec, keys: list[str], artifacts: dict, rejected: dict,
            version_dir: Path, pixels: np.ndarray, layers: np.ndarray,
            log: Callable[[str], None]) -> tuple[ViTBuildOptions, dict]:
    """Time every candidate that passed its parity check on the spec's optimal batch; serve the fastest."""
    batch = spec.sizes("opt")["batch"]
    rows = np.arange(batch) % len(pixels)
    inputs = {"pixel_values": np.ascontiguousarray(pixels[rows]), "layer": np.ascontiguousarray(layers[rows])}
    measured = {}
    # What runs here: the CPU's variants, or torch's CUDA ones on this GPU (ONNX Runtime's GPU variants run only in
    # NVIDIA's image).
    for key in (k for k in keys if k in artifacts and (not VIT_VARIANTS[k].gpu_only) == (options.device == "cpu")
                and (options.device == "cpu" or VIT_VARIANTS[k].runtime == "torch")):
        session = open_session(VIT_VARIANTS[key], version_dir / VIT_VARIANTS[key].artifact, options.threads)
        measured[key] = auto.throughput(lambda s=session: s.run(inputs, ["logits"]), batch)
        artifacts[key]["speed"] = measured[key] | {"batch": batch}
        log(f"  {key:18s} {measured[key]['per_s']:.2f} images/s at batch {batch}")
    chosen, reason = auto.choose(measured, rejected, f"images/s at batch {batch}")
    log(f"auto: serving {chosen}: {reason}")
    backend, precision = chosen.rsplit("-", 1)
    return replace(options, backend=backend, precision=precision), {
        "chosen": chosen, "reason": reason, "batch": batch, "candidates": {k: measured[k] for k in measured},
        "rejected": dict(rejected)}


def _model_name(model) -> str:
    """timm's name of the architecture and its pretrained tag (vit_base_patch16_224.augreg2_in21k_ft_in1k)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or VIT_MODEL_NAME.split(".")[0]
    return f"{name}.{cfg['tag']}" if cfg.get("tag") else name
