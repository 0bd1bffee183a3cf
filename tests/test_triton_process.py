"""How kiln starts tritonserver: tied to the thread that started it, and safe to start from a process that already
talks gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent import futures

import grpc

from kiln.triton_server import spawn_tied


def test_spawning_from_a_process_with_a_live_grpc_channel_never_kills_the_child():
    """A test client's gRPC channel lives in the process that starts Triton. Started with a preexec_fn (fork, so
    gRPC's fork handlers ran in the child), 18 of 300 children aborted before exec (grpc/grpc issue 43055); a CI run
    lost a test to it. Real gRPC, real children."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=10)  # its poller thread runs from here on
        codes = [spawn_tied(["true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True).wait() for _ in range(300)]
    finally:
        channel.close()
        server.stop(grace=None)
    assert codes == [0] * 300, {code: codes.count(code) for code in set(codes)}


def test_tritonserver_ends_when_the_process_that_started_it_is_killed(tmp_path):
    """SIGKILL leaves no chance to stop Triton: the parent-death signal (setpriv's) is what ends it."""
    (tmp_path / "repository").mkdir()
    script = textwrap.dedent(f"""
        import time
        from kiln.triton_server import TritonOptions, TritonServer
        server = TritonServer(TritonOptions.on_free_ports({str(tmp_path / "repository")!r},
                                                          {str(tmp_path / "triton.log")!r})).start()
        print(server.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        os.kill(pid, 0)  # running
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        assert not _alive(pid), f"tritonserver {pid} outlived the process that started it"
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
