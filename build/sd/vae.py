"""More VAEs for one build: AUTOMATIC1111's VAE choice (`sd_vae`), each VAE compiled and checked like the
checkpoint's own.

`kiln build sd --vae PATH` (repeatable, `NAME=PATH` to name one): a `.safetensors` file in the original (LDM)
layout, as AUTOMATIC1111's models/VAE holds (vae-ft-mse-840000-ema-pruned.safetensors; keys encoder.*, decoder.*,
quant_conv, post_quant_conv, optionally under first_stage_model.), a diffusers AutoencoderKL folder (config.json +
weights), or a folder of such files (AUTOMATIC1111's VAE folder: each file one VAE). A VAE's name is its file's name
(what AUTOMATIC1111 lists and `sd_vae` takes) or the folder's. Its architecture must be the checkpoint's VAE's: an
original-layout file is read into that architecture, and a missing or unexpected tensor is an error naming it.

Each extra VAE k (2, 3, ...) is served as sd_vae_decoder_k and sd_vae_encoder_k, with the ensembles sd_vae_decode_k
and sd_vae_encode_k; the contract lists them (kiln.contract.ServedVAE).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from build.sd.weights import named_paths
from kiln.errors import WeightsError, first_line

VAE_NAME = re.compile(r"^[\w.+ ()\[\]-]{1,96}$")
_SKIPPED = ("loss.", "model_ema.")  # training leftovers some VAE files carry


@dataclass
class ExtraVAE:
    model: object  # a diffusers AutoencoderKL, eval mode
    source: str  # where it was read from
    sha256: str  # of its file (AUTOMATIC1111's "VAE hash" is the first 10 digits)


def vae_sources(specs) -> dict[str, Path]:
    """`--vae` values (PATH or NAME=PATH) as {name: path}, a folder of files expanded to its files."""
    sources: dict[str, Path] = {}
    for text, name, path in named_paths(specs):
        if not path.exists():
            raise WeightsError(f"--vae {text}: no such file or folder")
        if path.is_dir() and not (path / "config.json").exists():
            found = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
            if not found:
                raise WeightsError(f"--vae {text}: a folder with neither config.json (diffusers) nor .safetensors "
                                   "files")
            if name:
                raise WeightsError(f"--vae {text}: a folder of VAE files takes no NAME (each is named by its file)")
            entries = [(p.name, p) for p in found]
        else:
            entries = [(name or path.name, path)]
        for label, where in entries:
            if not VAE_NAME.match(label) or label in ("Automatic", "None"):
                raise WeightsError(f"--vae {text}: {label!r} is no VAE name (1-96 letters, digits, space, _ . + - ( ) "
                                   "[ ]; not Automatic or None)")
            if label in sources:
                raise WeightsError(f"--vae {text}: two VAEs named {label!r}; name them with NAME=PATH")
            sources[label] = where
    return sources


def vae_ldm_state_dict(vae) -> dict:
    """A diffusers AutoencoderKL's tensors in the original layout (shared, not copied)."""
    from build.sd.single_file import vae_key

    out = {}
    for name, tensor in vae.state_dict().items():
        key, is_projection = vae_key(name, len(vae.config.up_block_types))
        out[key] = tensor[:, :, None, None] if is_projection and tensor.ndim == 2 else tensor
    return out


def load_vae(path: Path, base) -> ExtraVAE:
    """One VAE, in the architecture of `base` (the checkpoint's AutoencoderKL)."""
    from diffusers import AutoencoderKL

    from build import report
    from build.sd.single_file import vae_key

    path = Path(path)
    if path.is_dir():
        try:
            model = AutoencoderKL.from_pretrained(str(path), use_safetensors=True)
        except Exception as exc:  # noqa: BLE001 - diffusers raises OSError/ValueError variants
            raise WeightsError(f"--vae {path}: not a diffusers AutoencoderKL folder: {first_line(exc)}") from None
        public = [{k: v for k, v in config.items() if not k.startswith("_")} for config in (model.config, base.config)]
        if public[0] != public[1]:
            raise WeightsError(f"--vae {path}: its config is not the checkpoint's VAE's (architecture and scaling "
                               "factor must agree)")
        weights = next((p for p in sorted(path.glob("*.safetensors"))), None)
        digest = report.sha256(weights) if weights else ""
    else:
        if path.suffix != ".safetensors":
            raise WeightsError(f"--vae {path}: kiln reads .safetensors VAE files only (pickled .pt/.ckpt files can "
                               "run code when loaded; convert them)")
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the library raises its own and plain errors for a bad file
            raise WeightsError(f"--vae {path}: not a readable .safetensors file: {first_line(exc)}") from None
        tensors = {k.removeprefix("first_stage_model."): v for k, v in tensors.items() if not k.startswith(_SKIPPED)}
        model = AutoencoderKL.from_config(base.config)
        state = {}
        for name, reference in model.state_dict().items():
            key, is_projection = vae_key(name, len(model.config.up_block_types))
            if key not in tensors:
                raise WeightsError(f"--vae {path}: no {key} (is it an SD 1.x VAE in the original layout?)")
            tensor = tensors.pop(key)
            state[name] = tensor[:, :, 0, 0] if is_projection and tensor.ndim == 4 and reference.ndim == 2 else tensor
            if tuple(state[name].shape) != tuple(reference.shape):
                raise WeightsError(f"--vae {path}: {key} is {tuple(state[name].shape)}, the checkpoint's VAE has "
                                   f"{tuple(reference.shape)}")
        if tensors:
            raise WeightsError(f"--vae {path}: tensors no SD 1.x VAE has: {', '.join(sorted(tensors)[:3])}")
        model.load_state_dict({k: v.float() for k, v in state.items()})
        digest = report.sha256(path)
    return ExtraVAE(model.float().eval(), str(path), digest)


def random_vae(size: str = "tiny", seed: int = 7):
    """A seeded random AutoencoderKL of the `size` architecture (build.sd.weights)."""
    import torch
    from diffusers import AutoencoderKL

    from build.sd.families import ARCHITECTURES

    torch.manual_seed(seed)
    return AutoencoderKL(**ARCHITECTURES[size].vae).eval()


def write_vae_file(vae, out: Path) -> Path:
    """A VAE as AUTOMATIC1111's VAE files are: original layout, one .safetensors."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise WeightsError(f"{out}: a VAE file's name must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae_ldm_state_dict(vae).items()}, str(out))
    return out
