"""`make gpu-wheels`: the wheels a lent GPU machine lacks, for its Python, small enough to travel with a run.

That machine (the device tool's KINDS.md) has its own torch, transformers and onnxruntime on Python 3.12 and no
network; a run may carry 64 MiB in all, the working tree included. So this downloads, pinned as requirements.txt
pins them, only the wheels scripts/gpu_check.sh installs there, for that Python (not this machine's); trims
nvidia-pytriton (55 MB) to what its Python needs: the backend stub of that Python version alone, without the
interpreter copies that only the other versions' stubs link; and recompresses the large wheels with LZMA. It then
adds the working tree and fails, naming the sizes, if the whole would not travel.

    .venv/bin/python scripts/gpu_wheels.py [--python 3.12] [--out .kiln/gpu-wheels]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The modules gpu_check.sh may find missing, by the names requirements.txt pins them under.
# numpy: 1.26, for Triton's Python-backend stubs where the machine's own is numpy 2 (kiln/triton_install.py).
WHEELS = ("nvidia-pytriton", "diffusers", "tritonclient", "python-rapidjson", "prometheus_client", "open_clip_torch",
          "numpy")
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")
TRAVEL_LIMIT = 64 * 2**20  # the device tool's limit on what one run carries, the working tree included
STUBS = "pytriton/tritonserver/python_backend_stubs/"
REPACK_OVER = 4_000_000  # bytes: the wheels worth repacking (nvidia-pytriton, numpy, diffusers; about a minute)


def pins(names: tuple[str, ...], requirements: Path = ROOT / "requirements.txt") -> list[str]:
    """`name==version` for each name, as requirements.txt pins it (an unpinned name is an error)."""
    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name.strip()).lower()

    pinned = {normal(line.partition("==")[0]): line.strip() for line in requirements.read_text().splitlines()
              if "==" in line}
    missing = [n for n in names if normal(n) not in pinned]
    if missing:
        raise SystemExit(f"gpu-wheels: requirements.txt pins no {', '.join(missing)}")
    return [pinned[normal(n)] for n in names]


def keep(name: str, python: str) -> bool:
    """Whether a file of a wheel serves a machine whose Python is `python` (3.12, say): all but nvidia-pytriton's
    backend stubs of other versions and the interpreters it bundles for them."""
    if name.startswith(STUBS):
        return name[len(STUBS):].split("/")[0] == python
    # Bundled interpreters (libpython3-<hash>.13.so...): only the stubs of versions no system provides link them.
    return not re.match(r"nvidia_pytriton\.libs/libpython\d", name)


def repack(wheel: Path, python: str) -> tuple[int, int]:
    """Rewrite the wheel with LZMA (pip reads it: a third smaller than deflate here) and without the files `keep`
    drops, its RECORD to match; its size before and after."""
    before, repacked = wheel.stat().st_size, wheel.with_suffix(".repacked")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(repacked, "w", zipfile.ZIP_LZMA) as target:
        names = [n for n in source.namelist() if keep(n, python)]
        if wheel.name.startswith("nvidia_pytriton") and not any(n.startswith(f"{STUBS}{python}/") for n in names):
            raise SystemExit(f"gpu-wheels: {wheel.name} has no Python {python} backend stub")
        for name in names:
            content = source.read(name)
            if name.endswith(".dist-info/RECORD"):
                content = "".join(line for line in content.decode().splitlines(keepends=True)
                                  if line.split(",")[0] in names).encode()
            target.writestr(source.getinfo(name), content, compress_type=zipfile.ZIP_LZMA)
    repacked.replace(wheel)
    return before, wheel.stat().st_size


def tree_size() -> int:
    """The bytes of the working tree that travel with a run: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    return sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python version (KINDS.md: 3.12.3)")
    parser.add_argument("--out", type=Path, default=ROOT / ".kiln" / "gpu-wheels")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python, "--implementation", "cp",
                    *(f"--platform={p}" for p in PLATFORMS), "-d", str(args.out), *pins(WHEELS)], check=True)
    for wheel in sorted(w for w in args.out.glob("*.whl") if w.stat().st_size > REPACK_OVER):
        before, after = repack(wheel, args.python)
        print(f"gpu-wheels: {wheel.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    made = list(args.out.glob("*.whl"))
    wheels, tree = sum(w.stat().st_size for w in made), tree_size()
    print(f"gpu-wheels: {len(made)} wheels, {wheels / 2**20:.1f} MiB, and the working tree "
          f"{tree / 2**20:.1f} MiB: {(wheels + tree) / 2**20:.1f} MiB of the {TRAVEL_LIMIT // 2**20} MiB a run carries")
    if wheels + tree > TRAVEL_LIMIT:
        raise SystemExit("gpu-wheels: too much to travel with one run; make the working tree smaller (git status "
                         "shows untracked files that travel too)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
