"""Where the embedded Triton's pieces are (the nvidia-pytriton wheel's binary, libraries, Python backend and stub), and
how its Python-backend models see the project's environment.

One mechanism, in one place, makes Python-backend models see the project's environment:
the Python-backend stub embeds the system's `libpython3.X.so.1.0` (Debian's libpython3.11, installed by
scripts/setup_system.sh; where the system has none, this interpreter's own) and runs *isolated* (PYTHONPATH is
ignored), so

- `KILN_SITE_PACKAGES` names this environment's site-packages; every `model.py` starts with `site.addsitedir()` on
  each (which also honours the editable install's .pth file), then moves the stub interpreter's own site-packages
  behind them, as a venv would hide them.
- The stub (Triton 2.51's, built with a pybind11 older than numpy 2) needs numpy<2: with numpy 2 its arrays have the
  wrong item size, so a BYTES input crashes the stub (the 4-byte length prefix arrives as its low byte repeated) and
  a numpy output arrives empty. requirements.txt pins numpy 1.26. Where this environment has numpy 2 (a GPU
  machine's own Python), `KILN_STUB_PATH` names folders with numpy<2 (`pip install --target DIR 'numpy<2'`) that the
  stubs put first; `TritonServer.start()` refuses a numpy 2 that the stubs would import. (This was first taken for a
  fault of pyenv's libpython: its interpreter's own site-packages held numpy 2 and came first.)
"""

from __future__ import annotations

import os
import shutil
import site
import sys
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ServerError


@dataclass(frozen=True)
class TritonInstallation:
    """Where the pieces of the wheel-bundled server are."""

    binary: Path
    library_dir: Path  # nvidia_pytriton.libs: libtritonserver and friends under hashed names
    python_backend: Path  # backends/python/ of the wheel
    stub: Path  # triton_python_backend_stub for this interpreter's version

    @classmethod
    def find(cls) -> TritonInstallation:
        import importlib.util

        # Found, not imported: only its files are used (pytriton's own imports need packages kiln does not).
        package = importlib.util.find_spec("pytriton")
        if package is None or not package.submodule_search_locations:  # pragma: no cover - a pinned dependency
            raise ServerError("nvidia-pytriton is not installed; run `make setup`")
        root = Path(list(package.submodule_search_locations)[0]).resolve() / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(
            binary=root / "bin" / "tritonserver",
            library_dir=root.parent.parent / "nvidia_pytriton.libs",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        for name, path in (("tritonserver binary", found.binary), ("Python backend", found.python_backend),
                           (f"Python {version} backend stub", found.stub), ("Triton libraries", found.library_dir)):
            if not path.exists():
                raise ServerError(f"{name} not found at {path}; reinstall nvidia-pytriton (make setup)")
        return found

    def backend_directory(self) -> Path:
        """A backend folder with the Python backend and the stub matching this interpreter.

        Kept inside the virtual environment, so it is made once per environment (in the user's cache where the
        environment is a system Python that is not writable).
        """
        target = Path(sys.prefix) / "share" / "kiln" / "triton-backends"
        if not os.access(sys.prefix, os.W_OK):
            target = Path.home() / ".cache" / "kiln" / f"triton-backends-py{sys.version_info[0]}.{sys.version_info[1]}"
        python_dir = target / "python"
        marker = python_dir / ".complete"
        if not marker.exists():
            if python_dir.exists():
                shutil.rmtree(python_dir)
            shutil.copytree(self.python_backend, python_dir)
            shutil.copy2(self.stub, python_dir / "triton_python_backend_stub")
            marker.write_text(str(self.stub))
        return target


def stub_site_packages() -> str:
    """The value of KILN_SITE_PACKAGES: the folders of KILN_STUB_PATH (numpy<2 for the stubs, where this environment
    has numpy 2), this environment's site-packages folders, then the folders on PYTHONPATH (the stub ignores
    PYTHONPATH itself): a checkout run without installing, packages installed with --target."""
    folders = [*_folders("KILN_STUB_PATH"), *site.getsitepackages(), *_folders("PYTHONPATH")]
    return os.pathsep.join(dict.fromkeys(folders))


def _folders(variable: str) -> list[str]:
    return [str(Path(p).resolve()) for p in os.environ.get(variable, "").split(os.pathsep) if p]


def stub_numpy(folders: str) -> str | None:
    """The version of the numpy that stubs with these KILN_SITE_PACKAGES folders import (the first folder's that has
    one; None where none has, and the stub interpreter's own decides)."""
    import importlib.metadata

    for folder in filter(None, folders.split(os.pathsep)):
        found = next(iter(importlib.metadata.distributions(name="numpy", path=[folder])), None)
        if found is not None:
            return found.version
    return None


def check_stub_numpy(folders: str) -> None:
    """Refuse a numpy 2 in the stubs, which corrupts their tensors (the module docstring says how)."""
    version = stub_numpy(folders)
    if version is not None and int(version.split(".")[0]) >= 2:
        raise ServerError(f"Triton's Python-backend stubs would import numpy {version}, and the embedded Triton's stub "
                          "needs numpy<2 (with numpy 2 its BYTES inputs crash it and its numpy outputs arrive empty). "
                          "Install numpy<2 here (requirements.txt pins 1.26.4), or give the stubs their own: "
                          "pip install --target DIR 'numpy<2', then KILN_STUB_PATH=DIR")


def libpython_fallback() -> list[str]:
    """This interpreter's library folder where the system has no libpython3.X.so.1.0 for the stub to link (a Python
    built apart from the system's, as a GPU machine's may be); nothing where it has one (Debian's, here)."""
    import ctypes.util
    import sysconfig

    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    folder = sysconfig.get_config_var("LIBDIR")
    if ctypes.util.find_library(name) or not folder or not (Path(folder) / f"lib{name}.so.1.0").exists():
        return []
    return [folder]
