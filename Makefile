# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse .venv and install everything; nothing else is needed.
PYTHON ?= python3
VENV   ?= .venv
# The torch wheel to install first. On this project's machines torch==2.13.0 is a
# local CPU build; elsewhere override it, e.g. TORCH_SPEC=torch (see README).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.bornsparse-installed
OUT ?= out

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bornsparse demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_permuted.py

clean:
	rm -rf $(VENV) $(OUT)
