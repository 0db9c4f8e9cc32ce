"""The four drop-in functions of torch.nn.utils, routed to backends per device.

Each call validates every input before touching any gradient, groups the gradients by device
(as torch does), picks one backend per (device, dtype) group and issues one op per group; the
validation and planning live in gradclip.routing, shared with the distributed path. The
common case, every gradient on one device served by one backend, is one fused op call: one kernel
launch on the GPU backends, with no host synchronisation unless error_if_nonfinite=True.

Eager calls are offered first to the native fast path (gradclip.fast_path, csrc/fast_path.cpp),
which serves the common case in one C++ call with no Python per tensor and the same op call; what
it declines continues below unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradclip import fast_path, ops, routing

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

TensorOrTensors = Tensor | Iterable[Tensor]


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str = "auto",
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """The p-norm of all `tensors` viewed as one vector, like torch.nn.utils.get_total_norm.

    Returns a 0-dim tensor on the first tensor's device: fp32 for fp16/bf16/fp32 tensors, fp64 if
    any is fp64. Accumulates in at least fp32 and never overflows for finite inputs. One launch per
    device on the GPU backends and no host sync, unless error_if_nonfinite=True (which must read
    the norm). `foreach` is accepted for compatibility and ignored: every backend is multi-tensor.

    Across ranks (see gradclip.distributed): DTensors give the norm of the full tensors, and
    `process_group` sums in the tensors of the group's other ranks (pipeline stages, expert
    shards); one collective per distinct process group, a plain tensor identical on every rank.
    """
    if not error_if_nonfinite and process_group is None and (native := fast_path.native()) is not None:
        out = native.fast_get_total_norm(tensors, norm_type, backend)
        if type(out) is not tuple:
            return out
        tensors = fast_path.handback(tensors, out)
    tensors = routing.as_list(tensors, "tensors")
    norm_type = routing.check_norm_type(norm_type)
    routing.check_grads(tensors, "tensors")
    if routing.across_ranks(tensors, process_group):
        from gradclip import distributed

        with torch.no_grad():
            total = distributed.total_norm(tensors, norm_type, backend, process_group)
        if error_if_nonfinite:
            routing.raise_if_nonfinite(total, norm_type)
        return total
    if not tensors:
        return torch.tensor(0.0)
    with torch.no_grad():
        total = routing.total_norm(routing.plan(tensors, norm_type, backend), norm_type, tensors[0].device)
    if error_if_nonfinite:
        routing.raise_if_nonfinite(total, norm_type)
    return total


def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
    *,
    backend: str = "auto",
) -> None:
    """Scale gradients in place by min(max_norm / (total_norm + 1e-6), 1), like torch.

    `total_norm` is a device tensor (no host sync). Gradients are left bit-identical when the
    coefficient clamps to 1; a NaN norm makes them NaN, exactly as in torch.
    """
    if (native := fast_path.native()) is not None:
        out = native.fast_clip_grads_with_norm_(parameters, max_norm, total_norm, backend)
        if out is None:
            return
        parameters = fast_path.handback(parameters, out)
    max_norm = routing.check_bound(max_norm, "max_norm")
    grads = routing.grads_of(parameters)
    routing.check_grads(grads)
    if routing.across_ranks(grads, None):  # DTensor grads: scale the local shards
        from gradclip import distributed

        grads, total_norm = distributed.local_tensors(grads), distributed.plain_norm(total_norm)
    with torch.no_grad():
        for group in routing.plan(grads, None, backend):
            norm = total_norm.to(group.grads[0].device)
            ops.op(group.backend, "clip_grads_with_norm_")(group.grads, max_norm, norm)


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str = "auto",
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """Clip the global gradient norm in place, like torch.nn.utils.clip_grad_norm_; returns it.

    All gradients of one device served by one backend go through one fused op: on the GPU
    backends one kernel launch that computes the norm and, only if the coefficient is below 1,
    rescales. No host sync unless error_if_nonfinite=True, which raises before any gradient is
    modified. See get_total_norm for the dtype and overflow guarantees, and for DTensor
    gradients (FSDP2, tensor parallel) and `process_group` (pipeline stages, expert shards). DDP
    needs neither: its gradients are already averaged, so the local norm is the global one.
    """
    if not error_if_nonfinite and process_group is None and (native := fast_path.native()) is not None:
        out = native.fast_clip_grad_norm_(parameters, max_norm, norm_type, backend)
        if type(out) is not tuple:
            return out
        parameters = fast_path.handback(parameters, out)
    max_norm = routing.check_bound(max_norm, "max_norm")
    norm_type = routing.check_norm_type(norm_type)
    grads = routing.grads_of(parameters)
    routing.check_grads(grads)
    if routing.across_ranks(grads, process_group):
        from gradclip import distributed

        with torch.no_grad():
            return distributed.clip_grad_norm_(
                grads, max_norm, norm_type, error_if_nonfinite, backend, process_group
            )
    if not grads:
        return torch.tensor(0.0)
    with torch.no_grad():
        plan = routing.plan(grads, norm_type, backend)
        if len(plan) == 1 and not error_if_nonfinite:
            return ops.op(plan[0].backend, "clip_grad_norm_")(plan[0].grads, max_norm, norm_type)
        total = routing.total_norm(plan, norm_type, grads[0].device)
        if error_if_nonfinite:
            routing.raise_if_nonfinite(total, norm_type)
        for group in plan:
            norm = total.to(group.grads[0].device)
            ops.op(group.backend, "clip_grads_with_norm_")(group.grads, max_norm, norm)
    return total


def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float,
    foreach: bool | None = None,
    *,
    backend: str = "auto",
) -> None:
    """Clamp every gradient to [-clip_value, clip_value] in place (one launch per device); NaN stays NaN."""
    if (native := fast_path.native()) is not None:
        out = native.fast_clip_grad_value_(parameters, clip_value, backend)
        if out is None:
            return
        parameters = fast_path.handback(parameters, out)
    clip_value = routing.check_bound(clip_value, "clip_value")
    grads = routing.grads_of(parameters)
    routing.check_grads(grads)
    if routing.across_ranks(grads, None):  # DTensor grads: clamp the local shards
        from gradclip import distributed

        grads = distributed.local_tensors(grads)
    with torch.no_grad():
        for group in routing.plan(grads, None, backend):
            ops.op(group.backend, "clip_grad_value_")(group.grads, clip_value)
