"""Per-parameter norms from the same pass as the global norm (issue 14).

`per_param_norms` is the public entry point; it is routed like `gradclip.get_total_norm` (same
validation, same per-device/backend plan, one `{b}_per_param_norms` op per group, DTensors and
process groups through gradclip.distributed), so the kernels read every gradient once and keep
the per-tensor sums they compute anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradclip import reference, routing

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

TensorOrTensors = Tensor | Iterable[Tensor]


def per_param_norms(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    *,
    backend: str = "auto",
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """The p-norm of each tensor, as a 1-D tensor of len(tensors) norms in input order.

    fp32 for fp16/bf16/fp32 tensors, fp64 if any tensor is fp64 (complex: its real counterpart),
    on the first tensor's device; an empty input gives an empty fp32 tensor. Each entry is that
    tensor's norm as torch.linalg.vector_norm would give it (NaN if it holds a NaN, else inf if it
    holds an inf, so a non-finite entry names the tensor it came from), accumulated in at least
    fp32 and never overflowing for finite inputs; deterministic (no float atomics). The kernels
    compute it in the same pass as the global norm: one launch per device/backend group on the
    GPU backends, no host synchronisation.

    Across ranks (DTensors, `process_group`; see gradclip.distributed): each entry is the norm of
    the FULL parameter, identical on every rank that holds a shard of it, reduced in the same one
    collective per process group as the total norm. With `process_group` (pipeline stages,
    expert shards) each rank's tensors are its own parameters, so their entries are not summed
    over that group.
    """
    tensors = routing.as_list(tensors, "tensors")
    norm_type = routing.check_norm_type(norm_type)
    routing.check_grads(tensors)
    if routing.across_ranks(tensors, process_group):
        from gradclip import distributed  # noqa: PLC0415 (only across ranks)

        with torch.no_grad():
            return distributed.per_param_norms(tensors, norm_type, backend, process_group)[1]
    if not tensors:
        return torch.zeros(0, dtype=reference.norm_dtype(()))
    with torch.no_grad():
        plan = routing.plan(tensors, norm_type, backend)
        return routing.per_param_norms(plan, norm_type, tensors, tensors[0].device)[1]
