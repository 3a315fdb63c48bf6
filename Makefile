# `make test` and `make bench` work on a fresh machine: each creates the virtual environment if
# missing, installs the pinned toolchain, builds the extension when a source changed, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
TOOLCHAIN := $(VENV)/.toolchain-installed
BUILT := $(VENV)/.mmfast-built
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: build test bench gpu-check clean

$(TOOLCHAIN): requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BUILT): $(TOOLCHAIN) $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: $(BUILT)
	$(PY) -m benchmarks $(BENCH_ARGS)

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build mmfast/_C*.so $(BUILT)
