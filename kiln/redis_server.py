"""A real redis-server as a child process (Debian's binary, `make test` installs it): the shared job store of
several orchestrators (`kiln serve --redis`) in tests and benchmarks, on loopback. Production runs its own
(deploy/base/redis.yaml)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from kiln.errors import ServerError
from kiln.triton_server import free_port


class RedisServer:
    """redis-server on a free loopback port with its data in `folder`, writing every change to its append-only file
    before answering (as the manifests' Redis), so a restart (`kill` then `start`) keeps what it acknowledged."""

    def __init__(self, folder: Path, port: int = 0) -> None:
        if shutil.which("redis-server") is None:
            raise ServerError("redis-server is missing: `make test` installs Debian's (scripts/setup_system.sh), "
                              "or: apt-get install redis-server")
        self.folder, self.port = Path(folder), port or free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        log = self.folder / "redis.log"
        with log.open("a") as out:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                stdout=out, stderr=subprocess.STDOUT)
        import redis

        client, deadline = self.client(), time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return self
                except (redis.ConnectionError, OSError) as exc:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise ServerError(f"redis-server did not start:\n{log.read_text()[-2000:]}") from exc
                    time.sleep(0.05)
        finally:
            client.close()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=1)

    def kill(self) -> None:
        """SIGKILL: what a crash leaves (the append-only file holds what was acknowledged)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
