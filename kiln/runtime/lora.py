"""LoRA on compiled models: one session per LoRA set, over the same artifact, its touched weights merged.

A build writes, beside each artifact that can take LoRA (the text encoder's and the UNets', ONNX Runtime or OpenVINO
in float), `<artifact>.lora.json`: which of the artifact's constants holds which module's weight (found by value,
since an exporter renames and transposes them; build.sd.lora), in kiln.lora.module_key's names. A request names its
set by spec (kiln.lora.encode_spec: files under the LoRA folder and their multipliers). `LoraSessions.session(spec)`
returns the base session for "", and otherwise a session over the same artifact whose targeted constants are
replaced by W + sum(multiplier * delta) (AUTOMATIC1111's and diffusers' fused LoRA): ONNX Runtime takes them as
session initializers (`SessionOptions.add_initializer`), OpenVINO as new constants in the model before it compiles.

Cost: a set not yet held costs reading its files, the merge (numpy, per touched weight) and opening a session;
a held set costs nothing. Memory: each held set keeps its merged weights (the touched constants, in the artifact's
dtype) and a session, which reads the artifact's other weights again (the runtimes share nothing between sessions:
about the model's size per held set; benchmarks/RESULTS.md); sets are dropped least recently used past
`budget_bytes` of merged weights (KILN_LORA_CACHE_MB, default 4096), the newest always kept. An ONNX Runtime LoRA
session stops at the extended optimization level (kiln.runtime.Session: its layout transforms would read the
file's weights); KILN_LORA_ORT_LEVEL=all runs one over a file with external data (past 2 GB: the full-size UNet)
at every level, its weights replaced as the file loads, for more memory. The folder is `KILN_LORAS` (Triton's
side).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np

from kiln.errors import ConfigError, InputError, KilnError, WeightsError
from kiln.lora import ENV, decode_spec, read_lora, target_of

MAP_SUFFIX = ".lora.json"
BUDGET_ENV = "KILN_LORA_CACHE_MB"
_FILES_HELD = 8  # parsed LoRA files kept (sets often share files)


LORA_LEVEL_ENV = "KILN_LORA_ORT_LEVEL"


def lora_ort_level() -> str:
    """How ONNX Runtime runs a LoRA set's session over a file with external data: extended (default) or all."""
    level = os.environ.get(LORA_LEVEL_ENV, "extended") or "extended"
    if level not in ("extended", "all"):
        raise ConfigError(f"{LORA_LEVEL_ENV}={level!r}: extended or all")
    return level


def external_initializers(path: Path) -> set[str]:
    """The names of an ONNX file's initializers kept in external data: none where no `<file>.data` (the build's one
    data file) lies beside it; else read from its graph alone."""
    if not path.with_name(path.name + ".data").exists():
        return set()
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def map_path(artifact: Path) -> Path:
    return Path(artifact).with_name(Path(artifact).name + MAP_SUFFIX)


def read_map(artifact: Path) -> dict | None:
    """The artifact's LoRA map ({"component", "targets": {module: {"constant", "transposed", "shape"}}}), or None."""
    path = map_path(artifact)
    return json.loads(path.read_text()) if path.exists() else None


class LoraSessions:
    """Sessions of one artifact by LoRA spec ("" the base). Thread-safe."""

    def __init__(self, base, folder: Path | str | None = None, budget_bytes: int | None = None) -> None:
        self.base = base  # kiln.runtime.Session over the artifact as built
        self.map = read_map(base.options.path)
        folder = folder if folder is not None else os.environ.get(ENV)
        self.folder = Path(folder) if folder else None
        budget_mb = int(os.environ.get(BUDGET_ENV, "4096")) if budget_bytes is None else None
        self.budget_bytes = budget_bytes if budget_bytes is not None else budget_mb << 20
        self._sets: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self._files: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()
        self.built = 0  # sets merged and opened (a switch to a set not held)

    @property
    def held_bytes(self) -> int:
        return sum(size for _, size in self._sets.values())

    def session(self, spec: str):
        if not spec:
            return self.base
        entries = decode_spec(spec)
        if self.map is None:
            raise InputError(f"this model's artifact ({Path(self.base.options.path).name}) takes no LoRA (it has no "
                             f"{MAP_SUFFIX}: built before LoRA, or a variant whose weights cannot be replaced)")
        if self.folder is None:
            raise InputError(f"no LoRA folder where this model runs (set {ENV})")
        paths = [(self.folder / path, multiplier) for path, multiplier in entries]
        for path, _ in paths:
            if not path.is_file():
                raise InputError(f"LoRA file {path.relative_to(self.folder)} is not in {self.folder}")
        key = tuple((str(p), m, p.stat().st_mtime_ns, p.stat().st_size) for p, m in paths)
        with self._lock:
            if key in self._sets:
                self._sets.move_to_end(key)
                return self._sets[key][0]
            merged = self._merge([(self._layers(p), m, p.stem) for p, m in paths])
            session = type(self.base)(replace(self.base.options), overrides=merged)
            self._sets[key] = (session, sum(a.nbytes for a in merged.values()))
            self.built += 1
            while len(self._sets) > 1 and self.held_bytes > self.budget_bytes:
                self._sets.popitem(last=False)
            return session

    def _layers(self, path: Path) -> dict:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._files:
            self._files[key] = read_lora(path, self.map["component"])
            while len(self._files) > _FILES_HELD:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        return self._files[key]

    def _merge(self, loras: list[tuple[dict, float, str]]) -> dict[str, np.ndarray]:
        """{constant: merged weight in the artifact's layout and dtype} for every module the set touches. The files
        apply in order, as AUTOMATIC1111 applies them: a DoRA layer's change is to the weight as the files before it
        left it; the others' add up in any order."""
        targets = self.map["targets"]
        sets = [({target_of(module, targets) or module: layer for module, layer in layers.items()}, multiplier, name)
                for layers, multiplier, name in loras]
        for layers, _, name in sets:
            missing = sorted(set(layers) - set(targets))
            if missing:
                raise InputError(f"LoRA {name}: {len(missing)} of its {len(layers)} {self.map['component']} layers "
                                 f"name modules this model does not have as float weights ({', '.join(missing[:3])}"
                                 f"{', ...' if len(missing) > 3 else ''}): a LoRA for another model family, or a "
                                 "quantized build")
        modules = sorted({module for layers, _, _ in sets for module in layers})
        base = base_constants(self.base.options.runtime, Path(self.base.options.path),
                              [targets[m]["constant"] for m in modules])
        deltas: dict[str, np.ndarray] = {}
        for layers, multiplier, name in sets:
            for module, layer in layers.items():
                target = targets[module]
                shape = tuple(target["shape"])
                weight = None
                if layer.dora_scale is not None:  # torch's layout, with the changes so far
                    weight = base[target["constant"]].astype(np.float32)
                    weight = (weight.T if target["transposed"] else weight).reshape(shape) + deltas.get(module, 0)
                try:
                    change = layer.delta(shape, weight) * multiplier
                except WeightsError as exc:
                    raise InputError(f"LoRA {name}: {module}: {exc}") from None
                deltas[module] = deltas[module] + change if module in deltas else change
        merged = {}
        for module, change in deltas.items():
            target = targets[module]
            weight = base[target["constant"]]
            change = change.T if target["transposed"] else change
            merged[target["constant"]] = np.ascontiguousarray(
                (weight.astype(np.float32) + change.reshape(weight.shape)).astype(weight.dtype))
        return merged


def base_constants(runtime: str, path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The artifact's values of the named constants (read from the file: the runtime does not hand them out)."""
    wanted = set(names)
    if runtime == "onnxruntime":
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path), load_external_data=False)
        found = {t.name: numpy_helper.to_array(t, base_dir=str(path.parent))
                 for t in model.graph.initializer if t.name in wanted}
    elif runtime == "openvino":
        import openvino as ov

        found = {op.get_friendly_name(): np.array(op.get_data(), copy=True)
                 for op in ov.Core().read_model(str(path)).get_ops()
                 if op.get_type_name() == "Constant" and op.get_friendly_name() in wanted}
    else:
        raise KilnError(f"LoRA: the {runtime} runtime takes no replaced weights")
    if len(found) != len(wanted):
        raise KilnError(f"LoRA: {path.name} lacks constants its map names ({sorted(wanted - set(found))[:3]}); "
                        "rebuild it")
    return found
