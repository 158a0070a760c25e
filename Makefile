# `make demo` and `make test` do all set-up on a fresh machine (create .venv, install) and then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench bench-kernels bench-cpu clean

$(VENV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sparse-rnnt demo

# Both cores: the suite is mostly single-threaded interpreter work (22 min in one process on a
# slow day, 11.5 min in two).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.pipeline

bench-kernels: $(STAMP)
	$(BIN)/python -m benchmarks.kernels

bench-cpu: $(STAMP)
	$(BIN)/python -m pytest -q benchmarks/test_cpu_benchmarks.py -p no:cacheprovider --benchmark-enable \
		--benchmark-json benchmarks/results/cpu-pytest-benchmark.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
