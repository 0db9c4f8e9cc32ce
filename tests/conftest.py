"""Shared test configuration: skip markers, the tolerance table, and the comparison helpers.

No device is queried at import time: markers evaluate lazily through pytest's skipif strings
or through fixtures.
"""

from __future__ import annotations

import decimal
import functools
import math

import pytest
import torch


@functools.cache
def _has_cuda() -> bool:
    return torch.cuda.is_available()


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _has_cuda_extension() -> bool:
    from gradclip import _extension

    return not _extension.why_no_cuda_kernels()


def pytest_collection_modifyitems(config, items):
    reasons = {
        "cuda": (_has_cuda, "needs a CUDA GPU"),
        "triton": (_has_triton, "needs triton (pip install triton==3.6.0)"),
        "cuda_extension": (
            lambda: _has_cuda() and _has_cuda_extension(),
            "needs a GPU and the built gradclip._C",
        ),
    }
    for item in items:
        for name, (check, why) in reasons.items():
            if item.get_closest_marker(f"requires_{name}") and not check():
                item.add_marker(pytest.mark.skip(reason=why))


def pytest_configure(config):
    for name in ("cuda", "triton", "cuda_extension"):
        config.addinivalue_line("markers", f"requires_{name}: skip unless the test machine has {name}")


def clone_params(params):
    """Fresh parameters with the same values, requires_grad and gradients (None stays None)."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


# The adversarial shape grid shared by the API and kernel tests (STYLE.md), as lists of gradient
# shapes with readable ids; kernel tests add cases tied to their chunk and grid sizes.
SHAPE_GRID = {
    "one-scalar": [()],
    "size-1": [(1,)],
    "size-3": [(3,)],
    "size-127": [(127,)],
    "one-past-vector-width": [(9,), (5,), (17,)],
    "zero-size-mixed": [(0,), (4, 0), (7,)],
    "2000-tiny": [(3,)] * 2000,
}


# The one table of tolerances, per gradient dtype, for a kernel/reference result against the fp64
# reference. Norms are accumulated in >= fp32, so they are tight for every dtype; clipped
# gradients are rounded once to their own dtype.
NORM_TOL = {
    torch.float64: dict(rtol=1e-12, atol=0.0),
    torch.float32: dict(rtol=2e-6, atol=0.0),
    torch.float16: dict(rtol=2e-6, atol=0.0),
    torch.bfloat16: dict(rtol=2e-6, atol=0.0),
}
GRAD_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-300),
    torch.float32: dict(rtol=2e-6, atol=1e-30),
    torch.float16: dict(rtol=1e-3, atol=1e-7),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-30),
}


def fp64_norm(grads, norm_type: float) -> float:
    """The exact-as-possible norm: fp64 on the host via Python's math, independent of gradclip.

    p < 0 is computed in 60-digit decimal arithmetic, with no scaling (independent of gradclip's
    min-magnitude scaling): a zero gives 0 and NaN gives NaN as in torch.linalg.vector_norm, and
    zero-size tensors add nothing (0 when there is nothing else)."""
    values = [float(x) for g in grads for x in g.detach().double().abs().flatten().tolist()]
    if not values:
        return 0.0
    if norm_type < 0:
        return _decimal_negative_norm(values, norm_type)
    if math.isinf(norm_type):
        return max(values)
    peak = max(values)
    if peak == 0 or not math.isfinite(peak):
        return peak
    return peak * math.fsum((v / peak) ** norm_type for v in values) ** (1.0 / norm_type)


def _decimal_negative_norm(values: list[float], norm_type: float) -> float:
    if any(math.isnan(v) for v in values):
        return math.nan
    if norm_type == -math.inf:
        return min(values)
    if any(v == 0 for v in values):
        return 0.0  # |0|^p is inf, and inf^(1/p) is 0
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        p = decimal.Decimal(norm_type)
        total = sum((decimal.Decimal(v) ** p for v in values if math.isfinite(v)), decimal.Decimal(0))
        if total == 0:
            return math.inf  # every element infinite
        return float(total ** (1 / p))
