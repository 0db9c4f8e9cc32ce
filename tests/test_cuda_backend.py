"""The CUDA backend (csrc/, gradclip._C): host logic on the CPU, kernels against the reference on a GPU.

The CPU part compiles and runs the torch-free host-logic unit test (csrc/tests/host_logic_test.cpp).
Every other test needs a GPU and the built extension (`requires_cuda_extension`) and calls the
`gradclip::cuda_*` ops directly, so a fallback elsewhere in the API cannot hide a kernel bug.
"""

from __future__ import annotations

import math
import pathlib
import shutil
import subprocess

import conftest
import pytest
import torch
from conftest import GRAD_TOL, NORM_TOL, fp64_norm

from gradclip import ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
NORM_TYPES = [1.0, 2.0, math.inf]
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The adversarial shape grid for the kernels (STYLE.md); sizes are element counts.
CHUNK = 1 << 16  # csrc/tensor_list.h kChunkElems
SHAPES = {
    **conftest.SHAPE_GRID,
    "larger-than-a-chunk": [(3 * CHUNK + 5,)],
    "larger-than-first-sweep": [((1 << 25) + 3,)],  # > 2048 blocks x one chunk
    "more-than-inline-table": [(17,)] * 1030,
    "several-2d": [(31, 33), (1, 7), (4096, 65)],
}


def test_host_logic_unit_test(tmp_path):
    """Chunk partitioning, table split and grid sizing (csrc/tensor_list.h), compiled and run here."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "host_logic_test"
    src = ROOT / "csrc" / "tests" / "host_logic_test.cpp"
    subprocess.run([compiler, "-std=c++17", "-O1", "-o", str(exe), str(src)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


# ---- GPU tests ------------------------------------------------------------------------------------


def _C():
    from gradclip import _extension

    module, why = _extension.load()
    assert module is not None, why
    return module


def make_grads(shapes, dtype, seed=0, scale=1.0, device="cuda"):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        shape = shape if isinstance(shape, tuple) else (shape,)
        out.append(
            (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).to(device)
        )
    return out


def norm_fp64(grads, norm_type: float) -> float:
    """fp64 norm: Python math (conftest) for small lists, torch fp64 on the CPU for large ones."""
    if sum(g.numel() for g in grads) <= 100_000:
        return fp64_norm(grads, norm_type)
    flat = torch.cat([g.detach().double().cpu().reshape(-1) for g in grads])
    return torch.linalg.vector_norm(flat, norm_type).item()


def cuda_op(name):
    return ops.op("cuda", name)


def ref_op(name):
    return ops.op("reference", name)


def bits(t):
    return t.reshape(-1).view(torch.uint8)


@pytest.fixture(autouse=True)
def _poisoned_scratch(request):
    """Scratch slots start as NaN: a partial read before it is written shows up as a NaN norm."""
    if request.node.get_closest_marker("requires_cuda_extension"):
        _C().poison_scratch()
    yield


@pytest.mark.requires_cuda_extension
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=["l1", "l2", "inf"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
def test_total_norm_matches_fp64(shapes, dtype, norm_type):
    grads = make_grads(shapes, dtype)
    got = cuda_op("total_norm")(grads, norm_type)
    assert got.dtype == torch.float32 and got.device == grads[0].device
    want = torch.tensor(norm_fp64(grads, norm_type), dtype=torch.float64)
    torch.testing.assert_close(got.cpu().double(), want, **NORM_TOL[dtype])


@pytest.mark.requires_cuda_extension
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=["l1", "l2", "inf"])
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
def test_clip_grad_norm_mixed_dtypes_matches_reference(shapes, norm_type):
    grads = [g.to(KERNEL_DTYPES[i % 3]) for i, g in enumerate(make_grads(shapes, torch.float32, seed=1))]
    expected = [g.clone() for g in grads]
    ref_norm = ref_op("clip_grad_norm_")(expected, 0.5, norm_type)
    norm = cuda_op("clip_grad_norm_")(grads, 0.5, norm_type)
    torch.testing.assert_close(norm, ref_norm.to(norm.dtype), **NORM_TOL[torch.float32])
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, **GRAD_TOL[g.dtype])


@pytest.mark.requires_cuda_extension
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_no_clipping_leaves_bits_identical(dtype):
    grads = make_grads([(1000,), (3,), (CHUNK + 1,)], dtype, scale=1e-3)
    before = [bits(g).clone() for g in grads]
    cuda_op("clip_grad_norm_")(grads, 1e6, 2.0)
    cuda_op("clip_grads_with_norm_")(grads, 1e6, torch.tensor(1.0, device="cuda"))
    for g, b in zip(grads, before, strict=True):
        assert torch.equal(bits(g), b)


@pytest.mark.requires_cuda_extension
def test_misaligned_and_noncontiguous_grads():
    base = torch.randn(4 * CHUNK + 64, device="cuda")
    grads = [
        base[1 : 2 * CHUNK + 1],  # storage offset 4 B: scalar head, then vectors
        base[2 * CHUNK + 3 :: 2],  # strided: runs through a contiguous copy, written back
        torch.randn(33, 17, device="cuda", dtype=torch.float16).t(),  # dense, permuted
        torch.randn(7, device="cuda", dtype=torch.bfloat16)[1:],
    ]
    expected = [g.clone() for g in grads]
    ref_norm = ref_op("clip_grad_norm_")(expected, 0.1, 2.0)
    norm = cuda_op("clip_grad_norm_")(grads, 0.1, 2.0)
    torch.testing.assert_close(norm, ref_norm, **NORM_TOL[torch.float32])
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, **GRAD_TOL[g.dtype])


@pytest.mark.requires_cuda_extension
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_propagates_like_torch(bad):
    grads = make_grads([(100,), (CHUNK + 7,)], torch.float32)
    grads[1][5] = float(bad)
    expected = [g.clone() for g in grads]
    torch_norm = torch.nn.utils.clip_grad_norm_(expected, 1.0)  # torch itself on the same values
    norm = cuda_op("clip_grad_norm_")(grads, 1.0, 2.0)
    torch.testing.assert_close(norm, torch_norm, equal_nan=True)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, equal_nan=True)


@pytest.mark.requires_cuda_extension
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_overflow_safe_accumulation(dtype):
    big = {torch.float32: 3e38, torch.float16: 6e4, torch.bfloat16: 3e38}[dtype]
    grads = [torch.full((CHUNK * 3,), big, dtype=dtype, device="cuda")]
    norm = cuda_op("total_norm")(grads, 2.0)
    want = fp64_norm(grads, 2.0)
    if want > torch.finfo(torch.float32).max:
        assert math.isinf(norm.item())  # the true norm itself exceeds fp32
    else:
        assert math.isfinite(norm.item())
        torch.testing.assert_close(
            norm.double().cpu(), torch.tensor(want, dtype=torch.float64), rtol=2e-6, atol=0
        )


@pytest.mark.requires_cuda_extension
def test_bitwise_reproducible():
    grads = make_grads([(5 * CHUNK + 11,), (1000,)] * 20, torch.float32)
    norms = {cuda_op("total_norm")(grads, 2.0).item() for _ in range(5)}
    assert len(norms) == 1


@pytest.mark.requires_cuda_extension
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shapes", [SHAPES["2000-tiny"], SHAPES["larger-than-a-chunk"], SHAPES["size-127"]])
def test_clip_grad_value_matches_reference(shapes, dtype):
    grads = make_grads(shapes, dtype, seed=3)
    if grads[0].numel() > 0:
        grads[0].view(-1)[0] = float("nan")
    expected = [g.clone() for g in grads]
    ref_op("clip_grad_value_")(expected, 0.7)
    cuda_op("clip_grad_value_")(grads, 0.7)
    for g, e in zip(grads, expected, strict=True):
        assert torch.equal(bits(g), bits(e))


@pytest.mark.requires_cuda_extension
@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64], ids=str)
def test_scale_by_device_scalar(norm_dtype):
    grads = make_grads([(CHUNK + 3,), (10,)], torch.bfloat16)
    expected = [g.clone() for g in grads]
    total = torch.tensor(12.5, dtype=norm_dtype, device="cuda")
    ref_op("clip_grads_with_norm_")(expected, 1.0, total)
    cuda_op("clip_grads_with_norm_")(grads, 1.0, total)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, **GRAD_TOL[g.dtype])


@pytest.mark.requires_cuda_extension
def test_fp64_norm_uses_unrounded_max_norm():
    """fp64 total_norm: torch forms the coefficient in fp64 with max_norm as a double. For this
    norm, rounding max_norm=0.1 to fp32 first moves the fp32 coefficient by one ulp (found on the
    CPU with IEEE double arithmetic), so fp32 gradients would differ from the reference bitwise."""
    grads = make_grads([(CHUNK + 3,), (10,)], torch.float32, seed=4)
    expected = [g.clone() for g in grads]
    total = torch.tensor(64.05920704482398, dtype=torch.float64, device="cuda")
    ref_op("clip_grads_with_norm_")(expected, 0.1, total)
    cuda_op("clip_grads_with_norm_")(grads, 0.1, total)
    for g, e in zip(grads, expected, strict=True):
        assert torch.equal(bits(g), bits(e))


@pytest.mark.requires_cuda_extension
def test_rejects_cpu_first_gradient_before_touching_anything():
    grads = [torch.ones(3), torch.full((3,), 5.0, device="cuda")]
    with pytest.raises(RuntimeError, match="gradient 0 .*not a CUDA device"):
        cuda_op("clip_grad_value_")(grads, 1.0)
    assert torch.equal(grads[1].cpu(), torch.full((3,), 5.0))


@pytest.mark.requires_cuda_extension
def test_comparison_can_fail():
    """A deliberately wrong result must be caught by the same comparison."""
    grads = make_grads([(1000,)], torch.float32)
    norm = cuda_op("total_norm")(grads, 2.0)
    want = torch.tensor(fp64_norm(grads, 2.0), dtype=torch.float64)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(norm.cpu().double() * (1 + 1e-5), want, **NORM_TOL[torch.float32])


@pytest.mark.requires_cuda_extension
@pytest.mark.parametrize("count", [3, 1030], ids=["inline-table", "device-table"])
def test_cuda_graph_replay_sees_in_place_changes(count):
    grads = make_grads([(CHUNK + 5,)] + [(9,)] * (count - 1), torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: caches the device table for long lists
        cuda_op("clip_grad_norm_")([g.clone() for g in grads], 1e9, 2.0)
        cuda_op("clip_grad_norm_")(grads, 1e9, 2.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = cuda_op("clip_grad_norm_")(grads, 1.0, 2.0)
    for step, scale in enumerate([1e-4, 3.0, 1e-3, 100.0]):  # inactive, active, inactive, active
        fresh = make_grads([(CHUNK + 5,)] + [(9,)] * (count - 1), torch.float16, seed=10 + step, scale=scale)
        for g, f in zip(grads, fresh, strict=True):
            g.copy_(f)
        expected = [f.clone() for f in fresh]
        ref_norm = ref_op("clip_grad_norm_")(expected, 1.0, 2.0)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(norm, ref_norm, **NORM_TOL[torch.float16])
        for g, e, f in zip(grads, expected, fresh, strict=True):
            torch.testing.assert_close(g, e, **GRAD_TOL[torch.float16])
            if ref_norm.item() + 1e-6 <= 1.0:
                assert torch.equal(bits(g), bits(f))  # inactive: bit-identical


@pytest.mark.requires_cuda_extension
def test_long_list_device_table_is_cached():
    grads = make_grads([(5,)] * 1100, torch.float32)
    cuda_op("total_norm")(grads, 2.0)
    cached = _C().cached_device_tables()
    for _ in range(3):
        cuda_op("total_norm")(grads, 2.0)
    assert _C().cached_device_tables() == cached


@pytest.mark.requires_cuda_extension
def test_rejects_other_devices_and_dtypes():
    with pytest.raises(RuntimeError, match="float32/float16/bfloat16"):
        cuda_op("total_norm")([torch.ones(3, device="cuda", dtype=torch.float64)], 2.0)
    with pytest.raises(RuntimeError, match="norm_type"):
        cuda_op("total_norm")([torch.ones(3, device="cuda")], 3.0)


@pytest.mark.requires_cuda_extension
def test_torch_compile_fullgraph():
    grads = make_grads([(1000,), (CHUNK + 1,)], torch.float32, scale=10.0)
    expected = [g.clone() for g in grads]
    ref_norm = ref_op("clip_grad_norm_")(expected, 1.0, 2.0)

    @torch.compile(fullgraph=True)
    def step(gs):
        return cuda_op("clip_grad_norm_")(gs, 1.0, 2.0)

    norm = step(grads)
    torch.testing.assert_close(norm, ref_norm, **NORM_TOL[torch.float32])
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, **GRAD_TOL[torch.float32])


@pytest.mark.requires_cuda_extension
def test_more_than_2_pow_31_elements():
    n = (1 << 31) + 5
    free, _ = torch.cuda.mem_get_info()
    if free < n * 2 * 2 + (1 << 30):  # the fp16 tensor, a reference copy, and slack
        pytest.skip(f"needs ~{n * 4 / 2**30:.0f} GiB of free GPU memory")
    g = torch.full((n,), 1.0, dtype=torch.float16, device="cuda")
    g[-1] = 2.0  # the last element lies past 2^31: a 32-bit offset would miss it
    norm = cuda_op("total_norm")([g], math.inf)
    assert norm.item() == 2.0
    norm = cuda_op("total_norm")([g], 1.0)
    assert norm.item() == pytest.approx(float(n - 1) + 2.0, rel=1e-7)
    cuda_op("clip_grad_norm_")([g], float(n) / 4, 1.0)  # coef ~ 1/4: every element rewritten
    assert g[0].item() == pytest.approx(0.25, rel=1e-3) and g[-1].item() == pytest.approx(0.5, rel=1e-3)


# ---- per-parameter norms (issue 14): GPU only -------------------------------------------------------


@pytest.fixture
def poisoned_per_param_slots():
    _C().set_poison_per_param_scratch(True)
    yield
    _C().set_poison_per_param_scratch(False)


def per_param_fp64(grads, norm_type):
    return torch.tensor(
        [torch.linalg.vector_norm(g.double().cpu(), norm_type).item() if g.numel() else 0.0 for g in grads],
        dtype=torch.float64,
    )


@pytest.mark.requires_cuda_extension
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=["l1", "l2", "inf"])
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
def test_per_param_norms_match_fp64(poisoned_per_param_slots, shapes, norm_type):
    grads = [g.to(KERNEL_DTYPES[i % 3]) for i, g in enumerate(make_grads(shapes, torch.float32, seed=2))]
    grads = [g * (1 + i % 5) for i, g in enumerate(grads)]
    total, per_param = cuda_op("per_param_norms")(grads, norm_type)
    assert per_param.dtype == torch.float32 and per_param.shape == (len(grads),)
    assert per_param.device == grads[0].device
    torch.testing.assert_close(
        per_param.cpu().double(), per_param_fp64(grads, norm_type), **NORM_TOL[torch.float16]
    )
    assert torch.equal(total, cuda_op("total_norm")(grads, norm_type))  # bitwise the norm-only kernel's
    expected = [g.clone() for g in grads]
    expected_total = cuda_op("clip_grad_norm_")(expected, 0.5, norm_type)
    total, clipped_per_param = cuda_op("clip_grad_norm_per_param_")(grads, 0.5, norm_type)
    assert torch.equal(total, expected_total) and torch.equal(clipped_per_param, per_param)
    for g, e in zip(grads, expected, strict=True):
        assert torch.equal(bits(g), bits(e))  # rescaled exactly as clip_grad_norm_


@pytest.mark.requires_cuda_extension
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=["l1", "l2", "inf"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_per_param_nonfinite_in_its_own_entry(poisoned_per_param_slots, bad, norm_type):
    grads = make_grads([(5,), (0,), (3 * CHUNK + 1,), (7,), (CHUNK,)], torch.float16)
    grads[2][2 * CHUNK + 3] = bad  # in its third chunk
    grads[0][0] = 60000.0  # squares overflow fp16 and fp32 sums: still finite
    _, per_param = cuda_op("per_param_norms")(grads, norm_type)
    torch.testing.assert_close(
        per_param.cpu().double(), per_param_fp64(grads, norm_type), equal_nan=True, **NORM_TOL[torch.float16]
    )
    assert (~per_param.isfinite()).nonzero().flatten().tolist() == [2]


@pytest.mark.requires_cuda_extension
def test_per_param_bitwise_reproducible_and_graph_capturable():
    grads = make_grads([(CHUNK * 5 + 3,)] + [(11,)] * 1030, torch.bfloat16)  # a device table
    first = cuda_op("per_param_norms")(grads, 2.0)
    for _ in range(20):
        again = cuda_op("per_param_norms")(grads, 2.0)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total, per_param = cuda_op("per_param_norms")(grads, 2.0)
    fresh = make_grads([(CHUNK * 5 + 3,)] + [(11,)] * 1030, torch.bfloat16, seed=9, scale=4.0)
    for g, f in zip(grads, fresh, strict=True):
        g.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(
        per_param.cpu().double(), per_param_fp64(fresh, 2.0), **NORM_TOL[torch.bfloat16]
    )


@pytest.mark.requires_cuda_extension
def test_per_param_one_kernel_launch():
    from torch.profiler import ProfilerActivity, profile

    grads = make_grads([(CHUNK + 1,), (0,), (5,)] * 10, torch.float32)
    cuda_op("clip_grad_norm_per_param_")(grads, 1.0, 2.0)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        cuda_op("clip_grad_norm_per_param_")(grads, 1.0, 2.0)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [n for n in kernels if "Memcpy" not in n and "Memset" not in n]
    assert len(kernels) == 1 and "norm_clip_kernel" in kernels[0], kernels
