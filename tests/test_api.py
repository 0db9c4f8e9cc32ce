"""The public API against torch.nn.utils and an fp64 host reference (reference backend, CPU)."""

from __future__ import annotations

import math
import warnings

import conftest
import pytest
import torch
from conftest import GRAD_TOL, NORM_TOL, clone_params, fp64_norm

import gradclip

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
NORM_TYPES = [1.0, 2.0, math.inf, 3.0]

SHAPE_GRID = {**conftest.SHAPE_GRID, "several-2d": [(31, 33), (1, 7), (64,)]}


def make_params(shapes, dtype, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
        params.append(p)
    return params


def grads(params):
    return [p.grad for p in params if p.grad is not None]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def fp64_clipped(params, max_norm, norm_type):
    """Host fp64 clipping of the original gradients: the accuracy yardstick."""
    total = fp64_norm(grads(params), norm_type)
    coef = min(max_norm / (total + 1e-6), 1.0)
    return total, [g.double() * coef for g in grads(params)]


def assert_accurate(ours, torchs, expected, tol):
    """Our error against fp64 must be within tolerance, or at most ~2x torch's own error."""
    for o, t, e in zip(ours, torchs, expected, strict=True):
        ours_err = (o.double() - e).abs().max().item() if o.numel() else 0.0
        torch_err = (t.double() - e).abs().max().item() if t.numel() else 0.0
        if ours_err > 2 * torch_err + 1e-300:
            torch.testing.assert_close(o.double(), e, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("case", list(SHAPE_GRID), ids=str)
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipping", "no-clipping"])
def test_clip_grad_norm_matches_torch_and_fp64(dtype, norm_type, case, max_norm):
    shapes = SHAPE_GRID[case]
    if case == "2000-tiny" and (dtype != torch.float32 or norm_type == 3.0):
        pytest.skip("the 2000-tensor case runs once per norm type, in fp32")
    params = make_params(shapes, dtype)
    theirs = clone_params(params)
    expected_norm, expected_grads = fp64_clipped(params, max_norm, norm_type)

    norm = gradclip.clip_grad_norm_(params, max_norm, norm_type)
    if norm_type == math.inf and any(g.numel() == 0 for g in grads(theirs)):
        # torch raises on the inf-norm of a zero-size tensor: compare with torch on the others
        theirs = [p for p in theirs if p.grad.numel() > 0]
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)

    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert norm.shape == () and norm.device == params[0].grad.device
    torch.testing.assert_close(
        norm.double(), torch.tensor(expected_norm, dtype=torch.float64), **NORM_TOL[dtype]
    )
    if torch_norm.isfinite():
        torch.testing.assert_close(norm.double(), torch_norm.double(), **GRAD_TOL[dtype])
    if expected_norm + 1e-6 <= max_norm:
        for ours, original in zip(grads(params), grads(make_params(shapes, dtype)), strict=True):
            assert torch.equal(bits(ours), bits(original)), (
                "no clipping needed: gradients must be bit-identical"
            )
    else:
        nonempty = [(g, e) for g, e in zip(grads(params), expected_grads, strict=True) if g.numel() > 0]
        theirs_nonempty = [g for g in grads(theirs) if g.numel() > 0]
        assert_accurate([g for g, _ in nonempty], theirs_nonempty, [e for _, e in nonempty], GRAD_TOL[dtype])


def test_mixed_dtypes_in_one_call():
    params = make_params([(10,), (20,)], torch.float32) + make_params([(30,)], torch.float16, seed=1)
    params += make_params([(40,)], torch.bfloat16, seed=2) + make_params([(5,)], torch.float64, seed=3)
    expected_norm, expected_grads = fp64_clipped(params, 0.1, 2.0)
    norm = gradclip.clip_grad_norm_(params, 0.1)
    assert norm.dtype == torch.float64  # one fp64 gradient promotes the norm
    assert norm.item() == pytest.approx(expected_norm, rel=1e-12)
    for g, e in zip(grads(params), expected_grads, strict=True):
        torch.testing.assert_close(g.double(), e, **GRAD_TOL[g.dtype])
    fp32_only = make_params([(10,)], torch.float16) + make_params([(10,)], torch.bfloat16, seed=1)
    assert gradclip.get_total_norm(grads(fp32_only)).dtype == torch.float32


def test_the_comparison_can_fail():
    """A deliberately wrong result (norm off by 1e-3, one gradient off by one ulp-scale) is caught."""
    params = make_params([(100,)], torch.float32)
    expected_norm, expected_grads = fp64_clipped(params, 0.5, 2.0)
    gradclip.clip_grad_norm_(params, 0.5)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            torch.tensor(expected_norm * (1 + 1e-3)), torch.tensor(expected_norm), **NORM_TOL[torch.float32]
        )
    wrong = [g.clone() for g in grads(params)]
    wrong[0][3] *= 1.001
    with pytest.raises(AssertionError):
        assert_accurate(wrong, [e.float() for e in expected_grads], expected_grads, GRAD_TOL[torch.float32])


@pytest.mark.parametrize(
    "dtype, value, count, expected_norm, expected_grad",
    [(torch.float16, 60000.0, 4, 120000.0, 0.5), (torch.float32, None, 2, 5e20, None)],
    ids=["fp16-60000", "fp32-1e20"],
)
def test_finite_gradients_never_overflow(dtype, value, count, expected_norm, expected_grad):
    p = torch.nn.Parameter(torch.zeros(count, dtype=dtype))
    p.grad = torch.full((count,), value, dtype=dtype) if value else torch.tensor([3e20, 4e20], dtype=dtype)
    theirs = clone_params([p])[0]
    assert not torch.nn.utils.clip_grad_norm_(theirs, 1.0).isfinite()  # torch overflows here
    norm = gradclip.clip_grad_norm_(p, 1.0)
    assert norm.dtype == torch.float32
    assert norm.item() == pytest.approx(expected_norm, rel=1e-6)
    expected = [expected_grad] * count if expected_grad else [0.6, 0.8]
    torch.testing.assert_close(p.grad.float(), torch.tensor(expected), rtol=1e-3, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf, 3.0], ids=lambda p: f"p{p}")
def test_nonfinite_gradients_propagate_like_torch(bad, norm_type):
    params = make_params([(5,), (3,)], torch.float32)
    params[1].grad[1] = bad
    theirs = clone_params(params)
    norm = gradclip.clip_grad_norm_(params, 1.0, norm_type)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    torch.testing.assert_close(norm, torch_norm, equal_nan=True)
    for ours, t in zip(grads(params), grads(theirs), strict=True):
        torch.testing.assert_close(ours, t, equal_nan=True)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_error_if_nonfinite_raises_before_modifying(bad):
    params = make_params([(5,), (3,)], torch.float32, scale=100.0)
    params[0].grad[2] = bad
    before = [g.clone() for g in grads(params)]
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for g, b in zip(grads(params), before, strict=True):
        assert torch.equal(bits(g), bits(b))
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.get_total_norm(grads(params), error_if_nonfinite=True)


def test_error_if_nonfinite_passes_on_finite_and_clips():
    params = make_params([(50,)], torch.float32, scale=10.0)
    expected_norm, expected_grads = fp64_clipped(params, 1.0, 2.0)
    norm = gradclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert norm.item() == pytest.approx(expected_norm, rel=1e-6)
    torch.testing.assert_close(params[0].grad.double(), expected_grads[0], **GRAD_TOL[torch.float32])


def test_inputs_tensor_list_generator_and_empty():
    params = make_params([(4,), (6,)], torch.float32, scale=10.0)
    params.append(torch.nn.Parameter(torch.zeros(3)))  # grad None: skipped
    expected_norm = fp64_norm(grads(params), 2.0)
    assert gradclip.get_total_norm(grads(params)).item() == pytest.approx(expected_norm, rel=1e-6)
    assert gradclip.get_total_norm(p.grad for p in params[:2]).item() == pytest.approx(
        expected_norm, rel=1e-6
    )
    single = clone_params(params[:1])[0]
    assert gradclip.clip_grad_norm_(single, 1e9).item() == pytest.approx(
        fp64_norm([single.grad], 2.0), rel=1e-6
    )
    norm = gradclip.clip_grad_norm_((p for p in params), 1.0)
    assert norm.item() == pytest.approx(expected_norm, rel=1e-6)
    assert gradclip.get_total_norm(grads(params)).item() == pytest.approx(1.0, rel=1e-5)

    assert torch.equal(gradclip.clip_grad_norm_([], 1.0), torch.tensor(0.0))
    assert torch.equal(gradclip.get_total_norm([]), torch.tensor(0.0))
    assert torch.equal(gradclip.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0), torch.tensor(0.0))
    with pytest.warns(UserWarning, match="empty generator"):
        gradclip.clip_grad_norm_((p for p in []), 1.0)
    gradclip.clip_grad_value_([], 1.0)
    gradclip.clip_grads_with_norm_([], 1.0, torch.tensor(2.0))


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf, 3.0, 0.0, 0.5], ids=lambda p: f"p{p}")
def test_zero_size_tensors_with_every_norm_type(norm_type):
    tensors = [torch.zeros(0), torch.tensor([3.0, -4.0]), torch.zeros(2, 0)]
    if norm_type == math.inf:
        expected = torch.tensor(4.0)  # torch raises here: no inf-norm of a zero-size tensor
    else:  # torch's composition: the p-norm of the per-tensor norms (for p=0, a count of nonzero norms)
        expected = torch.nn.utils.get_total_norm(tensors, norm_type)
    torch.testing.assert_close(gradclip.get_total_norm(tensors, norm_type), expected)
    only_empty = gradclip.get_total_norm([torch.zeros(0)], norm_type)
    assert only_empty.item() == 0.0


def test_get_total_norm_then_clip_grads_with_norm_equals_fused():
    params = make_params([(7,), (9, 2)], torch.float32, scale=3.0)
    split = clone_params(params)
    fused_norm = gradclip.clip_grad_norm_(params, 0.7)
    total = gradclip.get_total_norm(grads(split))
    gradclip.clip_grads_with_norm_(split, 0.7, total)
    assert torch.equal(total, fused_norm)
    for a, b in zip(grads(params), grads(split), strict=True):
        assert torch.equal(a, b)


def test_clip_grads_with_norm_nan_norm_makes_nan_like_torch():
    params = make_params([(4,)], torch.float32)
    theirs = clone_params(params)
    gradclip.clip_grads_with_norm_(params, 1.0, torch.tensor(math.nan))
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, torch.tensor(math.nan))
    torch.testing.assert_close(params[0].grad, theirs[0].grad, equal_nan=True)
    assert params[0].grad.isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grad_value_matches_torch(dtype):
    params = make_params([(33,), (4, 5), ()], dtype, scale=3.0)
    params[0].grad[0] = math.nan
    theirs = clone_params(params)
    gradclip.clip_grad_value_(params, 1.5)
    torch.nn.utils.clip_grad_value_(theirs, 1.5)
    for ours, t in zip(grads(params), grads(theirs), strict=True):
        torch.testing.assert_close(ours, t, equal_nan=True, rtol=0, atol=0)
    assert params[1].grad.abs().max().item() <= 1.5


def test_non_contiguous_gradients():
    base = torch.randn(16, 32, dtype=torch.float64) * 5
    p = torch.nn.Parameter(torch.zeros(32, 8))
    p.grad = base.float().t()[:, ::2]  # non-contiguous view
    theirs = clone_params([p])[0]
    theirs.grad = base.float().t()[:, ::2].clone()
    assert not p.grad.is_contiguous()
    torch.testing.assert_close(gradclip.clip_grad_norm_(p, 1.0), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    torch.testing.assert_close(p.grad, theirs.grad)


def test_parameters_are_never_touched():
    params = make_params([(10,), (3, 3)], torch.float32, scale=100.0)
    before = [p.detach().clone() for p in params]
    gradclip.clip_grad_norm_(params, 1.0)
    gradclip.clip_grad_value_(params, 0.1)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(bits(p.detach()), bits(b))


def _params_with_bad_grad(kind):
    good = make_params([(3, 3)], torch.float32, scale=10.0)[0]
    bad = torch.nn.Parameter(torch.zeros(3, 3))
    if kind == "sparse":
        bad.grad = torch.eye(3).to_sparse()
    else:
        # autograd refuses integer .grad on a float parameter, so pass a plain integer tensor with a grad
        bad = torch.zeros(3, 3, dtype=kind)
        bad.grad = torch.ones(3, 3, dtype=kind)
    return [good, bad]


@pytest.mark.parametrize("kind", ["sparse", torch.int32, torch.bool], ids=str)
@pytest.mark.parametrize(
    "fn", ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]
)
def test_bad_gradients_raise_and_modify_nothing(kind, fn):
    params = _params_with_bad_grad(kind)
    before = params[0].grad.clone()
    expected = (ValueError, "layout") if kind == "sparse" else (TypeError, "floating point")
    with pytest.raises(expected[0], match=expected[1]):
        if fn == "clip_grad_norm_":
            gradclip.clip_grad_norm_(params, 1.0)
        elif fn == "clip_grad_value_":
            gradclip.clip_grad_value_(params, 0.1)
        elif fn == "clip_grads_with_norm_":
            gradclip.clip_grads_with_norm_(params, 1.0, torch.tensor(100.0))
        else:
            gradclip.get_total_norm([p.grad for p in params])
    assert torch.equal(params[0].grad, before)


# Arguments torch 2.13 accepts silently and gradclip refuses, naming them: (id, call(module,
# parameters), the argument's name), with module torch.nn.utils or gradclip.
SILENTLY_ACCEPTED_BY_TORCH = [
    ("nan-max_norm", lambda m, ps: m.clip_grad_norm_(ps, math.nan), "max_norm"),
    ("negative-max_norm", lambda m, ps: m.clip_grad_norm_(ps, -1.0), "max_norm"),
    ("nan-norm_type", lambda m, ps: m.clip_grad_norm_(ps, 1.0, math.nan), "norm_type"),
    ("nan-norm_type-total", lambda m, ps: m.get_total_norm([p.grad for p in ps], math.nan), "norm_type"),
    (
        "nan-max_norm-with-norm",
        lambda m, ps: m.clip_grads_with_norm_(ps, math.nan, torch.tensor(1.0)),
        "max_norm",
    ),
    ("negative-clip_value", lambda m, ps: m.clip_grad_value_(ps, -0.5), "clip_value"),
    ("nan-clip_value", lambda m, ps: m.clip_grad_value_(ps, math.nan), "clip_value"),
]


@pytest.mark.parametrize(
    "call, match",
    [(lambda ps, c=call: c(gradclip, ps), name) for _, call, name in SILENTLY_ACCEPTED_BY_TORCH]
    + [(lambda ps: gradclip.clip_grad_norm_(ps, 1.0, backend="fastest"), "backend")],
    ids=[case_id for case_id, _, _ in SILENTLY_ACCEPTED_BY_TORCH] + ["unknown-backend"],
)
def test_bad_arguments_raise_and_modify_nothing(call, match):
    params = make_params([(4,), (2, 2)], torch.float32, scale=10.0)
    before = [g.clone() for g in grads(params)]
    with pytest.raises(ValueError, match=match):
        call(params)
    for g, b in zip(grads(params), before, strict=True):
        assert torch.equal(g, b)


def test_explicit_unavailable_backend_names_the_missing_piece(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    params = make_params([(4,)], torch.float32)
    with pytest.raises(gradclip.BackendUnavailableError, match="cuda backend runs on CUDA tensors"):
        gradclip.clip_grad_norm_(params, 1.0, backend="cuda")
    with pytest.raises(gradclip.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        gradclip.clip_grad_norm_(params, 1.0, backend="triton")
    fp64 = make_params([(4,)], torch.float64)
    with pytest.raises(gradclip.BackendUnavailableError, match="float64"):
        gradclip.clip_grad_norm_(fp64, 1.0, backend="cuda")
    with pytest.raises(gradclip.BackendUnavailableError, match="norm_type=3.0"):
        gradclip.clip_grad_norm_(params, 1.0, 3.0, backend="triton")


def test_env_backend_overrides_auto(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    params = make_params([(4,)], torch.float32)
    monkeypatch.setenv("GRADCLIP_BACKEND", "cuda")
    with pytest.raises(gradclip.BackendUnavailableError):
        gradclip.clip_grad_norm_(params, 1.0)
    monkeypatch.setenv("GRADCLIP_BACKEND", "reference")
    assert gradclip.clip_grad_norm_(params, 1e9).isfinite()
    monkeypatch.setenv("GRADCLIP_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        gradclip.clip_grad_norm_(params, 1.0)


def test_patch_torch_routes_and_restores():
    original = torch.nn.utils.clip_grad_norm_
    params = make_params([(2,)], torch.float16)
    params[0].grad.fill_(60000.0)
    with gradclip.patch_torch():
        assert torch.nn.utils.clip_grad_norm_ is gradclip.clip_grad_norm_
        assert torch.nn.utils.clip_grad.clip_grad_value_ is gradclip.clip_grad_value_
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # torch's own would give inf here
        assert norm.isfinite()
    assert torch.nn.utils.clip_grad_norm_ is original
    gradclip.patch_torch()
    gradclip.patch_torch()  # idempotent
    gradclip.unpatch_torch()
    assert torch.nn.utils.clip_grad_norm_ is original
    gradclip.unpatch_torch()  # no-op


def test_deterministic_norm_bits():
    params = make_params([(1000,), (333,)], torch.float32)
    a = gradclip.get_total_norm(grads(params))
    b = gradclip.get_total_norm(grads(params))
    assert torch.equal(bits(a), bits(b))


def test_no_warning_on_normal_use():
    params = make_params([(8,)], torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradclip.clip_grad_norm_(params, 1.0)


@pytest.mark.requires_cuda
def test_grads_on_several_devices_are_grouped_per_device():
    params = make_params([(64,), (7,)], torch.float32, scale=4.0)
    theirs = clone_params(params)
    params[1].grad = params[1].grad.cuda()
    theirs[1].grad = theirs[1].grad.cuda()
    norm = gradclip.clip_grad_norm_(params, 1.0)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm.device == params[0].grad.device  # the first gradient's device, as in torch
    torch.testing.assert_close(norm, torch_norm)
    for ours, t in zip(grads(params), grads(theirs), strict=True):
        torch.testing.assert_close(ours, t)


def test_import_is_light():
    """`import gradclip` loads neither Triton, torch._dynamo, the extension nor torch.distributed.tensor."""
    import subprocess
    import sys

    code = (
        "import sys, gradclip; heavy = ['triton', 'torch._dynamo', 'gradclip._C', 'torch.distributed.tensor', "
        "'gradclip.triton_backend', 'gradclip.distributed']; print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_gradient_listed_twice_is_scaled_twice_like_torch(monkeypatch):
    """The kernels write each gradient once, so "auto" sends a repeated gradient to the reference."""
    from gradclip import backends, routing

    p = make_params([(6,)], torch.float32, scale=10.0)[0]
    theirs = clone_params([p])[0]
    torch.testing.assert_close(
        gradclip.clip_grad_norm_([p, p], 1.0), torch.nn.utils.clip_grad_norm_([theirs, theirs], 1.0)
    )
    torch.testing.assert_close(p.grad, theirs.grad)
    # Pretend a kernel backend serves CPU tensors, to exercise the rule without a GPU.
    monkeypatch.setattr(backends, "choose", lambda requested, device, dtype, norm_type: "triton")
    assert [g.backend for g in routing.plan([p.grad, p.grad], 2.0, "auto")] == ["reference"]
    assert [g.backend for g in routing.plan([p.grad, theirs.grad], 2.0, "auto")] == ["triton"]
    with pytest.raises(ValueError, match="listed twice"):
        routing.plan([p.grad, p.grad], 2.0, "triton")


# --- negative norm types (issue 11): finite gradients never give an infinite norm ------------------


@pytest.mark.parametrize("norm_type", [-2.0, -3.5, -1.0, -0.5], ids=lambda p: f"p{p}")
@pytest.mark.parametrize(
    "dtype, magnitude",
    [(torch.float64, 2e200), (torch.float64, 1e-300), (torch.float32, 3e38), (torch.float32, 1e-30)],
    ids=["fp64-2e200", "fp64-1e-300", "fp32-3e38", "fp32-1e-30"],
)
def test_negative_norm_types_never_overflow(norm_type, dtype, magnitude):
    """Ten gradients of +-magnitude (and one spread of values): finite, equal to the exact
    host value, error_if_nonfinite does not raise, and the clip scales like torch's formula."""
    signs = torch.tensor([(-1.0) ** i for i in range(10)], dtype=torch.float64)
    spread = torch.logspace(0, 3, 10, dtype=torch.float64)
    for values in (signs * magnitude, signs * spread * magnitude / 1e3):
        params = [torch.nn.Parameter(torch.zeros(1, dtype=dtype)) for _ in range(10)]
        for p, v in zip(params, values, strict=True):
            p.grad = v.reshape(1).to(dtype)
        expected_norm, expected_grads = fp64_clipped(params, 1.0, norm_type)
        assert math.isfinite(expected_norm) and expected_norm > 0
        norm = gradclip.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
        assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(
            norm.double(), torch.tensor(expected_norm, dtype=torch.float64), **NORM_TOL[dtype]
        )
        torch.testing.assert_close(
            [p.grad.double() for p in params], expected_grads, **GRAD_TOL[dtype], equal_nan=False
        )
        assert gradclip.get_total_norm(expected_grads, norm_type, error_if_nonfinite=True).isfinite()


def test_torch_gives_inf_where_gradclip_is_finite_for_negative_p():
    grads = [torch.full((1,), 2e200 * (-1) ** i, dtype=torch.float64) for i in range(10)]
    for norm_type in (-2.0, -3.5):
        assert torch.nn.utils.get_total_norm(grads, norm_type).isinf()  # the report
        assert gradclip.get_total_norm(grads, norm_type).isfinite()


@pytest.mark.parametrize("norm_type", [-2.0, -3.5, -1.0, -math.inf], ids=lambda p: f"p{p}")
@pytest.mark.parametrize(
    "values",
    [[0.0, 1.0, 2.0], [math.inf, 1.0, 3.0], [math.inf, math.inf], [0.0, math.nan], [math.nan, 2.0], [0.0]],
    ids=["a-zero", "an-inf", "all-inf", "zero-and-nan", "nan", "only-zero"],
)
def test_negative_norm_types_zeros_and_nonfinite_like_torch(norm_type, values):
    """A zero element makes the norm 0 (|0|^p = inf), as in torch; inf adds nothing; NaN wins."""
    for split in (False, True):  # one tensor, or one tensor per value (torch's composition)
        grads = [torch.tensor(values, dtype=torch.float64)]
        if split:
            grads = [g.reshape(1) for g in grads[0]]
        ours, theirs = (
            gradclip.get_total_norm(grads, norm_type),
            torch.nn.utils.get_total_norm(grads, norm_type),
        )
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        expected = fp64_norm(grads, norm_type)
        torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), equal_nan=True)


def test_negative_norm_type_ignores_zero_size_tensors():
    """torch raises on a zero-size tensor with p < 0 (no identity); gradclip lets it add nothing
    instead of a norm of 0 that would make the total 0."""
    tensors = [torch.zeros(0), torch.tensor([3.0, -4.0]), torch.zeros(2, 0)]
    for norm_type in (-2.0, -1.0):
        expected = gradclip.get_total_norm(tensors[1:2], norm_type)
        torch.testing.assert_close(gradclip.get_total_norm(tensors, norm_type), expected)
        assert expected.item() == pytest.approx(fp64_norm(tensors, norm_type), rel=1e-7)
    assert gradclip.get_total_norm([torch.zeros(0)], -2.0).item() == 0.0


def test_norm_type_zero_is_an_exact_count():
    """p = 0 counts, exactly, as torch's composition does: the 0-norm of the per-tensor 0-norms,
    i.e. the number of tensors holding a non-zero (also for a single tensor)."""
    grads = [torch.zeros(1000), torch.zeros(7), torch.randn(333), torch.zeros(5, dtype=torch.float64)]
    grads[0][::3] = 2e-30
    grads[3][1] = 1e300
    for subset, count in ((grads, 3.0), (grads[:2], 1.0), (grads[1:2], 0.0), (grads[3:], 1.0)):
        ours, theirs = gradclip.get_total_norm(subset, 0.0), torch.nn.utils.get_total_norm(subset, 0.0)
        assert ours.item() == theirs.item() == count


# --- error types (issue 11): each gradclip error is also what torch raises on the same input -------

_FUNCTIONS = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]


def _call(module, fn: str, params):
    if fn == "clip_grad_norm_":
        return module.clip_grad_norm_(params, 1.0)
    if fn == "clip_grad_value_":
        return module.clip_grad_value_(params, 0.1)
    if fn == "clip_grads_with_norm_":
        return module.clip_grads_with_norm_(params, 1.0, torch.tensor(100.0))
    return module.get_total_norm([p.grad for p in params])


def _raised(fn) -> BaseException | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (the test inspects it)
        return exc
    return None


@pytest.mark.parametrize("kind", ["sparse", torch.int32, torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("fn", _FUNCTIONS)
def test_bad_gradient_errors_are_torchs_exception_types(kind, fn):
    """Run torch on the same bad input: gradclip's error is an instance of torch's exception type
    (RuntimeError for integer grads, NotImplementedError for sparse), of its own old type, and of
    gradclip.GradclipError; the message names the argument and the gradient."""
    theirs = _raised(lambda: _call(torch.nn.utils, fn, _params_with_bad_grad(kind)))
    ours = _raised(lambda: _call(gradclip, fn, _params_with_bad_grad(kind)))
    assert isinstance(ours, gradclip.GradclipError), ours
    if theirs is not None:  # torch scales sparse grads in clip_grads_with_norm_; gradclip refuses
        assert isinstance(ours, type(theirs)), (type(ours).__mro__, type(theirs))
    if kind == "sparse":
        assert isinstance(ours, (ValueError, NotImplementedError, gradclip.GradientLayoutError))
        assert "layout torch.sparse_coo" in str(ours)
    else:
        assert isinstance(ours, (TypeError, RuntimeError, gradclip.GradientDtypeError))
        assert f"dtype {kind}" in str(ours)
    where = "`tensors`: tensor 1" if fn == "get_total_norm" else "`parameters`: gradient 1"
    assert where in str(ours), str(ours)


def test_code_written_for_torch_catches_gradclip_errors_under_patch_torch():
    """`except RuntimeError` / `except NotImplementedError` around torch's clip keeps working."""
    caught = []
    with gradclip.patch_torch():
        for kind, expected in ((torch.int32, RuntimeError), ("sparse", NotImplementedError)):
            try:
                torch.nn.utils.clip_grad_norm_(_params_with_bad_grad(kind), 1.0)
            except expected as exc:
                caught.append(type(exc))
        params = make_params([(3,)], torch.float32)
        params[0].grad[0] = math.inf
        try:
            torch.nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
        except RuntimeError as exc:
            caught.append(type(exc))
    assert caught == [gradclip.GradientDtypeError, gradclip.GradientLayoutError, gradclip.NonFiniteNormError]


def test_nonfinite_error_is_torchs_type():
    params = make_params([(3,)], torch.float32)
    params[0].grad[1] = math.nan
    theirs = _raised(
        lambda: torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, error_if_nonfinite=True)
    )
    ours = _raised(lambda: gradclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True))
    assert type(theirs) is RuntimeError and isinstance(ours, RuntimeError)
    assert isinstance(ours, gradclip.NonFiniteNormError) and "non-finite" in str(ours)


@pytest.mark.parametrize(
    "call, name",
    [(call, name) for _, call, name in SILENTLY_ACCEPTED_BY_TORCH],
    ids=[case_id for case_id, _, _ in SILENTLY_ACCEPTED_BY_TORCH],
)
def test_argument_errors_where_torch_raises_nothing(call, name):
    """torch 2.13 accepts these silently (NaN or unclipped gradients); gradclip refuses with a
    ValueError naming the argument, and modifies nothing. (Checked here that torch raises none:
    if torch starts raising, gradclip's type must follow.)"""
    assert _raised(lambda: call(torch.nn.utils, make_params([(4,)], torch.float32))) is None
    params = make_params([(4,)], torch.float32, scale=10.0)
    before = [g.clone() for g in grads(params)]
    ours = _raised(lambda: call(gradclip, params))
    assert isinstance(ours, gradclip.InvalidArgumentError) and isinstance(ours, ValueError), ours
    assert name in str(ours)
    for g, b in zip(grads(params), before, strict=True):
        assert torch.equal(g, b)


def test_uncoercible_arguments_raise_what_torch_raises():
    """Arguments float() rejects: the same TypeError/ValueError as torch (both call float())."""
    for args in ((None,), ("1", "fro"), (1j,)):
        params = make_params([(4,)], torch.float32)
        theirs = _raised(lambda a=args, ps=params: torch.nn.utils.clip_grad_norm_(clone_params(ps), *a))
        ours = _raised(lambda a=args, ps=params: gradclip.clip_grad_norm_(ps, *a))
        assert theirs is not None and isinstance(ours, type(theirs)), (args, ours, theirs)
