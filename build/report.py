"""build-report.json: what was built, from what, with which tools, and how close it is to PyTorch."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

REPORT_NAME = "build-report.json"
_TOOLS = ("torch", "timm", "onnx", "onnxruntime", "openvino", "nncf", "diffusers", "transformers", "numpy")


def artifact_files(path: Path) -> list[Path]:
    """An artifact's files: the file itself, plus an OpenVINO IR's .bin or an ONNX file's external data beside it
    (model.onnx and model.xml share a folder: the IR's model.bin is not the ONNX file's)."""
    path = Path(path)
    companion = {".xml": path.with_suffix(".bin"), ".onnx": path.with_name(path.name + ".data")}.get(path.suffix)
    return [path, companion] if companion is not None and companion.exists() else [path]


def sha256(path: Path) -> str:
    """One digest over all of an artifact's files (an IR's weights live in its .bin)."""
    digest = hashlib.sha256()
    for part in artifact_files(path):
        with open(part, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def artifact_size(path: Path) -> int:
    return sum(p.stat().st_size for p in artifact_files(path))


def remove_artifact(path: Path) -> None:
    for part in artifact_files(path) if Path(path).exists() else []:
        part.unlink()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def machine() -> dict:
    """The machine the parity figures were measured on: a bf16 or int8 figure depends on its ISA."""
    from kiln.machine import machine as cpu

    info = cpu()
    return {"platform": platform.platform(), "processor": info["cpu"], "cpus": str(info["cores"]), "isa": info["isa"]}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def update_report(repository: Path, section: str, content: dict) -> Path:
    """Replace one section ("vit", "sd", ...) of the repository's report, keeping the others."""
    path = Path(repository) / REPORT_NAME
    report = json.loads(path.read_text()) if path.exists() else {}
    report[section] = content
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


def read_report(repository: Path) -> dict:
    path = Path(repository) / REPORT_NAME
    return json.loads(path.read_text()) if path.exists() else {}
