"""What `vit_classify` answers with: the model's own label names, ImageNet's for a 1000-class head, or class_N."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Labels:
    names: tuple[str, ...]
    source: str  # "weights" (the folder's label_names), "imagenet-1k" or "index"


def class_labels(names: tuple[str, ...] | None, classes: int, log: Callable[[str], None] = print) -> Labels:
    """The folder's names when it has them; a 1000-class head without them is ImageNet-1k's; otherwise class_N."""
    if names is not None:
        return Labels(tuple(names), "weights")
    if classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return Labels(tuple(info.index_to_description(i) for i in range(info.num_classes())), "imagenet-1k")
    log(f"!! the weights name none of their {classes} classes (no label_names in config.json): "
        "serving class_0, class_1, ...")
    return Labels(tuple(f"class_{i}" for i in range(classes)), "index")


def write_labels(path: Path, names: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(names)))
