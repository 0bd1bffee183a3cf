#!/usr/bin/env bash
# The GPU check in a stand-in for the lent GPU machine's Python, on this machine's CPU: before a GPU is lent, find
# what its environment breaks (it found five faults, each of which would have failed that run).
#
#   bash scripts/gpu_sim.sh          (about 4 GB of downloads and 6 minutes the first time; then 4 minutes a run)
#
# The stand-in: Python 3.12 (pyenv's, or $PYTHON312) in .kiln/gpu-sim-venv with the versions the device tool's
# KINDS.md lists for that machine (torch 2.11 CUDA build, numpy 2.5, transformers 5.17, huggingface_hub 1.33,
# onnxruntime 1.30, ...), without what it lacks (pydantic, OpenVINO, this project's pins). Then `make gpu-wheels`'
# wheels, installed by scripts/gpu_check.sh as there, and the check on tiny weights: results in $OUT/gpu-check.
# What it cannot stand in for: CUDA itself, and that machine's libpython3.12 (here pyenv's: Debian 12 has none, so
# kiln/triton_install.py's fallback puts the interpreter's own library folder on the stubs' LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY312="${PYTHON312:-$(pyenv prefix 3.12 2>/dev/null || true)/bin/python3.12}"
[ -x "$PY312" ] || { echo "gpu-sim: no Python 3.12 (pyenv install 3.12, or PYTHON312=...)"; exit 2; }
VENV="$PWD/.kiln/gpu-sim-venv"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 transformers==5.17.0 \
    huggingface_hub==1.33.0 tokenizers==0.23.2 safetensors==0.8.0 onnx==1.23.1 onnxruntime==1.30.0 \
    onnxscript==0.7.2 onnx-ir==1.0.0 accelerate==1.15.0 timm pillow psutil tqdm prometheus-client grpcio protobuf \
    opencv-python-headless requests regex filelock pyyaml jinja2 scipy peft einops wrapt typing-inspect \
    sentencepiece scikit-image matplotlib
  "$VENV/bin/pip" uninstall --quiet -y pydantic pydantic-core annotated-types typing-inspection  # not there
fi
MADE=.kiln/gpu-wheels/.made
if [ ! -f "$MADE" ] || [ requirements.txt -nt "$MADE" ] || [ scripts/gpu_wheels.py -nt "$MADE" ]; then
  make gpu-wheels && touch "$MADE"
fi
rm -rf .kiln/gpu-site .kiln/gpu-stub-numpy  # installed afresh from the wheels, as on a fresh GPU machine
OUT="${OUT:-$PWD/.kiln/gpu-sim-out}" KILN_GPU_CHECK_WORK="${KILN_GPU_CHECK_WORK:-.kiln/gpu-sim-work}" \
  PYTHON="$VENV/bin/python" bash scripts/gpu_check.sh cpu
