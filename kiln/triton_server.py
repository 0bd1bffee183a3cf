"""The embedded Triton Inference Server: the real `tritonserver` binary from the nvidia-pytriton wheel, started,
watched and stopped. Where its pieces are, and how its Python-backend stubs see this environment: kiln.triton_install.

Production (NVIDIA's tritonserver image) needs neither: there the packages are installed into the
image's own Python.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import ServerError
from kiln.repository import native_models
from kiln.triton_install import TritonInstallation, check_stub_numpy, libpython_fallback, stub_site_packages

_PR_SET_PDEATHSIG = 1
_SERVERS = itertools.count()  # this process's servers: each names its Python backend's shared memory its own way
SHM_FOLDER = Path("/dev/shm")


@dataclass(frozen=True)
class TritonOptions:
    """How to start the embedded server."""

    repository: Path  # the model repository to serve
    address: str = "127.0.0.1"  # bind address for HTTP and gRPC; 127.0.0.1 keeps it off the network
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    startup_timeout_s: float = 300.0  # loading several full-size models on 2 cores takes a while
    exit_timeout_s: int = 30  # how long Triton waits for in-flight requests on shutdown
    log_verbose: int = 0
    # default: a file in a fresh temporary folder, made by start() and removed by a clean stop() (one was left per
    # server: 125 a day here); a server that fails or crashes keeps it for its error to point at
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # Triton's explicit model control: only these models load at start, the others on a client's load call (kiln
    # serve --max-checkpoints); None: every model of the repository loads at start (model control "none")
    load_models: tuple[str, ...] | None = None
    # The first GPU's CUDA memory pool, through which the Python backend hands a GPU input (a client's CUDA shared
    # memory) to a model's stub: Triton's default, 64 MB, holds one 256-image uint8 ViT batch (38.5 MB), not two
    # copies of vit's at once. Without a GPU Triton disables the pool.
    cuda_memory_pool_mb: int = 256

    @classmethod
    def on_free_ports(cls, repository: Path, log_path: Path | None = None, **fields) -> TritonOptions:
        """Loopback, on ports that are free now (tests, benchmarks and `kiln demo` start several side by side);
        fields: any other option, a port too."""
        ports = dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3)))
        return cls(repository=repository, log_path=log_path, **{**ports, **fields})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports on 127.0.0.1 that nothing listens on right now. Each is held until all are
    chosen: asked one at a time, the kernel may hand the same port out twice (a CI run once got Triton's HTTP and
    metrics ports equal, and Triton refused to start)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def spawn_tied(command: list[str], **popen: object) -> subprocess.Popen:
    """Start `command` so that it gets SIGTERM when the thread that started it ends (its parent dies).

    The signal follows the *thread* that started it: started from a thread that then ends, the command gets SIGTERM
    at once (a test met it). Start it from a thread that lives as long as it should.

    util-linux's `setpriv --pdeathsig` sets the signal, then execs the command, so its pid is the command's. A
    `preexec_fn` doing the same is no longer safe: it makes CPython fork() rather than vfork(), which runs gRPC's fork
    handlers in the child, and grpcio >= 1.81 restarts its poller thread there; `close_fds` then closes that poller's
    epoll descriptor before exec, and the child aborts ("epoll_ctl failed: Bad file descriptor", exit -6; grpc/grpc
    issue 43055). Measured: 18 of 300 such spawns from a process with a live gRPC channel, none through setpriv."""
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return subprocess.Popen([setpriv, "--pdeathsig", "TERM", *command], **popen)
    return subprocess.Popen(command, preexec_fn=_die_with_parent, **popen)  # pragma: no cover - no util-linux


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec, without setpriv
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux
        pass


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a stopped server's process group (its own session: start_new_session). A Triton that
    exits cleanly takes its Python-backend stubs with it; one that was killed or crashed leaves them running, holding
    their models' memory and shared-memory regions (two such stubs outlived a test run by an hour)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left (the usual case)
        pass


class TritonServer:
    """A running `tritonserver` process. Use as a context manager, or call start() and stop()."""

    def __init__(self, options: TritonOptions) -> None:
        self.options = options
        self.install = TritonInstallation.find()
        self._process: subprocess.Popen | None = None
        self._log_file = None
        self._temporary_log = options.log_path is None
        if options.log_path is not None:
            self.log_path = Path(options.log_path)
        else:
            self.log_path = Path(tempfile.gettempdir()) / f"kiln-triton-{uuid.uuid4().hex[:12]}" / "tritonserver.log"
        # The Python backend's regions in /dev/shm (16 MB per model instance, more as they grow) are named
        # prefix + a uuid. Triton removes them when it exits; a Triton killed or crashed leaves them, in memory,
        # until the machine restarts (5.5 GB of them had piled up here). This prefix lets stop() find its own.
        self.shm_prefix = f"triton_python_backend_shm_region_kiln{os.getpid()}_{next(_SERVERS)}_"

    # -- addresses -------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{_client_host(self.options.address)}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_client_host(self.options.address)}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_client_host(self.options.address)}:{self.options.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """The tritonserver process id while it runs (its Python-backend stubs are its children)."""
        return self._process.pid if self._process is not None else None

    # -- lifecycle -------------------------------------------------------------------------
    def command(self) -> list[str]:
        o = self.options
        return [
            str(self.install.binary),
            f"--model-repository={Path(o.repository).resolve()}",
            f"--backend-directory={self.install.backend_directory()}",
            *(["--model-control-mode=none"] if o.load_models is None else
              ["--model-control-mode=explicit", *(f"--load-model={m}" for m in o.load_models)]),
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={o.exit_timeout_s}",
            f"--http-address={o.address}",
            f"--http-port={o.http_port}",
            f"--grpc-address={o.address}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-address={o.address}",
            f"--metrics-port={o.metrics_port}",
            "--allow-metrics=true",
            f"--log-verbose={o.log_verbose}",
            # Tensors of a few MB (ViT token features of a batch) pass through shared memory.
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--cuda-memory-pool-byte-size=0:{o.cuda_memory_pool_mb << 20}",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        library_path = [str(self.install.library_dir)]
        if env.get("LD_LIBRARY_PATH"):
            library_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*library_path, *libpython_fallback()])
        env["KILN_SITE_PACKAGES"] = stub_site_packages()
        env.update(self.options.extra_env)
        return env

    def start(self) -> TritonServer:
        """Start the server and wait until it and all its models are ready."""
        if self._process is not None:
            raise ServerError("server already started")
        repository = Path(self.options.repository)
        if not repository.is_dir():
            raise ServerError(f"model repository {repository} does not exist; build one with `kiln build vit`")
        env = self.environment()  # once: it looks for libpython through ldconfig
        check_stub_numpy(env["KILN_SITE_PACKAGES"])
        native = native_models(repository)
        if native:
            listed = ", ".join(f"{name} ({backend})" for name, backend in sorted(native.items()))
            raise ServerError(f"{repository} was built for NVIDIA's tritonserver image: {listed} need Triton's native "
                              "backends, which the embedded Triton lacks (it has the Python backend). Serve it with "
                              "the Dockerfile, or rebuild with --triton-backend python to serve it here")
        self.log_path.parent.mkdir(mode=0o700 if self._temporary_log else 0o777, parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")
        self._process = spawn_tied(self.command(), env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.options.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._close_log()
                self._process = None
                raise ServerError(f"tritonserver exited with code {code} while starting:\n{self.explain()}")
            if self.is_ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {self.options.startup_timeout_s:.0f} s:\n{self.explain()}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait(self) -> int:
        """Block until the server process exits; return its exit code."""
        if self._process is None:
            return 0
        return self._process.wait()

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Ask the server to exit (SIGTERM: it drains in-flight requests), kill it if it does not."""
        if self._process is None:
            return None
        process, self._process = self._process, None
        crashed = process.poll() is not None  # it exited before we asked
        if not crashed:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s if timeout_s is not None else self.options.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _kill_group(process.pid)
        for region in self.shared_memory_regions():  # what a killed or crashed Triton left (none after a clean exit)
            region.unlink(missing_ok=True)
        self._close_log()
        if self._temporary_log and not crashed and process.returncode == 0:
            shutil.rmtree(self.log_path.parent, ignore_errors=True)
        return process.returncode

    def shared_memory_regions(self) -> list[Path]:
        """The Python backend's shared-memory regions of this server in /dev/shm (while it runs, or left by it)."""
        return sorted(SHM_FOLDER.glob(f"{self.shm_prefix}*")) if SHM_FOLDER.is_dir() else []

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- diagnostics -----------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def explain(self, max_lines: int = 40) -> str:
        """The log lines that say why the server or a model failed (errors and Python tracebacks)."""
        lines = self.log_text().splitlines()
        picked = [line for line in lines if _is_error_line(line)]
        if not picked:
            picked = lines[-max_lines:]
        return "\n".join(picked[-max_lines:]) + f"\n(full log: {self.log_path})"


def _is_error_line(line: str) -> bool:
    stripped = line.lstrip()
    return (
        (len(stripped) > 1 and stripped[0] == "E" and stripped[1:5].isdigit())  # Triton's E1126 hh:mm:ss lines
        or "Error" in line
        or "error:" in line.lower()
        or "failed" in line.lower()
        or stripped.startswith(("Traceback", "File \""))
    )


def _client_host(address: str) -> str:
    return "127.0.0.1" if address in ("0.0.0.0", "") else address
