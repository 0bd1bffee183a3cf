"""AUTOMATIC1111's LoRA: `<lora:name:multiplier>` tags, the `loras` folder, and the files in kohya's layout.

A prompt names LoRA files by tag, as AUTOMATIC1111 reads them (extensions-builtin/Lora): `<lora:name>` (multiplier
1), `<lora:name:0.8>`, `<lora:name:te:unet>` (the text encoder's and the UNet's multipliers), or named `te=`,
`unet=`; `<lyco:...>` is the same. The tags leave the prompt before it is encoded; a name is the file's stem (or the
alias its metadata gives as `ss_output_name`) under the folder, sub-folders too. A tag that names nothing is an
InputError listing what the folder has. The negative prompt's tags are refused: AUTOMATIC1111 applies the prompt's.

The service owns the folder (`kiln serve --loras DIR`) and reads only file headers; the models read the weights
(kiln.runtime.lora), each from its own copy of the folder (`KILN_LORAS` where Triton runs): what travels with a
request is a `LoraSet`, the files' paths under the folder and their multipliers, one spec per model kind.

Files read (`read_lora`): kohya's layout (`lora_unet_<module>` / `lora_te_<module>` with `.lora_down.weight`,
`.lora_up.weight` and `.alpha`; `.diff` for a full difference), and diffusers' PEFT layout (`unet.<module>.lora_A
.weight` / `lora_B`, `text_encoder.<module>...`). Module names are matched in one normal form (`module_key`):
diffusers' module path, "text_model." dropped, dots as underscores, which is kohya's. LyCORIS's LoHa (`.hada_w1_a`,
`_w1_b`, `_w2_a`, `_w2_b`), LoKr (`.lokr_w1` or `_w1_a` and `_w1_b`, the same for w2) and their Tucker factors
(`hada_t1`, `lokr_t2`, LoRA's `lora_mid`) in kohya's names too, their differences as AUTOMATIC1111's Lora extension
computes them (kiln.lycoris), DoRA's `dora_scale` on any of them. Bias differences are refused by name, never skipped.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln import lycoris
from kiln.embeddings import float32_tensor
from kiln.errors import InputError, WeightsError
from kiln.folders import WatchedFolder
from kiln.prompts import EXTRA_NETWORK

log = logging.getLogger("kiln.lora")

SUFFIX = ".safetensors"
TAGS = ("lora", "lyco")  # AUTOMATIC1111 reads <lyco:...> as <lora:...>
COMPONENTS = ("text_encoder", "unet")  # what a LoRA changes; sd_unet_control takes the UNet's layers
ENV = "KILN_LORAS"  # the folder the models read LoRA files from (Triton's side)
NOT_BUILT = ("<lora:{name}>: this build's models take no LoRA ({why}); rebuild with `kiln build sd` and a float "
             "variant that runs on ONNX Runtime or OpenVINO")
_KOHYA = re.compile(r"^lora_(unet|te[12]?)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha|diff|diff_b|dora_scale|"
                    r"lora_mid\.weight|hada_\w+|lokr_\w+)$")
_PEFT = re.compile(r"^(unet|text_encoder(?:_2)?)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")
# SDXL's text encoders as kiln's export wrapper names them (build.sd.export's TextEncoderXL), and as LoRA files do
# (kohya's lora_te1_/lora_te2_, diffusers' text_encoder./text_encoder_2.)
_ENCODERS = {"first.": "te1_", "second.": "te2_"}


def module_key(path: str) -> str:
    """A module's name in the one form LoRA files and builds are matched in: `model.` (kiln's export wrappers) and
    `text_model.` dropped, dots as underscores (kohya's form of diffusers' names); SDXL's two text encoders as te1_
    and te2_ (kohya's)."""
    label = next((label for wrapper, label in _ENCODERS.items() if path.startswith(wrapper)), "")
    if label:
        path = path.split(".", 1)[1]
    for prefix in ("model.", "text_model."):
        path = path.removeprefix(prefix)
    return label + path.replace(".", "_")


def target_of(module: str, targets: Mapping[str, object]) -> str | None:
    """The build's module a LoRA file's module names: itself, or across SD 1.x's one text encoder and SDXL's first
    (a file's lora_te1_/text_encoder. on SD 1.x, its lora_te_ on SDXL); None: the build has no such module."""
    if module in targets:
        return module
    other = module.removeprefix("te1_") if module.startswith("te1_") else "te1_" + module
    return other if other in targets else None


# --- prompts -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraUse:
    """One tag: a name and its two multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def _number(value: str, tag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InputError(f"prompt: {tag}: {value!r} is not a multiplier (a number)")
    return number


def parse_tag(args: str, tag: str) -> LoraUse:
    """A tag's arguments (after `lora:`) as AUTOMATIC1111's ExtraNetworkParams and its Lora activate read them."""
    positional, named = [], {}
    for item in args.split(":"):
        key, sep, value = item.partition("=")
        if sep:
            named[key.strip()] = value
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""
    if not name:
        raise InputError(f"prompt: {tag} names no LoRA")
    if "dyn" in named or len(positional) > 3:
        raise InputError(f"prompt: {tag}: dyn (a dynamic rank) is not supported; write <lora:name:te:unet>")
    unknown = set(named) - {"te", "unet"}
    if unknown:
        raise InputError(f"prompt: {tag}: unknown argument {sorted(unknown)[0]!r} (valid: te=, unet=)")
    te = _number(positional[1], tag) if len(positional) > 1 else 1.0
    te = _number(named["te"], tag) if "te" in named else te
    unet = _number(positional[2], tag) if len(positional) > 2 else te
    unet = _number(named["unet"], tag) if "unet" in named else unet
    return LoraUse(name, te, unet)


def split_lora_tags(prompt: str) -> tuple[str, tuple[LoraUse, ...]]:
    """The prompt without its LoRA tags, and the tags in order. Other extra-network tags stay (and are refused by
    kiln.prompts.check_prompt_syntax)."""
    uses: list[LoraUse] = []

    def found(match: re.Match) -> str:
        if match.group(1).lower() not in TAGS:
            return match.group(0)
        uses.append(parse_tag(match.group(2), match.group(0)))
        return ""

    return EXTRA_NETWORK.sub(found, prompt), tuple(uses)


@dataclass(frozen=True)
class LoraSet:
    """The LoRA files one prompt applies, resolved against the folder: `specs[component]` is what that kind of model
    is sent (kiln.runtime.lora reads it); "" where a component is unchanged."""

    names: tuple[str, ...] = ()
    specs: dict[str, str] = field(default_factory=dict)
    hashes: str = ""  # AUTOMATIC1111's infotext "Lora hashes": "name: short hash, ..." (kohya's addnet hash)

    def spec(self, component: str) -> str:
        return self.specs.get("unet" if component.startswith("unet") else component, "")  # unet_control, _tiling


def encode_spec(entries: Iterable[tuple[str, float]], ordered: bool = False) -> str:
    """One model's spec: [[path under the folder, multiplier], ...], one entry per file (the multipliers of repeated
    tags summed: a LoRA's difference is linear in its multiplier), sorted (`ordered`: in the tags' order, where a
    file has DoRA layers, whose change depends on the files before it), those at 0 left out; "" for none."""
    total: dict[str, float] = {}
    for path, multiplier in entries:
        total[path] = total.get(path, 0.0) + float(multiplier)
    kept = [(p, m) for p, m in total.items() if m != 0]
    kept = kept if ordered else sorted(kept)
    return json.dumps(kept, separators=(",", ":")) if kept else ""


def decode_spec(spec: str) -> list[tuple[str, float]]:
    """The entries of a spec; InputError for anything else."""
    if not spec:
        return []
    try:
        entries = [(str(p), float(m)) for p, m in json.loads(spec)]
    except (ValueError, TypeError) as exc:
        raise InputError(f"lora: {spec[:80]!r} is not a LoRA spec ([[path, multiplier], ...]): {exc}") from None
    for path, _ in entries:
        if Path(path).is_absolute() or ".." in Path(path).parts or not path.endswith(SUFFIX):
            raise InputError(f"lora: {path!r} is not a {SUFFIX} file's path under the LoRA folder")
    return entries


# --- files ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraLayer:
    """One module's change: up @ down * alpha / rank (a LoRA, with a Tucker mid between them where it has one), a
    full difference (`diff`), or a LoHa's or LoKr's factors (by name without the hada_/lokr_ prefix); kiln.lycoris
    computes each."""

    up: np.ndarray | None = None
    down: np.ndarray | None = None
    alpha: float | None = None
    diff: np.ndarray | None = None
    mid: np.ndarray | None = None  # a Tucker mid (LoCon's CP decomposition)
    loha: dict[str, np.ndarray] | None = None
    lokr: dict[str, np.ndarray] | None = None
    dora_scale: np.ndarray | None = None  # DoRA's magnitudes: the change then depends on the weight it changes

    def delta(self, shape: tuple[int, ...], weight: np.ndarray | None = None) -> np.ndarray:
        """The change to a weight of `shape` (torch's: (out, in) or (out, in, kh, kw)) at multiplier 1; a DoRA
        layer's to `weight` itself (float32, torch's layout)."""
        if self.diff is not None:
            change = self.diff
        elif self.loha is not None:
            change = lycoris.loha(self.loha, self.alpha)
        elif self.lokr is not None:
            change = lycoris.lokr(self.lokr, self.alpha)
        else:
            change = lycoris.lora(self.up, self.down, self.mid, self.alpha)
        if change.size != math.prod(shape):
            raise WeightsError(f"a change of shape {tuple(change.shape)} for a weight of shape {shape}")
        if self.dora_scale is None:
            return change.reshape(shape)
        if weight is None:
            raise WeightsError("a DoRA layer's change depends on the weight it changes, which was not given")
        return lycoris.dora(change.reshape(shape), weight.reshape(shape), self.dora_scale)


def addnet_hash(path: Path) -> str:
    """kohya's (and AUTOMATIC1111's) hash of a LoRA file: sha256 of its tensor data, after the header; AUTOMATIC1111's
    infotext gives its first 12 digits."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(8 + int.from_bytes(handle.read(8), "little"))
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_header(path: Path) -> dict:
    """A safetensors file's header (tensor names -> dtype, shape) and `__metadata__`, without reading its data."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= 100 << 20:
            raise WeightsError(f"{path.name} is not a {SUFFIX} file")
        try:
            return json.loads(handle.read(size))
        except ValueError:
            raise WeightsError(f"{path.name} is not a {SUFFIX} file (its header is not JSON)") from None


def classify_keys(keys: Iterable[str], name: str) -> dict[tuple[str, str], dict[str, str]]:
    """{(component, module key): {part: tensor name}}; WeightsError naming what kiln does not apply."""
    layers: dict[tuple[str, str], dict[str, str]] = {}
    for key in keys:
        if key == "__metadata__":
            continue
        if match := _KOHYA.match(key):
            component = "unet" if match.group(1) == "unet" else "text_encoder"
            module, part = match.group(2), match.group(3)
            module = module.removeprefix("text_model_")
            module = f"{match.group(1)}_{module}" if match.group(1) in ("te1", "te2") else module
        elif match := _PEFT.match(key):
            component, module = match.group(1), module_key(match.group(2))
            if component != "unet":  # diffusers' text_encoder. (SDXL's first) and text_encoder_2.
                component, module = "text_encoder", ("te2_" if component.endswith("_2") else "te1_") + module
            part = {"lora_A": "lora_down.weight", "lora.down": "lora_down.weight"}.get(match.group(3), "lora_up.weight")
        else:
            raise WeightsError(f"LoRA {name}: {key!r} is no layer kiln reads (kohya's lora_unet_*/lora_te_* or "
                               "diffusers' unet.*/text_encoder.* lora_A/lora_B)")
        if part.startswith(("hada_", "lokr_")) and part not in lycoris.PARTS or part in lycoris.REFUSED:  # e.g. OFT
            kind = lycoris.REFUSED.get(part) or ("a LoHa part" if part.startswith("hada_") else "a LoKr part")
            raise WeightsError(f"LoRA {name}: {key!r} is {kind}, which kiln does not apply (LoRA, LoHa and LoKr "
                               "layers and full differences, with DoRA scales)")
        layers.setdefault((component, module), {})[part] = key
    for (component, module), parts in layers.items():
        if lycoris.algorithm(set(parts) - {"alpha", lycoris.DORA}) is None:
            raise WeightsError(f"LoRA {name}: {component} module {module} has {sorted(parts)}, not one whole layer: "
                               "lora_down and lora_up (and a lora_mid), a diff, LoHa's hada_w1_a/w1_b/w2_a/w2_b (and "
                               "t1/t2), or LoKr's lokr_w1 (or w1_a and w1_b) and lokr_w2 (or w2_a and w2_b, and t2)")
    if not layers:
        raise WeightsError(f"LoRA {name} has no layers")
    return layers


def read_lora(path: Path, component: str | None = None) -> dict[str, LoraLayer]:
    """The layers of one file for `component` (text_encoder or unet; None: both, keyed "component:module")."""
    import safetensors

    path = Path(path)
    try:
        tensors = dict(safetensors.deserialize(path.read_bytes()))
    except Exception as exc:  # noqa: BLE001 - the library raises its own and plain errors for a bad file
        raise WeightsError(f"{path.name} is not a readable {SUFFIX} file: {exc}") from None
    layers = {}
    for (kind, module), parts in classify_keys(tensors, path.stem).items():
        if component is not None and kind != component:
            continue
        try:
            arrays = {part: float32_tensor(tensors[key]) for part, key in parts.items()}
        except WeightsError as exc:
            raise WeightsError(f"LoRA {path.stem}: {module}: {exc}") from None
        alpha = arrays.pop("alpha", None)
        alpha = float(alpha.reshape(-1)[0]) if alpha is not None else None
        dora = arrays.pop(lycoris.DORA, None)
        algorithm = lycoris.algorithm(set(arrays))
        if algorithm in ("loha", "lokr"):
            prefix = "hada_" if algorithm == "loha" else "lokr_"
            layer = LoraLayer(alpha=alpha, dora_scale=dora,
                              **{algorithm: {k.removeprefix(prefix): v for k, v in arrays.items()}})
        else:
            layer = LoraLayer(up=arrays.get("lora_up.weight"), down=arrays.get("lora_down.weight"), alpha=alpha,
                              diff=arrays.get("diff"), mid=arrays.get("lora_mid.weight"), dora_scale=dora)
        layers[module if component is not None else f"{kind}:{module}"] = layer
    return layers


# --- the folder ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraFile:
    name: str  # the file's stem: what tags use
    path: Path  # under the folder
    relative: str  # its path under the folder, what travels to the models
    alias: str
    metadata: dict
    components: tuple[str, ...]  # which of text_encoder and unet it changes
    dora: bool = False  # whether it has DoRA layers (their change depends on the weight as the files before left it)

    def describe(self) -> dict:
        """Its entry in AUTOMATIC1111's GET /sdapi/v1/loras."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": self.metadata}


def read_entry(folder: Path, path: Path) -> LoraFile:
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    layers = classify_keys(header, path.stem)
    return LoraFile(path.stem, path, path.relative_to(folder).as_posix(), str(metadata.get("ss_output_name") or
                    path.stem), {str(k): v for k, v in metadata.items()}, tuple(sorted({c for c, _ in layers})),
                    any(lycoris.DORA in parts for parts in layers.values()))


class LoraLibrary:
    """The LoRA files of one folder (None: none), read when first used, again when the folder changes and on
    `refresh()` (POST /sdapi/v1/refresh-loras); headers only."""

    def __init__(self, folder: Path | None) -> None:
        self._watched = WatchedFolder(folder, self._read, ([], {}))
        self.folder = self._watched.folder
        self._lock = threading.Lock()  # the hashes'
        self._hashes: dict[tuple, str] = {}  # by (path, mtime, size)

    @staticmethod
    def _read(folder: Path) -> tuple[list[LoraFile], dict[str, str]]:
        files, refused = [], {}
        for path in sorted(folder.rglob(f"*{SUFFIX}")):
            if path.name.startswith(".") or not path.is_file():
                continue
            try:
                files.append(read_entry(folder, path))
            except (WeightsError, OSError) as exc:
                refused[path.stem] = str(exc)
                log.warning("loras: %s", exc)
        log.info("LoRAs in %s: %s", folder, ", ".join(f.name for f in files) or "none")
        return files, refused

    def refresh(self) -> None:
        self._watched.refresh()

    def _current(self) -> tuple[list[LoraFile], dict[str, str]]:
        return self._watched.current()

    def listing(self) -> list[dict]:
        return [f.describe() for f in self._current()[0]]

    def find(self, name: str) -> LoraFile:
        files, refused = self._current()
        matches = [f for f in files if f.name == name] or [f for f in files if f.alias == name]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InputError(f"<lora:{name}>: {len(matches)} files have that name "
                             f"({', '.join(m.relative for m in matches)}); rename one")
        if name in refused:
            raise InputError(f"<lora:{name}>: {refused[name]}")
        known = ", ".join(sorted(f.name for f in files)) or "none"
        where = f"in {self.folder}" if self.folder is not None else "(the server has no LoRA folder: --loras)"
        raise InputError(f"<lora:{name}>: no such LoRA {where}; available: {known}")

    def resolve(self, uses: Iterable[LoraUse]) -> LoraSet:
        """The set a prompt's tags apply; InputError for a name the folder lacks (listing what it has)."""
        uses = list(uses)
        if not uses:
            return LoraSet()
        files = [(self.find(use.name), use) for use in uses]
        dora = [f.relative for f, _ in files if f.dora]  # their change depends on the files applied before them
        if len(set(dora)) < len(dora):  # AUTOMATIC1111 applies a repeated tag twice, the second to the first's result
            raise InputError("a LoRA with DoRA layers tagged twice: their change depends on the weight they change, so "
                             "two applications do not add up to one at the summed multiplier; tag it once")
        specs = {component: encode_spec(((f.relative, getattr(use, "te" if component == "text_encoder" else "unet"))
                                         for f, use in files if component in f.components), bool(dora))
                 for component in COMPONENTS}
        used = {f.name: f for f, _ in files}
        hashes = ", ".join(f"{name}: {self.short_hash(f.path)}" for name, f in used.items())
        return LoraSet(tuple(used), specs, hashes)

    def short_hash(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key not in self._hashes:
                self._hashes[key] = addnet_hash(path)[:12]
            return self._hashes[key]
