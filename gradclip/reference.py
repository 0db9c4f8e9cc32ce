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


def per_tensor_norms(grads: list[Tensor], norm_type: float) -> Tensor:
    """One fp64 norm per gradient, stacked (shape [len(grads)])."""
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([scaled_vector_norm(g, norm_type) for g in grads])


def combine_norms(norms: Tensor, norm_type: float, out_dtype: torch.dtype) -> Tensor:
    """Total norm from per-tensor (or per-group) norms, as torch does: the p-norm of the norms."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=out_dtype, device=norms.device)
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
    for g in grads:
        # Multiply in at least fp32, round once to the gradient's dtype (what torch._foreach_mul_ does).
        # The coefficient is exactly 1.0 when no clipping is needed, so the bits are unchanged.
        compute = torch.promote_types(g.dtype, coef.dtype)
        g.copy_(g.to(compute) * coef.to(compute))


def clip_grad_norm_(grads: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Fused: total norm, then in-place rescale. Returns the norm."""
    total = total_norm(grads, norm_type)
    clip_grads_with_norm_(grads, max_norm, total)
    return total


def clip_grad_value_(grads: list[Tensor], clip_value: float) -> None:
    """Clamp every gradient to [-clip_value, clip_value] in place; NaN stays NaN."""
    for g in grads:
        g.clamp_(min=-clip_value, max=clip_value)
