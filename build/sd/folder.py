"""A checkpoints folder as AUTOMATIC1111's models/Stable-diffusion: every checkpoint in it built into the repository
as its own named checkpoint (`kiln build sd --checkpoint NAME`), or reused when its build is of the same file.

`kiln serve --checkpoints DIR` runs `sync_checkpoints` before Triton starts. An entry is a single-file checkpoint
(`.safetensors`, SD 1.x or 2.x, the family's released architecture) or a diffusers-format folder; its name is its
file's stem (or folder's name) made a valid checkpoint name. A build records the entry's fingerprint (size and
modification time of its files) in its report section; an entry whose fingerprint matches is not built again.
An entry that cannot be built is reported and skipped: the others are still built and served.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from build import report
from build.sd.specs import ImageRange
from kiln.contract import SD_UNET, SDModels, check_checkpoint_name
from kiln.errors import KilnError

PICKLES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Synced:
    name: str  # the checkpoint's name: what requests give as sd_model_checkpoint
    source: Path
    status: str  # built, reused, skipped
    reason: str = ""  # why it was skipped


def checkpoint_name(path: Path) -> str:
    """A folder entry's checkpoint name: its stem with every other character a hyphen, hyphens never doubled."""
    stem = path.stem if path.is_file() else path.name
    name = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.+-]", "-", stem)).strip("-.+_")[:64].rstrip("-")
    return check_checkpoint_name(name or "checkpoint")


def fingerprint(path: Path) -> dict:
    """What changes when a checkpoint's files change: their count, total size and latest modification time."""
    files = [path] if path.is_file() else [f for f in sorted(path.rglob("*")) if f.is_file()]
    stats = [f.stat() for f in files]
    return {"files": len(stats), "bytes": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def entries(folder: Path) -> list[tuple[Path, str]]:
    """The folder's checkpoints, and the entries it cannot serve with the reason."""
    found = []
    for entry in sorted(Path(folder).iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.append((entry, "" if (entry / "model_index.json").is_file()
                          else "a folder without model_index.json (not a diffusers-format checkpoint)"))
        elif entry.suffix.lower() == ".safetensors":
            found.append((entry, ""))
        elif entry.suffix.lower() in PICKLES:
            found.append((entry, f"pickle checkpoints ({entry.suffix}) can run code when loaded; convert it to "
                                 ".safetensors"))
    return found


def sync_checkpoints(folder: Path, repository: Path, images: ImageRange = ImageRange(),
                     log: Callable[[str], None] = print, **build_options) -> list[Synced]:
    """Build every checkpoint of `folder` not yet built from the same files into `repository`."""
    from build.sd.build import SDBuildOptions, build_sd

    if not Path(folder).is_dir():
        raise KilnError(f"--checkpoints {folder}: no such folder")
    done: list[Synced] = []
    names: dict[str, Path] = {}
    for path, problem in entries(folder):
        name = checkpoint_name(path)
        if not problem and name in names:
            problem = f"its name {name!r} is also {names[name].name}'s; rename one"
        if problem:
            log(f"checkpoints: skipped {path.name}: {problem}")
            done.append(Synced(name, path, "skipped", problem))
            continue
        names[name] = path
        models = SDModels(name)
        section = report.read_report(repository).get(models.report_section, {})
        mark = fingerprint(path)
        built = (Path(repository) / models(SD_UNET) / "config.pbtxt").is_file()
        if built and section.get("source_fingerprint") == mark:
            done.append(Synced(name, path, "reused"))
            continue
        log(f"checkpoints: building {path.name} as {name!r} ...")
        try:
            content = build_sd(SDBuildOptions(weights=str(path), repository=Path(repository), checkpoint=name,
                                              images=images, **build_options), log=log)
        except KilnError as exc:
            for partial in Path(repository).glob(models("*")):  # never a half-written build for Triton to load
                shutil.rmtree(partial, ignore_errors=True)
            log(f"checkpoints: skipped {path.name}: {exc}")
            done.append(Synced(name, path, "skipped", str(exc)))
            continue
        report.update_report(repository, models.report_section, content | {"source_fingerprint": mark})
        done.append(Synced(name, path, "built"))
    return done
