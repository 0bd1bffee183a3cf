"""What a built model repository holds, read from its files alone (no Triton, no protobuf): for the embedded Triton
(which has only the Python backend) and for NVIDIA's image, whose build runs `python3 -m kiln.repository DIR`.

In NVIDIA's image a folder without config.pbtxt is auto-filled as a Python model, and one model that fails to load
stops tritonserver at start; so the image is built from a repository that `check_for_image` finds complete.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_BACKEND = re.compile(r'^backend:\s*"([^"]+)"', re.MULTILINE)
_PLATFORM = re.compile(r'^platform:\s*"([^"]+)"', re.MULTILINE)
_FILENAME = re.compile(r'^default_model_filename:\s*"([^"]+)"', re.MULTILINE)
_PARAMETER = r'key:\s*"{}"\s*value\s*{{\s*string_value:\s*"([^"]*)"'
_RUNTIME = re.compile(_PARAMETER.format("runtime"))
_ARTIFACT = re.compile(_PARAMETER.format("artifact"))
_DECODE = re.compile(_PARAMETER.format("decode"))


def model_folders(repository: Path) -> list[Path]:
    """The folders of a repository that Triton would take for models (every subfolder)."""
    return sorted(p for p in Path(repository).iterdir() if p.is_dir())


def backend_of(folder: Path) -> str | None:
    """A model's backend ("python", "onnxruntime", "openvino", ...; "ensemble" for an ensemble), None without config."""
    config = folder / "config.pbtxt"
    if not config.is_file():
        return None
    text = config.read_text()
    if match := _BACKEND.search(text):
        return match.group(1)
    if match := _PLATFORM.search(text):
        return match.group(1)
    return "python"  # what Triton assumes for a model.py without backend or platform


def native_models(repository: Path) -> dict[str, str]:
    """{model: backend} of the models that need one of Triton's native backends (NVIDIA's image only)."""
    found = {}
    for folder in model_folders(repository):
        backend = backend_of(folder)
        if backend not in (None, "python", "ensemble"):
            found[folder.name] = backend
    return found


def check_for_image(repository: Path) -> list[str]:
    """Why `repository` would not start in NVIDIA's image (an empty list: nothing found)."""
    root = Path(repository)
    if not root.is_dir():
        return [f"{root} is not a folder"]
    folders = model_folders(root)
    if not folders:
        return [f"{root} holds no models; build one with `kiln build vit|sd --triton-backend native --repo {root}`"]
    problems = []
    for folder in folders:
        backend = backend_of(folder)
        config = folder / "config.pbtxt"
        versions = [v for v in folder.iterdir() if v.is_dir() and v.name.isdigit()]
        if backend is None:
            problems.append(f"{folder.name}: no config.pbtxt (a source tree's model folder, or a partial build?); "
                            "build into a fresh --repo and copy that")
        elif backend != "ensemble" and not versions:
            problems.append(f"{folder.name}: no version folder (1/)")
        elif backend == "python":
            if not any((v / "model.py").is_file() for v in versions):
                problems.append(f"{folder.name}: a Python-backend model without model.py")
            text = config.read_text()
            if (runtime := _RUNTIME.search(text)) and runtime.group(1) != "torch":
                problems.append(f"{folder.name}: runs ONNX Runtime or OpenVINO inside the Python backend, which the "
                                "image does not install; build with --triton-backend native")
            elif runtime and (artifact := _ARTIFACT.search(text)):
                problems += _torch_problems(folder.name, [v / artifact.group(1) for v in versions])
            if (decode := _DECODE.search(text)) and decode.group(1) == "torch" and not _has_torchvision():
                problems.append(f"{folder.name}: decodes with torch (kiln build vit --decode torch), and this image "
                                "has no torch and torchvision: build it FROM NVIDIA's PyTorch flavour "
                                "(--build-arg TRITON_FLAVOR=pyt-python-py3) or with --decode pil")
        elif backend != "ensemble" and (match := _FILENAME.search(config.read_text())):
            if not any((v / match.group(1)).is_file() for v in versions):
                problems.append(f"{folder.name}: {match.group(1)} is missing from its version folder")
    return problems


def _has_torchvision() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("torch", "torchvision"))


def _torch_problems(model: str, programs: list[Path]) -> list[str]:
    """A torch program needs torch in the image, the release that exported it (torch.export's format changes)."""
    from kiln.errors import ConfigError
    from kiln.runtime.programs import read_metadata, release

    try:
        import torch
    except ImportError:
        return [f"{model}: a torch program, and this image has no torch: build it FROM NVIDIA's PyTorch flavour "
                "(--build-arg TRITON_FLAVOR=pyt-python-py3) or choose another variant"]
    problems = []
    for program in programs:
        if not program.is_file():
            problems.append(f"{model}: {program.name} is missing from its version folder")
            continue
        try:
            exported = read_metadata(program).get("torch")
        except ConfigError as exc:
            problems.append(f"{model}: {exc}")
            continue
        if exported != release(torch.__version__):
            problems.append(f"{model}: {program.name} was exported by torch {exported} and the image has "
                            f"{torch.__version__}: build the repository with the image's torch")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kiln.repository REPOSITORY   (checks a repository for NVIDIA's image)", file=sys.stderr)
        return 2
    problems = check_for_image(Path(args[0]))
    for problem in problems:
        print(f"kiln: {problem}", file=sys.stderr)
    if not problems:
        print(f"kiln: {args[0]}: {len(model_folders(Path(args[0])))} models, ready for tritonserver")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
