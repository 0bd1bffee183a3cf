"""One converter and quantizer for every model: the fp32 ONNX export -> the variant a build serves.

A `Variant` is a runtime, a precision and how it is derived from the ONNX file; its artifact's
file name follows from those (one naming scheme for ViT and SD). Each model family offers the
variants that make sense for it (`VIT_VARIANTS`, `SD_VARIANTS`), under the names users pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kiln.errors import ConfigError, ExportError

RUNTIMES = ("onnxruntime", "openvino", "torch")
QUANTIZATION = ("none", "dynamic", "dynamic7", "weights", "static")
ACCELERATORS = ("", "cuda", "tensorrt")  # "": the runtime's CPU execution; the others NVIDIA GPUs only


@dataclass(frozen=True)
class Variant:
    """One served form of a component."""

    runtime: str  # onnxruntime, openvino, or torch (a torch.export program inside Triton's Python backend)
    precision: str  # fp32, fp16, bf16, int8, int4: the tolerance it is checked against
    # none; dynamic (ONNX Runtime: int8 MatMul weights, activations quantized per call; dynamic7: 7-bit weights, which
    # CPUs without VNNI never saturate); weights (NNCF: int8 weights,
    # float activations); static (NNCF post-training quantization of weights and activations, calibrated)
    quantization: str = "none"
    inference_precision: str = "f32"  # OpenVINO's INFERENCE_PRECISION_HINT (bf16 runs the fp32 IR in bf16)
    # NVIDIA GPUs: ONNX Runtime's CUDA provider on an fp16 ONNX file, or TensorRT building an fp16 engine from the
    # fp32 ONNX file when the model loads (both in NVIDIA's image); torch on CUDA in fp16 (the Python backend)
    accelerator: str = ""
    # torch only: "aoti" compiles the exported program ahead of time with AOTInductor into a package of native code
    # (a compiled plan, like a TensorRT engine); "" runs the exported program's graph eagerly
    compiler: str = ""

    def __post_init__(self) -> None:
        if (self.runtime not in RUNTIMES or self.quantization not in QUANTIZATION
                or self.accelerator not in ACCELERATORS or (self.accelerator and self.runtime == "openvino")
                or (self.accelerator == "tensorrt" and self.runtime != "onnxruntime")
                or (self.runtime == "torch" and self.quantization != "none")
                or self.compiler not in ("", "aoti") or (self.compiler and self.runtime != "torch")):
            raise ExportError(f"no such variant: {self}")

    @property
    def tolerance_key(self) -> str:
        """The spec tolerance its parity is judged by: float16 arithmetic (torch on CUDA) is not float16 weights
        computed in float32 (ONNX Runtime's float16 file on the CPU), and float32 on CUDA (an upcast VAE) convolves
        in TF32, cuDNN's default since Ampere, not in IEEE float32."""
        if self.runtime == "torch" and self.precision == "fp16":
            return "fp16-compute"
        if self.runtime == "torch" and self.accelerator == "cuda" and self.precision == "fp32":
            return "tf32-compute"
        return self.precision

    @property
    def cuda_program(self) -> bool:
        """A torch.export program on CUDA, run as exported (not a compiled package): what the build's --layout and
        --torch-compile apply to."""
        return self.runtime == "torch" and self.accelerator == "cuda" and not self.compiler

    def check_torch_compile(self, torch_compile: bool, part: str, key: str) -> None:
        """--torch-compile needs `part` served as a torch.export program on CUDA (its CUDA graphs are what it
        compiles); `key` names what it serves."""
        if torch_compile and not self.cuda_program:
            raise ConfigError(f"--torch-compile compiles the CUDA graphs of a torch.export program on a GPU "
                              f"(--device gpu and the variant torch-cuda-fp16); {part} serves {key}")

    @property
    def channels_last(self) -> bool:
        """Whether a step model (UNet, ControlNet) of this variant serves its weights channels-last where the build
        asks (kiln build sd --layout): a float16 torch.export program on CUDA (a compiled package fixes its own)."""
        return self.cuda_program and self.precision == "fp16"

    @property
    def gpu_only(self) -> bool:
        """Runs on an NVIDIA GPU only (--device gpu): ONNX Runtime's CUDA and TensorRT, torch on CUDA."""
        return bool(self.accelerator)

    @property
    def artifact(self) -> str:
        """The file in a model's version folder: model.onnx, model-int8.onnx, model.xml, model-fp16.xml,
        model-int8.xml (int8 weights), model-int8-static.xml (weights and activations)."""
        stem = "model"
        if self.runtime == "torch":  # model.pt2, model-fp16.pt2, model-aoti.pt2, model-aoti-bf16.pt2, ...
            return (stem + (f"-{self.compiler}" if self.compiler else "")
                    + (f"-{self.precision}" if self.precision != "fp32" else "") + ".pt2")
        if self.accelerator == "tensorrt":
            return "model.onnx"  # TensorRT lowers the precision itself, from the fp32 graph
        if self.precision in ("fp16", "int8", "int4"):
            stem += f"-{self.precision}"
        if self.quantization == "static":
            stem += "-static"
        return stem + (".onnx" if self.runtime == "onnxruntime" else ".xml")

    @property
    def derived(self) -> bool:
        """Whether a file is derived from the fp32 ONNX export (a torch program is exported from the module)."""
        return self.artifact != "model.onnx" and self.runtime != "torch"

    @property
    def calibrated(self) -> bool:
        return self.quantization == "static"

    def uncalibrated(self) -> Variant:
        """This variant for a component without calibration data: int8 weights instead of static quantization."""
        return Variant(self.runtime, self.precision, "weights", self.inference_precision) if self.calibrated else self

    def upcast(self) -> Variant:
        """This variant computing in float32 where it computes in float16 on a GPU (the same runtime and device): a
        VAE's (SDXL's overflows float16 and decodes black; diffusers upcasts every VAE whose config says
        force_upcast)."""
        return replace(self, precision="fp32") if self.accelerator and self.precision == "fp16" else self


FP32 = Variant("onnxruntime", "fp32")
VIT_VARIANTS = {
    "onnxruntime-fp32": FP32,
    "onnxruntime-int8": Variant("onnxruntime", "int8", "dynamic"),
    "openvino-fp32": Variant("openvino", "fp32"),
    "openvino-fp16": Variant("openvino", "fp16"),  # fp16 weights, fp32 compute
    "openvino-bf16": Variant("openvino", "bf16", inference_precision="bf16"),  # bf16 where the CPU has it
    "openvino-int8": Variant("openvino", "int8", "static"),  # calibrated on photographs
}
TORCH_VARIANTS = {  # torch.export programs in Triton's Python backend, no ONNX in between
    "torch-fp32": Variant("torch", "fp32"),  # the program's graph run by PyTorch
    "torch-cuda-fp16": Variant("torch", "fp16", accelerator="cuda"),  # CUDA graphs for the step models' batches
    # AOTInductor packages: compiled ahead of time for this CPU (its vector ISA) or for CUDA
    "torch-aoti-fp32": Variant("torch", "fp32", compiler="aoti"),
    "torch-aoti-bf16": Variant("torch", "bf16", compiler="aoti"),  # bf16 arithmetic where the CPU has it
    "torch-aoti-cuda-fp16": Variant("torch", "fp16", accelerator="cuda", compiler="aoti"),
}
GPU_VARIANTS = {  # NVIDIA's image only: Triton's onnxruntime backend on a GPU
    "onnxruntime-cuda-fp16": Variant("onnxruntime", "fp16", accelerator="cuda"),
    "onnxruntime-tensorrt-fp16": Variant("onnxruntime", "fp16", accelerator="tensorrt"),
}
VIT_VARIANTS |= TORCH_VARIANTS | GPU_VARIANTS
SD_VARIANTS = {
    "onnxruntime-fp32": FP32,
    "onnxruntime-int8": Variant("onnxruntime", "int8", "dynamic7"),
    "openvino-fp32": Variant("openvino", "fp32"),
    "openvino-bf16": Variant("openvino", "bf16", inference_precision="bf16"),
    "openvino-fp16": Variant("openvino", "fp16"),
    "openvino-int8": Variant("openvino", "int8", "weights"),
    # int4 weights for the MatMuls (attention, projections: most of the text encoder, half the UNet), int8 for the
    # convolutions and embeddings (NNCF's weight compression keeps those in int8): the smallest memory, for the edge
    "openvino-int4": Variant("openvino", "int4", "weights"),
    # The UNet's weights and activations in int8, calibrated on UNet inputs captured from denoising runs of the fp32
    # build; the other components (no calibration data) int8 weights.
    "openvino-int8-hybrid": Variant("openvino", "int8", "static"),
} | TORCH_VARIANTS | GPU_VARIANTS

# Every file name a variant can have (a rebuild removes those it does not make: nothing of an earlier build lingers).
ARTIFACTS = frozenset(v.artifact for kind in (*VIT_VARIANTS.values(), *SD_VARIANTS.values())
                      for v in (kind, kind.uncalibrated()))


def derive(variant: Variant, source: Path, target: Path, calibration: list[dict] | None = None,
           float_outputs: tuple[str, ...] = ()) -> None:
    """Make `variant`'s artifact at `target` from a component's fp32 ONNX file `source`.

    A static variant needs `calibration` (input dicts that look like real inputs): NNCF's
    post-training quantization, transformer preset, SmoothQuant off (measured on the ViT, its head then
    int8: it lowers logit cosine, 0.9972 with it against 0.9977 without), NNCF's overflow fix on (without
    VNNI, disabling it saturates the int8 dot products: cosine 0.92). The layers that make
    `float_outputs` stay in float (static variants only; a classifier's head: see the ViT build).
    """
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if variant.calibrated and not calibration:
        raise ExportError(f"{target.name}: static int8 quantization needs calibration inputs")
    if variant.runtime == "openvino":
        import openvino as ov

        model = ov.convert_model(str(source))
        if variant.calibrated:
            import nncf
            from nncf.quantization.advanced_parameters import (
                AdvancedQuantizationParameters,
                AdvancedSmoothQuantParameters,
            )

            model = nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                  ignored_scope=nncf.IgnoredScope(names=_producers(model, float_outputs)),
                                  subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED,
                                  advanced_parameters=AdvancedQuantizationParameters(
                                      smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))
        elif variant.quantization == "weights":
            model = compress_weights(model, variant.precision)
        ov.save_model(model, str(target), compress_to_fp16=variant.precision == "fp16")
    elif variant.quantization in ("dynamic", "dynamic7"):
        import onnx
        from onnx.external_data_helper import uses_external_data
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # A source past 2 GB keeps its weights outside the .onnx file; so must the quantized one.
        header = onnx.load(str(source), load_external_data=False)
        external = any(uses_external_data(t) for t in header.graph.initializer)
        # MatMul only: ONNX Runtime's ConvInteger kernels are slower than its float convolutions on CPU. dynamic7
        # (SD): 7-bit weights, so that CPUs without VNNI (AVX2 sums pairs of u8 x s8 products into int16) never
        # saturate on SD's activation outliers (the tiny text encoder on AVX2: cosine 0.94 with 8-bit weights, inside
        # 0.98 with 7); the ViT keeps 8 bits (on photographs, AVX2: 0.998 with 8, 0.997 with 7)
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=variant.quantization == "dynamic7",
                         op_types_to_quantize=["MatMul"], use_external_data_format=external)
    elif variant.precision == "fp16" and variant.derived:
        _float16(source, target)
    elif source.resolve() != target.resolve():
        raise ExportError(f"{variant}: nothing to derive from {source}")


def _producers(model, outputs: tuple[str, ...]) -> list[str]:
    """The MatMul or convolution that makes each named output of an OpenVINO model (behind its bias, if any)."""
    names = []
    for output in outputs:
        node = model.output(output).get_node().input_value(0).get_node()  # the Result's input
        for _ in range(3):  # Add (bias) <- MatMul; a graph whose output is the layer itself stops at once
            if node is None or node.get_type_name() in ("MatMul", "Convolution"):
                break
            computed = [node.input_value(i).get_node() for i in range(node.get_input_size())
                        if node.input_value(i).get_node().get_type_name() != "Constant"]  # not the bias
            node = computed[0] if computed else None
        if node is None or node.get_type_name() not in ("MatMul", "Convolution"):
            raise ExportError(f"{output}: no MatMul or convolution makes it, to keep in float")
        names.append(node.get_friendly_name())
    return names


def compress_weights(model, precision: str):
    """An OpenVINO model with NNCF-compressed weights; activations stay in float, so no calibration set is needed.
    int8: asymmetric, per output channel. int4: asymmetric in groups of 64 input channels (where 64 does not divide a
    width: the largest power of two that does, else int8), every MatMul (ratio 1); NNCF keeps convolutions and
    embeddings in int8."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    if precision == "int4":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=64, ratio=1.0,
                                     advanced_parameters=AdvancedCompressionParameters(
                                         group_size_fallback_mode=GroupSizeFallbackMode.ADJUST))
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


def _float16(source: Path, target: Path) -> None:
    """The ONNX graph with float16 weights and arithmetic (inputs and outputs stay float32), for ONNX Runtime's CUDA
    provider. ONNX Runtime's converter keeps the ops it knows to be unsafe in float16 in float32."""
    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.transformers.float16 import convert_float_to_float16

    header = onnx.load(str(source), load_external_data=False)
    external = any(uses_external_data(t) for t in header.graph.initializer)
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, disable_shape_infer=external)
    if external:  # a 2 GB source (the SD 1.5 UNet): its weights stay beside the file
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{target.name}.data")
    else:
        onnx.save_model(model, str(target))


def check_threads(threads: int) -> None:
    """The runtime threads a build writes into its models' configs (0: decided where it runs, kiln.machine.threads)."""
    if threads < 0:
        raise ConfigError(f"--threads must be at least 0 (0: decided where it runs), got {threads}")


def open_session(variant: Variant, path: Path, threads: int = 0, byte_inputs=None):
    """A runtime session on an artifact, with the variant's execution precision (a CUDA torch program on the
    first GPU); `byte_inputs`: kiln.runtime.ByteScale by input name, for uint8 pixels."""
    from kiln.runtime import Session, SessionOptions

    device = "cuda:0" if variant.runtime == "torch" and variant.accelerator == "cuda" else "cpu"
    return Session(SessionOptions(variant.runtime, Path(path), inference_precision=variant.inference_precision,
                                  threads=threads, device=device, byte_inputs=byte_inputs))
