"""Pure-PyTorch reference: the specification every kernel backend is tested against.

It is also the CPU backend and the fallback for dtypes and norm types the kernels do not serve.
Every function takes the gradients of ONE device (any mix of dtypes) and never synchronises with
the host: no `.item()`, no data-dependent Python branch.

Numerics (what the kernels must reproduce):
- Norms are accumulated in fp64 after scaling by the largest magnitude, so a finite gradient never
  gives an infinite norm (torch overflows for fp16 grads of 60000 and fp32 grads of 1e20).
- The result is fp32 for fp16/bf16/fp32 gradients and fp64 when any gradient is fp64 (complex
  gradients give their real counterpart). It is never rounded to fp16/bf16.
- NaN anywhere gives a NaN norm; otherwise an inf gives an inf norm: exactly torch's propagation.
- The clip coefficient is `max_norm / (total_norm + 1e-6)` clamped at 1, as in torch. When it
  clamps to 1 the gradients are left bit-identical (multiplying by exactly 1.0 is the identity).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Added to the norm before dividing, exactly as torch.nn.utils.clip_grads_with_norm_ does.
EPS = 1e-6

_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def norm_dtype(dtypes) -> torch.dtype:
    """fp64 if any gradient is fp64/complex128, else fp32: the dtype of every returned norm."""
    return torch.float64 if any(_REAL_OF.get(d, d) == torch.float64 for d in dtypes) else torch.float32


def scaled_vector_norm(x: Tensor, norm_type: float) -> Tensor:
    """The p-norm of `x` in fp64, overflow-safe: max|x| * ||x / max|x|||_p for finite p > 0.

    fp64 squares overflow only above 1e154, so scaling matters for fp64 inputs and for large p;
    the branch-free `torch.where` keeps it free of host synchronisation.
    """
    x = x.to(torch.complex128 if x.is_complex() else torch.float64)
    if x.numel() == 0:
        return x.new_zeros((), dtype=torch.float64)
    if math.isinf(norm_type) or norm_type <= 0:
        # max/min/count of magnitudes cannot overflow; p <= 0 has no meaningful scaling.
        return torch.linalg.vector_norm(x, norm_type)
    peak = torch.linalg.vector_norm(x, math.inf)  # NaN if any NaN, inf if any inf (and no NaN)
    usable = torch.isfinite(peak) & (peak > 0)
    scale = torch.where(usable, peak, torch.ones_like(peak))
    scaled = scale * torch.linalg.vector_norm(x / scale, norm_type)
    return torch.where(torch.isfinite(peak), scaled, peak)


# fp64 accumulation of fp16/bf16/fp32 values cannot overflow for 0 < p <= 7: (3.4e38)^7 * 2^63 < 1.8e308.
_FP64_SAFE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
_FP64_SAFE_MAX_P = 7.0


def _fp64_is_safe(dtypes, norm_type: float) -> bool:
    in_range = norm_type == math.inf or 0 < norm_type <= _FP64_SAFE_MAX_P
    return in_range and all(d in _FP64_SAFE_DTYPES for d in dtypes)


def per_tensor_norms(grads: list[Tensor], norm_type: float) -> Tensor:
    """One fp64 norm per gradient, stacked (shape [len(grads)]).

    fp16/bf16/fp32 gradients take one foreach op accumulating in fp64 (overflow-free, see above);
    fp64/complex gradients and large p take the scaled path.
    """
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    if _fp64_is_safe((g.dtype for g in grads), norm_type):
        if norm_type != math.inf or all(g.numel() > 0 for g in grads):
            return torch.stack(torch._foreach_norm(grads, norm_type, dtype=torch.float64))
        # torch has no inf-norm of a zero-size tensor (max has no identity); its norm is 0 here.
        zero = grads[0].new_zeros((), dtype=torch.float64)
        nonempty = [g for g in grads if g.numel() > 0]
        nonempty = iter(torch._foreach_norm(nonempty, norm_type, dtype=torch.float64) if nonempty else ())
        return torch.stack([next(nonempty) if g.numel() > 0 else zero for g in grads])
    return torch.stack([scaled_vector_norm(g, norm_type) for g in grads])


def combine_norms(norms: Tensor, norm_type: float, out_dtype: torch.dtype) -> Tensor:
    """Total norm from per-tensor (or per-group) fp64 norms, as torch does: the p-norm of the norms."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=out_dtype, device=norms.device)
    if out_dtype == torch.float32 and _fp64_is_safe((), norm_type):
        # Norms of fp32-range values stay below 3.4e38 * 2^32: fp64 powers of them cannot overflow.
        return torch.linalg.vector_norm(norms, norm_type).to(out_dtype)
    return scaled_vector_norm(norms, norm_type).to(out_dtype)


def total_norm(grads: list[Tensor], norm_type: float) -> Tensor:
    """Global p-norm of `grads` (one device), as a 0-dim fp32 tensor (fp64 for fp64 grads)."""
    out_dtype = norm_dtype(g.dtype for g in grads)
    if not grads:
        return torch.zeros((), dtype=out_dtype)
    return combine_norms(per_tensor_norms(grads, norm_type), norm_type, out_dtype)


def clip_coefficient(max_norm: float, total: Tensor) -> Tensor:
    """min(max_norm / (total + 1e-6), 1), NaN-propagating (torch.clamp keeps NaN)."""
    return torch.clamp(max_norm / (total + EPS), max=1.0)


def clip_grads_with_norm_(grads: list[Tensor], max_norm: float, total: Tensor) -> None:
    """Scale `grads` in place by the clip coefficient of `total` (a device scalar: no sync)."""
    if not grads:
        return
    coef = clip_coefficient(max_norm, total.to(grads[0].device))
    # foreach_mul_ multiplies in at least fp32 and rounds once to each gradient's dtype. The
    # coefficient is exactly 1.0 when no clipping is needed, so the bits are unchanged.
    torch._foreach_mul_(grads, coef)


def clip_grad_norm_(grads: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Fused: total norm, then in-place rescale. Returns the norm."""
    total = total_norm(grads, norm_type)
    clip_grads_with_norm_(grads, max_norm, total)
    return total


def per_param_norms(grads: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    """(total, per_param): the total exactly as `total_norm` computes it (bitwise), and the norm of
    each gradient in input order as a 1-D tensor of the norm dtype (fp32, fp64 for fp64 grads).

    Each per-tensor norm is that tensor's own fp64 norm rounded once: NaN/inf as
    torch.linalg.vector_norm of that tensor gives, never overflowing for finite inputs.
    """
    out_dtype = norm_dtype(g.dtype for g in grads)
    if not grads:
        return torch.zeros((), dtype=out_dtype), torch.zeros(0, dtype=out_dtype)
    norms = per_tensor_norms(grads, norm_type)
    return combine_norms(norms, norm_type, out_dtype), norms.to(out_dtype)


def clip_grad_norm_per_param_(
    grads: list[Tensor], max_norm: float, norm_type: float
) -> tuple[Tensor, Tensor]:
    """`clip_grad_norm_` that also returns the per-gradient norms (before clipping)."""
    total, per_param = per_param_norms(grads, norm_type)
    clip_grads_with_norm_(grads, max_norm, total)
    return total, per_param


def clip_grad_value_(grads: list[Tensor], clip_value: float) -> None:
    """Clamp every gradient to [-clip_value, clip_value] in place; NaN stays NaN."""
    if grads:
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)
