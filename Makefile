# gradclip developer targets. `make demo` is the main job, `make test` the test suite (what CI runs).
PYTHON ?= python
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90

.PHONY: install demo test pytest check-cuda bench gpu-check lint format

install:
	$(PYTHON) -m pip install --no-build-isolation -e .

demo:
	$(PYTHON) -m gradclip demo

# Compile-only check of every kernel source (no GPU needed), then the whole pytest suite.
test: check-cuda pytest

pytest:
	$(PYTHON) -m pytest -q tests

check-cuda:
	@bash csrc/check_compile.sh "$(NVCC)" $(CUDA_ARCHS)

bench:
	$(PYTHON) -m gradclip bench

gpu-check:
	bash bench/gpu_check.sh

lint:
	ruff check gradclip triton_kernels tests bench setup.py
	ruff format --check gradclip triton_kernels tests bench setup.py
	@command -v clang-format >/dev/null && clang-format --dry-run --Werror csrc/*.h csrc/*.cpp csrc/cuda/* csrc/cpu/* || echo "clang-format not installed; C++ format not checked"

format:
	ruff format gradclip triton_kernels tests bench setup.py
	@command -v clang-format >/dev/null && clang-format -i csrc/*.h csrc/*.cpp csrc/cuda/* csrc/cpu/* || true
