"""AUTOMATIC1111's textual-inversion embeddings: `.safetensors` files in a folder, each named by its file's stem.

The service owns the folder (`kiln serve --embeddings DIR`): an `EmbeddingLibrary` reads it, lists it in
AUTOMATIC1111's shape, reads it again when it changes (a file added, removed or renamed) or when asked to
(POST /sdapi/v1/refresh-embeddings), and picks for each request the embeddings its prompts name (`select`), whose
vectors then travel with the prompts: to Triton's sd_tokenizer, which needs no folder of its own, or to the
in-process text encoder. Either finds the names by their token ids (kiln.prompts.EmbeddingLookup).

Layouts read: AUTOMATIC1111's `emb_params` (n, hidden), its .pt layout's `string_to_param.*` as converters flatten
it, and diffusers' one tensor under the token's name ((hidden,) or (n, hidden)); float32, float16, bfloat16 or
float64; SDXL's `clip_l` and `clip_g` side by side (its text encoding's layout: (n, 768 + 1280)). Pickled files
(.pt, .bin, .ckpt, .pth) are never loaded (unpickling runs code): a prompt naming one is refused with the file's
name, and converting it to .safetensors is the way.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import InputError, WeightsError
from kiln.folders import WatchedFolder
from kiln.prompts import BREAK, parse_emphasis

log = logging.getLogger("kiln.embeddings")

SUFFIX = ".safetensors"
PICKLED = (".pt", ".bin", ".ckpt", ".pth")  # never loaded: refused by name
MAX_FILE_BYTES = 64 << 20  # an embedding is a few KB; a file this big is something else (a checkpoint)
NOT_BUILT = ("prompt names the textual-inversion embedding {name!r}, which this build's text encoder cannot take "
             "(built before embeddings); rebuild with `kiln build sd`")
_FLOATS = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
# CLIP's pre-tokenization (its tokenizer splits text so before BPE): contractions, runs of letters, single digits,
# runs of anything else but spaces; a name's token ids can only appear where its words do
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\w\s]|_)+")


@dataclass(frozen=True)
class Embedding:
    name: str  # the file's stem: the word prompts use
    vectors: np.ndarray  # (n, hidden) float32
    step: int | None = None  # what the file's metadata says, where it says it (AUTOMATIC1111's fields)
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])

    def describe(self) -> dict:
        """Its entry in AUTOMATIC1111's GET /sdapi/v1/embeddings."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
                "shape": self.hidden_size, "vectors": int(self.vectors.shape[0])}


def float32_tensor(info: dict) -> np.ndarray:
    """A safetensors tensor (safetensors.deserialize's entry) as float32 (LoRA files are read so too)."""
    shape, dtype, data = tuple(info["shape"]), str(info["dtype"]), info["data"]
    if dtype == "BF16":  # numpy has no bfloat16: its bits are float32's upper half
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype not in _FLOATS:
        raise WeightsError(f"a tensor of {dtype}, not floats")
    return np.frombuffer(data, dtype=_FLOATS[dtype]).astype(np.float32).reshape(shape)


def read_embedding(path: Path) -> Embedding:
    """One embedding file; WeightsError naming the file for a pickled, unreadable or non-embedding file."""
    import safetensors

    path = Path(path)
    if path.suffix.lower() in PICKLED:
        raise WeightsError(f"{path.name} is a pickled file, which kiln never loads (unpickling can run code); "
                           f"convert it to {SUFFIX}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise WeightsError(f"{path.name}: {path.stat().st_size} bytes is no embedding (a few KB)")
    try:
        data = path.read_bytes()
        tensors = dict(safetensors.deserialize(data))
        metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except Exception as exc:  # noqa: BLE001 - the library raises its own and plain errors for a bad file
        raise WeightsError(f"{path.name} is not a readable {SUFFIX} file: {exc}") from None
    flattened = [k for k in tensors if k.startswith("string_to_param.")]
    joined = None
    if "emb_params" in tensors:
        key = "emb_params"
    elif len(flattened) == 1:
        key = flattened[0]
    elif len(tensors) == 1:
        key = next(iter(tensors))
    elif set(tensors) == {"clip_l", "clip_g"}:  # SDXL's: each encoder's vectors, side by side as its encoding's
        try:
            parts = [float32_tensor(tensors[k]) for k in ("clip_l", "clip_g")]
        except WeightsError as exc:
            raise WeightsError(f"{path.name}: {exc}") from None
        if any(part.ndim != 2 for part in parts) or parts[0].shape[0] != parts[1].shape[0]:
            raise WeightsError(f"{path.name}: clip_l {tuple(parts[0].shape)} and clip_g {tuple(parts[1].shape)} are "
                               "not (vectors, hidden) of the same vectors")
        key, joined = "clip_l+clip_g", np.concatenate(parts, axis=1)
    else:
        raise WeightsError(f"{path.name} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}), not one "
                           "embedding (emb_params, or one tensor)")
    try:
        vectors = joined if joined is not None else float32_tensor(tensors[key])
    except WeightsError as exc:
        raise WeightsError(f"{path.name}: {key} is {exc}") from None
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or not vectors.size or not np.isfinite(vectors).all():
        raise WeightsError(f"{path.name}: {key} of shape {tuple(vectors.shape)} is not (vectors, hidden) of finite "
                           "values")
    step = str(metadata.get("step", ""))
    return Embedding(path.stem, np.ascontiguousarray(vectors), int(step) if step.isdigit() else None,
                     metadata.get("sd_checkpoint"), metadata.get("sd_checkpoint_name"))


def write_embedding(path: Path, vectors: np.ndarray, split: int = 0) -> Path:
    """An embedding file in AUTOMATIC1111's layout ({"emb_params": (n, hidden) float32}); SDXL's (`split`: the first
    encoder's width) as {"clip_l": (n, split), "clip_g": (n, rest)}."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        raise WeightsError(f"{path}: an embedding file's name must end in {SUFFIX}")
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    tensors = {"clip_l": vectors[:, :split].copy(), "clip_g": vectors[:, split:].copy()} if split else \
        {"emb_params": vectors}
    save_file(tensors, str(path))
    return path


def read_folder(folder: Path) -> tuple[dict[str, Embedding], dict[str, str]]:
    """Every embedding under `folder` (sub-folders too, as AUTOMATIC1111), by name, and why the others are not read
    (pickled or broken files, by name). The first file of a name wins; a .safetensors file over a pickled one."""
    loaded: dict[str, Embedding] = {}
    refused: dict[str, str] = {}
    for path in sorted(Path(folder).rglob("*")):
        suffix = path.suffix.lower()
        if suffix not in (SUFFIX, *PICKLED) or path.name.startswith(".") or not path.is_file() \
                or path.stat().st_size == 0:
            continue
        try:
            embedding = read_embedding(path)
        except WeightsError as exc:
            refused.setdefault(path.stem, str(exc))
            continue
        loaded.setdefault(embedding.name, embedding)
    return loaded, {name: why for name, why in refused.items() if name not in loaded}


def _words(text: str) -> list[str]:
    return _WORDS.findall(unicodedata.normalize("NFC", text).lower())


def mentioned(prompts: Sequence[str], names: Sequence[str]) -> list[str]:
    """The `names` that `prompts` use as words: the name's words in a row within one emphasis fragment, which is
    where a tokenizer can find its token ids (it then decides, by those ids)."""
    fragments = []
    for prompt in prompts:
        try:
            parts = [text for text, weight in parse_emphasis(prompt) if not (weight == -1 and text == BREAK)]
        except InputError:  # the tokenizer names what is wrong with the prompt
            parts = [prompt]
        fragments += [_words(part) for part in parts]
    present = {word for fragment in fragments for word in fragment}
    found = []
    for name in names:
        words = _words(name)
        if words and words[0] in present and any(
                fragment[i:i + len(words)] == words for fragment in fragments
                for i in range(len(fragment) - len(words) + 1)):
            found.append(name)
    return found


class EmbeddingLibrary:
    """The embeddings of one folder (None: none), read when first used and again when the folder changes or on
    `refresh()`, as AUTOMATIC1111 reloads its embeddings folder."""

    def __init__(self, folder: Path | None) -> None:
        self._watched = WatchedFolder(folder, self._read, ({}, {}))
        self.folder = self._watched.folder

    @staticmethod
    def _read(folder: Path) -> tuple[dict[str, Embedding], dict[str, str]]:
        loaded, refused = read_folder(folder)
        log.info("embeddings in %s: %s", folder, ", ".join(loaded) or "none")
        for why in refused.values():
            log.warning("embeddings: %s", why)
        return loaded, refused

    def refresh(self) -> None:
        """Read the folder again now (a file replaced in place does not change the folder)."""
        self._watched.refresh()

    def _current(self) -> tuple[dict[str, Embedding], dict[str, str]]:
        return self._watched.current()

    def listing(self, hidden: int) -> dict:
        """AUTOMATIC1111's GET /sdapi/v1/embeddings for a text encoder of `hidden` (0: one that takes none): the
        others are skipped."""
        loaded, _ = self._current()
        return {"loaded": {n: e.describe() for n, e in loaded.items() if e.hidden_size == hidden},
                "skipped": {n: e.describe() for n, e in loaded.items() if e.hidden_size != hidden}}

    def select(self, prompts: Sequence[str], hidden: int) -> dict[str, np.ndarray]:
        """{name: vectors} of the embeddings `prompts` name, for a text encoder of `hidden`. One of another hidden size
        stays text (AUTOMATIC1111 skips it); a refused file, or any embedding when `hidden` is 0 (a build before
        embeddings), is an InputError naming it."""
        loaded, refused = self._current()
        if not loaded and not refused:
            return {}
        named = mentioned(prompts, [*loaded, *refused])
        for name in named:
            if name in refused:
                raise InputError(f"embedding {name!r}: {refused[name]}")
            if not hidden:
                raise InputError(NOT_BUILT.format(name=name))
        return {name: loaded[name].vectors for name in named if loaded[name].hidden_size == hidden}
