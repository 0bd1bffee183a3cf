"""What a lent GPU machine is sent (scripts/gpu_wheels.py), and the numpy its Triton stubs import.

The GPU machine has Python 3.12 with numpy 2 and no network, and a run carries 64 MiB in all: the wheels it lacks are
trimmed and recompressed here, and its Triton stubs get a numpy<2 of their own.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from kiln.errors import ServerError
from kiln.triton_install import check_stub_numpy, stub_numpy, stub_site_packages
from scripts.gpu_wheels import STUBS, TRAVEL_LIMIT, keep, pins, repack, tree_size


def _wheel(path, names):
    info = path.name.split("-")[0] + "-1.0.dist-info"
    record = f"{info}/RECORD"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name in names:
            wheel.writestr(name, f"content of {name}\n" * 50)
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {info.split('-')[0]}\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(record, "".join(f"{n},,\n" for n in [*names, f"{info}/METADATA", f"{info}/WHEEL", record]))
    return path


def test_a_repacked_wheel_keeps_one_python_and_pip_installs_it(tmp_path):
    names = [f"{STUBS}3.11/triton_python_backend_stub", f"{STUBS}3.12/triton_python_backend_stub",
             "nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0", "nvidia_pytriton.libs/libtritonserver-7171.so",
             "pytriton/tritonserver/bin/tritonserver"]
    wheel, info = _wheel(tmp_path / "nvidia_pytriton-1.0-py3-none-any.whl", names), "nvidia_pytriton-1.0.dist-info"
    before, after = repack(wheel, "3.12")
    assert after < before
    with zipfile.ZipFile(wheel) as repacked:
        kept = set(repacked.namelist())
        assert all(entry.compress_type == zipfile.ZIP_LZMA for entry in repacked.infolist())
        record = repacked.read(f"{info}/RECORD").decode()
    assert kept == {f"{STUBS}3.12/triton_python_backend_stub", "nvidia_pytriton.libs/libtritonserver-7171.so",
                    "pytriton/tritonserver/bin/tritonserver", f"{info}/METADATA", f"{info}/WHEEL", f"{info}/RECORD"}
    assert "3.11" not in record and "libpython3-" not in record and "bin/tritonserver" in record
    # pip reads an LZMA wheel: what scripts/gpu_check.sh runs on the GPU machine
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True)
    installed = tmp_path / "site" / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    assert installed.read_text() == "content of pytriton/tritonserver/bin/tritonserver\n" * 50
    with pytest.raises(SystemExit, match="has no Python 3.10 backend stub"):
        repack(_wheel(tmp_path / "nvidia_pytriton-2.0-py3-none-any.whl", names), "3.10")


def test_what_travels_leaves_room_for_the_wheels():
    assert not keep(f"{STUBS}3.13/triton_python_backend_stub", "3.12") and keep("diffusers/__init__.py", "3.12")
    assert pins(("numpy", "nvidia-pytriton"))[0].startswith("numpy==1.")  # the stubs' numpy: see the next test
    # The wheels take about 45 MiB of the 64 a GPU run carries; a committed or stray large file takes the rest.
    assert tree_size() < TRAVEL_LIMIT - 50 * 2**20, "the working tree is too large to travel with the GPU wheels"


def _numpy_metadata(folder, version):
    info = folder / f"numpy-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: numpy\nVersion: {version}\n")
    return str(folder)


def test_the_stubs_numpy_is_the_first_on_their_path_and_numpy_2_is_refused(tmp_path, monkeypatch):
    import numpy

    here = stub_site_packages()
    assert stub_numpy(here) == numpy.__version__  # this environment's (requirements.txt: 1.26)
    check_stub_numpy(here)
    two, one = _numpy_metadata(tmp_path / "two", "2.5.2"), _numpy_metadata(tmp_path / "one", "1.26.4")
    with pytest.raises(ServerError, match=r"would import numpy 2\.5\.2.*KILN_STUB_PATH=DIR"):
        check_stub_numpy(f"{two}:{here}")
    monkeypatch.setenv("KILN_STUB_PATH", one)
    assert stub_site_packages().split(":")[0] == one
    assert stub_numpy(f"{stub_site_packages()}:{two}") == "1.26.4"
