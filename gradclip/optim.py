"""Clipping folded into the optimizer step (issue 15): no rescale pass, skips decided on the device.

torch's fused optimizers (`fused=True` Adam, AdamW, SGD, Adagrad; CPU and CUDA) read two device
tensors in `step()` that torch.amp.GradScaler normally sets as attributes of the optimizer:
`grad_scale` (every gradient is divided by it as the kernel reads it, and written back divided) and
`found_inf` (a non-zero value skips the whole update: parameters, moments and step counts stay as
they were). So the clip coefficient can ride in `grad_scale` (1 / coef, or scale / coef with a
GradScaler) and the skip decision in `found_inf`, with no rescale pass and no host sync.

This module holds the optimizer- and scaler-facing half of `gradclip.Clipper.step`:
- `fused_kind(optimizer)` detects the optimizers whose step honours both tensors (detected from
  the class's own `step` and every param group's `fused` flag, never guessed from a name);
- `scaler_state(scaler, optimizer)` reads a GradScaler's scale without a host sync and checks its
  per-optimizer stage; `record_scaler_step` leaves the scaler's bookkeeping exactly as
  `scaler.step(optimizer)` would (stage STEPPED, `found_inf_per_device` holding the inf check), so
  `scaler.update()` backs off on the same steps it would have;
- `fused_step` and `plain_step` run the optimizer.

Passes over gradient memory for one clipped step (fp32, a fused optimizer): torch's sequence makes
4 (norm read, rescale read + write, optimizer read), 6 with a GradScaler (unscale read + write);
folded: 3 (norm read, optimizer read + write back of the divided gradient) with or without a
scaler. A non-fused optimizer gets the ordinary path: norm read, one rescale read + write (unscale
and clip in one multiplication with a scaler), then `step()`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

# The torch optimizers whose step() forwards `self.grad_scale` / `self.found_inf` to the fused
# kernels (torch/optim/{adam,adamw,sgd,adagrad}.py, torch 2.13). AdamW subclasses Adam and keeps
# Adam.step. Subclasses qualify only if they keep the class's own step().
_FUSED_CAPABLE = (torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad)


def fused_kind(optimizer: torch.optim.Optimizer) -> str | None:
    """The name of the torch class whose fused step `optimizer` runs, or None.

    Not None only when (a) the optimizer is a torch Adam/AdamW/SGD/Adagrad or a subclass that keeps
    that class's `step`, (b) torch marked it `_step_supports_amp_scaling` (set when it was built
    with fused=True) and (c) EVERY param group has `fused=True`: a non-fused group would reject
    `grad_scale` (its implementation asserts it is None).
    """
    for cls in _FUSED_CAPABLE:
        if isinstance(optimizer, cls):
            break
    else:
        return None
    # A subclass with its own step() may ignore them. torch wraps `step` per class on first
    # construction (Optimizer._patch_step_function, functools.wraps), so compare unwrapped.
    if inspect.unwrap(type(optimizer).step) is not inspect.unwrap(cls.step):
        return None
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    if not optimizer.param_groups or not all(group.get("fused", False) for group in optimizer.param_groups):
        return None
    return "AdamW" if isinstance(optimizer, torch.optim.AdamW) else cls.__name__


def params_with_grad(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimizer's parameters whose .grad is not None, in param-group order."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


# ---------------------------------------------------------------------------------------------
# GradScaler bookkeeping (torch/amp/grad_scaler.py, torch 2.13: `_scale`, `_per_optimizer_states`
# keyed by id(optimizer), each {"stage": OptState, "found_inf_per_device": {device: fp32 tensor}}).


def _opt_state_enum():
    from torch.amp.grad_scaler import OptState

    return OptState


def scaler_state(scaler: Any, optimizer: torch.optim.Optimizer) -> tuple[Tensor | None, Tensor | None]:
    """(inv_scale, prior_found_inf) for this step, read without a host sync.

    inv_scale: 1/scale computed as GradScaler.unscale_ does (in fp64, rounded to fp32), or None when
    the gradients are not scaled any more (scaler disabled, or `scaler.unscale_(optimizer)` already
    called this iteration). prior_found_inf: the inf check unscale_ already recorded (0-dim fp32),
    or None. Raises if `scaler.step(optimizer)` already ran since the last update().
    """
    if scaler is None or not scaler.is_enabled():
        return None, None
    OptState = _opt_state_enum()
    scale = getattr(scaler, "_scale", None)
    if scale is None:
        raise RuntimeError(
            "scaler: GradScaler has no scale yet; call scaler.scale(loss).backward() before clipper.step"
        )
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("scaler: step() has already been called since the last update()")
    if state["stage"] is OptState.UNSCALED:  # the user unscaled already: gradients are unscaled
        found = [t.to(scale.device) for t in state["found_inf_per_device"].values()]
        return None, (torch.stack(found).sum() if found else None)
    return scale.double().reciprocal().float(), None


def scaler_scale(scaler: Any) -> Tensor:
    """The scaler's current scale tensor (device, fp32); no host sync."""
    return scaler._scale


def record_scaler_step(scaler: Any, optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """Leave `scaler` as `scaler.step(optimizer)` leaves it: stage STEPPED, and `found_inf`
    (0-dim fp32, 1.0 when the scaled gradients held an inf/NaN) recorded for `scaler.update()`."""
    if scaler is None or not scaler.is_enabled():
        return
    state = scaler._per_optimizer_states[id(optimizer)]
    found = found_inf.to(device=scaler._scale.device, dtype=torch.float32).reshape(())
    state["found_inf_per_device"] = {found.device: found}
    state["stage"] = _opt_state_enum().STEPPED


# ---------------------------------------------------------------------------------------------
# Running the optimizer.

_MISSING = object()


def fused_step(optimizer: torch.optim.Optimizer, grad_scale: Tensor | None, found_inf: Tensor | None) -> Any:
    """optimizer.step() with `grad_scale` / `found_inf` (0-dim device tensors) handed to its kernels.

    The kernels divide every gradient by grad_scale (and write it back divided) and skip the whole
    update when found_inf is non-zero. Any `grad_scale`/`found_inf` attribute the caller had set is
    restored afterwards. No host sync, except in one documented case: a fused SGD with momentum and
    dampening != 0 whose momentum buffers do not exist yet reads `found_inf` once (see
    `_prepare_fused_sgd`).
    """
    if found_inf is not None:
        found_inf = found_inf.to(torch.float32).reshape(())
        if not _prepare_fused_sgd(optimizer, found_inf):
            return None
    if grad_scale is not None:
        grad_scale = grad_scale.to(torch.float32).reshape(())
    saved = {name: getattr(optimizer, name, _MISSING) for name in ("grad_scale", "found_inf")}
    optimizer.grad_scale = grad_scale
    optimizer.found_inf = found_inf
    try:
        return optimizer.step()
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                delattr(optimizer, name)
            else:
                setattr(optimizer, name, value)


def _prepare_fused_sgd(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> bool:
    """torch's fused SGD allocates its momentum buffers with empty_like on the first step and lets
    the kernel fill them; a skipped first step (found_inf = 1) leaves them uninitialised, and the
    next step reads garbage (torch 2.13; GradScaler.step has the same problem). With dampening 0,
    zero buffers give bitwise the first-step result (0 * momentum + 1 * g = g), so they are created
    here, on the device. With dampening != 0 no buffer can stand in for "none yet": this one step
    reads found_inf on the host and skips step() when it is set. Returns False when step() must
    not run."""
    if not isinstance(optimizer, torch.optim.SGD):
        return True
    needs_sync = False
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        missing = [
            p for p in group["params"] if p.grad is not None and "momentum_buffer" not in optimizer.state[p]
        ]
        if not missing:
            continue
        if group["dampening"] != 0:
            needs_sync = True
            continue
        for p in missing:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
    if needs_sync:
        return not bool(found_inf)  # host sync, first step only
    return True


def plain_step(
    optimizer: torch.optim.Optimizer, grads: list[Tensor], factor: Tensor | None, skip: Tensor | None
) -> Any:
    """The path for every optimizer that cannot take grad_scale/found_inf.

    Multiplies `grads` in place by `factor` (a 0-dim device tensor: the clip coefficient, times
    1/scale with a GradScaler; one read + write per gradient, one foreach call per device/dtype),
    then calls optimizer.step(). When `skip` is given, it is read on the host (one sync: a step
    cannot be undone on the device for an arbitrary optimizer); a True skip leaves parameters,
    optimizer state and gradients untouched.
    """
    if skip is not None and bool(skip):  # host sync, documented: skipping a non-fused step
        return None
    if factor is not None:
        scale_(grads, factor)
    return optimizer.step()


def scale_(grads: list[Tensor], factor: Tensor) -> None:
    """Multiply every gradient in place by the 0-dim device tensor `factor` (no host sync): one
    foreach call per device/dtype, multiplying in fp32 (fp64 for fp64) and rounding once, as
    torch's clip_grads_with_norm_ does. A factor of exactly 1 leaves the bits unchanged."""
    for group in _by_device_dtype(grads):
        torch._foreach_mul_(group, factor.to(group[0].device))


def _by_device_dtype(grads: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple, list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    return list(groups.values())
