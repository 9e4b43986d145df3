# `make test` and `make bench` build .venv from nothing, then run.
# torch: an installed 2.13 is reused (venv with system site-packages); otherwise TORCH_SPEC is
# installed explicitly first — on this machine kind it is the CPU wheel on disk. The torch now in
# the venv is then held by a pip constraints file (torch==<that version>) for every later install,
# so no dependency of an extra (torchao, bitsandbytes, …) can replace it with a newer CUDA build.
# The pin lives here, in this environment; the package itself asks only torch>=2.11.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := $(VENV)/constraints.txt
PYTEST_ARGS ?=
# two pytest workers, one torch thread each: the suite is mostly single-threaded tracing
PYTEST_WORKERS ?= 2
BENCH_ARGS ?=
# The tests whose verdict depends on how the CPU rounds 16-bit products (marker `rounding`) run a
# second time on the AVX2 code paths: ATen's kernels, Inductor's codegen, oneDNN's and MKL's
# GEMMs all dispatch on the CPU, AVX-512-BF16 and AMX round differently from AVX2's emulation,
# and CI's CPU model changes between sessions. On an AVX2-only CPU the second run repeats the
# first; on a newer one it is the AVX2 machine's run.
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

.PHONY: test test-avx2 bench env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13'))" 2>/dev/null; then \
	    echo "reusing the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
	  > $(CONSTRAINTS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test,bench]"
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-deps "torchtune==0.6.1"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)
	$(AVX2_ENV) $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m rounding

test-avx2: $(STAMP)
	$(AVX2_ENV) $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m rounding

bench: $(STAMP)
	$(PY) experiments/model_exp.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
