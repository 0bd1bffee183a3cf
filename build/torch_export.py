"""The torch variants' artifacts: a component's wrapper module exported by `torch.export`, and for the `torch-aoti-*`
variants that program compiled ahead of time by AOTInductor into a package of native code.

Every named axis of the spec is dynamic (`Dim.AUTO`: the exporter infers the constraints, such as the latents'
multiples of the UNet's downsampling), so one program serves every batch and size of the spec's profile. A lower
precision or the CUDA variants are exported from a copy of the module (the float32 module stays the parity
reference); the runtime (kiln.runtime.torch_session) runs the program or the package without diffusers or timm.

AOTInductor compiles one C++ file per program, single-threaded: the components of a build compile side by side,
one process each (`compile_packages`), and a package is cached by the hash of the program it was compiled from (its
graph and weights) with the torch release, the device and this CPU's vector ISA, so rebuilding the same weights
costs no compile. `KILN_AOTI_CACHE` moves the cache (default ~/.cache/kiln/aoti); `off` turns it off.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from build.convert import Variant
from build.specs import ComponentSpec
from kiln.errors import ExportError, first_line

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Inputs kept in float32 whatever the variant: fractional timesteps near 1000 (Euler a's) round to 0.5 in float16,
# and diffusers computes the time embedding in float32 before casting it to the UNet's dtype, as its fp16 pipeline.
FLOAT32_INPUTS = ("timestep",)


def export_program(module, spec: ComponentSpec, variant: Variant, path: Path, sizes: dict[str, int]) -> None:
    """`module` exported to `path` in the variant's dtype and device, with the runtime's metadata."""
    import torch

    from kiln.runtime.torch_session import save

    device = "cuda" if variant.accelerator == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"{spec.name}: torch's CUDA variants are exported and checked on the GPU they run on, and "
                          "this machine has none (build them where they will serve)")
    if variant.precision not in DTYPES:
        raise ExportError(f"{spec.name}: no torch variant in {variant.precision}")
    dtype = getattr(torch, DTYPES[variant.precision])
    target = module if (device, dtype) == ("cpu", torch.float32) else copy.deepcopy(module).to(device, dtype)
    sample = spec.sample_inputs(seed=0, **sizes)
    args = []
    for name in spec.input_names:
        tensor = torch.from_numpy(sample[name]).to(device)
        args.append(tensor.to(dtype) if tensor.is_floating_point() and name not in FLOAT32_INPUTS else tensor)
    dynamic = tuple({i: torch.export.Dim.AUTO for i, d in enumerate(t.shape) if isinstance(d, str)}
                    for t in spec.inputs)
    parameters = inspect.signature(target.forward).parameters.values()
    fixed = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
    if len(dynamic) > fixed:  # forward(sample, ..., *residuals): the extra inputs are one tuple to the exporter
        dynamic = (*dynamic[:fixed], tuple(dynamic[fixed:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            program = torch.export.export(target.eval(), tuple(args), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise ExportError(f"torch.export of {spec.name} failed: {first_line(exc)}") from exc
    inputs = {name: str(arg.dtype).removeprefix("torch.") for name, arg in zip(spec.input_names, args)}
    save(program, path, inputs, spec.output_names, DTYPES[variant.precision], device)


@dataclass(frozen=True)
class Compiled:
    """One package: where it is, how long its compile took (0 from the cache), whether the cache had it."""

    path: Path
    seconds: float
    cached: bool


def cache_dir() -> Path | None:
    setting = os.environ.get("KILN_AOTI_CACHE", "")
    if setting == "off":
        return None
    return Path(setting) if setting else Path.home() / ".cache" / "kiln" / "aoti"


def cache_key(program: Path, device: str) -> str:
    """The program's bytes (graph and weights), the torch release, the device and what AOTInductor compiles for: on
    the CPU its vector ISA (a package built for AVX-512 does not run on an AVX2-only CPU), on CUDA the compute
    capability."""
    import torch
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from kiln.runtime.torch_session import cuda_capability

    digest = hashlib.sha256()
    with open(program, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    target = pick_vec_isa() if device == "cpu" else cuda_capability(device)
    digest.update(f"{torch.__version__}|{device}|{target}".encode())
    return digest.hexdigest()[:32]


def compile_packages(jobs: dict[Path, Path], device: str, log=print,
                     workers: int | None = None) -> dict[Path, Compiled]:
    """Compile each exported program (key) into its AOTInductor package (value), one process per program, as many
    at a time as the machine has cores (or `workers`; KILN_COMPILE_JOBS), from the cache where it has them."""
    cache, results, todo = cache_dir(), {}, {}
    for program, package in jobs.items():
        key = cache_key(program, device) if cache else None
        package.parent.mkdir(parents=True, exist_ok=True)
        if key and (cache / f"{key}.pt2").is_file():
            shutil.copyfile(cache / f"{key}.pt2", package)
            results[program] = Compiled(package, 0.0, True)
            log(f"  {package.parent.parent.name}: AOTInductor package from the cache ({key[:12]})")
        else:
            todo[program] = (package, key)
    workers = workers or int(os.environ.get("KILN_COMPILE_JOBS", "0")) or os.cpu_count() or 1

    def one(program: Path, package: Path) -> Compiled:
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "build.torch_export", str(program), str(package), device],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if run.returncode != 0:
            lines = [line for line in run.stderr.splitlines() if line.strip()]
            raise ExportError(f"AOTInductor could not compile {package.parent.parent.name}: "
                              f"{lines[-1] if lines else 'exit ' + str(run.returncode)}")
        return Compiled(package, round(time.perf_counter() - start, 2), False)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as pool:
        largest_first = sorted(todo, key=lambda p: p.stat().st_size, reverse=True)  # the UNet sets the wall time
        futures = {pool.submit(one, program, todo[program][0]): program for program in largest_first}
        for future in as_completed(futures):
            program = futures[future]
            try:
                compiled = results[program] = future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # the build fails: compile nothing more
                raise
            log(f"  {compiled.path.parent.parent.name}: compiled by AOTInductor in {compiled.seconds:.1f} s")
            key = todo[program][1]
            if key:
                cache.mkdir(parents=True, exist_ok=True)
                partial = cache / f"{key}.pt2.partial-{os.getpid()}"
                shutil.copyfile(compiled.path, partial)
                partial.replace(cache / f"{key}.pt2")  # whole or absent, for concurrent builds
    return results


def export_artifact(module, spec: ComponentSpec, variant: Variant, path: Path, sizes: dict[str, int],
                    log=print) -> Compiled | None:
    """One component's torch artifact: the exported program, or (AOTInductor) its compiled package."""
    if not variant.compiler:
        export_program(module, spec, variant, path, sizes)
        return None
    with tempfile.TemporaryDirectory(prefix="kiln-program-") as scratch:
        program = Path(scratch) / "program.pt2"
        export_program(module, spec, variant, program, sizes)
        return compile_packages({program: path}, "cuda" if variant.accelerator == "cuda" else "cpu", log)[program]


def _compile(program: Path, package: Path, device: str) -> None:
    """One program into one package (run in its own process by compile_packages)."""
    import torch

    from kiln.runtime.torch_session import write_package_metadata

    extra = {"kiln.json": ""}
    exported = torch.export.load(str(program), extra_files=extra)
    package.parent.mkdir(parents=True, exist_ok=True)
    package.unlink(missing_ok=True)
    torch._inductor.aoti_compile_and_package(exported, package_path=str(package))
    write_package_metadata(package, json.loads(extra["kiln.json"]), device)


if __name__ == "__main__":
    _compile(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
