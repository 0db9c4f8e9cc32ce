"""The native CPU kernels (backend "cpu", gradclip._C, csrc/cpu/) against the reference and an fp64
host reference: the adversarial grid plus chunk-boundary cases, mixed dtypes, non-finite values,
overflow, determinism across thread counts, bit-identical gradients when not clipping, opcheck,
"auto" choosing "cpu", and a deliberately wrong result being caught.

Every test skips when gradclip._C is not built (the reference then serves CPU tensors).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import GRAD_TOL, NORM_TOL, SHAPE_GRID, fp64_norm

import gradclip
from gradclip import backends, ops, reference, routing

NORM_TYPES = [1.0, 2.0, math.inf]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(scope="module", autouse=True)
def native():
    why = backends.why_unavailable("cpu", "cpu")
    if why:
        pytest.skip(why)
    from gradclip import _C

    return _C


def _chunk() -> int:
    from gradclip import _C

    return int(_C.CPU_CHUNK_ELEMS)


def _parallel_min() -> int:
    from gradclip import _C

    return int(_C.CPU_PARALLEL_MIN_ELEMS)


# Cases tied to the CPU kernels' chunk size (65,536 elements) and vector width (16 fp32 / 32 bf16
# elements an iteration, 256-element fp32 blocks): shapes are computed lazily from the extension.
def _kernel_cases() -> dict[str, list[tuple[int, ...]]]:
    c = _chunk()
    return {
        "one-vector-block": [(256,)],
        "block-plus-one": [(257,), (255,)],
        "chunk-minus-one": [(c - 1,)],
        "exactly-one-chunk": [(c,)],
        "chunk-plus-one": [(c + 1,)],
        "three-ragged-chunks": [(2 * c + 3,), (5,), (c + 17,)],
        "parallel-sized": [(_parallel_min() + 7,), (3, 1000)],
    }


CASES = list(SHAPE_GRID) + [
    "one-vector-block",
    "block-plus-one",
    "chunk-minus-one",
    "exactly-one-chunk",
    "chunk-plus-one",
    "three-ragged-chunks",
    "parallel-sized",
]


def _shapes(case: str) -> list[tuple[int, ...]]:
    return SHAPE_GRID[case] if case in SHAPE_GRID else _kernel_cases()[case]


def _make(shapes, dtypes, seed: int = 0, scale: float = 3.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtypes[i % len(dtypes)])
        for i, s in enumerate(shapes)
    ]


def _host_norm(grads, p: float) -> float:
    """fp64 norm independent of gradclip: Python's math for small inputs, fp64 torch otherwise."""
    if sum(g.numel() for g in grads) <= 20_000:
        return fp64_norm(grads, p)
    flat = torch.cat([g.detach().double().flatten() for g in grads])
    return float(torch.linalg.vector_norm(flat, p)) if flat.numel() else 0.0


def check_norm(out: torch.Tensor, grads, p: float) -> None:
    """The kernel's norm within NORM_TOL of the fp64 host reference, fp32, 0-dim."""
    assert out.dtype == torch.float32 and out.dim() == 0
    expected = torch.tensor(_host_norm(grads, p), dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, **NORM_TOL[torch.float32])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b, strict=True))


# ---- norms -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtypes", [[d] for d in DTYPES] + [DTYPES], ids=["fp32", "fp16", "bf16", "mixed"])
@pytest.mark.parametrize("case", CASES)
def test_norms_against_fp64_and_reference(case, dtypes, p):
    grads = _make(_shapes(case), dtypes)
    total = ops.op("cpu", "total_norm")(grads, p)
    check_norm(total, grads, p)
    torch.testing.assert_close(total, reference.total_norm(grads, p), **NORM_TOL[torch.float32])
    pp_total, per = ops.op("cpu", "per_param_norms")(grads, p)
    assert torch.equal(bits(pp_total), bits(total)), "per-param total must be bitwise cpu_total_norm"
    assert per.shape == (len(grads),) and per.dtype == torch.float32
    if len(grads) <= 20:
        expected = torch.tensor([_host_norm([g], p) for g in grads], dtype=torch.float64)
    else:
        expected = reference.per_tensor_norms(grads, p)
    torch.testing.assert_close(per.double(), expected, **NORM_TOL[torch.float32])


@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtypes", [[d] for d in DTYPES] + [DTYPES], ids=["fp32", "fp16", "bf16", "mixed"])
@pytest.mark.parametrize("case", ["size-127", "2000-tiny", "three-ragged-chunks", "parallel-sized"])
def test_clip_grad_norm_against_reference(case, dtypes, p):
    grads = _make(_shapes(case), dtypes)
    ours = [g.clone() for g in grads]
    theirs = [g.clone() for g in grads]
    norm = ops.op("cpu", "clip_grad_norm_")(ours, 1.0, p)
    ref_norm = reference.clip_grad_norm_(theirs, 1.0, p)
    torch.testing.assert_close(norm, ref_norm, **NORM_TOL[torch.float32])
    assert reference.clip_coefficient(1.0, ref_norm) < 1, "the case must clip"
    for o, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(o, t, **GRAD_TOL[o.dtype])
    # Given the same norm, the rescale is bitwise the reference's (coefficient rounding included).
    again = [g.clone() for g in grads]
    reference.clip_grads_with_norm_(again, 1.0, norm)
    assert same_bits(ours, again)
    # The per-param variant: same norm bits, same gradients, per-tensor norms of the input.
    per_grads = [g.clone() for g in grads]
    total, per = ops.op("cpu", "clip_grad_norm_per_param_")(per_grads, 1.0, p)
    assert torch.equal(bits(total), bits(norm))
    assert same_bits(per_grads, ours)
    assert torch.equal(per, ops.op("cpu", "per_param_norms")(grads, p)[1])


@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_norm", [0.3, 1.0, 7.0, 1e30, 0.0])
def test_clip_grads_with_norm_is_bitwise_the_reference(norm_dtype, max_norm):
    grads = _make([(1000,), (_chunk() + 5,), (7,), (301,)], DTYPES)
    for g in grads:  # non-finite elements inside the vector body and in the scalar tail
        g[[3, -1]] = torch.tensor([math.nan, -math.inf], dtype=g.dtype)
    for norm_value in (0.5, 6.99999, 7.0, 123.456, 0.0, math.inf, math.nan):
        total = torch.tensor(norm_value, dtype=norm_dtype)
        ours = [g.clone() for g in grads]
        theirs = [g.clone() for g in grads]
        ops.op("cpu", "clip_grads_with_norm_")(ours, max_norm, total)
        reference.clip_grads_with_norm_(theirs, max_norm, total)
        for o, t in zip(ours, theirs, strict=True):
            nan = t.isnan()
            assert torch.equal(o.isnan(), nan), (norm_value, max_norm)
            assert torch.equal(bits(o)[~nan], bits(t)[~nan]), (norm_value, max_norm)


@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("case", ["one-scalar", "2000-tiny", "three-ragged-chunks", "parallel-sized"])
def test_no_clipping_leaves_gradients_bit_identical(case, p):
    grads = _make(_shapes(case), DTYPES)
    before = [g.clone() for g in grads]
    ops.op("cpu", "clip_grad_norm_")(grads, 1e30, p)
    assert same_bits(grads, before)
    ops.op("cpu", "clip_grads_with_norm_")(grads, 1.0, torch.tensor(0.5))
    assert same_bits(grads, before)
    # A norm whose coefficient rounds to exactly 1 does not write either.
    norm = ops.op("cpu", "total_norm")(grads, p)
    ops.op("cpu", "clip_grad_norm_")(grads, float(norm) + 1e-6, p)
    assert same_bits(grads, before)


def test_empty_and_zero_size(native):
    # An empty list has no tensor to dispatch on (the routing never sends one); zero-size tensors do.
    for p in NORM_TYPES:
        zeros = [torch.empty(0), torch.empty(3, 0, dtype=torch.bfloat16)]
        assert float(ops.op("cpu", "total_norm")(zeros, p)) == 0.0
        total, per = ops.op("cpu", "per_param_norms")(zeros + [torch.tensor([-2.0])], p)
        assert per.tolist() == [0.0, 0.0, 2.0] and float(total) == 2.0
    ops.op("cpu", "clip_grad_value_")([torch.empty(0)], 1.0)
    ops.op("cpu", "clip_grads_with_norm_")([], 1.0, torch.tensor(2.0))


# ---- non-finite values and overflow ------------------------------------------------------------------
@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_nan_and_inf_propagate_as_torch(dtype, p):
    c = _chunk()
    for nan_first in (True, False):
        grads = _make([(c + 9,), (300,), (5,)], [dtype])
        grads[0 if nan_first else 1][c + 3 if nan_first else 100] = math.nan
        grads[1 if nan_first else 0][7] = -math.inf
        total, per = ops.op("cpu", "per_param_norms")(grads, p)
        assert total.isnan(), "NaN anywhere gives NaN (and wins over inf for the inf-norm)"
        torch_per = torch.stack([torch.linalg.vector_norm(g.double(), p) for g in grads]).float()
        torch.testing.assert_close(per, torch_per, equal_nan=True, **NORM_TOL[torch.float32])
    grads = _make([(c + 9,), (300,)], [dtype])
    grads[1][4] = math.inf
    assert ops.op("cpu", "total_norm")(grads, p).isposinf()
    # NaN norm: the clip rescales every gradient by NaN, as torch does.
    grads[0][0] = math.nan
    theirs = [g.clone() for g in grads]
    ops.op("cpu", "clip_grad_norm_")(grads, 1.0, p)
    reference.clip_grad_norm_(theirs, 1.0, p)
    for o, t in zip(grads, theirs, strict=True):
        torch.testing.assert_close(o, t, equal_nan=True)


@pytest.mark.parametrize("p", [1.0, 2.0], ids=lambda p: f"p{p}")
def test_finite_inputs_never_overflow(p):
    c = _chunk()
    # fp32 squares overflow above 1.8e19; the chunk falls back to fp64 and stays exact.
    grads = [torch.full((c + 300,), 1e20), torch.randn(1000)]
    grads[0][5] = -3e19
    total = ops.op("cpu", "total_norm")(grads, p)
    assert total.isfinite()
    check_norm(total, grads, p)
    # bf16 near its max (3.39e38): squares far above fp32's range, the norm itself representable.
    big = torch.tensor([3.38e38], dtype=torch.bfloat16)
    small = (torch.randn(10_000) * 1e30).to(torch.bfloat16)
    total = ops.op("cpu", "total_norm")([small, big], p)
    assert total.isfinite()
    torch.testing.assert_close(total, reference.total_norm([small, big], p), **NORM_TOL[torch.float32])
    # fp16 near its max: the fp32 fast path cannot overflow, and is exact enough.
    half = torch.full((3000,), 65504.0, dtype=torch.float16)
    check_norm(ops.op("cpu", "total_norm")([half], p), [half], p)


# ---- determinism -------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p}")
def test_bitwise_the_same_whatever_the_thread_count(p):
    c = _chunk()
    shapes = [(3 * c + 11,), (17,), (c,), (_parallel_min(),), (2 * c - 1,)] + [(129,)] * 50
    grads = _make(shapes, DTYPES, scale=1e3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 4, 7):  # each count splits the chunks between threads differently
            torch.set_num_threads(n)
            clipped = [g.clone() for g in grads]
            norm = ops.op("cpu", "clip_grad_norm_")(clipped, 1.0, p)
            total, per = ops.op("cpu", "per_param_norms")(grads, p)
            results.append((norm, total, per, clipped))
    finally:
        torch.set_num_threads(threads)
    first = results[0]
    assert torch.equal(bits(first[0]), bits(first[1]))
    for norm, total, per, clipped in results[1:]:
        assert torch.equal(bits(norm), bits(first[0]))
        assert torch.equal(bits(total), bits(first[1]))
        assert torch.equal(bits(per), bits(first[2]))
        assert same_bits(clipped, first[3])


def test_poisoned_scratch_cannot_leak(native):
    grads = _make([(_chunk() * 2 + 1,), (3,)] * 3, DTYPES)
    clean = ops.op("cpu", "total_norm")(grads, 2.0)
    native.cpu_poison_scratch()
    assert torch.equal(bits(ops.op("cpu", "total_norm")(grads, 2.0)), bits(clean))
    native.cpu_poison_scratch()
    assert torch.equal(bits(ops.op("cpu", "per_param_norms")(grads, 2.0)[0]), bits(clean))


# ---- clip_grad_value_ ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", [[d] for d in DTYPES] + [DTYPES], ids=["fp32", "fp16", "bf16", "mixed"])
@pytest.mark.parametrize("clip_value", [0.0, 0.5, 2.0, math.inf])
def test_clip_grad_value_is_bitwise_torch(dtypes, clip_value):
    grads = _make([(_chunk() + 45,), (33,), (3,), ()], dtypes)
    for g in grads[:2]:
        g.view(-1)[:6] = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0])
    ours = [g.clone() for g in grads]
    theirs = [g.clone() for g in grads]
    ops.op("cpu", "clip_grad_value_")(ours, clip_value)
    torch._foreach_clamp_min_(theirs, -clip_value)  # what torch.nn.utils.clip_grad_value_ runs on CPU
    torch._foreach_clamp_max_(theirs, clip_value)
    for o, t in zip(ours, theirs, strict=True):
        assert torch.equal(o.isnan(), t.isnan())
        keep = ~t.isnan()
        assert torch.equal(bits(o)[keep], bits(t)[keep]), "values and signs of zero as CPU torch gives"


def test_clip_value_out_of_dtype_range_raises_like_torch():
    g = torch.randn(10, dtype=torch.float16)
    before = g.clone()
    with pytest.raises(RuntimeError, match="overflow"):
        torch._foreach_clamp_min_([g.clone()], -1e10)
    with pytest.raises(RuntimeError, match="overflow"):
        ops.op("cpu", "clip_grad_value_")([g], 1e10)
    assert torch.equal(g, before)


# ---- layouts and bad input -----------------------------------------------------------------------------
def test_non_contiguous_gradients_are_copied_and_written_back():
    base = torch.randn(300, 40) * 10
    sliced = base[:, ::3]  # not dense: a contiguous copy, written back
    transposed = (torch.randn(50, 70) * 10).t()  # dense, not contiguous: served in place
    untouched = base[:, 1::3].clone()
    grads = [sliced, transposed]
    theirs = [g.clone() for g in grads]
    norm = ops.op("cpu", "clip_grad_norm_")(grads, 1.0, 2.0)
    ref = reference.clip_grad_norm_(theirs, 1.0, 2.0)
    torch.testing.assert_close(norm, ref, **NORM_TOL[torch.float32])
    for o, t in zip(grads, theirs, strict=True):
        torch.testing.assert_close(o, t, **GRAD_TOL[torch.float32])
    assert torch.equal(base[:, 1::3], untouched), "elements outside the view are not written"
    value = base[::2, ::5]
    expected = value.clamp(-0.1, 0.1)
    ops.op("cpu", "clip_grad_value_")([value], 0.1)
    assert torch.equal(base[::2, ::5], expected)


def test_bad_input_names_the_gradient_and_writes_nothing():
    good = torch.randn(100) * 10
    before = good.clone()
    with pytest.raises(RuntimeError, match="gradient 1 has dtype Double"):
        ops.op("cpu", "clip_grad_norm_")([good, torch.randn(3, dtype=torch.float64)], 1.0, 2.0)
    with pytest.raises(RuntimeError, match="norm_type must be 1, 2 or inf"):
        ops.op("cpu", "clip_grad_norm_")([good], 1.0, 3.0)
    with pytest.raises(NotImplementedError, match="SparseCPU"):  # the dispatcher refuses sparse lists
        ops.op("cpu", "clip_grad_value_")([good, torch.randn(4, 4).to_sparse()], 1.0)
    with pytest.raises(RuntimeError, match="total_norm must hold one value"):
        ops.op("cpu", "clip_grads_with_norm_")([good], 1.0, torch.ones(2))
    assert torch.equal(good, before)


# ---- routing: "auto" serves CPU tensors with the native kernels ---------------------------------------
@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_auto_chooses_cpu(monkeypatch, dtype, p):
    monkeypatch.delenv("GRADCLIP_BACKEND", raising=False)
    g = torch.randn(5, dtype=dtype)
    assert [grp.backend for grp in routing.plan([g], p, "auto")] == ["cpu"]
    assert [grp.backend for grp in routing.plan([g], None, "auto")] == ["cpu"]


def test_auto_sends_what_cpu_cannot_serve_to_the_reference(monkeypatch):
    monkeypatch.delenv("GRADCLIP_BACKEND", raising=False)
    fp32, fp64 = torch.randn(5), torch.randn(5, dtype=torch.float64)
    assert [g.backend for g in routing.plan([fp32], 3.0, "auto")] == ["reference"]
    assert [g.backend for g in routing.plan([fp64], 2.0, "auto")] == ["reference"]
    assert [g.backend for g in routing.plan([torch.randn(3, dtype=torch.complex64)], 2.0, "auto")] == [
        "reference"
    ]
    # An fp64 norm must be fp64-accurate: the whole device goes to the reference for a norm, while
    # an op with no norm (clip_grad_value_, clip_grads_with_norm_) still splits per dtype.
    assert [g.backend for g in routing.plan([fp32, fp64], 2.0, "auto")] == ["reference"]
    assert sorted(g.backend for g in routing.plan([fp32, fp64], None, "auto")) == ["cpu", "reference"]
    with pytest.raises(gradclip.BackendUnavailableError, match="float64"):
        routing.plan([fp64], 2.0, "cpu")


def test_public_api_really_runs_the_cpu_kernel(monkeypatch):
    """The profiler sees gradclip::cpu_* under "auto": the fast kernels cannot silently fall back."""
    monkeypatch.delenv("GRADCLIP_BACKEND", raising=False)
    params = [torch.nn.Parameter(torch.zeros(64)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(64) * 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        gradclip.clip_grad_norm_(params, 1.0)
        gradclip.get_total_norm([p.grad for p in params])
        gradclip.clip_grad_value_(params, 0.1)
    names = {e.name for e in prof.events()}
    assert {
        "gradclip::cpu_clip_grad_norm_",
        "gradclip::cpu_total_norm",
        "gradclip::cpu_clip_grad_value_",
    } <= names
    assert not any(n.startswith("gradclip::reference") for n in names)


def test_report_says_cpu_is_available():
    assert backends.report()["cpu"].startswith("available")
    assert "cuda tensors" in backends.why_unavailable("cpu", "cuda").lower()


# ---- opcheck and the comparison's power -----------------------------------------------------------------
@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p}")
def test_opcheck_cpu(p):
    def grads():
        return _make([(3, 5), (7,), (4, 4), (2,), (), (0,)], DTYPES, scale=4.0)

    samples = {
        "total_norm": [(grads(), p)],
        "clip_grad_norm_": [(grads(), 0.5, p), (grads(), 1e6, p)],
        "clip_grads_with_norm_": [(grads(), 0.5, torch.tensor(3.0)), (grads(), 1e6, torch.tensor(3.0))],
        "clip_grad_value_": [(grads(), 0.1)],
        "per_param_norms": [(grads(), p)],
        "clip_grad_norm_per_param_": [(grads(), 0.5, p)],
    }
    for name, cases in samples.items():
        for args in cases:
            result = torch.library.opcheck(ops.op("cpu", name), args)
            assert all(v == "SUCCESS" for v in result.values()), (name, p, result)


def test_a_wrong_result_is_caught():
    grads = _make([(1000,), (33,)], [torch.float32])
    good = ops.op("cpu", "total_norm")(grads, 2.0)
    check_norm(good, grads, 2.0)
    with pytest.raises(AssertionError):
        check_norm(good * (1 + 1e-5), grads, 2.0)  # five times NORM_TOL's rtol
    clipped = [g.clone() for g in grads]
    ops.op("cpu", "clip_grad_norm_")(clipped, 1.0, 2.0)
    wrong = [clipped[0].clone(), clipped[1].clone()]
    wrong[1][3] = torch.nextafter(wrong[1][3], torch.tensor(math.inf))
    assert not same_bits(wrong, clipped)
