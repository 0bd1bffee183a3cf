#!/usr/bin/env bash
# System packages the project needs beyond Python wheels.
# Triton's Python-backend stub embeds the system's libpython3.X (Debian's libpython3.11 here).
# We always use Debian's build: with a pyenv interpreter's own libpython the stub corrupts BYTES
# inputs (see orchestrator/triton_server.py).
set -euo pipefail
py=${PYTHON:-python3}
ver=$("$py" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
# grep without -q: with pipefail, an early exit of grep would fail the pipeline through SIGPIPE.
if "$ldconfig" -p 2>/dev/null | grep -E "libpython${ver}\.so\.1\.0 .*=> /(usr/)?lib/" >/dev/null; then
  exit 0
fi
echo "setup: installing Debian's libpython${ver} (embedded by Triton's Python backend stub)"
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "libpython${ver}" >/dev/null
