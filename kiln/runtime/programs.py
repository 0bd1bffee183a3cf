"""What kiln writes beside an exported torch program (`extra/kiln.json` inside the `.pt2` archive), read without torch.

The metadata names the program's inputs (in call order, with their dtypes), its outputs, the dtype its floats compute
in and the torch release that exported it: torch.export's archive format is not stable across releases, so a
program is served by the release that built it, and a repository check (`python -m kiln.repository`) can say so
before Triton starts.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from kiln.errors import ConfigError

METADATA = "kiln.json"


def release(version: str) -> str:
    """major.minor of a torch version string ("2.14.1+cu130" -> "2.14")."""
    return ".".join(version.split("+")[0].split(".")[:2])


def read_metadata(path: Path) -> dict:
    """The metadata of a program file written by `kiln build`."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(f"/extra/{METADATA}"):  # <archive>/extra/kiln.json
                    return json.loads(archive.read(name))
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: not a readable program archive ({exc})") from exc
    raise ConfigError(f"{path}: not a program written by kiln build (no {METADATA})")
