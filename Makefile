# Two commands set everything up on a fresh machine: `make test` and `make bench`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flatminima-installed
# torch is pinned first so that pip takes the local CPU wheel instead of a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install test bench bench-step lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/flatminima bench --seeds 0,1,2
	$(BIN)/flatminima bench --seeds 0,1,2 --label-noise 0.2

bench-step: $(STAMP)
	$(BIN)/python benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis

# PyHessian is the benchmark's reference only, not a dependency: installed into the venv here (--no-deps:
# it needs only torch and numpy, already there); if that fails the script falls back to a re-implementation.
# Extra flags: make bench-hessian HESSIAN_ARGS="--quick --json hessian.json"
.PHONY: bench-hessian
bench-hessian: $(STAMP)
	-$(BIN)/python -m pip install -q --no-deps "pyhessian==0.1"
	$(BIN)/python benchmarks/hessian.py $(HESSIAN_ARGS)
