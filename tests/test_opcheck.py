"""torch.library.opcheck on every registered gradclip op: schema (the declared mutations are the
real ones), fake tensor (meta) implementations, and AOT dispatch with static and dynamic shapes.

reference ops on the CPU here; triton ops on CPU tensors under TRITON_INTERPRET=1 (run in a child
process by tests/test_compile.py::test_triton_under_interpreter) and on CUDA; cuda ops on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradclip import backends, ops

ALL_NORM_TYPES = [1.0, 2.0, math.inf, 3.0]
KERNEL_NORM_TYPES = [1.0, 2.0, math.inf]
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grads(dtypes, device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (4, 4), (2,), (), (0,)]
    return [
        (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(
            device=device, dtype=dtypes[i % len(dtypes)]
        )
        for i, shape in enumerate(shapes)
    ]


def _samples(dtypes, device, norm_type: float) -> dict[str, list[tuple]]:
    norm = torch.tensor(3.0, device=device)
    return {
        "total_norm": [(_grads(dtypes, device), norm_type), (_grads(dtypes[:1], device)[:1], norm_type)],
        "clip_grad_norm_": [
            (_grads(dtypes, device), 0.5, norm_type),
            (_grads(dtypes, device), 1e6, norm_type),
        ],
        "clip_grads_with_norm_": [(_grads(dtypes, device), 0.5, norm), (_grads(dtypes, device), 1e6, norm)],
        "clip_grad_value_": [(_grads(dtypes, device), 0.1)],
    }


def _opcheck(backend: str, dtypes, device: str, norm_type: float) -> None:
    for name, samples in _samples(dtypes, device, norm_type).items():
        if name == "clip_grad_value_" and norm_type != 2.0:
            continue  # no norm involved: checked once
        for args in samples:
            result = torch.library.opcheck(ops.op(backend, name), args)
            assert all(v == "SUCCESS" for v in result.values()), (backend, name, norm_type, result)


def test_every_op_is_registered():
    for backend in ops.BACKENDS:
        for name in ops.OP_NAMES:
            assert ops.op(backend, name)._schema.name == ops.qualified_name(backend, name)


@pytest.mark.parametrize("norm_type", ALL_NORM_TYPES, ids=lambda p: f"p{p}")
def test_opcheck_reference_cpu(norm_type):
    _opcheck("reference", ALL_DTYPES, "cpu", norm_type)


@pytest.mark.requires_triton
@pytest.mark.skipif(
    not backends.triton_interpret(), reason="run by test_compile.py::test_triton_under_interpreter"
)
@pytest.mark.parametrize("norm_type", KERNEL_NORM_TYPES, ids=lambda p: f"p{p}")
def test_opcheck_triton_interpreter(norm_type):
    if backends.why_unavailable("triton", "cpu"):
        pytest.skip(backends.why_unavailable("triton", "cpu"))
    _opcheck("triton", KERNEL_DTYPES, "cpu", norm_type)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("norm_type", KERNEL_NORM_TYPES, ids=lambda p: f"p{p}")
def test_opcheck_gpu(backend, norm_type):
    why = backends.why_unavailable(backend, "cuda")
    if why:
        pytest.skip(why)
    _opcheck(backend, ALL_DTYPES if backend == "reference" else KERNEL_DTYPES, "cuda", norm_type)
