"""The set-up and GPU-check tooling of issue 12, on CPU: tools/setup_env.sh, tools/native_registration.py,
bench/sanitize.py (Triton ops under the interpreter) and bench/gpu_check.sh's argument handling."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, env=None, timeout=300):
    return subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def test_setup_is_a_fast_no_op_when_nothing_changed():
    venv = Path(sys.prefix)
    if not (venv / ".gradclip-setup-stamp").exists():
        pytest.skip("this interpreter's venv was not made by tools/setup_env.sh")
    env = {"GRADCLIP_VENV": os.path.relpath(venv, ROOT)}
    first = run(["bash", "tools/setup_env.sh"], env=env, timeout=900)  # brings the stamp up to date
    assert first.returncode == 0, first.stderr
    start = time.perf_counter()
    result = run(["bash", "tools/setup_env.sh"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and time.perf_counter() - start < 5


def test_setup_failure_names_the_step_and_the_retry(tmp_path):
    result = run(
        ["bash", "tools/setup_env.sh"],
        env={"GRADCLIP_VENV": str(tmp_path / "venv"), "GRADCLIP_BASE_PYTHON": str(tmp_path / "no-python")},
    )
    assert result.returncode == 1
    assert "FAILED: no base interpreter" in result.stderr and "retry with: make setup" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_native_registration_flags_a_missing_kernel():
    """On a CPU-only build the gradclip::cuda_* ops have no CUDA kernel: the check must say so."""
    from gradclip import _extension

    module, why = _extension.load()
    if module is None:
        pytest.skip(why)
    if module.WITH_CUDA:
        pytest.skip("gradclip._C holds the CUDA kernels here")
    result = run([sys.executable, "tools/native_registration.py", "--expect-from", str(ROOT / "nowhere")])
    assert result.returncode == 1
    assert "has no kernel for the CUDA dispatch key" in result.stderr
    assert "not from under" in result.stderr


@pytest.mark.requires_triton
def test_sanitize_workload_runs_the_triton_kernels_on_cpu():
    result = run([sys.executable, "bench/sanitize.py", "--device", "cpu"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ran ['triton'] on cpu; failures: none" in result.stdout


@pytest.mark.requires_triton
def test_sanitize_fails_loudly_when_a_kernel_did_not_run():
    """With the tensor table refused (the reference would serve), the script must exit 2, not pass."""
    code = (
        "import os, sys; os.environ['TRITON_INTERPRET'] = '1'; sys.path.insert(0, 'bench');"
        "from gradclip import triton_backend as tb; tb._table = lambda grads: None;"
        "import sanitize; sys.exit(sanitize.main(['--device', 'cpu']))"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "NOT RUN: triton" in result.stdout


def test_gpu_check_rejects_unknown_arguments():
    result = run(["bash", "bench/gpu_check.sh", "--bogus"], timeout=30)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr
