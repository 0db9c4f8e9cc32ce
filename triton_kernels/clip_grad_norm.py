"""Fused global p-norm (p = 1, 2, inf) + in-place rescale over every gradient of one device.

One `@triton.jit` function, specialised by constexprs into the kernels the backend launches:

    PHASE=0, SCALE=True    clip_grad_norm_: partials -> grid barrier -> norm -> rescale. ONE launch (GPU).
    PHASE=0, SCALE=False   total_norm: partials -> grid barrier -> norm. ONE launch (GPU).
    PHASE=1                partials only (one per program).
    PHASE=2                finish from the partials -> norm (-> rescale if SCALE). PHASE 1 + 2 is what
                           the interpreter runs instead of PHASE 0.
    PHASE=3                clip_grads_with_norm_: coefficient from a given fp32 norm -> rescale.

Math. Program p reduces its contiguous range of chunks (BLOCK elements of one tensor each) into
one fp64 partial: sum x^2 (p=2), sum |x| (p=1) or max |x| (p=inf, NaN-propagating), and writes it
to partials[p] (no atomics, so the norm is bitwise reproducible). Finishing, every program sums
the P partials in the same fixed tree order, so all programs hold the same norm and coefficient
coef = max_norm / (norm + 1e-6), computed as torch does: fp32 IEEE reciprocal of norm + 1e-6,
times max_norm. Program 0 writes the norm. When
coef >= 1 nothing is written (gradients stay bit-identical); otherwise (coef < 1 or NaN) each
program rescales its own chunks, multiplying in fp32 and rounding once to the gradient dtype,
walking them in reverse (REVERSE) so the chunks read last, likeliest still in L2, go first.

Accumulation: fp64. Squares of fp16/bf16/fp32 values are exact in fp64 and a sum of up to 2^60 of
them (< 3.4e38^2 * 2^60 < 1.8e308) cannot overflow, so finite fp32 inputs up to 3.4e38 give a
finite norm, with no per-element division or branch (a running-max scaled fp32 sum would need a
division per element and a rescale per chunk). The cost is one fp32->fp64 convert and one fp64
FMA per element: on A100/H100 (9.7/34 TFLOP/s fp64) that stays well under what HBM feeds
(<= ~1.7e12 elements/s); on GPUs with 1/64-rate fp64 it may become compute-bound (unmeasured).
NaN and inf propagate as in torch: NaN anywhere -> NaN norm, else inf -> inf norm (then coef = 0
and the gradients become 0, or NaN where they were inf, exactly as torch).

Bytes moved (N gradient elements of e bytes, P programs, T tensors): phase 1 reads N*e once plus
the table (40 B per tensor walked + 16 B per program) and writes 8 B per program; finishing reads
8*P B per program and writes 4 B; the rescale, only when clipping, reads and writes N*e again.
Floor: N*e when no clipping, 3*N*e when clipping.

Gradient addresses come from an int64 table (see gradclip/triton_backend.py for the layout), so
one launch serves any number of tensors of mixed fp32/fp16/bf16 dtype: the dtype tag is
dispatched per tensor, not per element. Chunks of tensors whose address is 16-byte aligned and
that are full take a 16-byte vector path (alignment hint, all-true mask); the rest a masked
scalar path. Offsets are int64. Loops are `while` loops (runtime bounds read from the table; the triton 3.6
interpreter cannot take a tensor as a `range` bound under numpy 2).

The grid barrier (PHASE=0) is a flip-bit counter in `sync_ptr`, never reset: program 0 adds
`arrive_first` = 2^31 - (P - 1) (mod 2^32) and the others add 1, so each launch adds exactly 2^31
and flips bit 31 once. Correct only while the low 31 bits are 0 when a launch starts (review
note: NOT for any prior value; from 0x7FFFFFFF the first +1 flips bit 31 before program 0 has
arrived): the counter starts at 0 and each complete launch adds 2^31, so this holds, under
CUDA-graph replay too, and int32 wraparound is harmless (only bit 31 is compared). Before the
last arrival the low bits are at most 2^31 - 1, so bit 31 flips exactly at the last arrival. Two
launches on one counter at once (the same gradients on two streams) would break it. Arrival
is an acq_rel atomic (releases this program's partial); waiting spins on acquire reads until bit
31 differs from the value seen at arrival; partials are then read with .cg (L2, not L1). The
grid must be co-resident: the backend launches it cooperatively (launch_cooperative_grid=True)
with at most 2 programs per SM. THE BARRIER IS ONLY EXERCISED ON A GPU: the interpreter
(TRITON_INTERPRET=1) runs programs one after another, so there the backend launches PHASE=1 and
then PHASE=2 of this same code instead.
"""

from __future__ import annotations

import triton
import triton.language as tl
from gradclip.triton_kernels.tensor_table import TAG_ALIGNED16, elem_type, program_range, tensor_entry


@triton.jit
def _max_nan(a, b):
    """max(a, b) that propagates NaN (tl.maximum and tl.max drop it on the GPU)."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _accumulate(acc, x, NORM: tl.constexpr):
    x = x.to(tl.float32)
    if NORM == 2:
        x = x.to(tl.float64)
        acc += x * x
    elif NORM == 1:
        acc += tl.abs(x).to(tl.float64)
    else:
        acc = _max_nan(acc, tl.abs(x).to(tl.float64))
    return acc


@triton.jit
def _partial(
    table_ptr,
    num_tensors,
    c_lo,
    c_hi,
    t_first,
    t_last,
    tparts_ptr,
    NORM: tl.constexpr,
    BLOCK: tl.constexpr,
    PER_PARAM: tl.constexpr,
):
    """fp64 partial of chunks [c_lo, c_hi): sum x^2, sum |x| or max |x|.

    PER_PARAM: also the partial of each tensor t of the range, to tparts[pid + t]. It is kept in
    a second per-lane accumulator, so the program's own partial takes exactly the same operations
    as without PER_PARAM (the total stays bitwise the same).
    """
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    all_lanes = lanes < BLOCK  # an all-true mask: keeps the full-chunk loads vectorised
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    t = t_first
    while t <= t_last:
        addr, numel, tag, lo, hi = tensor_entry(table_ptr, num_tensors, t, c_lo, c_hi, BLOCK)
        aligned = (tag & TAG_ALIGNED16) != 0
        acc_t = tl.zeros([BLOCK], dtype=tl.float64)
        for k in tl.static_range(3):
            if (tag & 3) == k:
                ptr = addr.to(tl.pointer_type(elem_type(k)))
                c = lo
                while c < hi:
                    offs = c * BLOCK + lanes
                    if aligned & (c * BLOCK + BLOCK <= numel):
                        x = tl.load(tl.multiple_of(ptr, 16) + offs, mask=all_lanes)
                    else:
                        x = tl.load(ptr + offs, mask=offs < numel, other=0.0)
                    acc = _accumulate(acc, x, NORM)
                    if PER_PARAM:
                        acc_t = _accumulate(acc_t, x, NORM)
                    c += 1
        if PER_PARAM:
            tl.store(tparts_ptr + pid + t, _reduce(acc_t, NORM))
        t += 1
    return _reduce(acc, NORM)


@triton.jit
def _reduce(acc, NORM: tl.constexpr):
    if NORM == 0:
        return tl.reduce(acc, 0, _max_nan)
    else:
        return tl.sum(acc, 0)


@triton.jit
def _finish(total, NORM: tl.constexpr):
    """The fp32 norm from a combined fp64 sum (p = 2, 1) or max (p = inf)."""
    if NORM == 2:
        total = tl.sqrt(total)  # fp64 sqrt: correctly rounded (sqrt.rn.f64)
    return total.to(tl.float32)


@triton.jit
def _per_param_finish(
    table_ptr,
    num_tensors,
    total_chunks,
    tparts_ptr,
    per_param_ptr,
    NORM: tl.constexpr,
    BLOCK: tl.constexpr,
    P_POW2: tl.constexpr,
):
    """Program p finishes tensors [p*T//P, (p+1)*T//P): per_param[t] from the slots tparts[q + t]
    of the programs q that own its chunks, combined in one fixed tree order; 0 for an empty tensor.

    Chunk c is owned by program ((c + 1) * P - 1) // C, the largest q with q*C//P <= c.
    """
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    slots = tl.arange(0, P_POW2).to(tl.int64)
    t = pid * num_tensors // nprog
    t_end = (pid + 1) * num_tensors // nprog
    while t < t_end:
        numel = tl.load(table_ptr + num_tensors + t)
        chunk0 = tl.load(table_ptr + 3 * num_tensors + t)
        chunk_last = chunk0 + tl.cdiv(numel, BLOCK) - 1
        q_lo = ((chunk0 + 1) * nprog - 1) // total_chunks
        q_hi = ((chunk_last + 1) * nprog - 1) // total_chunks
        mask = (slots >= q_lo) & (slots <= q_hi) & (numel > 0)
        parts = tl.load(tparts_ptr + slots + t, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(per_param_ptr + t, _finish(_reduce(parts, NORM), NORM))
        t += 1


@triton.jit
def _rescale(
    table_ptr, num_tensors, c_lo, c_hi, t_first, t_last, coef, BLOCK: tl.constexpr, REVERSE: tl.constexpr
):
    """x <- round_to_dtype(fp32(x) * coef) over chunks [c_lo, c_hi), last chunk first if REVERSE."""
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    all_lanes = lanes < BLOCK
    i = t_first
    while i <= t_last:
        t = t_last - (i - t_first) if REVERSE else i
        addr, numel, tag, lo, hi = tensor_entry(table_ptr, num_tensors, t, c_lo, c_hi, BLOCK)
        aligned = (tag & TAG_ALIGNED16) != 0
        for k in tl.static_range(3):
            if (tag & 3) == k:
                ptr = addr.to(tl.pointer_type(elem_type(k)))
                j = lo
                while j < hi:
                    c = hi - 1 - (j - lo) if REVERSE else j
                    offs = c * BLOCK + lanes
                    if aligned & (c * BLOCK + BLOCK <= numel):
                        vptr = tl.multiple_of(ptr, 16) + offs
                        x = tl.load(vptr, mask=all_lanes)
                        tl.store(vptr, (x.to(tl.float32) * coef).to(elem_type(k)), mask=all_lanes)
                    else:
                        mask = offs < numel
                        x = tl.load(ptr + offs, mask=mask, other=0.0)
                        tl.store(ptr + offs, (x.to(tl.float32) * coef).to(elem_type(k)), mask=mask)
                    j += 1
        i += 1


@triton.jit
def _fused(
    table_ptr,
    num_tensors,
    total_chunks,
    partials_ptr,
    norm_ptr,
    sync_ptr,
    max_norm,
    arrive_first,
    tparts_ptr,
    per_param_ptr,
    NORM: tl.constexpr,
    PHASE: tl.constexpr,
    SCALE: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK: tl.constexpr,
    P_POW2: tl.constexpr,
    PER_PARAM: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    c_lo, c_hi, t_first, t_last = program_range(table_ptr, num_tensors, total_chunks)

    if PHASE <= 1:
        part = _partial(
            table_ptr, num_tensors, c_lo, c_hi, t_first, t_last, tparts_ptr, NORM, BLOCK, PER_PARAM
        )
        tl.store(partials_ptr + pid, part)

    if PHASE == 0:
        # Grid-wide barrier (GPU only; see the module docstring).
        inc = tl.where(pid == 0, arrive_first, 1).to(tl.int32)
        seen = tl.atomic_add(sync_ptr, inc, sem="acq_rel", scope="gpu")
        now = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        while (seen ^ now) >= 0:  # bit 31 (the int32 sign) not flipped yet
            now = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")

    if PHASE != 1:
        if PHASE == 3:
            norm = tl.load(norm_ptr).to(tl.float32)
        else:
            slots = tl.arange(0, P_POW2)
            parts = tl.load(partials_ptr + slots, mask=slots < nprog, other=0.0, cache_modifier=".cg")
            if NORM == 0:
                total = tl.reduce(parts, 0, _max_nan)
            elif NORM == 1:
                total = tl.sum(parts, 0)
            else:
                total = tl.sqrt(tl.sum(parts, 0))  # fp64 sqrt: correctly rounded (sqrt.rn.f64)
            norm = total.to(tl.float32)
            if pid == 0:
                tl.store(norm_ptr, norm)
            if PER_PARAM:
                _per_param_finish(
                    table_ptr, num_tensors, total_chunks, tparts_ptr, per_param_ptr, NORM, BLOCK, P_POW2
                )
        if SCALE:
            # torch evaluates max_norm / (norm + 1e-6) as reciprocal(norm + 1e-6) * max_norm, in fp32.
            coef = tl.math.div_rn(1.0, norm + 1e-6) * tl.cast(max_norm, tl.float32)
            if (coef < 1.0) | (coef != coef):  # clipping (or NaN); when coef clamps to 1, write nothing
                _rescale(table_ptr, num_tensors, c_lo, c_hi, t_first, t_last, coef, BLOCK, REVERSE)


@triton.jit
def clip_grad_norm_kernel(
    table_ptr,  # int64 tensor table (layout: gradclip/triton_backend.py)
    num_tensors,  # T
    total_chunks,  # C = sum over tensors of cdiv(numel, BLOCK)
    partials_ptr,  # fp64 [P], one slot per program
    norm_ptr,  # fp32 []: written by program 0 (PHASE 0/2), read (PHASE 3)
    sync_ptr,  # int32 [1]: grid-barrier counter, never reset (PHASE 0)
    max_norm,  # float
    arrive_first,  # int32: program 0's barrier increment, 2^31 - (P - 1) mod 2^32
    NORM: tl.constexpr,  # 0 = inf, 1, 2
    PHASE: tl.constexpr,
    SCALE: tl.constexpr,  # rescale after the norm (clip) or not (norm only)
    REVERSE: tl.constexpr,  # rescale walks chunks last-first
    BLOCK: tl.constexpr,  # elements per chunk
    P_POW2: tl.constexpr,  # next power of two >= P
):
    _fused(
        table_ptr,
        num_tensors,
        total_chunks,
        partials_ptr,
        norm_ptr,
        sync_ptr,
        max_norm,
        arrive_first,
        partials_ptr,  # unused without PER_PARAM
        norm_ptr,
        NORM,
        PHASE,
        SCALE,
        REVERSE,
        BLOCK,
        P_POW2,
        False,
    )


@triton.jit
def clip_grad_norm_per_param_kernel(
    table_ptr,
    num_tensors,
    total_chunks,
    partials_ptr,
    norm_ptr,
    sync_ptr,
    max_norm,
    arrive_first,
    tparts_ptr,  # fp64 [T + P - 1]: slot pid + t holds program pid's partial of tensor t
    per_param_ptr,  # fp32 [T]: the norm of each tensor, written in PHASE 0/2
    NORM: tl.constexpr,
    PHASE: tl.constexpr,  # 0, 1 or 2 (PHASE 3 has no norms to compute)
    SCALE: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK: tl.constexpr,
    P_POW2: tl.constexpr,
):
    """clip_grad_norm_kernel that also writes the norm of every tensor (see the module docstring)."""
    _fused(
        table_ptr,
        num_tensors,
        total_chunks,
        partials_ptr,
        norm_ptr,
        sync_ptr,
        max_norm,
        arrive_first,
        tparts_ptr,
        per_param_ptr,
        NORM,
        PHASE,
        SCALE,
        REVERSE,
        BLOCK,
        P_POW2,
        True,
    )
