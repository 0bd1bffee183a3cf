"""The PyTorch side of the SD build: small nn.Module wrappers per component, ONNX export, parity with PyTorch."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from build import parity
from build.convert import FP32, Variant, open_session
from build.specs import ComponentSpec
from kiln.contract import TILING, controlnet_component
from kiln.errors import ExportError
from kiln.prompts import pad_token_id, token_vector_id


def export_modules(loaded) -> dict[str, Callable]:
    """Small nn.Module wrappers, one per spec, taking the spec's inputs in order (no monkeypatched forward)."""
    import torch
    from transformers.masking_utils import create_causal_mask

    def run_layers(model, input_ids, token_vectors):
        """CLIP's text model run from its parts (transformers 5's CLIPTextModel takes no inputs_embeds), so that
        the token embeddings can be replaced per request: every layer's output, the ids, the end-of-text positions.

        Textual inversion: a position whose id is token_vector_id(k) (-1 - k, never a token) takes row k of
        `token_vectors` instead of a token's embedding; with no id below 0 the arithmetic is the model's own."""
        text = getattr(model, "text_model", model)  # transformers 5 dropped text_model
        vector = input_ids < 0
        ids = torch.where(vector, torch.zeros_like(input_ids), input_ids)  # "!" where a vector goes, as A1111
        rows = token_vector_id(input_ids).clamp(0, token_vectors.shape[0] - 1)  # its own inverse: -1 - id
        tokens = torch.where(vector.unsqueeze(-1), token_vectors[rows], text.embeddings.token_embedding(ids))
        hidden = text.embeddings(input_ids=ids, inputs_embeds=tokens)  # + position embeddings
        # config, inputs_embeds, attention_mask, cache: by position (transformers 5.24 renamed past_key_values to
        # cache; a GPU machine's own transformers may be older)
        mask = create_causal_mask(text.config, hidden, None, None)
        states = []
        for layer in text.encoder.layers:
            hidden = layer(hidden, mask, is_causal=True)
            states.append(hidden)
        # CLIPTextModel's pooled output: the last layer at the end-of-text position (the highest id in configs
        # written before transformers' fix, whose eos_token_id is 2; int32 for ONNX's ArgMax)
        end = (ids if text.config.eos_token_id == 2 else ids == text.config.eos_token_id).int().argmax(-1)
        return text, torch.stack(states), end  # (layers, rows, tokens, hidden)

    class TextEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, clip_skip, token_vectors):
            """AUTOMATIC1111's clip skip per row: the hidden state `clip_skip` layers from the end (1: the last),
            through the final layer norm, as its FrozenCLIPEmbedder (and diffusers' `clip_skip`, counted one
            lower)."""
            text, layers, end = run_layers(self.model, input_ids, token_vectors)
            index = (len(layers) - clip_skip).clamp(0, len(layers) - 1)
            every = torch.arange(input_ids.shape[0], device=input_ids.device)
            return text.final_layer_norm(layers[index, every]), text.final_layer_norm(layers[-1, every, end])

    class TextEncoderXL(torch.nn.Module):
        """SDXL's text encoders as one model (two for the base; its OpenCLIP ViT-bigG alone for the refiner): all
        read the same tokens (the second with its own padding after the end token: "!", as diffusers' tokenizer_2
        and AUTOMATIC1111's id_pad), each from its penultimate layer without the final layer norm, side by side; the
        pooled text is the last one's projection of its last layer at the end token. Textual-inversion vectors hold
        the encoders' rows side by side too (SDXL embeddings' clip_l and clip_g)."""

        def __init__(self, second, first=None, pad_2: int = 0):
            super().__init__()
            self.first, self.second, self.pad_2 = first, second, pad_2

        def forward(self, input_ids, clip_skip, token_vectors):
            """clip skip 1 (AUTOMATIC1111's default): the penultimate layers; each more goes one layer further back,
            as diffusers' SDXL `clip_skip` (counted one lower)."""
            every, ids_2, width, states = torch.arange(input_ids.shape[0], device=input_ids.device), input_ids, 0, []
            if self.first is not None:
                width = self.first.config.hidden_size
                _, first, end = run_layers(self.first, input_ids, token_vectors[:, :width])
                after_end = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0) > end.unsqueeze(1)
                ids_2 = torch.where(after_end, torch.full_like(input_ids, self.pad_2), input_ids)
                states.append(first)
            text_2, second, end_2 = run_layers(self.second, ids_2, token_vectors[:, width:])
            states.append(second)
            hidden = [layers[(len(layers) - 1 - clip_skip).clamp(0, len(layers) - 1), every] for layers in states]
            pooled = self.second.text_projection(text_2.final_layer_norm(second[-1, every, end_2]))
            return torch.cat(hidden, dim=-1), pooled

    class Tiling(torch.nn.Module):
        """AUTOMATIC1111's tiling (seamless images): with `circular`, every Conv2d of the model pads circularly while
        the wrapper runs (its sd_hijack.apply_circular), so the export traces circular pads; the model's own
        padding is restored after, for the wrappers that share it."""

        def __init__(self, model, circular: bool = False):
            super().__init__()
            self.model, self.circular = model, circular

        def __call__(self, *args):
            if not self.circular:
                return super().__call__(*args)
            convs = [m for m in self.model.modules() if isinstance(m, torch.nn.Conv2d)]
            for conv in convs:
                conv.padding_mode = "circular"
            try:
                return super().__call__(*args)
            finally:
                for conv in convs:
                    conv.padding_mode = "zeros"

    class UNet(Tiling):
        def forward(self, sample, timestep, encoder_hidden_states, *rest):
            added, residuals = {}, rest
            if self.model.config.addition_embed_type == "text_time":  # SDXL: the pooled text and the time ids first
                added, residuals = {"added_cond_kwargs": {"text_embeds": rest[0], "time_ids": rest[1]}}, rest[2:]
            if residuals:
                return self.model(sample, timestep, encoder_hidden_states, return_dict=False,
                                  down_block_additional_residuals=list(residuals[:-1]),
                                  mid_block_additional_residual=residuals[-1], **added)[0]
            return self.model(sample, timestep, encoder_hidden_states, return_dict=False, **added)[0]

    class ControlNet(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            # A ControlNet that pools (global_pool_conditions: shuffle's) is pooled here and each mean spread over its
            # residual's size, so that unet_control's inputs keep their shapes in every runtime (static plans, torch
            # programs, TensorRT profiles); diffusers' 1x1 means would only broadcast in some. A shallow copy runs
            # unpooled: the loaded model keeps its config.
            self.pooled = bool(model.config.global_pool_conditions)
            if self.pooled:
                model = copy.copy(model)
                model.register_to_config(global_pool_conditions=False)
            self.model = model

        def forward(self, sample, timestep, encoder_hidden_states, *rest):
            added = {}
            if self.model.config.addition_embed_type == "text_time":  # SDXL: the pooled text and the time ids first
                added, rest = {"added_cond_kwargs": {"text_embeds": rest[0], "time_ids": rest[1]}}, rest[2:]
            controlnet_cond, conditioning_scale = rest
            down, mid = self.model(sample, timestep, encoder_hidden_states, controlnet_cond, return_dict=False,
                                   **added)
            if self.pooled:
                down, mid = [d.mean(dim=(2, 3), keepdim=True).expand_as(d) for d in down], \
                    mid.mean(dim=(2, 3), keepdim=True).expand_as(mid)
            scale = conditioning_scale.reshape(-1, 1, 1, 1)  # per sample: requests with different scales share a batch
            return (*[d * scale for d in down], mid * scale)

    class VaeEncoder(Tiling):
        def forward(self, image):
            return self.model.encode(image).latent_dist.parameters

    class VaeDecoder(Tiling):
        def __init__(self, model, circular: bool = False):
            super().__init__(model, circular)
            self.scaling_factor = float(model.config.scaling_factor)  # from the checkpoint, not a constant here

        def forward(self, latent):
            return self.model.decode(latent / self.scaling_factor, return_dict=False)[0]

    second = getattr(loaded, "text_encoder_2", None)
    if second is not None:  # SDXL
        text_encoder = TextEncoderXL(second, loaded.text_encoder, pad_token_id(loaded.tokenizer_2))
    elif getattr(loaded, "family", "") == "sdxl-refiner":
        text_encoder = TextEncoderXL(loaded.text_encoder)
    else:
        text_encoder = TextEncoder(loaded.text_encoder)
    modules = {
        "text_encoder": text_encoder,
        "unet": UNet(loaded.unet), "unet_control": UNet(loaded.unet),
        "vae_encoder": VaeEncoder(loaded.vae), "vae_decoder": VaeDecoder(loaded.vae),
    }
    for index, control in enumerate(loaded.controlnets.values()):
        modules[controlnet_component(index)] = ControlNet(control)
    if getattr(loaded, "tiling", False):  # the seamless models: the same weights, circular padding
        modules |= {"unet" + TILING: UNet(loaded.unet, circular=True),
                    "vae_decoder" + TILING: VaeDecoder(loaded.vae, circular=True),
                    "vae_encoder" + TILING: VaeEncoder(loaded.vae, circular=True)}
    for index, extra in enumerate(getattr(loaded, "vaes", {}).values()):  # kiln.contract.ServedVAE's suffixes
        modules[f"vae_decoder_{index + 2}"], modules[f"vae_encoder_{index + 2}"] = \
            VaeDecoder(extra.model), VaeEncoder(extra.model)
    return {name: module.eval() for name, module in modules.items()}


def export_component(module, spec: ComponentSpec, path: Path, sizes: dict[str, int]) -> None:
    """ONNX export with every named axis dynamic (legacy exporter, opset 17; tiny components take seconds).

    A model past protobuf's 2 GB (the full-size UNet) keeps its weights in one `model.onnx.data`
    beside it; the exporter's own one-file-per-tensor output stays in a scratch folder.
    """
    import shutil
    import tempfile
    import warnings

    import onnx
    import torch

    sample = spec.sample_inputs(seed=0, **sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        exported = Path(scratch) / path.name
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.onnx.export(module, tuple(torch.from_numpy(sample[n]) for n in spec.input_names), str(exported),
                                  input_names=spec.input_names, output_names=spec.output_names,
                                  dynamic_axes=spec.dynamic_axes(), opset_version=spec.opset, dynamo=False)
        except Exception as exc:
            raise ExportError(f"ONNX export of {spec.name} failed: {exc}") from exc
        if len(list(Path(scratch).iterdir())) == 1:  # everything inline
            shutil.move(str(exported), path)
        else:
            model = onnx.load(str(exported))  # pulls the per-tensor files back in
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
            del model
    onnx.checker.check_model(str(path))


def check_component(module, spec: ComponentSpec, path: Path, sizes: dict[str, int], seed: int = 1,
                    variant: Variant = FP32) -> dict[str, parity.Parity]:
    """Run the artifact and PyTorch on the same fresh inputs; raise ParityError outside the variant's tolerance."""
    import torch

    inputs = spec.sample_inputs(seed=seed, **sizes)
    with torch.inference_mode():
        expected = module(*(torch.from_numpy(inputs[n]) for n in spec.input_names))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = open_session(variant, path).run(inputs, spec.output_names)
    figures = {name: parity.compare(ref.numpy(), got[name]) for name, ref in zip(spec.output_names, expected)}
    parity.check(f"{spec.name} ({spec.reference_output})", figures[spec.reference_output],
                 spec.tolerance(variant.tolerance_key))
    return figures
