#!/usr/bin/env bash
# The GPU figures of issue 11 in one run (benchmarks/gpu_check.py), for a lent NVIDIA machine:
#
#   here:   make gpu-wheels              (the wheels that machine lacks, for its Python 3.12, into .kiln/gpu-wheels)
#   there:  bash scripts/gpu_check.sh    (run from the repository root, with .kiln/gpu-wheels carried along)
#   here, to try it on the CPU:  bash scripts/gpu_check.sh cpu   (tiny weights; tests/test_gpu_check.py runs it)
#   options (after the device, which may be left out) go to benchmarks/gpu_check.py: a run that measures one change,
#   bash scripts/gpu_check.sh --variant torch-aoti-cuda-fp16+text_encoder=torch-cuda-fp16+vae=torch-cuda-fp16 \
#       --phases weights,build,serve,sd_served,unet_rows,sd_in_process
#
# That machine has its own torch (no network, and the 5.5 GB venv cannot travel), so this script uses its python and
# installs, with --target into .kiln/gpu-site, only the carried wheels of the modules it cannot import. Results go
# to $OUT/gpu-check/results.json (and .md, .png), rewritten after every phase; the run stops itself at 8 minutes
# (KILN_GPU_CHECK_LIMIT_S: sooner, where less of the lent machine's time is left).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in  # the device first, if named; the rest: benchmarks/gpu_check.py's options
  cuda|cpu) DEVICE="$1"; shift ;;
  *) DEVICE=cuda ;;
esac
OUT="${OUT:-results}"
# The python: $PYTHON if set (a stand-in for the GPU machine's environment, say), else on the CPU the project's venv,
# else the machine's python3 (the GPU machine's holds its torch).
PY="${PYTHON:-}"
if [ -z "$PY" ] && [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
PY="${PY:-python3}"
SITE="$PWD/.kiln/gpu-site"
WHEELS="$PWD/.kiln/gpu-wheels"

# module -> the wheel that provides it (the modules the check imports beyond torch, numpy and the standard library)
missing=$("$PY" - <<'PYEOF'
import importlib.util
wheels = {"diffusers": "diffusers", "pytriton": "nvidia-pytriton", "tritonclient": "tritonclient",
          "prometheus_client": "prometheus-client", "safetensors": "safetensors", "tokenizers": "tokenizers",
          "timm": "timm", "transformers": "transformers", "onnx": "onnx", "onnxruntime": "onnxruntime",
          "grpc": "grpcio", "google.protobuf": "protobuf", "open_clip": "open-clip-torch", "PIL": "pillow",
          "tqdm": "tqdm", "psutil": "psutil", "rapidjson": "python-rapidjson"}  # rapidjson: tritonclient's
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
    "$PY" -m pip install --quiet --upgrade --no-deps --no-index --find-links "$WHEELS" --target "$SITE" "$wheel" \
      || echo "gpu-check: no carried wheel for $wheel (make gpu-wheels carries the ones this check needs)" \
      | tee -a "$OUT/gpu-check-setup.log"
  done
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"  # only then: a folder left by another python must not shadow this one's
fi
# Triton's Python-backend stub needs numpy<2 (kiln/triton_install.py says why). Where this python has numpy 2 (the GPU
# machine's has 2.5), the stubs get the carried numpy 1.26 in a folder of their own, first on their path.
if ! "$PY" -c "import sys, numpy; sys.exit(int(numpy.__version__.split('.')[0]) >= 2)"; then
  STUB="$PWD/.kiln/gpu-stub-numpy"
  if "$PY" -m pip install --quiet --upgrade --no-deps --no-index --find-links "$WHEELS" --target "$STUB" "numpy<2"; then
    export KILN_STUB_PATH="$STUB"
  else
    echo "gpu-check: no carried numpy<2 for Triton's stubs (make gpu-wheels carries one)" | tee -a "$OUT/gpu-check-setup.log"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('gpu-check: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec timeout --signal=INT --kill-after=20 "${KILN_GPU_CHECK_LIMIT_S:-480}" "$PY" -m benchmarks.gpu_check --device "$DEVICE" --out "$OUT" "$@"
