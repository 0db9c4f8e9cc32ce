"""Clipping across ranks: DTensor gradients (FSDP2, tensor parallel, n-D meshes) and process groups.

`gradclip.clip` routes a call here only when a gradient is a DTensor or a `process_group` is given,
so single-device training never imports or touches torch.distributed.

The math. For p > 0 the p-th power of the global norm is a sum over all gradient elements, so it
is additive over shards and ranks (and the inf-norm is a max, equally decomposable):

    ||g||_p^p = sum over slots s of  S_s,  S_s = all_reduce_SUM over the groups of s (||local_s||_p^p)
    ||g||_inf = max over slots s of  M_s,  M_s = all_reduce_MAX over the groups of s (||local_s||_inf)

A *slot* is the set of gradients that must be reduced over the same tuple of process groups:
- a DTensor is reduced over the groups of the mesh dims on which it is sharded: `Shard`, and
  `_StridedShard` (FSDP2 on top of tensor parallel: its local pieces are strided slices of the
  tensor, but the pieces of a mesh dim still partition it, which is all a norm needs; in torch
  2.13 it is neither a subclass of Shard nor `is_shard()`); a mesh dim on which it is Replicate
  adds no group, so replicated values are counted once (every rank of that dim holds the same
  value);
- a plain tensor is local (no group);
- `process_group`, when given, is appended to every slot: the gradients of this rank are one
  disjoint part (pipeline stage, expert shard) of a model spread over that group.
Local norms come from the fastest backend op (`{b}_total_norm` on the local shards, one op call per
slot and device/backend group); their p-th powers are taken in fp64, put into one small fp64
vector, and each distinct process group gets ONE all_reduce over the entries of the slots that
need it, in first-seen order (the same on every rank of an SPMD program), so a call issues one
collective per distinct process group whatever the number of parameters, and runs in linear time.
Mesh dims of size 1 issue nothing. The norm is then rebuilt on every rank from identical reduced
values in the same order, so it is bitwise identical everywhere, and the local shards are scaled
on the device with `{b}_clip_grads_with_norm_`: no host synchronisation (unless
error_if_nonfinite=True, which must read the norm, and raises on every rank alike).

Non-finite values: a NaN anywhere makes the norm NaN on every rank (SUM propagates NaN; for the
inf-norm MAX reduction, whose NaN handling differs between backends, a NaN flag travels in the
same collective), an inf makes it inf.

Partial placements (unreduced gradients, e.g. after a custom loss-parallel backward) are supported
but not on the fast path: the norm of a sum is not a sum of norms, so each such gradient is first
redistributed to Replicate on its Partial dims (one collective per tensor, as in torch); the clip
then scales the partial local values, which is exact because the reduction is linear (sum/avg) or
commutes with a positive scale (max/min). FSDP2 and tensor parallel gradients are never Partial.
`_MaskPartial` (a Partial) is handled the same way.

Placements gradclip does not know (a subclass of Shard or Replicate, a placement added by a future
torch) take a slow path that is right whatever they mean: the norm of `full_tensor()` (every rank
of the mesh holds the whole tensor, so it is counted once, with one gather per such tensor), then
the local values are scaled like any other (exact for every placement whose full tensor is
obtained from the local values by slicing, copying, summing, or max/min: a positive scale commutes
with each). Where torch itself cannot materialise the full tensor, gradclip raises
NotImplementedError naming the placement and the gradient, before any gradient is modified.

Limits: the power sums are fp64, so nothing overflows for fp16/bf16/fp32 gradients with p <= 2
(fp32max^2 ~ 1e77); fp64 gradients whose norm exceeds ~1e154 (p = 2), or very large p, can
overflow to inf, as torch does. p must be > 0 (or inf). Every rank of a group must call with the
same structure of gradients (same meshes and placements in the same order), as in any SPMD code.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from gradclip import errors, ops, reference, routing


def dtensor_class() -> type | None:
    """The DTensor class if torch.distributed.tensor is imported, else None (then none can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The local shard of each DTensor (a view sharing storage, so in-place ops reach the DTensor)."""
    cls = dtensor_class()
    if cls is None:
        return list(tensors)
    return [t._local_tensor if isinstance(t, cls) else t for t in tensors]


def plain_norm(norm: Tensor) -> Tensor:
    """A norm given as a DTensor (torch's get_total_norm on DTensors returns one) as a plain tensor."""
    cls = dtensor_class()
    return norm.full_tensor() if cls is not None and isinstance(norm, cls) else norm


def _check_norm_type(norm_type: float) -> None:
    if not norm_type > 0:
        raise errors.InvalidArgumentError(
            f"norm_type={norm_type} across ranks: gradclip reduces p-th powers, so it takes p > 0 or inf"
        )


def _known_placement_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(sharded, replicated) placement classes gradclip reduces on the fast path. Exact types only:
    a subclass may mean something else, so it takes the full_tensor() path. Sharded: the local
    pieces of a mesh dim partition the tensor (Shard, and _StridedShard, which in torch 2.13 is
    neither a Shard subclass nor `is_shard()`)."""
    from torch.distributed.tensor import placement_types  # noqa: PLC0415 (DTensors exist: imported)

    def present(*names: str) -> tuple[type, ...]:
        return tuple(getattr(placement_types, n) for n in names if hasattr(placement_types, n))

    return present("Shard", "_StridedShard"), present("Replicate")


class _Layout(NamedTuple):
    """How a DTensor layout is reduced: over `groups`; `how` says what the norm is taken of."""

    groups: tuple
    how: str  # "local": the local shard; "partial": Partial dims reduced first; "full": full_tensor()
    unknown: object = None  # the first placement gradclip does not know (how == "full")


def _layout_of(mesh, placements) -> _Layout:
    """The process groups to SUM/MAX over, and which values to take the norm of, for one layout."""
    sharded, replicated = _known_placement_types()
    groups = []
    partial = False
    for dim, placement in enumerate(placements):
        if type(placement) in sharded:
            if mesh.size(dim) > 1:
                groups.append(mesh.get_group(dim))
        elif type(placement) in replicated:
            continue
        elif placement.is_partial():  # Partial, _MaskPartial: reduced to Replicate first
            partial = True
        else:
            return _Layout((), "full", placement)
    return _Layout(tuple(groups), "partial" if partial else "local")


def _full_values(t: Tensor, index: int, placement) -> Tensor:
    """The whole tensor on every rank, for a placement gradclip does not know (one gather)."""
    try:
        return t.full_tensor()
    except Exception as exc:
        raise errors.UnsupportedPlacementError(
            f"gradient {index} is a DTensor with placement {placement!r} (placements "
            f"{tuple(t.placements)}), which gradclip does not know and torch cannot gather to a "
            f"full tensor ({type(exc).__name__}: {exc}); gradclip cannot compute its norm"
        ) from exc


def _cached_layout(t: Tensor, layouts: dict) -> _Layout:
    """`_layout_of` a DTensor's spec, memoised per call in `layouts` (one entry per distinct layout)."""
    spec = t._spec
    # the types too: a Shard subclass compares equal to Shard but takes the slow path
    key = (id(spec.mesh), spec.placements, tuple(map(type, spec.placements)))
    layout = layouts.get(key)
    if layout is None:
        layout = layouts[key] = _layout_of(spec.mesh, spec.placements)
    return layout


def _values_for_norm(t: Tensor, index: int, layout: _Layout) -> Tensor:
    """What a DTensor's norm is taken of on this rank: its local shard, its local values with the
    Partial dims reduced, or (an unknown placement) the full tensor."""
    if layout.how == "local":
        return t._local_tensor
    if layout.how == "partial":
        return _replicate_partials(t)
    return _full_values(t, index, layout.unknown)


def _replicate_partials(t: Tensor) -> Tensor:
    """The local values of `t` with its Partial mesh dims reduced (one collective per tensor)."""
    from torch.distributed.tensor import Replicate  # noqa: PLC0415 (only for Partial grads)

    placements = [Replicate() if p.is_partial() else p for p in t.placements]
    return t.redistribute(t.device_mesh, placements)._local_tensor


def _slots(tensors: Sequence[Tensor], process_group) -> tuple[dict[tuple, list[Tensor]], list[Tensor]]:
    """Bucket local tensors by the tuple of groups to reduce over; also return every local shard."""
    cls = dtensor_class()
    extra = () if process_group is None else (process_group,)
    layouts: dict[tuple, _Layout] = {}
    slots: dict[tuple, list[Tensor]] = {}
    keys: dict[tuple, tuple] = {}  # tuple of ids -> the tuple of groups it was first seen with
    shards: list[Tensor] = []
    for index, t in enumerate(tensors):
        if cls is not None and isinstance(t, cls):
            layout = _cached_layout(t, layouts)
            groups = layout.groups
            shards.append(t._local_tensor)
            norm_of = _values_for_norm(t, index, layout)
        else:
            groups = ()
            shards.append(t)
            norm_of = t
        groups = groups + extra
        ids = tuple(id(g) for g in groups)
        key = keys.setdefault(ids, groups)
        if norm_of.numel():
            slots.setdefault(key, []).append(norm_of)
        else:
            slots.setdefault(key, [])
    if extra and not slots:  # no tensors here: still take part in the group's collective
        slots[extra] = []
    return slots, shards


def _device_for(tensors: Sequence[Tensor], process_group) -> torch.device:
    for t in tensors:
        return t.device
    backend = dist.get_backend(process_group)
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: Tensor, group, use_max: bool) -> Tensor:
    """One collective over `group`; a MAX reduction carries NaN flags alongside the values."""
    if not use_max:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
        return values
    nan = values.isnan()
    packed = torch.cat([torch.where(nan, torch.zeros_like(values), values), nan.to(values.dtype)])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    n = values.numel()
    return torch.where(packed[n:] > 0, torch.full_like(values, math.nan), packed[:n])


def total_norm(tensors: Sequence[Tensor], norm_type: float, backend: str, process_group=None) -> Tensor:
    """The p-norm of all `tensors` (plain or DTensor) across ranks; see the module docstring.

    Returns a plain 0-dim tensor on the first tensor's device, fp32 (fp64 if any gradient is fp64),
    identical on every rank. One collective per distinct process group, no host sync.
    """
    _check_norm_type(norm_type)
    slots, shards = _slots(tensors, process_group)
    out_dtype = reference.norm_dtype(t.dtype for t in shards)
    if not slots:  # only possible with no tensors and no process group
        return torch.zeros((), dtype=out_dtype)
    device = _device_for(shards, process_group)
    use_max = math.isinf(norm_type)
    powers: list[Tensor] = []
    for members in slots.values():
        if not members:
            powers.append(torch.zeros((), dtype=torch.float64, device=device))
            continue
        norm = routing.total_norm(routing.plan(members, norm_type, backend), norm_type, device)
        norm = norm.to(device=device, dtype=torch.float64)
        powers.append(norm if use_max else norm.pow(norm_type))
    # One all_reduce per distinct group (first-seen order), over the entries of the slots that need it.
    users: dict[int, tuple[object, list[int]]] = {}
    for index, groups in enumerate(slots):
        for group in groups:
            users.setdefault(id(group), (group, []))[1].append(index)
    for group, indices in users.values():
        reduced = _all_reduce(torch.stack([powers[i] for i in indices]), group, use_max)
        for k, i in enumerate(indices):
            powers[i] = reduced[k]
    values = torch.stack(powers)
    total = values.max() if use_max else values.sum().pow(1.0 / norm_type)
    return total.to(out_dtype)


def clip_grad_norm_(
    grads: Sequence[Tensor],
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
    backend: str,
    process_group=None,
) -> Tensor:
    """Global norm across ranks, then every local shard scaled on its device by min(max_norm / (norm + 1e-6), 1)."""
    total = total_norm(grads, norm_type, backend, process_group)
    if error_if_nonfinite:
        routing.raise_if_nonfinite(total, norm_type)  # every rank holds the same norm, so all raise alike
    shards = [t for t in local_tensors(grads) if t.numel()]
    for group in routing.plan(shards, None, backend):
        norm = total.to(group.grads[0].device)
        ops.op(group.backend, "clip_grads_with_norm_")(group.grads, max_norm, norm)
    return total


def per_param_norms(
    tensors: Sequence[Tensor], norm_type: float, backend: str, process_group=None
) -> tuple[Tensor, Tensor]:
    """(total, per_param) across ranks: `total` as `total_norm` computes it, `per_param` the norm
    of each FULL tensor in input order (fp32, fp64 if any gradient is fp64, on the first tensor's
    device), identical on every rank that holds a shard of it.

    The p-th power of each tensor's local norm is reduced over the groups of the mesh dims it is
    sharded on, appended to the vector that carries the slot powers to those groups' collectives,
    so a call still issues ONE collective per distinct process group. `process_group` is not
    summed into the per-tensor entries: each rank's tensors there are its own parameters. A
    tensor that needs no reduction (plain, replicated) keeps its local norm exactly. No host sync.
    """
    _check_norm_type(norm_type)
    cls = dtensor_class()
    extra = () if process_group is None else (process_group,)
    layouts: dict[tuple, _Layout] = {}
    keys: dict[tuple, tuple] = {}  # tuple of ids -> the tuple of groups it was first seen with
    slots: dict[tuple, list[int]] = {}  # groups to reduce over -> indices of its non-empty tensors
    classes: dict[tuple, list[int]] = {}  # groups a tensor's own entry is reduced over -> indices
    locals_: list[Tensor] = []  # what each tensor's norm is taken of
    shards: list[Tensor] = []
    for i, t in enumerate(tensors):
        groups, norm_of = (), t
        if cls is not None and isinstance(t, cls):
            layout = _cached_layout(t, layouts)
            groups = layout.groups
            norm_of = _values_for_norm(t, i, layout)
            shards.append(t._local_tensor)
        else:
            shards.append(t)
        locals_.append(norm_of)
        own = keys.setdefault(tuple(id(g) for g in groups), groups)
        classes.setdefault(own, []).append(i)
        members = slots.setdefault(keys.setdefault(tuple(id(g) for g in groups + extra), groups + extra), [])
        if norm_of.numel():
            members.append(i)
    if extra and not slots:  # no tensors here: still take part in the group's collective
        slots[extra] = []
    out_dtype = reference.norm_dtype(t.dtype for t in shards)
    if not slots:  # only possible with no tensors and no process group
        return torch.zeros((), dtype=out_dtype), torch.zeros(0, dtype=out_dtype)
    device = _device_for(shards, process_group)
    use_max = math.isinf(norm_type)
    f64 = torch.float64

    # Local norms: one per-param op per slot and device/backend group (the same pass as the total).
    powers: list[Tensor] = []  # per slot, as total_norm computes them
    pieces: list[Tensor] = []  # per slot, the fp64 local norms of its members
    where: dict[int, tuple[int, int]] = {}
    for members in slots.values():
        if not members:
            powers.append(torch.zeros((), dtype=f64, device=device))
            continue
        grads = [locals_[i] for i in members]
        norm, per_param = routing.per_param_norms(
            routing.plan(grads, norm_type, backend), norm_type, grads, device
        )
        norm = norm.to(device=device, dtype=f64)
        powers.append(norm if use_max else norm.pow(norm_type))
        for k, i in enumerate(members):
            where[i] = (len(pieces), k)
        pieces.append(per_param.to(dtype=f64))
    n_empty = len(tensors) - len(where)
    pieces.append(torch.zeros(n_empty, dtype=f64, device=device))
    empties = iter(range(n_empty))
    for i in range(len(tensors)):
        if i not in where:
            where[i] = (len(pieces) - 1, next(empties))

    # Per-tensor entries, one vector per class of tensors reduced over the same groups.
    entries = [routing.concat_in_order(pieces, (where[i] for i in members)) for members in classes.values()]
    for c, groups in enumerate(classes):
        if groups and not use_max:
            entries[c] = entries[c].pow(norm_type)
    # One all_reduce per distinct group (first seen in the slots, as total_norm orders them): the
    # slot powers that need it, then the per-tensor entries that need it, in one vector.
    users: dict[int, tuple[object, list[int], list[int]]] = {}
    for index, groups in enumerate(slots):
        for group in groups:
            users.setdefault(id(group), (group, [], []))[1].append(index)
    for c, groups in enumerate(classes):
        for group in groups:
            users[id(group)][2].append(c)
    for group, slot_indices, class_indices in users.values():
        parts = [torch.stack([powers[i] for i in slot_indices])] if slot_indices else []
        parts += [entries[c] for c in class_indices]
        reduced = _all_reduce(torch.cat(parts), group, use_max)
        for k, i in enumerate(slot_indices):
            powers[i] = reduced[k]
        offset = len(slot_indices)
        for c in class_indices:
            entries[c] = reduced[offset : offset + entries[c].numel()]
            offset += entries[c].numel()
    for c, groups in enumerate(classes):
        if groups and not use_max:
            entries[c] = entries[c].pow(1.0 / norm_type)
    position: dict[int, tuple[int, int]] = {}
    for c, members in enumerate(classes.values()):
        for k, i in enumerate(members):
            position[i] = (c, k)
    if tensors:
        per_param = routing.concat_in_order(entries, (position[i] for i in range(len(tensors))))
    else:  # a rank with no tensors still took part in the group's collective
        per_param = torch.zeros(0, dtype=f64, device=device)
    values = torch.stack(powers)
    total = values.max() if use_max else values.sum().pow(1.0 / norm_type)
    return total.to(out_dtype), per_param.to(out_dtype)


def clip_grad_norm_per_param_(
    grads: Sequence[Tensor], max_norm: float, norm_type: float, backend: str, process_group=None
) -> tuple[Tensor, Tensor]:
    """`per_param_norms` across ranks, then every local shard scaled by the clip coefficient of
    the total, as `clip_grad_norm_` does. Returns (total, per_param), both from before clipping."""
    total, per_param = per_param_norms(grads, norm_type, backend, process_group)
    shards = [t for t in local_tensors(grads) if t.numel()]
    for group in routing.plan(shards, None, backend):
        ops.op(group.backend, "clip_grads_with_norm_")(group.grads, max_norm, total.to(group.grads[0].device))
    return total, per_param
