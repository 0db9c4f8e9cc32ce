"""Reading the int64 tensor table shared by every Triton kernel (layout: gradclip/triton_backend.py).

Program p owns chunks [p*C//P, (p+1)*C//P) of the C chunks (BLOCK elements, never spanning two
tensors); these helpers give a program its chunk range and, per tensor, its address, size, dtype
tag and the part of its chunks that falls in that range.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Dtype tags in the tensor table (bits 0-1: 0 fp32, 1 fp16, 2 bf16), and the 16-byte-aligned flag.
TAG_ALIGNED16 = tl.constexpr(4)


@triton.constexpr_function
def elem_type(tag):
    return (tl.float32, tl.float16, tl.bfloat16)[tag]


@triton.jit
def program_range(table_ptr, num_tensors, total_chunks):
    """This program's chunks [c_lo, c_hi) and the tensors [t_first, t_last] they lie in."""
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    c_lo = pid * total_chunks // nprog
    c_hi = (pid + 1) * total_chunks // nprog
    ranges = table_ptr + 4 * num_tensors + 2 * pid
    return c_lo, c_hi, tl.load(ranges), tl.load(ranges + 1)


@triton.jit
def tensor_entry(table_ptr, num_tensors, t, c_lo, c_hi, BLOCK: tl.constexpr):
    """Address, numel, tag of tensor t, and the chunks [lo, hi) of it in [c_lo, c_hi)."""
    addr = tl.load(table_ptr + t)
    numel = tl.load(table_ptr + num_tensors + t)
    tag = tl.load(table_ptr + 2 * num_tensors + t)
    chunk0 = tl.load(table_ptr + 3 * num_tensors + t)
    nchunks = tl.cdiv(numel, BLOCK)
    lo = tl.maximum(c_lo - chunk0, 0)
    hi = tl.minimum(c_hi - chunk0, nchunks)
    return addr, numel, tag, lo, hi
