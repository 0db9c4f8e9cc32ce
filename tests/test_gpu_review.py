"""GPU checks of the review fixes of issue 12 (they skip without a GPU; the CPU halves of these fixes are
tested under the Triton interpreter in tests/test_triton.py).

- Triton cold path and streams: a first launch on a side stream reads a filled table; launches on
  two streams at once each get their own partial slots and barrier counter; eviction after use on
  another stream is safe.
- clip_grad_value_ with clip_value=0: both kernel backends give CUDA torch's +0.0 (a tie returns the
  bound), checked bit for bit against torch.nn.utils.clip_grad_value_ on the GPU.
- clip_grads_with_norm_ with an fp64 total_norm: torch's fp64 coefficient.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradclip

pytestmark = pytest.mark.requires_cuda


def _triton():
    pytest.importorskip("triton")
    from gradclip import triton_backend

    if triton_backend.interpreting():
        pytest.skip("triton is interpreted in this process")
    return triton_backend


def _grads(seed=0, n=40, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    sizes = [(4096 * 5 + 7) if i % 7 == 0 else 1 + (i * 997) % 5000 for i in range(n)]
    return [(torch.randn(s, generator=gen) * scale).to(dtypes[i % 3]).cuda() for i, s in enumerate(sizes)]


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


def test_triton_first_launch_on_a_side_stream():
    tb = _triton()
    tb.configure()
    grads = _grads(seed=1)
    want = gradclip.get_total_norm(grads, 2.0, backend="reference")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = tb.total_norm(grads, 2.0)  # cold path on the side stream
    torch.cuda.synchronize()
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=0)
    assert torch.equal(tb.total_norm(grads, 2.0), got)  # the default stream: its own scratch, same bits


def test_triton_two_streams_at_once():
    tb = _triton()
    tb.configure()
    grads = _grads(seed=2)
    first = tb.total_norm(grads, 2.0)
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = {0: [], 1: []}
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(100):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i].append(tb.total_norm(grads, 2.0))
    torch.cuda.synchronize()
    assert all(torch.equal(o, first) for i in outs for o in outs[i])
    entry = tb._table(grads)
    assert len(entry.scratch) == 3  # default + two side streams
    tb.configure()  # eviction of an entry used on other streams (recorded on its table): no crash
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("value", [0.0, 0.5])
def test_clip_grad_value_matches_cuda_torch_bitwise(backend, value):
    if backend == "triton":
        _triton()
    from gradclip import backends

    why = backends.why_unavailable(backend, "cuda")
    if why:
        pytest.skip(why)
    grads = _grads(seed=3)
    for g in grads:
        g[:6] = torch.tensor([-0.0, 0.0, -1.0, value, -value, math.nan], dtype=g.dtype)
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for o, t, g in zip(ours, theirs, grads, strict=True):
        o.grad, t.grad = g.clone(), g.clone()
    gradclip.clip_grad_value_(ours, value, backend=backend)
    torch.nn.utils.clip_grad_value_(theirs, value)  # foreach on CUDA: a tie returns the bound
    assert all(torch.equal(_bits(o.grad), _bits(t.grad)) for o, t in zip(ours, theirs, strict=True))
    if value == 0.0:
        assert not any(t.grad[t.grad == 0].signbit().any() for t in theirs)  # CUDA torch: +0.0


def test_triton_fp64_total_norm_coefficient_as_torch():
    tb = _triton()
    grads = [g.float() for g in _grads(seed=4)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    norm = torch.tensor(3.0 + 1.3e-8 * 77, dtype=torch.float64, device="cuda")
    tb.clip_grads_with_norm_(grads, 1.0, norm)
    torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
    assert all(torch.equal(_bits(g), _bits(p.grad)) for g, p in zip(grads, params, strict=True))
