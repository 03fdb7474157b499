# The two commands of the contract: `make demo` and `make test`. Both start from nothing (a fresh
# clone), build .venv once, and reuse it on later runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda

NATIVE_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test setup aot-check cuda-check bench bench-quick gpu-check gpu-check-dry compat-check clean

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

# Every Triton kernel compiled for sm_90 (GPUTarget cuda 90) at exactly the configs the launchers
# choose on a GPU, driven with fake CUDA tensors: fails on a compile error, a register spill or
# shared memory over the per-block limit; prints the table (parallelkit/aot_check).
aot-check: setup
	mkdir -p build && $(PY) -m parallelkit.aot_check --json build/aot-check.json

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

# On a machine with one GPU and its own torch, without .venv (nothing can be downloaded there):
# builds the CUDA extension into GPU_PYTHON's environment (pip install --no-build-isolation
# --no-deps -e .), runs the GPU tests and the benchmarks' GPU configuration within 480 s, and packs
# every log, summary.json and result into the one file OUT (a folder: a .tgz named inside it).
GPU_PYTHON ?= python3
OUT ?= benchmarks/results
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check --out $(OUT)

# The same steps on CPU with small budgets (no build, GPU tests skipped, the GPU benchmarks at quick
# sizes): proves the script end to end. tests/unit/test_gpu_check.py runs it too.
gpu-check-dry: setup
	$(PY) -m benchmarks.gpu_check --dry-run --out build/gpu-check-dry.tgz

# The GPU machine's stack (Python 3.12, torch 2.11.0+cu130, Triton 3.6) in a second environment,
# .venv-torch211: compiles the extension against it (C++ and CUDA sources, sm_90) into
# build/torch211/ (the .venv's editable install and in-place build stay as they are), then runs the
# GPU path's Python on CPU under that torch: the gpu-check dry run (which imports every module and
# runs `parallelkit info`), every Triton kernel compiled for sm_90 by Triton 3.6 (aot_check), the
# build's facts, and the kernels and ops the GPU tests use (in Triton 3.6's interpreter, and over
# gloo).
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3)
COMPAT_VENV   := .venv-torch211
COMPAT_PY     := $(COMPAT_VENV)/bin/python
COMPAT_BUILD  := build/torch211
COMPAT_ENV    := PYTHONSAFEPATH=1 PYTHONPATH=$(COMPAT_BUILD)/site:$(CURDIR)

$(COMPAT_VENV)/.deps: requirements-torch211.txt
	test -x $(COMPAT_PY) || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q -r requirements-torch211.txt
	touch $@

# PYTHONSAFEPATH keeps the repo's own parallelkit (built for .venv's torch) off sys.path: the copy
# in $(COMPAT_BUILD)/site, with the extension built here, is the one imported.
compat-check: $(COMPAT_VENV)/.deps
	rm -rf $(COMPAT_BUILD)/site && mkdir -p $(COMPAT_BUILD)/site
	cp -r parallelkit $(COMPAT_BUILD)/site/ && cp -r kernels $(COMPAT_BUILD)/site/parallelkit/
	rm -f $(COMPAT_BUILD)/site/parallelkit/_C*.so
	PARALLELKIT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 $(COMPAT_PY) setup.py -q build_ext \
		--build-temp $(COMPAT_BUILD)/obj --build-lib $(COMPAT_BUILD)/site
	$(COMPAT_ENV) $(COMPAT_PY) -m benchmarks.gpu_check --dry-run \
		--out $(COMPAT_BUILD)/gpu-check-dry.tgz
	@if [ -e parallelkit/aot_check ]; then \
		set -x; $(COMPAT_ENV) $(COMPAT_PY) -m parallelkit.aot_check; \
	else echo "compat-check: no parallelkit.aot_check here, Triton 3.6's sm_90 compile unchecked"; fi
	$(COMPAT_ENV) PARALLELKIT_EXPECT_CUDA_BUILD=1 $(COMPAT_PY) -m pytest -q -p no:cacheprovider \
		tests/unit/test_about.py tests/ops tests/distributed/test_parallel_norms.py \
		tests/distributed/test_vocab_parallel_cross_entropy.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info parallelkit/_C*.so
