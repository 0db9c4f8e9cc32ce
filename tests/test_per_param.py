"""Per-parameter norms (issue 14, section 1): the reference ops, gradclip.per_param_norms and its
routing, against fp64 torch.linalg.vector_norm of each gradient.

The Triton kernel's per-parameter norms are tested in tests/test_triton.py (interpreter), the CUDA
kernel's in tests/test_cuda_backend.py (GPU only), across ranks in tests/test_distributed.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import NORM_TOL, SHAPE_GRID, fp64_norm

import gradclip
from gradclip import ops, reference, routing

NORMS = [1.0, 2.0, math.inf, 3.0]
DTYPES = {
    "fp32": [torch.float32],
    "fp16": [torch.float16],
    "bf16": [torch.bfloat16],
    "fp64": [torch.float64],
    "mixed": [torch.float32, torch.bfloat16, torch.float16, torch.float64],
    "mixed-no-fp64": [torch.float16, torch.float32, torch.bfloat16],
}


def make(shapes, dtypes, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, generator=gen, dtype=torch.float64) * scale * (1 + i % 5)).to(dtypes[i % len(dtypes)])
        for i, s in enumerate(shapes)
    ]


def expected_per_param(grads, p) -> torch.Tensor:
    """fp64 torch.linalg.vector_norm of each gradient (0 for an empty one), independent of gradclip."""
    return torch.tensor(
        [float(torch.linalg.vector_norm(g.double(), p)) if g.numel() else 0.0 for g in grads],
        dtype=torch.float64,
    )


def check_per_param(per_param, grads, p):
    out_dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    assert per_param.dtype == out_dtype and per_param.shape == (len(grads),)
    tol = max((NORM_TOL[g.dtype] for g in grads), key=lambda t: t["rtol"]) if grads else {}
    torch.testing.assert_close(per_param.double(), expected_per_param(grads, p), equal_nan=True, **tol)


# --- the reference ops -----------------------------------------------------------------------------


@pytest.mark.parametrize("p", NORMS, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shapes", SHAPE_GRID.values(), ids=SHAPE_GRID.keys())
def test_reference_shape_grid(shapes, dtypes, p):
    if len(shapes) == 2000 and (len(dtypes) > 1 or p != 2.0):
        pytest.skip("2000-tiny once is enough")
    grads = make(shapes, dtypes)
    total, per_param = ops.op("reference", "per_param_norms")(grads, p)
    check_per_param(per_param, grads, p)
    assert torch.equal(total, ops.op("reference", "total_norm")(grads, p))  # bitwise the same total


@pytest.mark.parametrize("p", NORMS, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("max_norm", [0.5, 1e9], ids=["clips", "no-clip"])
def test_reference_clip_variant_rescales_as_clip_grad_norm_(p, max_norm):
    grads = make([(5, 7), (3,), (), (0,), (130,)], DTYPES["mixed"])
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    total, per_param = ops.op("reference", "clip_grad_norm_per_param_")(ours, max_norm, p)
    expected_total = ops.op("reference", "clip_grad_norm_")(theirs, max_norm, p)
    assert torch.equal(total, expected_total)
    check_per_param(per_param, grads, p)  # from before clipping
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    if max_norm == 1e9:
        assert all(torch.equal(a, g) for a, g in zip(ours, grads, strict=True))


NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@pytest.mark.parametrize("p", NORMS, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("value", NONFINITE.values(), ids=NONFINITE.keys())
@pytest.mark.parametrize("dtypes", [DTYPES["fp16"], DTYPES["mixed"]], ids=["fp16", "mixed"])
def test_nonfinite_shows_in_its_own_entry_only(dtypes, value, p):
    grads = make([(4,), (9,), (3, 3), (6,)], dtypes)
    grads[2][1, 1] = value
    per_param = gradclip.per_param_norms(grads, p)
    expected = expected_per_param(grads, p)  # torch's propagation for that tensor
    torch.testing.assert_close(per_param.double(), expected, equal_nan=True, **NORM_TOL[torch.float16])
    bad = ~per_param.isfinite()
    assert bad.tolist() == [False, False, True, False]
    assert per_param[2].isnan() == math.isnan(value)


def test_finite_inputs_never_overflow():
    grads = [
        torch.full((4,), 60000.0, dtype=torch.float16),  # squares overflow fp16, sums of them fp32
        torch.tensor([3e38, 1e37, -2e37]),  # squares overflow fp32
        torch.tensor([1e200, 1e200], dtype=torch.float64),  # squares overflow fp64
    ]
    for p in NORMS:
        per_param = gradclip.per_param_norms(grads, p)
        assert per_param.isfinite().all(), (p, per_param)
        expected = torch.tensor(
            [fp64_norm([g], p) for g in grads], dtype=torch.float64
        )  # scaled: no overflow
        torch.testing.assert_close(per_param, expected, rtol=1e-6, atol=0)
    assert gradclip.per_param_norms(grads[:1], 2.0).item() == 120000.0


def test_comparison_can_fail():
    grads = make([(10,), (3,)], DTYPES["fp32"])
    per_param = gradclip.per_param_norms(grads)
    with pytest.raises(AssertionError):
        check_per_param(per_param * torch.tensor([1.0, 1 + 1e-5]), grads, 2.0)


# --- gradclip.per_param_norms: validation, empty input, routing --------------------------------------


def test_public_function_types_and_empty_input():
    empty = gradclip.per_param_norms([])
    assert empty.shape == (0,) and empty.dtype == torch.float32
    one = torch.randn(5, 5)
    assert torch.equal(gradclip.per_param_norms(one), gradclip.per_param_norms([one]))
    gen = (g for g in [torch.randn(3), torch.randn(4, dtype=torch.float64)])
    assert gradclip.per_param_norms(gen).dtype == torch.float64


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: gradclip.per_param_norms([torch.ones(3)], math.nan), ValueError, "norm_type"),
        (lambda: gradclip.per_param_norms([torch.ones(3, dtype=torch.int64)]), TypeError, "gradient 0"),
        (
            lambda: gradclip.per_param_norms([torch.ones(2), torch.ones(3).to_sparse()]),
            ValueError,
            "gradient 1",
        ),
        (lambda: gradclip.per_param_norms([torch.ones(3)], backend="nope"), ValueError, "backend"),
    ],
    ids=["nan-norm-type", "int-dtype", "sparse", "bad-backend"],
)
def test_bad_input_names_the_culprit(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_total_of_the_per_param_op_equals_get_total_norm():
    grads = make([(7, 3), (0,), (2,), ()], DTYPES["mixed"])
    for p in NORMS:
        plan = routing.plan(grads, p, "auto")
        total, per_param = routing.per_param_norms(plan, p, grads, grads[0].device)
        assert torch.equal(total, gradclip.get_total_norm(grads, p))
        assert torch.equal(per_param, gradclip.per_param_norms(grads, p))


def test_several_groups_are_scattered_back_to_input_order():
    """A plan of several groups (devices/backends; built by hand here, one CPU device): the entries
    come back in input order, a tensor listed twice in both places, the total as total_norm's."""
    grads = make([(3,), (4,), (5,), (6,), (7,), (8,)], [torch.float32, torch.float64, torch.float16])
    a, b, c, d, e, f = grads
    inputs = [a, b, c, a, d, e, f]
    plan = [
        routing.Group("reference", [a, c, a, e]),  # interleaved with the other group
        routing.Group("reference", [b, d]),
        routing.Group("reference", [f]),
    ]
    for p in NORMS:
        total, per_param = routing.per_param_norms(plan, p, inputs, torch.device("cpu"))
        assert per_param.dtype == torch.float64
        check_per_param(per_param, inputs, p)
        assert torch.equal(total, routing.total_norm(plan, p, torch.device("cpu")))
    clipped = [g.clone() for g in grads]
    a, b, c, d, e, f = clipped
    plan = [routing.Group("reference", [a, c, e]), routing.Group("reference", [b, d, f])]
    total, per_param = routing.clip_grad_norm_per_param_(plan, 1.0, 2.0, clipped, torch.device("cpu"))
    check_per_param(per_param, grads, 2.0)
    coef = min(1.0 / (float(total) + 1e-6), 1.0)
    for g, before in zip(clipped, grads, strict=True):
        torch.testing.assert_close(g.double(), before.double() * coef, rtol=1e-3, atol=0)


def test_concat_in_order():
    pieces = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([10.0, 11.0])]
    where = [(1, 1), (0, 0), (0, 1), (1, 0), (0, 2), (0, 0)]
    assert routing.concat_in_order(pieces, where).tolist() == [11.0, 0.0, 1.0, 10.0, 2.0, 0.0]
    assert routing.concat_in_order(pieces, [(0, 0), (0, 1), (0, 2)]) is pieces[0]  # no copy
    assert routing.concat_in_order(pieces, []).shape == (0,)


def test_process_group_and_dtensor_route_to_distributed(monkeypatch):
    from gradclip import distributed

    seen = []

    def fake(tensors, norm_type, backend, process_group):
        seen.append((len(tensors), norm_type, backend, process_group))
        return torch.zeros(()), torch.zeros(len(tensors))

    monkeypatch.setattr(distributed, "per_param_norms", fake)
    group = object()
    out = gradclip.per_param_norms([torch.ones(2)] * 3, 1.0, backend="reference", process_group=group)
    assert out.shape == (3,) and seen == [(3, 1.0, "reference", group)]


# --- torch.compile ----------------------------------------------------------------------------------


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["p2", "pinf"])
def test_compiled_fullgraph_equals_eager(_fresh_dynamo, p):
    grads = make([(8, 16), (16,), (4, 16), (4,)], [torch.float32, torch.bfloat16, torch.float64])

    def per_param(gs):
        return gradclip.per_param_norms(gs, p)

    def clip(gs):
        plan = routing.plan(gs, p, "auto")
        return routing.clip_grad_norm_per_param_(plan, 0.5, p, gs, gs[0].device)

    compiled = torch.compile(per_param, fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(grads), per_param(grads), rtol=0, atol=0)
    eager_grads, compiled_grads = [g.clone() for g in grads], [g.clone() for g in grads]
    expected = clip(eager_grads)
    got = torch.compile(clip, fullgraph=True)(compiled_grads)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=0, atol=0)  # mutated in place
    assert not any(torch.equal(a, b) for a, b in zip(compiled_grads, grads, strict=True))


@pytest.mark.parametrize("name", ["per_param_norms", "clip_grad_norm_per_param_"])
@pytest.mark.parametrize("p", NORMS, ids=lambda p: f"p{p}")
def test_opcheck_reference(name, p):
    grads = make([(3, 5), (7,), (), (0,)], DTYPES["mixed"])
    args = (grads, p) if name == "per_param_norms" else (grads, 0.5, p)
    result = torch.library.opcheck(ops.op("reference", name), args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_fake_outputs_match_real_ones():
    grads = make([(3,), (4,)], [torch.bfloat16, torch.float64])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(g) for g in grads]
        total, per_param = ops.op("triton", "per_param_norms")(fakes, 2.0)
    real_total, real_per_param = reference.per_param_norms(grads, 2.0)
    assert (total.shape, total.dtype) == (real_total.shape, real_total.dtype)
    assert (per_param.shape, per_param.dtype) == (real_per_param.shape, real_per_param.dtype)
