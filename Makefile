# gradclip developer targets. On a fresh clone `make demo` and `make test` are all a newcomer needs:
# both first run tools/setup_env.sh (a .venv in the checkout, reusing the machine's torch; a no-op
# when nothing changed), then the demo, or the compile check and the test suite (what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90
DRY_RUN ?= 0
export GRADCLIP_VENV := $(VENV)

.PHONY: setup install demo test pytest check-cuda check-cuda-build bench gpu-check gpu-check-extra lint format

# The environment: created if missing, re-run when setup.py, pyproject.toml or csrc/ change.
setup:
	@bash tools/setup_env.sh

# For people who manage their own environment: the install alone, into the python on the PATH.
install:
	python -m pip install --no-build-isolation -e .

demo: setup
	$(PY) -m gradclip demo

# Compile-only check of every kernel source (no GPU needed), then the whole pytest suite.
test: setup check-cuda pytest

pytest: setup
	$(PY) -m pytest -q tests

check-cuda: setup
	@PYTHON=$(PY) bash csrc/check_compile.sh "$(NVCC)" $(CUDA_ARCHS)

# gradclip._C built for real (sm_80, sm_90) against a CUDA torch in a cached venv outside the checkout,
# imported in a fresh process, dispatch keys and ptxas spills checked. Nothing runs on a GPU.
check-cuda-build:
	@bash tools/check_cuda_build.sh

bench: setup
	$(PY) -m gradclip bench

# On a lent GPU: everything in one call of < 9 min. DRY_RUN=1 rehearses it on a CPU machine.
gpu-check:
	@if [ "$(DRY_RUN)" = 1 ]; then bash bench/gpu_check.sh --dry-run; else bash bench/gpu_check.sh; fi

# What does not fit gpu-check's 9 minutes: torch.compile providers, the CUDA-graph tests... (optional).
gpu-check-extra:
	@if [ "$(DRY_RUN)" = 1 ]; then bash bench/gpu_check.sh --extra --dry-run; else bash bench/gpu_check.sh --extra; fi

lint: setup
	$(VENV)/bin/ruff check gradclip triton_kernels tests bench tools setup.py
	$(VENV)/bin/ruff format --check gradclip triton_kernels tests bench tools setup.py
	@command -v clang-format >/dev/null && clang-format --dry-run --Werror csrc/*.h csrc/*.cpp csrc/cuda/* csrc/cpu/* || echo "clang-format not installed; C++ format not checked"

format: setup
	$(VENV)/bin/ruff format gradclip triton_kernels tests bench tools setup.py
	@command -v clang-format >/dev/null && clang-format -i csrc/*.h csrc/*.cpp csrc/cuda/* csrc/cpu/* || true
