"""kiln's torch-free core: what the build, the service, the Triton models and the clients share.

Nothing here imports another package of this project (import contracts in pyproject.toml check
it), and nothing here imports torch: the Triton models and a serving install load it without one.

Importing kiln turns off OpenVINO's and NNCF's telemetry in this process: `import openvino` forks a
process to send an event, and in Triton's multithreaded Python-backend stubs that fork can deadlock
(seen here: a stub that never exits, Triton waiting out its exit timeout, the stub left running).
Both fall back to their own no-op stubs when `openvino_telemetry` cannot be imported.
"""

import sys

sys.modules.setdefault("openvino_telemetry", None)  # an import of it raises ImportError: telemetry off
