"""Writing a Triton model repository: configs, the Python-backend models' code, stale models removed.

Models with their own logic (vit, vit_preprocess, sd_tokenizer, ...) are hand-written in the source
tree's model_repository/ and copied; every model that only serves an artifact (sd_unet,
sd_text_encoder, sd_controlnet_2, ...) gets the same thin model.py, written from one template.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from build.triton_config import ModelConfig
from kiln.contract import base_name
from kiln.errors import ConfigError
from kiln.paths import DEFAULT_REPOSITORY

# What every generated model.py starts with: the stub runs isolated, so it puts this environment's folders on its
# path itself (kiln/triton_install.py; the hand-written models in model_repository/ carry the same lines).
SITE_PREAMBLE = '''import os
import site
import sys

for _path in os.environ.get("KILN_SITE_PACKAGES", "").split(os.pathsep):  # see kiln/triton_install.py
    if _path:
        site.addsitedir(_path)
_own = set(site.getsitepackages() + [site.getusersitepackages()])  # the stub interpreter's: after the above
sys.path.sort(key=lambda _p: _p in _own)
'''

RUNTIME_MODEL = '''"""{name}: an artifact on ONNX Runtime, OpenVINO or torch inside Triton's Python backend.

Written by `kiln build` from one template (build/repository.py): the model is kiln.runtime.model.RuntimeModel,
configured by this folder's config.pbtxt.
"""

''' + SITE_PREAMBLE + '''
from kiln.runtime.model import RuntimeModel as TritonPythonModel  # noqa: F401 - Triton looks the class up by name
'''


def hand_written(name: str) -> Path | None:
    """The source tree's model.py of a model with its own logic, or None."""
    path = DEFAULT_REPOSITORY / name / "1" / "model.py"
    return path if path.is_file() else None


def write_model(config: ModelConfig, repository: Path) -> Path:
    """Write one model: its config.pbtxt and, for the Python backend, its model.py."""
    path = config.write(repository)
    if config.backend == "python":
        target = Path(repository) / config.name / "1" / "model.py"
        source = hand_written(base_name(config.name))  # a checkpoint's own sd_tokenizer: the same code
        if source is not None:
            if source.resolve() != target.resolve():
                shutil.copy2(source, target)
        elif "runtime" in config.parameters:
            target.write_text(RUNTIME_MODEL.format(name=config.name))
        else:
            raise ConfigError(f"{config.name}: a Python-backend model with neither its own model.py in "
                              f"{DEFAULT_REPOSITORY} nor an artifact to serve")
    return path


def write_models(configs: Iterable[ModelConfig], repository: Path) -> list[str]:
    names = []
    for config in configs:
        write_model(config, repository)
        names.append(config.name)
    return names


def remove_stale(repository: Path, pattern: str, keep: Iterable[str]) -> None:
    """Remove model folders matching `pattern` that this build did not write (a rebuild with fewer ControlNets must
    not keep serving the previous build's)."""
    keep = set(keep)
    for stale in Path(repository).glob(pattern):
        if stale.is_dir() and stale.name not in keep:
            shutil.rmtree(stale, ignore_errors=True)
