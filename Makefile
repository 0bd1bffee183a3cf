# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each sets up what is missing first (system library, virtual environment, pinned packages).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kiln-installed

.PHONY: setup setup-serve demo test test-fast lint bench bench-vit clean-repo gpu-check gpu-wheels

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml scripts/setup_system.sh
	bash scripts/setup_system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The serving install (issue 17, the edge): `kiln serve` on a built OpenVINO repository from requirements-serve.txt
# alone (no CUDA libraries, no build tooling; about 1.4 GB against the development venv's 6.7). Another folder:
# make setup-serve SERVE_VENV=DIR. Off this machine, the CPU torch comes from PyTorch's index: SERVE_PIP_ARGS=
# "--extra-index-url https://download.pytorch.org/whl/cpu".
SERVE_VENV     ?= .venv-serve
SERVE_PIP_ARGS ?=
SERVE_STAMP    := $(SERVE_VENV)/.kiln-installed

setup-serve: $(SERVE_STAMP)

$(SERVE_STAMP): requirements-serve.txt pyproject.toml scripts/setup_system.sh
	bash scripts/setup_system.sh
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --no-deps $(SERVE_PIP_ARGS) -r requirements-serve.txt
	$(SERVE_VENV)/bin/python -m pip install --quiet --no-deps .
	touch $@

demo: $(STAMP)
	$(BIN)/kiln demo

# On TEST_WORKERS processes (pytest-xdist): a module's tests on one, the longest modules first (tests/conftest.py).
# Each process builds the session's tiny models and starts its own Triton; TEST_WORKERS=1 runs them in this one.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: $(STAMP)
	bash scripts/setup_system.sh browser
	$(PYTEST)

# The inner loop: no Triton, no export (3 min on 2 cores, 2026-12-07).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# What the tests also check: the layout's import contracts (pyproject.toml) and ruff.
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .

bench: bench-vit

bench-vit: $(STAMP)
	$(BIN)/kiln bench vit

# The GPU figures (benchmarks/gpu_check.py). On a lent GPU machine: `bash scripts/gpu_check.sh` with .kiln/gpu-wheels
# carried; here, `make gpu-check` runs it on this machine's GPU, or says there is none.
gpu-check: $(STAMP)
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA GPU here; bash scripts/gpu_check.sh cpu runs the same check on tiny weights')"
	bash scripts/gpu_check.sh cuda

# The wheels a GPU machine with its own torch lacks, for its Python (3.12), pinned as requirements.txt pins them;
# nvidia-pytriton trimmed to that Python's stub. It fails if they and the working tree exceed the 64 MiB a run carries.
gpu-wheels: $(STAMP)
	$(BIN)/python scripts/gpu_wheels.py --out .kiln/gpu-wheels

clean-repo:
	git clean -fdX model_repository
