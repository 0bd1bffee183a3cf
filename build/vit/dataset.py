"""The images `kiln finetune vit` learns from: a class-folder tree or a CSV of path,label, checked and split.

Every image is opened before training starts: unreadable ones are skipped and counted (up to a limit),
an empty class or a single class is refused by name, and the train/validation split is stratified and
seeded, written to split.json so the build calibrates int8 on the same training images.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.errors import ConfigError
from kiln.paths import IMAGE_SUFFIXES, SAMPLE_IMAGES


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class Split:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of the unreadable images

    def as_dict(self) -> dict:
        def entries(samples):
            return [{"path": str(s.path), "label": self.classes[s.label]} for s in samples]

        return {"classes": self.classes, "train": entries(self.train), "val": entries(self.val),
                "skipped": [{"path": p, "why": why} for p, why in self.skipped]}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=1))


def read_labelled(data: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """(class names in index order, (image, class) pairs) of a class-folder tree or a CSV of path,label."""
    data = Path(data).resolve()  # split.json records absolute paths: the build reads them from anywhere
    if data.is_file() and data.suffix.lower() == ".csv":
        return _from_csv(data)
    if not data.is_dir():
        raise ConfigError(f"{data}: neither a folder of class folders nor a .csv of path,label")
    folders = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConfigError(f"{data}: no class folders (put each class's images in a sub-folder named after it)")
    pairs = []
    for folder in folders:
        images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ConfigError(f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        pairs += [(p, folder.name) for p in images]
    return [f.name for f in folders], pairs


def _from_csv(path: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    pairs = []
    with path.open(newline="") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if not row or row[0].startswith("#") or (number == 1 and [c.strip().lower() for c in row] == ["path",
                                                                                                        "label"]):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise ConfigError(f"{path}:{number}: expected two columns, path,label; got {row}")
            image = Path(row[0].strip())
            pairs.append((image if image.is_absolute() else path.parent / image, row[1].strip()))
    if not pairs:
        raise ConfigError(f"{path}: no rows of path,label")
    return sorted({label for _, label in pairs}), pairs


def check_images(pairs: list[tuple[Path, str]], max_bad: float,
                 progress: Callable | None = None) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Open every image; skip and count those that cannot be read, refusing when more than `max_bad` of them fail."""
    from PIL import Image, UnidentifiedImageError

    good, bad = [], []
    for path, label in (progress(pairs) if progress else pairs):
        try:
            with Image.open(path) as image:
                image.verify()
            good.append((path, label))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            bad.append((str(path), f"{type(exc).__name__}: {exc}"))
    limit = int(max_bad * len(pairs))
    if len(bad) > limit:
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:3])
        raise ConfigError(f"{len(bad)} of {len(pairs)} images cannot be read, more than --max-bad-images "
                          f"{max_bad:g} allows ({limit}): {shown}")
    return good, bad


def split(classes: list[str], pairs: list[tuple[Path, str]], val_fraction: float, seed: int,
          skipped: list[tuple[str, str]] | None = None) -> Split:
    """A stratified, seeded split: each class gives round(n * val_fraction) images (at least one) to validation."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if len(classes) < 2:
        raise ConfigError(f"one class only ({', '.join(classes) or 'none'}): a classifier needs at least two")
    rng = np.random.default_rng(seed)
    index = {name: i for i, name in enumerate(classes)}
    train, val = [], []
    for name in classes:
        members = [Sample(p, index[name]) for p, label in pairs if label == name]
        if len(members) < 2:
            raise ConfigError(f"class {name!r} has {len(members)} readable image(s); each class needs at least two "
                              "(one to train on, one to validate)")
        order = rng.permutation(len(members))
        held = max(1, round(len(members) * val_fraction))
        val += [members[i] for i in order[:held]]
        train += [members[i] for i in order[held:]]
    return Split(classes, train, val, skipped or [])


# -- an example dataset (the README's walk-through and the tests) ---------------------------------------------------
EXAMPLE_CLASSES = {
    "warm": (1.0, 0.55, 0.35),  # the photographs tinted towards red
    "cool": (0.35, 0.6, 1.0),  # towards blue
    "gray": None,  # without colour
}


def write_example_dataset(out: Path, per_class: int = 12, seed: int = 0, size: int = 160) -> Path:
    """Three classes made from the shipped photographs by distinct transforms (random crops of each, then tinted warm,
    tinted cool, or made gray): a small labelled folder to fine-tune on without anyone's data."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted(SAMPLE_IMAGES.iterdir())
              if p.suffix.lower() in IMAGE_SUFFIXES]
    for name, tint in EXAMPLE_CLASSES.items():
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo = photos[int(rng.integers(len(photos)))]
            w, h = photo.size
            side = int(min(w, h) * rng.uniform(0.5, 1.0))
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            view = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
            if tint is None:
                view = view.convert("L").convert("RGB")
            else:
                view = Image.fromarray((np.asarray(view, np.float32) * np.array(tint)).clip(0, 255).astype(np.uint8))
            view.save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return Path(out)
