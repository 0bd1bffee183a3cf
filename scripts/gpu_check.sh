#!/usr/bin/env bash
# The GPU figures of issue 11 in one run (benchmarks/gpu_check.py), for a lent NVIDIA machine:
#
#   here:   make gpu-wheels              (the wheels that machine lacks, into .kiln/gpu-wheels, ~62 MB)
#   there:  bash scripts/gpu_check.sh    (run from the repository root, with .kiln/gpu-wheels carried along)
#   here, to try it on the CPU:  bash scripts/gpu_check.sh cpu   (tiny weights; tests/test_gpu_check.py runs it)
#
# That machine has its own torch (no network, and the 5.5 GB venv cannot travel), so this script uses its python and
# installs, with --target into .kiln/gpu-site, only the carried wheels of the modules it cannot import. Results go
# to $OUT/gpu-check/results.json (and .md), rewritten after every phase; the run stops itself at 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
OUT="${OUT:-results}"
PY="${PYTHON:-python3}"
if [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
SITE="$PWD/.kiln/gpu-site"
WHEELS="$PWD/.kiln/gpu-wheels"

# module -> the wheel that provides it (the modules the check imports beyond torch, numpy and the standard library)
missing=$("$PY" - <<'PYEOF'
import importlib.util
wheels = {"diffusers": "diffusers", "pytriton": "nvidia-pytriton", "tritonclient": "tritonclient",
          "prometheus_client": "prometheus-client", "safetensors": "safetensors", "tokenizers": "tokenizers",
          "timm": "timm", "transformers": "transformers", "onnx": "onnx", "onnxruntime": "onnxruntime",
          "grpc": "grpcio", "google.protobuf": "protobuf", "open_clip": "open-clip-torch", "PIL": "pillow",
          "tqdm": "tqdm", "psutil": "psutil"}
def absent(module):
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True
print(" ".join(sorted({w for m, w in wheels.items() if absent(m)})))
PYEOF
)
mkdir -p "$OUT"
if [ -n "$missing" ]; then
  echo "gpu-check: $PY lacks: $missing; installing them from $WHEELS"
  for wheel in $missing; do
    "$PY" -m pip install --quiet --no-deps --no-index --find-links "$WHEELS" --target "$SITE" "$wheel" \
      || echo "gpu-check: no carried wheel for $wheel (make gpu-wheels carries the ones this check needs)" \
      | tee -a "$OUT/gpu-check-setup.log"
  done
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('gpu-check: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec timeout --signal=INT --kill-after=20 480 "$PY" -m benchmarks.gpu_check --device "$DEVICE" --out "$OUT"
