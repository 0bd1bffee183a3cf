"""The five Triton models of the ViT path, generated from the spec and the resolved transform."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from build.native import GPU_INPUTS, cuda_graph_parameters, native_config
from build.specs import ComponentSpec
from build.static import size_label, static_plan
from build.triton_config import DynamicBatching, EnsembleStep, ModelConfig, Tensor
from build.vit.spec import DEFAULT_TOP_K, MAX_TOP_K, VIT_SPEC, spec_facts
from kiln import contract as names
from kiln.errors import ConfigError
from kiln.imaging import EvalTransform, ImageLimits
from kiln.runtime import ByteScale
from kiln.runtime.static import StaticPlan

if TYPE_CHECKING:
    from build.vit.build import ViTBuildOptions


GPU_MAX_BATCH = 256
GPU_GRAPH_BATCHES = (1, 8, 64, 256)  # torch on CUDA: batch sizes replayed from CUDA graphs


def vit_static_plan(spec: ComponentSpec) -> StaticPlan:
    """A static build's plan: one image per call at the model's size (its only one)."""
    size = spec_facts(spec)["size"]
    return static_plan(spec, {size_label(size, size): {"batch": 1}})


PIXEL_WIRES = ("auto", "uint8", "float32")


def pixel_wire(options: ViTBuildOptions) -> str:
    """How vit_preprocess hands the image to `vit`: "uint8" pixels (resized and cropped), which vit's session scales
    (a quarter of float32's bytes through Triton and, on a GPU, over PCIe, scaled there), or "float32" pixel_values,
    scaled by the decode pool. auto: uint8 where torch runs on a GPU, float32 elsewhere (a native backend takes
    floats only)."""
    if options.pixel_wire not in PIXEL_WIRES:
        raise ConfigError(f"unknown pixel wire {options.pixel_wire!r}; valid: {', '.join(PIXEL_WIRES)}")
    if options.pixel_wire == "uint8" and options.triton_backend != "python":
        raise ConfigError("--pixel-wire uint8 needs the Python backend's vit (a native backend's ONNX Runtime or "
                          "OpenVINO model takes float32 pixel_values only)")
    if options.pixel_wire == "auto":
        return "uint8" if options.device == "gpu" and options.triton_backend == "python" else "float32"
    return options.pixel_wire


DECODES = ("pil", "torch")


def check_decode(options: ViTBuildOptions, wire: str) -> None:
    """--decode torch (kiln.runtime.torch_decode) hands `vit` uint8 pixels where it decoded them, decoded in full."""
    if options.decode not in DECODES:
        raise ConfigError(f"unknown decode {options.decode!r}; valid: {', '.join(DECODES)}")
    if options.decode == "torch" and wire != "uint8":
        raise ConfigError("--decode torch hands vit uint8 pixels, which vit scales: it needs --pixel-wire uint8 (auto "
                          "chooses it for torch on a GPU)")
    if options.decode == "torch" and options.jpeg_draft:
        raise ConfigError("--jpeg-draft is PIL's reduced decode; --decode torch decodes in full: choose one")


def vit_instances(options: ViTBuildOptions) -> int:
    """How many copies of `vit` Triton runs (its instance_group count), each with its own session. auto (0): two on a
    GPU, where one copy's host work (the batch into its stub, the pinned copy, the response) overlaps the other's
    compute, which a single copy serialises; one on a CPU, where one session already uses every core (more copies
    there should share them: --threads)."""
    if options.instances < 0:
        raise ConfigError(f"--instances must be 0 (auto) or more, got {options.instances}")
    return options.instances or (2 if options.device == "gpu" else 1)


def vit_model_configs(options: ViTBuildOptions, transform: EvalTransform,
                      spec: ComponentSpec = VIT_SPEC) -> list[ModelConfig]:
    """vit_preprocess, vit, vit_postprocess and the ensembles vit_classify and vit_embed, for this ViT's spec."""
    facts = spec_facts(spec)
    served = options.served
    on_gpu = options.device == "gpu" and options.triton_backend == "python"  # torch on CUDA (check_target)
    # A GPU classifies 256 images in one call (10,000 images/s on an H200 is a batch-256 figure); Triton's batcher
    # forms the batch sizes whose CUDA graphs the model captured where it can.
    max_batch = GPU_MAX_BATCH if on_gpu else spec.max_batch_size
    batching = DynamicBatching(max_queue_delay_microseconds=options.max_queue_delay_us,
                               preferred_batch_size=GPU_GRAPH_BATCHES if on_gpu else ())
    pixel = spec.inputs[0]
    image = Tensor("image", "BYTES", (1,))
    layer = spec.inputs[1].triton_tensor()
    # A Python-backend `vit` also takes the image as uint8 `pixels` (resized and cropped), which its session scales;
    # what vit_preprocess hands it is pixel_wire's choice.
    python = options.triton_backend == "python"
    pixels = Tensor("pixels", "UINT8", pixel.triton_tensor().dims, optional=True)
    wire = pixels if pixel_wire(options) == "uint8" else pixel.triton_tensor()
    labels = (Tensor("labels", "BYTES", (-1,)), Tensor("scores", "FP32", (-1,)), Tensor("indices", "INT32", (-1,)))
    preprocess = ModelConfig(
        name=names.VIT_PREPROCESS,
        inputs=(image,),
        # `layer` carries the default block to the `vit` step of vit_classify: native backends have no
        # optional inputs, and an ensemble cannot make a constant.
        outputs=(replace(wire, optional=False), replace(layer, optional=False)),
        max_batch_size=max_batch,
        dynamic_batching=batching,
        kind="KIND_GPU" if on_gpu and options.decode == "torch" else "KIND_CPU",  # nvJPEG on the GPU vit runs on
        parameters={"transform": transform.to_json(), "default_layer": str(facts["blocks"] - 1),
                    "max_pixels": str(ImageLimits().max_pixels), "min_side": str(ImageLimits().min_side),
                    "threads": str(options.threads),  # its decode pool (0: every core it may use)
                    "jpeg_draft": str(options.jpeg_draft).lower(),  # JPEGs decoded reduced (kiln.imaging.preprocess)
                    "scaled": str(wire is not pixels).lower(),  # false: uint8 `pixels` out, scaled by `vit`
                    **({"decode": "torch"} if options.decode == "torch" else {})},  # kiln.runtime.torch_decode
    )
    vit = ModelConfig(
        name=names.VIT,
        inputs=(replace(pixel.triton_tensor(), optional=True), pixels, layer) if python else spec.triton_inputs(),
        outputs=spec.triton_outputs(),
        max_batch_size=max_batch,
        dynamic_batching=batching,
        kind="KIND_CPU",
        instance_count=vit_instances(options),
        parameters={"runtime": served.runtime, "artifact": served.artifact,
                    "inference_precision": served.inference_precision, "threads": str(options.threads),
                    **({"ov_device": options.ov_device} if served.runtime == "openvino" else {}),
                    **({"static_shapes": vit_static_plan(spec).to_json()} if options.static_sizes else {}),
                    **({"byte_inputs": ByteScale.dump({pixel.name: ByteScale(transform.mean, transform.std)})}
                       if python else {}),
                    "default_layer": str(facts["blocks"] - 1)},
    )
    if options.triton_backend == "native":
        vit = native_config(vit, served, options.device, options.threads, spec)
    elif on_gpu:
        vit = replace(vit, kind="KIND_GPU", parameters=vit.parameters | cuda_graph_parameters(
            spec, GPU_GRAPH_BATCHES, GPU_MAX_BATCH) | GPU_INPUTS)
    served.check_torch_compile(options.torch_compile, "the ViT", options.served_key)
    if options.torch_compile:  # its CUDA graphs replay Inductor's kernels (kiln.runtime.torch_session)
        vit = replace(vit, parameters=vit.parameters | {"torch_compile": "1"})
    top_k = Tensor("top_k", "INT32", (1,), optional=True)
    postprocess = ModelConfig(
        name=names.VIT_POSTPROCESS,
        inputs=(Tensor("logits", "FP32", (facts["classes"],)), top_k),
        outputs=labels,
        max_batch_size=max_batch,
        dynamic_batching=batching,
        parameters={"default_top_k": str(DEFAULT_TOP_K), "max_top_k": str(MAX_TOP_K)},
    )
    classify = ModelConfig(
        name=names.VIT_CLASSIFY,
        backend=None,
        platform="ensemble",
        max_batch_size=max_batch,
        inputs=(image, top_k),
        outputs=labels,
        steps=(
            EnsembleStep(names.VIT_PREPROCESS, {"image": "image"}, {wire.name: wire.name, "layer": "layer"}),
            EnsembleStep(names.VIT, {wire.name: wire.name, "layer": "layer"}, {"logits": "logits"}),
            EnsembleStep(names.VIT_POSTPROCESS, {"logits": "logits", "top_k": "top_k"},
                         {"labels": "labels", "scores": "scores", "indices": "indices"}),
        ),
    )
    embed = ModelConfig(
        name=names.VIT_EMBED,
        backend=None,
        platform="ensemble",
        max_batch_size=max_batch,
        inputs=(image, Tensor("layer", "INT64", (1,))),
        outputs=(Tensor("embedding", "FP32", (facts["width"],)),
                 Tensor("tokens", "FP32", (facts["tokens"], facts["width"]))),
        steps=(
            EnsembleStep(names.VIT_PREPROCESS, {"image": "image"}, {wire.name: wire.name}),
            EnsembleStep(names.VIT, {wire.name: wire.name, "layer": "layer"},
                         {"pooled": "embedding", "tokens": "tokens"}),
        ),
    )
    return [preprocess, vit, postprocess, classify, embed]
