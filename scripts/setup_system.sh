#!/usr/bin/env bash
# System packages the project needs beyond Python wheels.
# - always: Debian's libpython3.X. Triton's Python-backend stub embeds the system's libpython; we always use
#   Debian's build: with a pyenv interpreter's own libpython the stub corrupts BYTES inputs (see kiln/triton_install.py).
# - `setup_system.sh browser` (make test): Debian's chromium, which the web page's browser test drives through
#   Playwright (tests/test_ui.py), and kubectl (Debian's kubernetes-client, where none is on PATH), whose kustomize
#   renders the Kubernetes manifests tests/test_deploy.py validates, and Debian's redis-server, the job store several
#   orchestrators share (`kiln serve --redis`; tests/test_shared_queue.py starts its own on loopback).
set -euo pipefail
py=${PYTHON:-python3}
ver=$("$py" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
missing=()
# grep without -q: with pipefail, an early exit of grep would fail the pipeline through SIGPIPE.
if ! "$ldconfig" -p 2>/dev/null | grep -E "libpython${ver}\.so\.1\.0 .*=> /(usr/)?lib/" >/dev/null; then
  echo "setup: installing Debian's libpython${ver} (embedded by Triton's Python backend stub)"
  missing+=("libpython${ver}")
fi
if [ "${1:-}" = "browser" ] && [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing Debian's chromium (the web page's browser test)"
  missing+=(chromium)
fi
if [ "${1:-}" = "browser" ] && ! command -v kubectl >/dev/null; then
  echo "setup: installing Debian's kubernetes-client (kubectl kustomize renders deploy/ in tests/test_deploy.py)"
  missing+=(kubernetes-client)
fi
if [ "${1:-}" = "browser" ] && ! command -v redis-server >/dev/null; then
  echo "setup: installing Debian's redis-server (the shared job store's tests)"
  missing+=(redis-server)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
