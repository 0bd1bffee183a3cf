# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each sets up what is missing first (system library, virtual environment, pinned packages).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kiln-installed

.PHONY: setup demo test test-fast lint bench bench-vit clean-repo

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml scripts/setup_system.sh
	bash scripts/setup_system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(BIN)/kiln demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The inner loop: no Triton, no export (under two minutes on 2 cores).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# What the tests also check: the layout's import contracts (pyproject.toml) and ruff.
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .

bench: bench-vit

bench-vit: $(STAMP)
	$(BIN)/kiln bench vit

clean-repo:
	git clean -fdX model_repository
