"""The routes SD.Next's clients call when they connect (vladmandic/automatic, modules/api/server.py): version, status
and platform, in its shapes and field names, answered with what this service knows; nothing is made up (a figure
kiln cannot know is left out)."""

from __future__ import annotations

import locale
import platform
import subprocess
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

import kiln
from kiln.machine import machine
from orchestrator.jobs import Job
from orchestrator.server.generation import client_id, engine

router = APIRouter(prefix="/sdapi/v1", tags=["sdnext"])
# What runs here (the service: FastAPI, the diffusers schedulers on torch, the Triton client) and the runtimes
# kiln's Triton models use where they share this environment (embedded Triton: the nvidia-pytriton wheel's server).
PACKAGES = ("kiln", "fastapi", "numpy", "torch", "diffusers", "tritonclient", "nvidia-pytriton", "onnxruntime",
            "onnxruntime-gpu", "openvino", "tensorrt")


@lru_cache(maxsize=1)
def version_info() -> dict:
    """SD.Next's get_version shape: app, updated (the commit's date), hash, url; the git fields only where kiln runs
    from a git checkout (an installed wheel has no commit to report), url only where it has an origin remote."""
    info: dict = {"app": "kiln", "version": _version("kiln")}
    root = Path(kiln.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return info
    last = _git(root, "log", "-1", "--pretty=format:%h %ad", "--date=short").split()
    if len(last) == 2:
        info["hash"], info["updated"] = last
    origin, branch = _git(root, "remote", "get-url", "origin"), _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    if origin and branch:
        info["url"] = f"{origin}/tree/{branch}"
    return info


def _git(root: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):  # no git here
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@router.get("/version")
async def version() -> dict:
    return await run_in_threadpool(version_info)


def _visible(request: Request, job: Job) -> bool:
    """Every job when auth is off; the caller's own otherwise (its id and task are not another caller's to see)."""
    return not request.app.state.settings.security.auth_required or job.client_id == client_id(request)


@router.get("/status")
async def status(request: Request) -> dict:
    """SD.Next's ResStatus over the engine's queue: the oldest running job (of the caller's, with auth) is "the"
    job; queued counts every waiting job. kiln runs several jobs at once, so `running` says how many; `total` is the
    jobs the engine holds now (running and queued): it keeps no count since it started."""
    queue = engine(request).queue
    running = await run_in_threadpool(queue.running)
    queued = await run_in_threadpool(queue.waiting)
    mine = sorted((job for job in running if _visible(request, job)), key=lambda job: job.started or 0)
    job = mine[0] if mine else None
    now = time.time()
    answer = {"status": "idle", "task": "", "timestamp": None, "id": "", "job": 0, "jobs": 0,
              "total": len(running) + queued, "step": 0, "steps": 0, "queued": queued, "running": len(running),
              "uptime": round(now - _started()), "elapsed": None, "eta": None, "progress": 0.0}
    if job is None:
        return answer
    # SD.Next's arithmetic: steps over all of the job's runs (n_iter), progress rounded to 2 places
    step, steps = job.steps * job.iteration + job.step, job.steps * job.n_iter
    progress = round(min(1.0, step / steps), 2) if steps > 0 else 0.0
    elapsed = round(now - job.started, 2) if job.started is not None else None
    eta = round(round(elapsed / progress, 2) - elapsed, 2) if progress > 0 and elapsed is not None else None
    state = "interrupted" if job.interrupted else "skipped" if job.skipped else "running"
    return answer | {"status": state, "task": job.kind, "id": job.id, "job": job.iteration, "jobs": job.n_iter,
                     "timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "step": step,
                     "steps": steps, "elapsed": elapsed, "eta": eta, "progress": progress}


@lru_cache(maxsize=1)
def _started() -> float:
    """When this service's process started (SD.Next's uptime is its server's)."""
    import psutil

    return psutil.Process().create_time()


@router.get("/platform")
async def platform_info(request: Request) -> dict:
    """SD.Next's get_platform fields (arch, cpu, system, release, python, locale) with kiln.machine's cores and
    vector extensions, the versions of the packages installed here (null: not installed; read from their metadata,
    nothing is imported), and the version of the Triton server this service talks to (null: unreachable now)."""
    def gather() -> dict:
        host = machine()
        info = {"arch": platform.machine(), "cpu": host["cpu"], "system": platform.system(),
                "release": platform.release(), "python": platform.python_version(), "locale": locale.getlocale(),
                "cores": host["cores"], "isa": host["isa"]}
        info |= {package: _version(package) for package in PACKAGES}
        try:
            server = request.app.state.probe.connection().get_server_metadata(as_json=True, client_timeout=2)
            info["triton"] = server.get("version")
        except Exception:  # noqa: BLE001 - unreachable, refused, timed out: the version is unknown now
            info["triton"] = None
        return info

    return await run_in_threadpool(gather)
