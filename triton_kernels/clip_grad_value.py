"""In-place clamp of every gradient of one device to [-clip_value, clip_value]: one launch.

Math: x <- min(max(x, -v), v) per element (so all v for v < 0, all NaN for a NaN v, as torch),
compared in fp32 (v cast to fp32 in-kernel) and the bound rounded once to the gradient dtype, as
torch.clamp_min_/clamp_max_ do. A NaN gradient element stays NaN (both comparisons are false).
Ties (x equal to a bound) follow the torch of the tensors' device (TIES_TO_BOUND):
- CUDA (TIES_TO_BOUND=True): torch's foreach `maximum`/`minimum` functors return the bound on a
  tie (`isnan(a) || a > b ? a : b`), so for v = 0 every non-NaN element becomes +0.0
  (max(x, -0.0) gives -0.0, then min(-0.0, +0.0) gives the bound +0.0). (Review fix: this kernel
  gave -0.0 for negative elements, CPU torch's sign.)
- CPU (the interpreter, TIES_TO_BOUND=False): CPU torch keeps the element on a tie (-0.0 stays).
Only elements that change (or tie, on CUDA) are stored, so in-range gradients keep their exact
bits.

Bytes moved (N elements of e bytes, T tensors, P programs): reads N*e once plus the table
(40 B per tensor walked + 16 B per program); writes e bytes per clamped element only. Floor: N*e
read, plus the writes of the clamped elements.

Work split: the same tensor table and contiguous per-program chunk ranges as clip_grad_norm.py
(layout in gradclip/triton_backend.py); dtype tag dispatched per tensor; 16-byte vector path
for full chunks of 16-byte-aligned tensors, masked scalar path otherwise; int64 offsets.
"""

from __future__ import annotations

import triton
import triton.language as tl
from gradclip.triton_kernels.tensor_table import TAG_ALIGNED16, elem_type, program_range, tensor_entry


@triton.jit
def _clamp_chunk(ptr, offs, mask, lo, hi, ELEM: tl.constexpr, TIES_TO_BOUND: tl.constexpr):
    # Exactly clamp_min(lo) then clamp_max(hi), as the reference: min(max(x, lo), hi). (Review fix:
    # `where(x < lo, lo, hi)` gave lo, not hi, for a negative clip_value, where torch gives hi
    # everywhere.) A NaN bound makes every element NaN, as torch's clamp with a NaN bound does.
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lo = tl.broadcast_to(lo, x.shape)  # (the interpreter cannot OR a scalar with a block)
    if TIES_TO_BOUND:  # CUDA torch: maximum(x, lo) = x if isnan(x) or x > lo else lo; minimum alike
        hi = tl.broadcast_to(hi, x.shape)
        below = (x == x) & ((x <= lo) | (lo != lo))
        t = tl.where(below, lo, x)
        above = (t == t) & ((t >= hi) | (hi != hi))
    else:  # CPU torch: the element wins a tie
        below = (x < lo) | (lo != lo)
        t = tl.where(below, lo, x)
        above = t > hi
    y = tl.where(above, hi, t)
    tl.store(ptr + offs, y.to(ELEM), mask=mask & (below | above))


@triton.jit
def clip_grad_value_kernel(
    table_ptr,  # int64 tensor table (layout: gradclip/triton_backend.py)
    num_tensors,  # T
    total_chunks,  # C = sum over tensors of cdiv(numel, BLOCK)
    clip_value,  # float
    BLOCK: tl.constexpr,  # elements per chunk
    TIES_TO_BOUND: tl.constexpr,  # a tie returns the bound (CUDA torch) or the element (CPU torch)
):
    c_lo, c_hi, t_first, t_last = program_range(table_ptr, num_tensors, total_chunks)
    hi_bound = tl.cast(clip_value, tl.float32)
    lo_bound = hi_bound * -1.0  # not -hi_bound: triton negates as 0 - x, giving +0.0 for v = 0 (torch: -0.0)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    all_lanes = lanes < BLOCK  # an all-true mask: keeps the full-chunk accesses vectorised
    t = t_first
    while t <= t_last:
        addr, numel, tag, lo, hi = tensor_entry(table_ptr, num_tensors, t, c_lo, c_hi, BLOCK)
        aligned = (tag & TAG_ALIGNED16) != 0
        for k in tl.static_range(3):
            if (tag & 3) == k:
                ptr = addr.to(tl.pointer_type(elem_type(k)))
                c = lo
                while c < hi:
                    offs = c * BLOCK + lanes
                    if aligned & (c * BLOCK + BLOCK <= numel):
                        _clamp_chunk(
                            tl.multiple_of(ptr, 16),
                            offs,
                            all_lanes,
                            lo_bound,
                            hi_bound,
                            elem_type(k),
                            TIES_TO_BOUND,
                        )
                    else:
                        _clamp_chunk(ptr, offs, offs < numel, lo_bound, hi_bound, elem_type(k), TIES_TO_BOUND)
                    c += 1
        t += 1
