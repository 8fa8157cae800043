# Two commands: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.headgain-installed
RUFF_VERSION := 0.17.6

.PHONY: demo test lint install clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the pinned CPU wheel on machines without one), then headgain and its
# compiled extension, built against that torch (no build isolation).
$(STAMP): $(PY) setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install setuptools wheel ninja pytest "ruff==$(RUFF_VERSION)"
	$(PY) -m pip install --no-build-isolation -e ".[eval]"
	$(PY) -c "import headgain, sys; ok = headgain.extension_available(); print('headgain extension:', ('built, CUDA kernels ' + ('included' if headgain.extension_available('cuda') else 'not built')) if ok else headgain.core.ops.extension_error()); sys.exit(0 if ok else 1)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m headgain.demo

# lint first (seconds), then the suite; the suite fails when the compiled extension did not load
test: lint
	HEADGAIN_REQUIRE_EXTENSION=1 $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check headgain tests benchmarks setup.py
	$(VENV)/bin/ruff format --check headgain tests benchmarks setup.py

# On a GPU machine as it comes (CUDA torch preinstalled, no venv): build with the CUDA kernels,
# run the CUDA tests and the GPU benchmarks; results under $OUT (or build/gpu-check).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build headgain/*.so *.egg-info $(STAMP)
