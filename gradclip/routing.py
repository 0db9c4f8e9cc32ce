"""Routing shared by every entry point: input validation, per-device grouping, backend choice.

The single-device API (gradclip.clip), the native fast path and the distributed path
(gradclip.distributed) all go through these functions, so a gradient list is validated and
planned the same way whichever way it came in. Nothing here launches a kernel except
`total_norm`, which combines the norms of a plan's groups.
"""

from __future__ import annotations

import math
import operator
import sys
import types
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from gradclip import backends, ops, reference

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

TensorOrTensors = Tensor | Iterable[Tensor]


def each(name: str, objects: Iterable) -> Iterable:
    """getattr(o, name) for every o. Eager, through map() and a C-level attrgetter: ~60 ns a read
    against ~150 ns in a comprehension, which matters at 2,000 gradients a call. Dynamo cannot
    trace attrgetter, so under torch.compile a plain comprehension (traced once, then free)."""
    if torch.compiler.is_compiling():
        return [getattr(o, name) for o in objects]
    return map(operator.attrgetter(name), objects)


_ALLOWED_DTYPES = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128}
)


class Group(NamedTuple):
    """Gradients of one device that one backend serves in one op call."""

    backend: str
    grads: list[Tensor]


def as_list(tensors: TensorOrTensors, what: str) -> list:
    if isinstance(tensors, Tensor):
        return [tensors]
    is_generator = isinstance(tensors, types.GeneratorType)
    tensors = list(tensors)
    if is_generator and not tensors:
        _warn_empty_generator(what)
    return tensors


@backends.constant_under_compile
def _warn_empty_generator(what: str) -> bool:
    """Warns as torch does. A constant to torch.compile (warnings.warn would break the graph), so
    a compiled step warns once, when it is traced."""
    warnings.warn(f"`{what}` is an empty generator, no gradient clipping will occur.", stacklevel=4)
    return True


def grads_of(parameters: TensorOrTensors) -> list[Tensor]:
    return [g for g in each("grad", as_list(parameters, "parameters")) if g is not None]


def check_grads(grads: list[Tensor]) -> None:
    if set(each("layout", grads)) <= {torch.strided} and set(each("dtype", grads)) <= _ALLOWED_DTYPES:
        return
    for i, g in enumerate(grads):  # something is wrong: find the first culprit and name it
        if g.layout != torch.strided:
            raise ValueError(
                f"gradient {i} has layout {g.layout}; gradclip takes dense (strided) gradients only"
            )
        if g.dtype not in _ALLOWED_DTYPES:
            raise TypeError(f"gradient {i} has dtype {g.dtype}; gradients must be floating point or complex")


def check_norm_type(norm_type: float) -> float:
    norm_type = float(norm_type)
    if math.isnan(norm_type):
        raise ValueError("norm_type is NaN; use a number or float('inf')")
    return norm_type


def check_bound(value: float, name: str) -> float:
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value}")
    return value


def across_ranks(tensors: list[Tensor], process_group: ProcessGroup | None) -> bool:
    """True when a process group is given or a tensor is a DTensor: then gradclip.distributed serves.

    DTensors exist only once torch.distributed.tensor is imported, so the single-device path pays
    one dict lookup.
    """
    if process_group is not None:
        return True
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(issubclass(t, module.DTensor) for t in set(map(type, tensors)))


def plan(grads: list[Tensor], norm_type: float | None, backend: str) -> list[Group]:
    """Group by device in first-seen order, then by the backend that serves each dtype."""
    requested = backends.requested(backend)
    devices = set(each("device", grads))
    if len(devices) == 1:  # the common case: decide per dtype, not per tensor
        (device,) = devices
        chosen = {backends.choose(requested, device, dtype, norm_type) for dtype in set(each("dtype", grads))}
        if len(chosen) == 1:
            return _no_repeated_kernel_writes([Group(chosen.pop(), grads)], requested)
    by_device: dict[torch.device, dict[str, list[Tensor]]] = {}
    for g in grads:
        per_backend = by_device.setdefault(g.device, {})
        chosen = backends.choose(requested, g.device, g.dtype, norm_type)
        per_backend.setdefault(chosen, []).append(g)
    plan = [Group(b, gs) for per_backend in by_device.values() for b, gs in per_backend.items()]
    return _no_repeated_kernel_writes(plan, requested)


def _no_repeated_kernel_writes(plan: list[Group], requested: str) -> list[Group]:
    """A gradient listed twice is rescaled twice by torch (and the reference), but the kernels
    would rescale it from two programs at once. Such a group goes to the reference under "auto";
    an explicitly requested kernel backend raises. (Distinct views of overlapping memory are not
    detected: each gradient must own its elements, as parameters' gradients do.)"""
    for i, group in enumerate(plan):
        if group.backend != "reference" and len(set(map(id, group.grads))) != len(group.grads):
            if requested != "auto":
                raise ValueError(
                    f"a gradient is listed twice; backend={requested!r} writes each gradient once "
                    "(torch would rescale it twice); pass each parameter once or use backend='reference'"
                )
            plan[i] = Group("reference", group.grads)
    return plan


def total_norm(plan: list[Group], norm_type: float, device: torch.device) -> Tensor:
    norms = [ops.op(group.backend, "total_norm")(group.grads, norm_type) for group in plan]
    if len(norms) == 1:
        return norms[0]
    out_dtype = reference.norm_dtype(n.dtype for n in norms)
    stacked = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
    return reference.combine_norms(stacked, norm_type, out_dtype)


def raise_if_nonfinite(total: Tensor, norm_type: float) -> None:
    if torch.logical_or(total.isnan(), total.isinf()):  # a host sync, as in torch
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so "
            "it cannot be clipped. To disable this error and scale the gradients by the non-finite "
            "norm anyway, set `error_if_nonfinite=False`"
        )


def per_param_norms(
    plan: list[Group], norm_type: float, grads: list[Tensor], device: torch.device
) -> tuple[Tensor, Tensor]:
    """(total, per_param) of `grads` planned as `plan`: one `{b}_per_param_norms` op per group.

    `total` is bitwise what `total_norm(plan, ...)` returns; `per_param` holds one norm per
    gradient in the order of `grads`, in the norm dtype, on `device`. No host sync.
    """
    results = [ops.op(group.backend, "per_param_norms")(group.grads, norm_type) for group in plan]
    return _total_and_in_order(results, plan, norm_type, grads, device)


def clip_grad_norm_per_param_(
    plan: list[Group], max_norm: float, norm_type: float, grads: list[Tensor], device: torch.device
) -> tuple[Tensor, Tensor]:
    """`per_param_norms`, then every group rescaled by the clip coefficient of the total (one
    fused `{b}_clip_grad_norm_per_param_` op when the plan has one group). No host sync."""
    if len(plan) == 1:
        return ops.op(plan[0].backend, "clip_grad_norm_per_param_")(plan[0].grads, max_norm, norm_type)
    total, per_param = per_param_norms(plan, norm_type, grads, device)
    for group in plan:
        ops.op(group.backend, "clip_grads_with_norm_")(group.grads, max_norm, total.to(group.grads[0].device))
    return total, per_param


def _total_and_in_order(
    results: list[tuple[Tensor, Tensor]], plan: list[Group], norm_type: float, grads: list[Tensor], device
) -> tuple[Tensor, Tensor]:
    if len(results) == 1:  # the group's gradients are `grads` themselves
        return results[0]
    out_dtype = reference.norm_dtype(total.dtype for total, _ in results)
    stacked = torch.stack([total.to(device=device, dtype=torch.float64) for total, _ in results])
    total = reference.combine_norms(stacked, norm_type, out_dtype)  # as total_norm combines them
    pieces = [per_param.to(device=device, dtype=out_dtype) for _, per_param in results]
    # Where each gradient landed: groups keep the input order, a gradient listed twice lies twice
    # in the same group, so the k-th occurrence of a tensor is its k-th entry there.
    where: dict[int, list[tuple[int, int]]] = {}
    for g_index, group in enumerate(plan):
        for k, g in enumerate(group.grads):
            where.setdefault(id(g), []).append((g_index, k))
    seen: dict[int, int] = {}
    locations = []
    for g in grads:
        n = seen.get(id(g), 0)
        seen[id(g)] = n + 1
        locations.append(where[id(g)][n])
    return total, concat_in_order(pieces, locations)


def concat_in_order(pieces: list[Tensor], locations: Iterable[tuple[int, int]]) -> Tensor:
    """The 1-D tensor whose i-th entry is pieces[p][k] for the i-th (p, k) of `locations`.

    One slice per run of consecutive entries of one piece, then one cat: no index tensor, so no
    host-to-device copy (which would synchronise) and nothing data-dependent under torch.compile.
    """
    runs: list[list[int]] = []  # [piece, start, stop)
    for p, k in locations:
        if runs and runs[-1][0] == p and runs[-1][2] == k:
            runs[-1][2] = k + 1
        else:
            runs.append([p, k, k + 1])
    if not runs:
        return pieces[0][:0]
    if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == pieces[runs[0][0]].numel():
        return pieces[runs[0][0]]
    return torch.cat([pieces[p][start:stop] for p, start, stop in runs])
