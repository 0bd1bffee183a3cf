"""The PyTorch side of the ViT build: the exported graph, PyTorch's reference outputs, ONNX/TorchScript/SafeTensors.

Kept apart from the build so that importing the spec, the variants or the configs (the command
line, the clients) does not import torch.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from build import parity, report
from build.specs import ComponentSpec
from build.vit.spec import VIT_SPEC
from kiln.errors import ExportError


class ViTExport(torch.nn.Module):
    """The served graph: logits, pooled CLS features and the tokens of a chosen block, in one pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, layer: torch.Tensor):
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixel_values))))
        per_block = []
        for block in m.blocks:
            x = block(x)
            per_block.append(x)
        stacked = torch.stack(per_block, dim=1)  # (B, blocks, tokens, dim)
        index = layer.reshape(-1, 1, 1, 1).expand(-1, 1, stacked.shape[2], stacked.shape[3])
        tokens = torch.gather(stacked, 1, index)[:, 0]  # indexing, not squeeze(): no If node in the graph
        pooled = m.forward_head(m.norm(x), pre_logits=True)
        return m.head(pooled), pooled, tokens


def reference_outputs(model: torch.nn.Module, pixel_values: np.ndarray, layer: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch's own answers, computed with timm's public API (not with ViTExport)."""
    with torch.inference_mode():
        x = torch.from_numpy(pixel_values)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
        _, intermediates = model.forward_intermediates(x, indices=list(range(len(model.blocks))), norm=False,
                                                       output_fmt="NLC", return_prefix_tokens=True)
        tokens = np.stack([
            torch.cat([intermediates[int(block)][1][i], intermediates[int(block)][0][i]], dim=0).numpy()
            for i, block in enumerate(layer[:, 0])
        ])
    return {"logits": logits.numpy(), "pooled": pooled.numpy(), "tokens": tokens}


def export_onnx(model: torch.nn.Module, path: Path, spec: ComponentSpec = VIT_SPEC) -> None:
    sample = spec.sample_inputs(seed=0, batch=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ViTExport(model).eval()
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper,
                tuple(torch.from_numpy(sample[name]) for name in spec.input_names),
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=spec.opset,
                dynamo=False,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export of {spec.name} failed: {exc}") from exc
    import onnx

    onnx.checker.check_model(str(path))


def export_safetensors(model, path: Path, artifacts: dict, repository: Path) -> None:
    from build.vit.weights import save_state_dict

    start = time.perf_counter()
    save_state_dict(model, path)
    artifacts["safetensors"] = {"file": str(path.relative_to(repository)), "runtime": "torch", "precision": "fp32",
                                "size_bytes": path.stat().st_size, "sha256": report.sha256(path),
                                "build_seconds": round(time.perf_counter() - start, 2),
                                "parity": "bit-exact state dict of the PyTorch model"}


def export_torchscript(model, path: Path, pixels, layers, reference, artifacts: dict, repository: Path,
                       spec: ComponentSpec = VIT_SPEC) -> None:
    start = time.perf_counter()
    wrapper = ViTExport(model).eval()
    with torch.inference_mode():
        traced = torch.jit.trace(wrapper, (torch.from_numpy(pixels[:2]), torch.from_numpy(layers[:2])),
                                 check_trace=False)
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    with torch.inference_mode():
        outs = [o.numpy() for o in loaded(torch.from_numpy(pixels), torch.from_numpy(layers))]
    figures = parity.compare_outputs(reference, dict(zip(spec.output_names, outs)), classify={"logits"})
    try:
        parity.check("torchscript (logits)", figures["logits"], spec.tolerance("fp32"))
    except Exception:
        path.unlink(missing_ok=True)
        raise
    artifacts["torchscript"] = {"file": str(path.relative_to(repository)), "runtime": "torch", "precision": "fp32",
                                "size_bytes": path.stat().st_size, "sha256": report.sha256(path),
                                "build_seconds": round(time.perf_counter() - start, 2),
                                "parity": {name: fig.as_dict() for name, fig in figures.items()}}
