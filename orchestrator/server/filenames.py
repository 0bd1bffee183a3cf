"""AUTOMATIC1111's file names for saved images (Settings > Saving images): samples_filename_pattern's [tags]
(images.FilenameGenerator), save_to_dirs with directories_filename_pattern (a folder per date by default), the
sequence number (save_images_add_number) and grid_extended_filename, as its save_image applies them. Its defaults
give outputs/txt2img-images/<date>/<number>-<seed>.png and outputs/txt2img-grids/<date>/grid-<number>.png."""

from __future__ import annotations

import hashlib
import os
import re
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from kiln.errors import InputError

# Settings -> Naming's fields, with AUTOMATIC1111's defaults (Naming's)
NAMING_SETTINGS = {"samples_filename_pattern": "pattern", "save_to_dirs": "to_dirs",
                   "directories_filename_pattern": "dirs_pattern", "grid_save_to_dirs": "grid_to_dirs",
                   "grid_extended_filename": "grid_extended", "save_images_add_number": "add_number",
                   "directories_max_prompt_words": "prompt_words"}
_PATTERN = re.compile(r"(.*?)(?:\[([^\[\]]+)\]|$)")  # text, then a [tag] (or the end)
_ARGUMENT = re.compile(r"(.*)<([^>]*)>$")  # a tag's last <argument>
_NONLETTERS = re.compile(rf"[\s{re.escape(string.punctuation)}]+")
_SKIP = object()  # a tag with nothing to say here: it and the text before it are left out
_UNSAFE = '#<>:"/\\|?*\n\r\t'  # (AUTOMATIC1111's invalid_filename_chars; other control characters too, here)
_TAG = re.compile(r"\[[^\[\]]+\]")
_MOST = 255  # bytes in one name (a file's or a folder's), as Linux's file systems take them
_DEEPEST = 2048  # bytes of the folders a pattern makes below the outputs folder


@dataclass(frozen=True)
class Naming:
    """How saved files are named: AUTOMATIC1111's settings (NAMING_SETTINGS), defaults as its."""

    pattern: str = ""  # samples_filename_pattern ("": [seed] in a folder per date, [seed]-[prompt_spaces] without)
    to_dirs: bool = True  # save_to_dirs: images in a folder named by dirs_pattern
    dirs_pattern: str = "[date]"  # directories_filename_pattern ("": [prompt_words])
    grid_to_dirs: bool = True  # grid_save_to_dirs
    grid_extended: bool = False  # grid_extended_filename: a grid's name has the pattern too
    add_number: bool = True  # save_images_add_number: the sequence number first (off: the pattern alone)
    prompt_words: int = 8  # directories_max_prompt_words: [prompt_words]'s

    @classmethod
    def of(cls, settings: dict) -> Naming:
        return cls(**{name: settings[key] for key, name in NAMING_SETTINGS.items() if key in settings})


@dataclass(frozen=True)
class Picture:
    """What a name's tags read of one saved picture: its generation info, its pixels, and its job's (all its
    seeds, batch size, runs, position in the job, styles (name and prompt), schedule type, caller, start)."""

    info: dict
    image: np.ndarray
    seeds: tuple = ()
    batch_size: int = 1
    n_iter: int = 1
    index: int = 0
    styles: tuple[tuple[str, str], ...] = ()
    sampler: str = ""  # as the request named it (sampler_name)
    scheduler: str = "Automatic"  # the schedule type it ran (Automatic: the sampler's own)
    user: str | None = None  # the Basic-auth user (None: an API key's or no one's, as AUTOMATIC1111's API has none)
    started: float = field(default_factory=time.time)
    basename: str = ""  # the file's (grid, xyz_grid, ...)


def sanitized(text: Any, replace_spaces: bool = True) -> str:
    """A tag's value as part of a file name (AUTOMATIC1111's sanitize_filename_part): no path separators or other
    characters a file system refuses, no leading space, no trailing space or dot, at most 128 characters."""
    text = str(text)
    text = text.replace(" ", "_") if replace_spaces else text
    text = "".join("_" if c in _UNSAFE or ord(c) < 32 or 0xD800 <= ord(c) < 0xE000 else c for c in text)  # (and
    # a lone surrogate, which JSON can carry and no file system takes)
    return text.lstrip(" ")[:128].rstrip(" .")


def _words(picture: Picture, naming: Naming) -> str:
    words = [w for w in _NONLETTERS.split(picture.info.get("prompt") or "") if w] or ["empty"]
    return " ".join(words[:naming.prompt_words])


def _datetime(picture: Picture, naming: Naming, form: str = "", zone: str = "") -> str:
    moment = datetime.now().astimezone()
    try:
        moment = moment.astimezone(ZoneInfo(zone)) if zone else moment
    except (ZoneInfoNotFoundError, ValueError, OSError):  # (an unknown zone, or a folder's name: local time, as there)
        pass
    try:
        return moment.strftime(form or "%Y%m%d%H%M%S")
    except ValueError:
        return moment.strftime("%Y%m%d%H%M%S")


def _unstyled(picture: Picture, naming: Naming) -> str:
    """[prompt_no_styles]: the prompt with its styles' text taken out, as AUTOMATIC1111 takes it out."""
    prompt = picture.info.get("prompt") or ""
    for style in (text for _, text in picture.styles if text):
        for part in style.split("{prompt}"):
            prompt = prompt.replace(part, "").replace(", ,", ",").strip().strip(",")
        prompt = prompt.replace(style, "").strip().strip(",").strip()
    return prompt


def _hasprompt(picture: Picture, naming: Naming, *wanted: str) -> str:
    """[hasprompt<word|otherwise>...]: each word the prompt has, else its otherwise."""
    prompt, out = (picture.info.get("prompt") or "").lower(), ""
    for argument in filter(None, wanted):
        word, *others = argument.split("|")
        out += word.lower() if word.lower() in prompt else (others[0] if others else "")
    return sanitized(out)


def _hash(text: str, length: str = "") -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:int(length) if length.isdecimal() else 8]


def _numbered(picture: Picture) -> Any:
    return _SKIP if picture.n_iter * picture.batch_size == 1 else picture.index + 1


# AUTOMATIC1111 1.10's tags (FilenameGenerator.replacements); None: left as written, as there
TAGS: dict[str, Callable[..., Any]] = {
    "seed": lambda p, n: p.info.get("seed", ""),
    "seed_first": lambda p, n: p.seeds[0] if p.batch_size > 1 and p.seeds else p.info.get("seed"),
    "seed_last": lambda p, n: _SKIP if p.batch_size == 1 or not p.seeds else p.seeds[-1],
    "steps": lambda p, n: p.info.get("steps"),
    "cfg": lambda p, n: p.info.get("cfg_scale"),
    "width": lambda p, n: p.image.shape[1],
    "height": lambda p, n: p.image.shape[0],
    "styles": lambda p, n: ", ".join(name for name, _ in p.styles if name != "None") or "None",
    "sampler": lambda p, n: p.sampler or p.info.get("sampler"),
    "scheduler": lambda p, n: p.scheduler.capitalize(),
    "sampler_scheduler": lambda p, n: f"{p.sampler or p.info.get('sampler')}_{p.scheduler.capitalize()}",
    "basename": lambda p, n: p.basename,
    "model_hash": lambda p, n: p.info.get("model_hash"),
    "model_name": lambda p, n: p.info.get("model"),
    "date": lambda p, n: time.strftime("%Y-%m-%d"),
    "datetime": _datetime,
    "job_timestamp": lambda p, n: time.strftime("%Y%m%d%H%M%S", time.localtime(p.started)),
    "prompt_hash": lambda p, n, *length: _hash(p.info.get("prompt") or "", *length),
    "negative_prompt_hash": lambda p, n, *length: _hash(p.info.get("negative_prompt") or "", *length),
    "full_prompt_hash": lambda p, n, *length: _hash(f"{p.info.get('prompt') or ''} "
                                                    f"{p.info.get('negative_prompt') or ''}", *length),
    "prompt": lambda p, n: sanitized(p.info.get("prompt") or ""),
    "prompt_no_styles": _unstyled,
    "prompt_spaces": lambda p, n: p.info.get("prompt") or "",
    "prompt_words": _words,
    "batch_number": lambda p, n: _SKIP if p.batch_size == 1 else p.index % p.batch_size + 1,
    "batch_size": lambda p, n: p.batch_size,
    "generation_number": lambda p, n: _numbered(p),
    "hasprompt": _hasprompt,
    "clip_skip": lambda p, n: p.info.get("clip_skip") or 1,
    "denoising": lambda p, n: p.info.get("denoising_strength") or _SKIP,
    "user": lambda p, n: p.user,
    "vae_filename": lambda p, n: Path(p.info["vae"]).stem if p.info.get("vae") else "NoneType",
    "none": lambda p, n: "",
    "image_hash": lambda p, n, length="": hashlib.sha256(np.ascontiguousarray(p.image).tobytes()).hexdigest()[
        :int(length) if length.isdecimal() else None],
}


def applied(pattern: str, picture: Picture, naming: Naming) -> str:
    """A pattern with its [tags] replaced (AUTOMATIC1111's FilenameGenerator.apply): each value sanitized; a tag it
    does not know, or one without a value here, left as written; one with nothing to say (a batch number in a batch
    of one) left out with the text before it."""
    out = ""
    for match in _PATTERN.finditer(pattern):
        text, tag = match.groups()
        if tag is None:
            out += text
            continue
        name, arguments = tag, []
        while (argument := _ARGUMENT.match(name)) is not None:
            name, value = argument.groups()
            arguments.insert(0, value)
        make = TAGS.get(name.lower())
        value = None
        if make is not None:
            try:
                value = make(picture, naming, *arguments)
            except (TypeError, ValueError, KeyError, IndexError):  # (a tag given arguments it takes none of)
                value = None
        if value is _SKIP:
            continue
        out += text + sanitized(value if value is not None else f"[{name}]", replace_spaces=False)
    return out


def saved_path(folder: Path, basename: str, picture: Picture, naming: Naming, extension: str, *, grid: bool = False,
               short: bool = False, suffix: str = "") -> Path:
    """Where AUTOMATIC1111's save_image writes a picture under `folder` (its outpath): in the folder
    directories_filename_pattern names (save_to_dirs; grid_save_to_dirs for a grid), as
    [<basename>-]<number><-pattern><suffix>.<extension>, the number one past the highest there (five digits, four
    after a basename), or the pattern alone without save_images_add_number; `short`: no pattern (a grid's
    without grid_extended_filename). The caller holds the numbering lock."""
    picture = replace(picture, basename=basename)
    if naming.grid_to_dirs if grid else naming.to_dirs:
        named = applied(naming.dirs_pattern or "[prompt_words]", picture, naming).lstrip(" ").rstrip("\\ /")
        # each folder's name as a name (never . or .., never empty), so it stays under `folder` whatever the tags say
        parts = [_cut(part.strip(" "), _MOST) for part in re.split(r"[\\/]", named)]
        parts = [part for part in parts if part.strip(".")]
        while len("/".join(parts).encode()) > _DEEPEST:  # (a path has at most 4096 bytes: the deepest are left out)
            parts.pop()
        folder = folder.joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    pattern = "" if short else naming.pattern or ("[seed]" if naming.to_dirs else "[seed]-[prompt_spaces]")
    # (the name is a name, whatever the pattern's text and its tags made: no folder in it)
    made = re.sub(r"[\\/\x00]", "_", applied(pattern, picture, naming))
    numbered = naming.add_number or not (made + suffix)  # (as there: decided on the name the tags made)
    if not numbered:
        return folder / f"{_cut(made, _MOST - len(suffix.encode()) - 6)}{suffix}.{extension}"
    number = _next_number(folder, basename)
    stem = f"{number:05d}" if not basename else f"{basename}-{number:04d}"
    room = _MOST - len(stem.encode()) - len(suffix.encode()) - 1 - 7  # (the dash, .<extension> or .txt, a digit more)
    decoration = _cut(made, room) + suffix
    decoration = f"-{decoration}" if decoration else ""
    for offset in range(500):  # (as there: past a name that is taken)
        stem = f"{number + offset:05d}" if not basename else f"{basename}-{number + offset:04d}"
        path = folder / f"{stem}{decoration}.{extension}"
        if not path.exists():
            break
    return path


def _next_number(folder: Path, basename: str) -> int:
    """AUTOMATIC1111's get_next_sequence_number: one past the highest number that a file's name there starts with
    (after `basename-`), 0 for none. (Its folders do not count here: there, a date's folder would number on from
    its year where save_to_dirs is turned off.)"""
    prefix, highest = f"{basename}-" if basename else "", -1
    for entry in os.scandir(folder):
        if entry.name.startswith(prefix) and entry.is_file():
            head = entry.name[len(prefix):].rsplit(".", 1)[0].split("-")[0]
            highest = max(highest, int(head)) if head.isascii() and head.isdigit() else highest
    return highest + 1


def _cut(text: str, most: int) -> str:
    """`text` cut to at most `most` bytes of UTF-8, never inside a character."""
    return text.encode()[:max(most, 0)].decode(errors="ignore")


def check_pattern(key: str, value: str) -> None:
    """A name pattern as a name can hold it: at most 1024 characters, no control characters; no folder in
    samples_filename_pattern's text, no absolute folder or .. in directories_filename_pattern's (tags' values are
    sanitized, and saved_path keeps every folder under the outputs folder whatever they make)."""
    if len(value) > 1024 or any(ord(c) < 32 or 0xD800 <= ord(c) < 0xE000 for c in value):
        raise InputError(f"option {key} must be at most 1024 characters without control characters, got "
                         f"{len(value)} characters")
    literal = _TAG.sub("_", value)  # (a tag stands for a name: its value is sanitized)
    parts = re.split(r"[\\/]", literal)
    if key == "samples_filename_pattern" and len(parts) > 1:
        raise InputError(f"option samples_filename_pattern names a file, not a folder (no / or \\): got {value!r}; "
                         "directories_filename_pattern names the folder")
    if literal.lstrip(" ").startswith(("/", "\\")) or ".." in parts or re.match(r"^ *[A-Za-z]:", literal):
        raise InputError(f"option {key} must stay inside the outputs folder (no leading /, drive or ..): "
                         f"got {value!r}")
