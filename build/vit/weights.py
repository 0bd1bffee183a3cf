"""Loading ViT weights: a local timm/Hugging Face folder, a single .safetensors file, a hub id, or seeded random.

Only safetensors are read from disk: nothing here unpickles a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from build.vit.spec import VIT_MODEL_NAME
from kiln.errors import WeightsError, first_line

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LoadedWeights:
    """A model in eval mode and where its weights came from."""

    model: torch.nn.Module
    source: str  # what the user passed, or "random (seed N)"
    random: bool  # True when the weights are seeded random: outputs are meaningless
    labels: tuple[str, ...] | None = None  # the folder's label_names (one per class), when it has them
    images: tuple[Path, ...] = ()  # the images it was fine-tuned on (kiln finetune's training split), when known


# `kiln weights vit --tiny`: ViT-B/16's own class and depth (timm's VisionTransformer, 224 px, 16 px patches, 197
# tokens, 12 blocks, 1000 classes) 64 wide with 2 heads, where ViT-B/16 is 768 wide with 12: every variant builds in
# 8 s on 2 cores, against 51 s (the tests' ViT)
TINY_VIT_ARGS = {"embed_dim": 64, "num_heads": 2}


def create_vit(model_name: str = VIT_MODEL_NAME, model_args: dict | None = None, **kwargs) -> torch.nn.Module:
    """The real architecture from timm, no download (pretrained=False); `model_args` change its shape (depth,
    embed_dim, ...), as a timm folder's config.json says, and save_vit_checkpoint writes them back."""
    import timm

    model = timm.create_model(model_name, pretrained=False, **(model_args or {}), **kwargs)
    model.kiln_model_args = dict(model_args or {})
    return model


def load_vit(weights: str | Path | None = None, *, random_weights: bool = False, seed: int = 0,
             model_name: str = VIT_MODEL_NAME, model_args: dict | None = None) -> LoadedWeights:
    """Load `model_name` with weights from a folder, a .safetensors file or a hub id; or seeded random (of the shape
    `model_args` give: TINY_VIT_ARGS for the tiny one)."""
    if random_weights == (weights is not None):
        raise WeightsError("give exactly one of --weights PATH_OR_HUB_ID and --random-weights")
    if random_weights:
        import torch

        torch.manual_seed(seed)
        model = create_vit(model_name, model_args)
        return LoadedWeights(model.eval(), f"random (seed {seed})", True)

    path = Path(weights)
    if path.is_dir():
        model, labels = _from_folder(path, model_name)
        marker = path / RANDOM_MARKER  # seeded random weights written by `kiln weights vit`
        random = marker.exists() and json.loads(marker.read_text()).get("random") is True
        return LoadedWeights(model.eval(), str(weights), random, labels, training_images(path))
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: only .safetensors files are loaded (pickled checkpoints are never unpickled)")
        model = create_vit(model_name)
        _load_state(model, path)
    elif str(weights).count("/") == 1 and not str(weights).startswith((".", "/")):
        model = _from_hub(str(weights))
        names = model.pretrained_cfg.get("label_names")
        if isinstance(names, (list, tuple)) and len(names) == model.num_classes:
            return LoadedWeights(model.eval(), str(weights), False, tuple(str(n) for n in names))
    else:
        raise WeightsError(f"{weights}: no such file or folder, and not a hub id of the form owner/name")
    return LoadedWeights(model.eval(), str(weights), False)


RANDOM_MARKER = "kiln-weights.json"  # in a folder of seeded random weights, as `kiln weights sd` writes one too


def write_random_vit(out: Path, seed: int = 0, tiny: bool = False) -> Path:
    """A timm-style folder of seeded random weights (`kiln weights vit --random OUT`): ViT-B/16, or its architecture
    at TINY_VIT_ARGS' size; kiln-weights.json says they are random, so a build warns and its report says so."""
    model_args = TINY_VIT_ARGS if tiny else None
    out = save_vit_checkpoint(load_vit(random_weights=True, seed=seed, model_args=model_args).model, out)
    (out / RANDOM_MARKER).write_text(json.dumps(
        {"random": True, "seed": seed, "model_args": model_args or {},
         "note": "seeded random weights of the real architecture: labels and scores are meaningless"}, indent=2))
    return out


def _from_folder(folder: Path, default_model_name: str) -> tuple[torch.nn.Module, tuple[str, ...] | None]:
    """A timm hub-style folder: model.safetensors, plus config.json naming the architecture (and its labels)."""
    checkpoint = folder / "model.safetensors"
    if not checkpoint.exists():
        found = sorted(p.name for p in folder.iterdir())
        raise WeightsError(f"{folder}: no model.safetensors (found: {', '.join(found) or 'nothing'})")
    kwargs, model_args = {}, None
    labels = None
    architecture = default_model_name
    config_path = folder / "config.json"
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{config_path}: not valid JSON ({exc})") from None
        architecture = config.get("architecture", default_model_name)
        if "num_classes" in config:
            kwargs["num_classes"] = int(config["num_classes"])
        if isinstance(config.get("model_args"), dict):  # timm's save_for_hf: arguments the model was made with
            model_args = config["model_args"]
        labels = _label_names(config, config_path)
        if isinstance(config.get("pretrained_cfg"), dict):
            # The folder's preprocessing (mean, std, crop) wins over timm's defaults for the architecture.
            kwargs["pretrained_cfg_overlay"] = config["pretrained_cfg"]
    try:
        model = create_vit(architecture, model_args, **kwargs)
    except RuntimeError as exc:  # timm: unknown model
        raise WeightsError(f"{config_path}: architecture {architecture!r} is not a timm model: {exc}") from None
    except TypeError as exc:  # an argument the architecture does not take
        raise WeightsError(f"{config_path}: model_args {model_args} do not fit {architecture!r}: {exc}") from None
    _load_state(model, checkpoint)
    if labels is not None and len(labels) != model.num_classes:
        raise WeightsError(f"{config_path}: {len(labels)} label_names for a model with {model.num_classes} classes")
    return model, labels


def _label_names(config: dict, config_path: Path) -> tuple[str, ...] | None:
    """timm's label_names (top level, or in pretrained_cfg): a list, or a dict of index -> name without gaps."""
    names = config.get("label_names", (config.get("pretrained_cfg") or {}).get("label_names"))
    if names is None:
        return None
    if isinstance(names, dict):
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except ValueError:
            raise WeightsError(f"{config_path}: label_names keys must be class indices") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WeightsError(f"{config_path}: label_names must be a list of strings")
    # timm's ImageNet folders name classes by synset (n01440764) and describe them in label_descriptions: serve the
    # descriptions ("tench, Tinca tinca"), as the stock build does
    descriptions = config.get("label_descriptions", (config.get("pretrained_cfg") or {}).get("label_descriptions"))
    if isinstance(descriptions, dict):
        names = [str(descriptions.get(name, name)) for name in names]
    return tuple(names)


def training_images(folder: Path) -> tuple[Path, ...]:
    """The training split kiln finetune recorded in the folder (split.json), those of its images that still exist."""
    split = folder / "split.json"
    if not split.exists():
        return ()
    try:
        train = json.loads(split.read_text())["train"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise WeightsError(f"{split}: not the split kiln finetune writes") from None
    return tuple(p for p in (Path(entry["path"]) for entry in train) if p.exists())


def _load_state(model: torch.nn.Module, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(checkpoint))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
        raise WeightsError(f"{checkpoint}: not a readable safetensors file ({exc})") from None
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape (another width than config.json says)
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise WeightsError(f"{checkpoint} does not fit {type(model).__name__}: "
                           f"{lines[0] if lines else first_line(exc)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{checkpoint} does not fit {type(model).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def _from_hub(hub_id: str) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(f"hf-hub:{hub_id}", pretrained=True)
    except Exception as exc:  # noqa: BLE001 - no network, unknown repo, gated repo: all surface as different types
        raise WeightsError(
            f"cannot fetch {hub_id!r} from the Hugging Face hub ({type(exc).__name__}: {first_line(exc)}); "
            "without network access, pass a local folder or .safetensors file with --weights") from None


def save_state_dict(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def save_vit_checkpoint(model: torch.nn.Module, folder: Path, model_name: str = VIT_MODEL_NAME,
                        labels: list[str] | None = None) -> Path:
    """Write a timm hub-style folder (model.safetensors + config.json, with label_names) that `load_vit` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(model, folder / "model.safetensors")
    architecture = model_name.split(".")[0]
    config = {"architecture": architecture, "num_classes": int(model.num_classes),
              "pretrained_cfg": {k: v for k, v in dict(model.pretrained_cfg).items() if _is_json(v)}}
    config["pretrained_cfg"]["num_classes"] = int(model.num_classes)
    if getattr(model, "kiln_model_args", None):  # the shape it was made with (create_vit), as timm writes it
        config["model_args"] = dict(model.kiln_model_args)
    if labels is not None:
        config["label_names"] = list(labels)
        config["pretrained_cfg"].pop("label_names", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _is_json(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False
