# The two commands of the contract: `make demo` and `make test`. Both start from nothing (a fresh
# clone), build .venv once, and reuse it on later runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda

NATIVE_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test setup cuda-check bench bench-quick gpu-check clean

demo: setup
	$(PY) -m parallelkit layout --world 8 --tp 2 --pp 2 --cp 2
	$(PY) -m parallelkit demo --world 8 --tp 2 --cp 2 --steps 30
	$(PY) -m parallelkit demo --world 8 --tp 2 --cp 1 --pp 2 --steps 20 --png demo_loss_pp.png

test: setup
	$(PY) -m pytest -q

setup: $(VENV)/.built

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# --no-build-isolation: compile against the torch in .venv, the one the tests import.
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Proves the CUDA sources compile and link on a machine without a GPU (sm_90 by default), then
# checks that the extension says so. Leaves the CUDA-enabled build installed.
cuda-check: setup
	PARALLELKIT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" \
		$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	PARALLELKIT_EXPECT_CUDA_BUILD=1 $(PY) -m pytest -q tests/unit/test_about.py tests/ops

# The microbenchmarks (not part of `make test`): tables, results/*.json, PNGs beside them.
bench: setup
	$(PY) -m benchmarks

bench-quick: setup
	$(PY) -m benchmarks --quick

# On a machine with one GPU and its own torch (no .venv: nothing is downloaded there): builds the
# CUDA extension, runs `pytest -m gpu` and the benchmarks' GPU configuration, all logs and results
# in benchmarks/results/gpu-<device>-<date>/. Under 10 minutes.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info parallelkit/_C*.so
