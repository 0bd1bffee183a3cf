"""Where a LoRA goes in a built artifact: each Linear and Conv2d weight of the module, found among the artifact's
constants by value (kiln.runtime.lora reads the map this writes).

Exporters rename weights (the legacy ONNX exporter folds a Linear's transposed weight into an anonymous
`onnx::MatMul_N`; OpenVINO names constants after the operation that consumed them), so a name cannot say which
module a constant is; its value can. A weight matches a constant of the artifact's dtype whose values equal it or
its transpose; one that matches no constant (quantized, or fused with another operation) or several is left out of
the map, and a LoRA that touches it is refused when it is used, by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from kiln.lora import module_key
from kiln.runtime.lora import map_path

# -> the LoRA's part
LORA_COMPONENTS = {"text_encoder": "text_encoder", "unet": "unet", "unet_control": "unet", "unet_tiling": "unet"}
LORA_RUNTIMES = ("onnxruntime", "openvino")


def _constants(runtime: str, path: Path) -> dict[str, np.ndarray]:
    """The artifact's 2-D and 4-D float constants by name."""
    if runtime == "onnxruntime":
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) in (2, 4)}
    else:
        import openvino as ov

        arrays = {op.get_friendly_name(): np.array(op.get_data()) for op in ov.Core().read_model(str(path)).get_ops()
                  if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) in (2, 4)}
    return {name: a for name, a in arrays.items() if a.dtype.kind == "f"}


def _digest(array: np.ndarray) -> tuple:
    return array.dtype.str, array.shape, hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()


def lora_map(module, component: str, runtime: str, path: Path) -> dict:
    """The map of `module` (an export wrapper: build.sd.export) in its artifact at `path`."""
    import torch

    constants = _constants(runtime, path)
    index: dict[tuple, list[str]] = {}
    for name, array in constants.items():
        index.setdefault(_digest(array), []).append(name)
    dtypes = {a.dtype for a in constants.values()}
    targets, unmatched = {}, []
    for name, layer in module.named_modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        weight = layer.weight.detach().float().numpy()
        found = []
        for dtype in dtypes:
            cast = weight.astype(dtype)
            found += [(n, False) for n in index.get(_digest(cast), [])]
            if weight.ndim == 2:
                found += [(n, True) for n in index.get(_digest(cast.T), [])]
        if len(found) == 1:
            target = {"constant": found[0][0], "transposed": found[0][1], "shape": list(weight.shape)}
            targets |= {key: target for key in (module_key(name), *_original_names(module, name))}
        else:
            unmatched.append(module_key(name))
    return {"component": LORA_COMPONENTS[component], "targets": targets, "unmatched": unmatched}


def _original_names(module, name: str) -> tuple[str, ...]:
    """A UNet module's name in the original (LDM/SGM) layout too: kohya's SDXL LoRAs (and LyCORIS files) name the UNet's
    layers so (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q)."""
    from build.sd.single_file import unet_key
    from kiln.errors import WeightsError

    config = getattr(getattr(module, "model", None), "config", None)
    if config is None or "up_block_types" not in config or not name.startswith("model."):
        return ()
    attention_up = {i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind}
    try:
        original = unet_key(name.removeprefix("model.") + ".weight", config.layers_per_block, attention_up)
    except WeightsError:
        return ()
    return (module_key(original.removesuffix(".weight")),)


def write_lora_map(module, component: str, runtime: str, path: Path) -> dict:
    """Write `<artifact>.lora.json` beside the artifact; returns what the build report records."""
    content = lora_map(module, component, runtime, path)
    map_path(path).write_text(json.dumps(content, indent=1))
    layers = len({target["constant"] for target in content["targets"].values()})  # a layer once, by either name
    return {"file": map_path(path).name, "layers": layers, "unmatched": len(content["unmatched"])}


UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def random_lora(size: str = "tiny", seed: int = 0, rank: int = 4, alpha: float = 2.0,
                text_encoder: bool = True, family_name: str = "sd1") -> dict[str, np.ndarray]:
    """A seeded random LoRA in kohya's layout for the family's `size` architecture (build.sd.families): the layers
    kohya's sd-scripts train by default (the UNet's transformer blocks, the text encoder's attention and MLP), rank
    `rank`. lora_down is normal with std 1/sqrt(fan in); lora_up is not zero (as a trained LoRA's): its std makes each
    difference about half as wide as the weight it changes. SDXL's as kohya's sd-scripts write them: lora_te1_ and
    lora_te2_, and the UNet's layers by their original (SGM) names."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from build.sd.families import family
    from build.sd.weights import clip_text_config

    arch = family(family_name).architecture(size)
    modules = {"unet": UNet2DConditionModel(**arch.unet)}
    if text_encoder and arch.text_encoder_2 is None:
        modules["te"] = CLIPTextModel(clip_text_config(arch.text_encoder))
    elif text_encoder:
        modules |= {"te1": CLIPTextModel(clip_text_config(arch.text_encoder)),
                    "te2": CLIPTextModelWithProjection(clip_text_config(arch.text_encoder_2))}
    original = arch.text_encoder_2 is not None  # SDXL: the UNet's original names
    rng = np.random.default_rng(seed)
    tensors = {}
    for prefix, model in modules.items():
        layers = UNET_LAYERS if prefix == "unet" else TEXT_LAYERS
        for name, layer in model.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(layers) \
                    or (prefix == "unet" and ".attentions." not in name):
                continue
            out, fan_in = layer.weight.shape[0], int(np.prod(layer.weight.shape[1:]))
            tail = (1, 1) if layer.weight.ndim == 4 else ()
            names = _original_names(_Wrapped(model), "model." + name) if prefix == "unet" and original else ()
            key = f"lora_{prefix}_{names[0] if names else module_key(name)}"
            key = key.replace("_te1_", "_te1_text_model_").replace("_te2_", "_te2_text_model_")  # kohya's, for SDXL
            tensors[f"{key}.lora_down.weight"] = rng.normal(0, fan_in ** -0.5, (rank, *layer.weight.shape[1:]))
            tensors[f"{key}.lora_up.weight"] = rng.normal(0, 0.3 * rank ** 0.5 / alpha, (out, rank, *tail))
            tensors[f"{key}.alpha"] = np.array(alpha)
    return {k: v.astype(np.float32) for k, v in tensors.items()}


class _Wrapped:
    """A model as kiln's export wrappers hold it (its `model`), for _original_names."""

    def __init__(self, model) -> None:
        self.model = model


def write_lora(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """A LoRA file as kohya's sd-scripts write one (.safetensors, its ss_* metadata where given)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
