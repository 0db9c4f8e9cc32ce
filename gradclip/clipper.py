"""`gradclip.Clipper`: the object a training loop keeps (issue 14), and its `ClipStats`.

    clipper = gradclip.Clipper(model.named_parameters(), max_norm=1.0)   # built once
    for batch in data:
        model(batch).backward()
        stats = clipper.clip_()          # one fused op per device/backend group, no host sync
        optimizer.step()
        if step % 100 == 0:
            log(stats.metrics())         # the one host sync, at the caller's cadence

The clipper holds the parameter list and its plan (which backend serves which parameters, decided
once from the parameters' devices and dtypes, which their gradients share), so a call reads each
`.grad`, issues the ops and records its history, with no generator walk and no re-planning.

Extension points (issue 15 builds `step()` and the skip policies on them): `norms()` computes the
norms without touching the gradients, `coefficient(total)` the clip coefficient, `observe(...)`
the spike decision and the history update; `clip_()` is `norms + rescale` fused into one op.

Issue 15: `step(optimizer, scaler=None)` replaces `scaler.unscale_(opt); clip_grad_norm_(...);
scaler.step(opt)`, folding the coefficient into a fused optimizer's `grad_scale` and the skip
decision into its `found_inf` (gradclip.optim); `max_norm` may be a threshold policy
(gradclip.thresholds: ZClip, AutoClip, AGC); the `nonfinite`, `max_consecutive_skips` and
`skip_spikes` policies decide skips on the device.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from gradclip import backends, labels, ops, optim, reference, routing
from gradclip import history as history_mod
from gradclip import thresholds as thresholds_mod

NONFINITE_POLICIES = ("propagate", "error", "skip")
_STATE_VERSION = 1


@dataclasses.dataclass
class ClipStats:
    """What one clip did, as device tensors (nothing here has been read to the host).

    - total_norm: 0-dim, the norm before clipping, exactly what torch.nn.utils.clip_grad_norm_ returns.
    - clip_coef: 0-dim, the coefficient applied, min(max_norm / (total_norm + 1e-6), 1) as torch
      computes it (1.0 when nothing was clipped; NaN when the norm is NaN).
    - per_param_norms: 1-D, one norm per parameter in `Clipper.names` order (0 for a None grad),
      or None when the clipper was built without per_param_norms=True.
    - nonfinite: 0-dim bool, the norm is NaN or inf (some gradient holds a NaN or an inf).
    - spike: 0-dim bool, the norm is a spike by the history rule (False without history).
    - skipped: 0-dim bool, the step was skipped by a policy of issue 15 (False otherwise).
    """

    total_norm: Tensor
    clip_coef: Tensor
    per_param_norms: Tensor | None
    nonfinite: Tensor
    spike: Tensor
    skipped: Tensor
    names: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    def metrics(self) -> dict[str, float]:
        """Host floats under the names trainers use, read in ONE device-to-host transfer.

        grad_norm (before clipping, what torch returns and trainers log), grad_norm_clipped (the
        norm after clipping: grad_norm * clip_coef), clip_coef, and with per-parameter norms
        grad_norm/<name> for every parameter.
        """
        head = torch.stack([self.total_norm, self.total_norm * self.clip_coef, self.clip_coef]).to(
            torch.float64
        )
        parts = [head]
        if self.per_param_norms is not None:
            parts.append(self.per_param_norms.to(device=head.device, dtype=torch.float64))
        values = torch.cat(parts).cpu().tolist()  # the one transfer
        out = {"grad_norm": values[0], "grad_norm_clipped": values[1], "clip_coef": values[2]}
        if self.per_param_norms is not None:
            out.update(zip((f"grad_norm/{n}" for n in self.names), values[3:], strict=True))
        return out


def _names_and_params(parameters: Any) -> tuple[list[str], list[Tensor]]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    items = list(parameters)
    if not items:
        raise ValueError(
            "parameters is empty (an exhausted generator?); a Clipper needs the parameters it clips"
        )
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        names, params = [n for n, _ in items], [p for _, p in items]
    elif any(isinstance(x, tuple) for x in items):
        raise TypeError(
            "parameters must be all (name, tensor) pairs, as named_parameters() gives, or all tensors"
        )
    else:
        names, params = [str(i) for i in range(len(items))], items
    for name, p in zip(names, params, strict=True):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
    if len(set(map(id, params))) != len(params):
        seen: dict[int, str] = {}
        for name, p in zip(names, params, strict=True):
            if id(p) in seen:
                raise ValueError(
                    f"parameter {name!r} is the same tensor as {seen[id(p)]!r}; pass each parameter once"
                )
            seen[id(p)] = name
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"parameter name {dup!r} appears twice; names must be unique")
    return names, params


class _SkipCounter:
    """Consecutive skipped steps, counted on the device, for max_consecutive_skips.

    `record` updates the run length and, at the step where it reaches the limit, keeps which
    parameters' gradients were non-finite; `check` raises once that has happened. On CPU the flag
    is read directly (no device to wait for). On CUDA `record` starts a non-blocking copy of the
    flag into pinned host memory with an event, and `check` only looks at copies whose event has
    completed, so no call ever waits on the GPU: the error comes on the first call after the GPU
    has finished the tripping step (usually the next one or two steps; those steps are skipped or
    applied as their own norms decide).
    """

    def __init__(self, device: torch.device, n_params: int) -> None:
        self.device = device
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.tripped = torch.zeros((), dtype=torch.bool, device=device)
        self.bad = torch.zeros(n_params, dtype=torch.bool, device=device)
        self._pending: list[tuple[Tensor, Any]] = []
        self.limit = 0

    def record(self, skip: Tensor, per_param: Tensor | None, limit: int) -> None:
        self.limit = limit
        run = torch.where(skip, self.run + 1, torch.zeros_like(self.run))
        reached = run >= limit
        newly = reached & torch.logical_not(self.tripped)
        if per_param is not None:
            bad_now = torch.logical_not(torch.isfinite(per_param)).to(self.device)
            self.bad = torch.where(newly, bad_now, self.bad)
        self.tripped = self.tripped | reached
        self.run = run
        if self.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(self.tripped, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event))

    def _tripped_on_host(self) -> bool:
        if self.device.type != "cuda":
            return bool(self.tripped)  # CPU: a plain read, nothing to wait for
        flag = False
        while self._pending and self._pending[0][1].query():
            flag |= bool(self._pending.pop(0)[0])
        return flag

    def check(self, names: tuple[str, ...]) -> None:
        if not self._tripped_on_host():
            return
        bad = [n for n, b in zip(names, self.bad.tolist(), strict=True) if b]
        self.run.zero_()
        self.tripped.zero_()
        self.bad.zero_()
        self._pending.clear()
        culprits = ", ".join(bad) if bad else "none (the steps were skipped as norm spikes)"
        raise RuntimeError(
            f"{self.limit} optimizer steps in a row were skipped (max_consecutive_skips={self.limit}); "
            f"parameters whose gradients were non-finite at the step that reached the limit: {culprits}"
        )

    def state_dict(self) -> dict[str, Tensor]:
        return {"run": self.run.clone(), "tripped": self.tripped.clone(), "bad": self.bad.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["bad"].shape != self.bad.shape:
            raise ValueError("state_dict['skips'] is for a different number of parameters")
        self.run = state["run"].to(self.device).clone()
        self.tripped = state["tripped"].to(self.device).clone()
        self.bad = state["bad"].to(self.device).clone()


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class Clipper:
    """Clip the global gradient norm of a fixed set of parameters, step after step.

    `parameters`: `model.named_parameters()` (names kept), or parameters / tensors (named "0",
    "1", ...); each parameter once. `max_norm` and `norm_type` as in torch.nn.utils.clip_grad_norm_.
    `per_param_norms=True` adds each parameter's norm, computed in the same pass. `backend` as in
    the functional API. `history=N` keeps the last N steps on the device and flags spikes: a norm
    above the mean of the previous `spike_window` finite norms by `spike_sigma` standard
    deviations, once `spike_min_steps` are recorded (OLMo-core's defaults).

    `max_norm` may also be a threshold policy (`gradclip.ZClip`, `gradclip.AutoClip`: a global
    threshold computed on the device each step; `gradclip.AGC`: unit-wise clipping), whose state is
    part of `state_dict()`.

    Policies for bad steps (issue 15), acted on by `step()`:
    - nonfinite="propagate" (torch's behaviour), "error" (raise before anything is modified; one
      host sync a step, as torch's error_if_nonfinite) or "skip" (a non-finite norm skips the
      optimizer step: nothing is modified, `stats.skipped` is True);
    - max_consecutive_skips=N: raise once N steps in a row were skipped, naming the parameters
      whose gradients were non-finite. The run length is counted on the device; on CPU it is read
      each step (free there), on a GPU through a non-blocking copy that is looked at on later
      calls once it has landed, so the error comes a step or so late and never costs a sync;
    - skip_spikes=True: also skip a step whose norm is a spike by the history rule.
    Every decision derives from the total norm (and the history of it), which is identical on
    every rank, so all ranks skip together.

    Across ranks: DTensor gradients (FSDP2, tensor parallel) need nothing. `process_group`: this
    rank's gradients are one disjoint part of a model spread over that group (pipeline stages,
    FSDP1 FULL_SHARD / SHARD_GRAD_OP shards, expert shards), and the norm sums over it, as
    `gradclip.clip_grad_norm_(..., process_group=)` does; every rank of the group must call.

    Every method but `metrics()`, `report()`, `plot()` and `state_dict()` runs without a host
    sync; `clip_()` works inside torch.compile(fullgraph=True).
    """

    def __init__(
        self,
        parameters: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Tensor,
        max_norm: float = 1.0,
        norm_type: float = 2.0,
        *,
        per_param_norms: bool = False,
        backend: str = "auto",
        history: int = 0,
        spike_sigma: float = 6.0,
        spike_window: int = 128,
        spike_min_steps: int = 64,
        nonfinite: str = "propagate",
        max_consecutive_skips: int | None = None,
        skip_spikes: bool = False,
        process_group: Any = None,
    ) -> None:
        names, params = _names_and_params(parameters)
        self._policy: Any = None  # a threshold policy of gradclip.thresholds, or None
        if isinstance(max_norm, (thresholds_mod.ZClip, thresholds_mod.AutoClip, thresholds_mod.AGC)):
            self._policy = max_norm
            self.max_norm: Any = max_norm
        elif isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool):
            self.max_norm = routing.check_bound(max_norm, "max_norm")
        elif hasattr(max_norm, "threshold") and hasattr(max_norm, "state_dict"):
            self._policy = max_norm  # a user policy with ZClip's interface
            self.max_norm = max_norm
        else:
            raise TypeError(
                f"max_norm must be a number or a threshold policy (gradclip.ZClip, AutoClip, AGC), "
                f"got {type(max_norm).__name__}"
            )
        self.norm_type = routing.check_norm_type(norm_type)
        if not isinstance(per_param_norms, bool):
            raise TypeError(f"per_param_norms must be True or False, got {per_param_norms!r}")
        requested = backends.requested(backend)  # raises on an unknown name
        history = _positive_int(history, "history", minimum=0)
        spike_sigma = float(spike_sigma)
        if not (math.isfinite(spike_sigma) and spike_sigma >= 0):
            raise ValueError(f"spike_sigma must be a finite number >= 0, got {spike_sigma}")
        spike_window = _positive_int(spike_window, "spike_window", minimum=2)
        spike_min_steps = _positive_int(spike_min_steps, "spike_min_steps", minimum=2)
        if spike_min_steps > spike_window:
            raise ValueError(
                f"spike_min_steps ({spike_min_steps}) exceeds spike_window ({spike_window}): no spike could ever be flagged"
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if max_consecutive_skips is not None:
            _positive_int(max_consecutive_skips, "max_consecutive_skips")
        if not isinstance(skip_spikes, bool):
            raise TypeError(f"skip_spikes must be True or False, got {skip_spikes!r}")
        if skip_spikes and history == 0:
            raise ValueError("skip_spikes=True needs history > 0 (spikes are judged on the recorded norms)")
        if max_consecutive_skips is not None and nonfinite != "skip" and not skip_spikes:
            raise ValueError(
                "max_consecutive_skips needs a policy that skips: nonfinite='skip' or skip_spikes=True"
            )
        routing.check_grads(params)  # a gradient has its parameter's dtype and layout
        self.names: tuple[str, ...] = tuple(names)
        self.per_param_norms = per_param_norms
        self.backend = backend
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skip_spikes = skip_spikes
        self._params = params
        self.process_group = process_group
        self._distributed = routing.across_ranks(params, process_group)
        self.device = params[0].device
        # The plan, from the parameters (a gradient has its parameter's device and dtype):
        # (backend, indices) per group; resolving it here also rejects an unusable backend now.
        if self._distributed:
            self._plan: list[tuple[str, list[int]]] = []
        else:
            index = {id(p): i for i, p in enumerate(params)}
            self._plan = [
                (g.backend, [index[id(p)] for p in g.grads])
                for g in routing.plan(params, self.norm_type, requested)
            ]
        self._whole = len(self._plan) == 1  # one group holding every parameter, in order
        out_dtype = reference.norm_dtype(routing.each("dtype", params))
        self._false = torch.zeros((), dtype=torch.bool, device=self.device)
        self._zero = torch.zeros((), dtype=out_dtype, device=self.device)
        self._agc_index: list[int] = []
        if isinstance(self._policy, thresholds_mod.AGC):
            self._agc_index = [
                i for i, (n, p) in enumerate(zip(names, params, strict=True)) if self._policy.selects(n, p)
            ]
        self._coverage_cache: dict[tuple, bool] = {}
        self._skips = _SkipCounter(self.device, len(params)) if max_consecutive_skips is not None else None
        self.history: history_mod.History | None = None
        if history:
            self.history = history_mod.History(
                history,
                len(params),
                per_param_norms,
                self.device,
                spike_sigma,
                spike_window,
                spike_min_steps,
            )

    def __repr__(self) -> str:
        return (
            f"Clipper({len(self.names)} parameters, max_norm={self.max_norm}, norm_type={self.norm_type}, "
            f"per_param_norms={self.per_param_norms}, backend={self.backend!r}, "
            f"history={self.history.size if self.history else 0})"
        )

    @property
    def parameters(self) -> list[Tensor]:
        """The parameters, in `names` order (the list itself: do not modify it)."""
        return self._params

    # -- the per-step path -------------------------------------------------------------------

    def _grads(self) -> tuple[list[Tensor | None], bool]:
        grads = list(routing.each("grad", self._params))
        if torch.compiler.is_compiling():
            return grads, all(g is not None for g in grads)
        # `None in grads` would call Tensor.__eq__ per entry (~15 us each); this is C-level identity.
        return grads, all(map(operator.is_not, grads, itertools.repeat(None)))

    def _run(self, clip: bool, want: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """(total, per_param or None) of the current gradients; rescaled in place when `clip`.
        `want` overrides per_param_norms (the skip counter needs per-parameter norms)."""
        grads, complete = self._grads()
        want = self.per_param_norms if want is None else want
        max_norm, norm_type = self.max_norm, self.norm_type
        if complete and self._whole and not self._distributed:  # the fast path: one op
            backend = self._plan[0][0]
            if want:
                name = "clip_grad_norm_per_param_" if clip else "per_param_norms"
                args = (grads, max_norm, norm_type) if clip else (grads, norm_type)
                return ops.op(backend, name)(*args)
            if clip:
                return ops.op(backend, "clip_grad_norm_")(grads, max_norm, norm_type), None
            return ops.op(backend, "total_norm")(grads, norm_type), None
        present = [g for g in grads if g is not None]
        if not present and self.process_group is None:  # with a group, this rank still takes part
            zeros = self._zero.new_zeros(len(grads)) if want else None
            return self._zero.clone(), zeros
        if self._distributed:
            from gradclip import distributed  # noqa: PLC0415 (only across ranks)

            if want or not clip:
                fn = distributed.clip_grad_norm_per_param_ if clip else distributed.per_param_norms
                args = (present, max_norm, norm_type) if clip else (present, norm_type)
                total, per = fn(*args, self.backend, self.process_group)
            else:
                total, per = (
                    distributed.clip_grad_norm_(
                        present, max_norm, norm_type, False, self.backend, self.process_group
                    ),
                    None,
                )
        else:
            groups = [
                routing.Group(b, [grads[i] for i in idx if grads[i] is not None]) for b, idx in self._plan
            ]
            plan = [g for g in groups if g.grads]
            device = present[0].device
            if want:
                fn = routing.clip_grad_norm_per_param_ if clip else routing.per_param_norms
                args = (plan, max_norm, norm_type) if clip else (plan, norm_type)
                total, per = fn(*args, present, device)
            else:
                total, per = routing.total_norm(plan, norm_type, device), None
                if clip:
                    for g in plan:
                        ops.op(g.backend, "clip_grads_with_norm_")(
                            g.grads, max_norm, total.to(g.grads[0].device)
                        )
        if per is not None and len(present) != len(grads):  # zeros for the None grads, in order
            pieces = [per, per.new_zeros(len(grads) - len(present))]
            present_k, missing_k = itertools.count(), itertools.count()
            locations = [(1, next(missing_k)) if g is None else (0, next(present_k)) for g in grads]
            per = routing.concat_in_order(pieces, locations)
        return total, per

    def norms(self) -> tuple[Tensor, Tensor | None]:
        """(total_norm, per_param_norms or None) of the current gradients, which are not modified.

        Same ops and guarantees as `clip_()` without the rescale; no history is recorded.
        """
        with torch.no_grad():
            return self._run(clip=False)

    def coefficient(self, total: Tensor, threshold: Tensor | None = None) -> Tensor:
        """min(max_norm / (total + 1e-6), 1) on the device, as torch computes it (NaN stays NaN).
        `threshold` (a device tensor, from a threshold policy) replaces max_norm."""
        return reference.clip_coefficient(self.max_norm if threshold is None else threshold, total)

    def observe(self, total: Tensor, coef: Tensor, per_param: Tensor | None, nonfinite: Tensor) -> Tensor:
        """Judge `total` by the spike rule and record the step in the history; returns `spike`
        (0-dim bool on the device; always False without history). No host sync."""
        if self.history is None:
            return self._false
        spike = self.history.is_spike(total)
        self.history.record(total, coef, per_param, spike, nonfinite)
        return spike

    def clip_(self) -> ClipStats:
        """Clip the current gradients in place, exactly as torch.nn.utils.clip_grad_norm_ with this
        clipper's max_norm and norm_type would (a None grad counts as zero and is not touched).

        One fused op per device/backend group (one kernel launch on the GPU backends, the norm
        and the per-parameter norms from the same pass), then a few scalar device ops for the
        coefficient and, with history, the record. No host sync; works under
        torch.compile(fullgraph=True). Returns the step's ClipStats (device tensors).
        """
        if not torch.compiler.is_compiling() and labels.recording():
            with labels.region("gradclip.Clipper.clip_", self.device.type):
                return self._clip()
        return self._clip()

    def _clip(self) -> ClipStats:
        if self._policy is not None or self._skip_policy():
            return self._decide_and_apply(None, None)
        return self._measured(clip=True)

    def measure(self) -> ClipStats:
        """Record the current gradients' norms without clipping them (clip_coef is 1): telemetry
        for an unclipped run, or for a step whose gradients some other code clips. Same ops as
        `norms()`, then the history record; no host sync."""
        return self._measured(clip=False)

    def _measured(self, clip: bool) -> ClipStats:
        """The norms (the gradients rescaled in place when `clip`), the coefficient, the record."""
        with torch.no_grad():
            total, per_param = self._run(clip=clip)
            coef = self.coefficient(total) if clip else torch.ones_like(total)
            nonfinite = torch.logical_not(torch.isfinite(total))
            spike = self.observe(total, coef, per_param, nonfinite)
        return ClipStats(total, coef, per_param, nonfinite, spike, self._false, self.names)

    # -- issue 15: the optimizer step, skip policies, threshold policies ------------------------

    def _skip_policy(self) -> bool:
        return self.nonfinite != "propagate" or self.skip_spikes

    def step(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> ClipStats:
        """Clip and step: replaces `scaler.unscale_(optimizer); torch.nn.utils.clip_grad_norm_(...);
        scaler.step(optimizer)` (or `clip_grad_norm_(...); optimizer.step()` without a scaler).
        Call `scaler.update()` afterwards as usual.

        - A fused torch optimizer (Adam, AdamW, SGD, Adagrad with fused=True in every param group;
          see gradclip.optim.fused_kind): the gradients are read once for the norm (scaled ones
          with a GradScaler, the norm unscaled on the device); the optimizer applies the clip
          coefficient through `grad_scale` (1 / coef, or scale / coef) and skips through
          `found_inf`. No host sync, no rescale pass; on a skipped step parameters, optimizer state
          and gradients are left as they were.
        - Any other optimizer: norm, one in-place rescale (unscale and clip in one multiplication
          with a scaler), then `optimizer.step()`. When a step may be skipped (a GradScaler, or
          nonfinite="skip" / skip_spikes) the skip flag is read on the host: one sync a step, as
          GradScaler.step itself does for such optimizers.
        - With a GradScaler, `scaler.update()` sees the inf check it would have seen (steps skipped
          as spikes do not back the scale off), and scaler.step must not be called for this
          optimizer in the same iteration.

        The result equals torch's sequence within the rounding of one multiplication per gradient
        element. Returns the step's ClipStats: total_norm unscaled, `skipped` True when the
        optimizer step was not applied (non-finite with a scaler or nonfinite="skip", or a spike
        with skip_spikes=True). Not for torch.compile (it calls optimizer.step()).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if labels.recording():
            with labels.region("gradclip.Clipper.step", self.device.type):
                return self._decide_and_apply(optimizer, scaler)
        return self._decide_and_apply(optimizer, scaler)

    def _decide_and_apply(self, optimizer: Any, scaler: Any) -> ClipStats:
        """The general path shared by clip_() (optimizer None) and step()."""
        if self._skips is not None:
            self._skips.check(self.names)  # an earlier step's trip, once its copy has landed
        fused = (
            optimizer is not None and self._coverage(optimizer) and optim.fused_kind(optimizer) is not None
        )
        inv_scale, prior_inf = (
            optim.scaler_state(scaler, optimizer) if optimizer is not None else (None, None)
        )
        scaler_on = optimizer is not None and scaler is not None and scaler.is_enabled()
        if (
            optimizer is not None
            and not fused
            and not scaler_on
            and self._policy is None
            and not self._skip_policy()
        ):
            stats = self._clip()  # a plain optimizer, nothing to skip: the one fused clip op, then step()
            optimizer.step()
            return stats
        with torch.no_grad():
            want = True if self._skips is not None else None
            total, per_param = self._run(clip=False, want=want)
            overflow = torch.logical_not(torch.isfinite(total))  # what the scaler's inf check sees
            if prior_inf is not None:
                overflow = overflow | (prior_inf.to(overflow.device) > 0)
            if inv_scale is not None:
                inv = inv_scale.to(device=total.device, dtype=total.dtype)
                total = total * inv
                per_param = per_param * inv if per_param is not None else None
            nonfinite = torch.logical_not(torch.isfinite(total)) | overflow
            if self.nonfinite == "error":
                self._raise_if_nonfinite(nonfinite, per_param)
            spike = self.history.is_spike(total) if self.history is not None else self._false
            skip = self._false
            if self.nonfinite == "skip" or scaler_on:  # a GradScaler skips non-finite steps anyway
                skip = skip | nonfinite
            if self.skip_spikes:
                skip = skip | spike
            may_skip = self.nonfinite == "skip" or self.skip_spikes or scaler_on
            accept = torch.logical_not(skip | nonfinite)
            threshold = None
            if self._policy is not None and not isinstance(self._policy, thresholds_mod.AGC):
                threshold = self._policy.threshold(total, accept)
            coef = (
                self.coefficient(total, threshold)
                if not isinstance(self._policy, thresholds_mod.AGC)
                else None
            )
            grads = list(routing.each("grad", self._params))
            if isinstance(self._policy, thresholds_mod.AGC):
                pairs = [(self._params[i], grads[i]) for i in self._agc_index if grads[i] is not None]
                coef = self._policy.clip_(
                    [p for p, _ in pairs], [g for _, g in pairs], inv_scale, skip=skip if may_skip else None
                ).to(total.dtype)
                factor = None  # the gradients are clipped; only the scaler's unscale remains
            else:
                factor = coef
            stats_coef = torch.where(skip, torch.ones_like(coef), coef) if may_skip else coef
            if self.history is not None:
                self.history.record(total, stats_coef, per_param, spike, nonfinite)
            present = [g for g in grads if g is not None]
            if optimizer is None:  # clip_(): rescale unless skipped; the step is the caller's
                if factor is not None:
                    optim.scale_(
                        present, torch.where(skip, torch.ones_like(factor), factor) if may_skip else factor
                    )
            elif fused:
                scale = optim.scaler_scale(scaler) if inv_scale is not None else None
                grad_scale = None
                if factor is not None:
                    grad_scale = factor.reciprocal() if scale is None else scale.to(factor.device) / factor
                elif scale is not None:
                    grad_scale = scale
                optim.fused_step(optimizer, grad_scale, skip.to(torch.float32) if may_skip else None)
            else:
                if inv_scale is not None:
                    inv = inv_scale.to(total.device)
                    factor = inv if factor is None else factor.to(torch.float32) * inv
                optim.plain_step(optimizer, present, factor, skip if may_skip else None)
            if optimizer is not None:
                optim.record_scaler_step(scaler, optimizer, overflow.to(torch.float32))
            if self._skips is not None:
                self._skips.record(skip, per_param, self.max_consecutive_skips)
        stats = ClipStats(
            total, stats_coef, per_param if self.per_param_norms else None, nonfinite, spike, skip, self.names
        )
        if self._skips is not None:
            self._skips.check(self.names)
        return stats

    def _coverage(self, optimizer: torch.optim.Optimizer) -> bool:
        """Raise unless every parameter of `optimizer` is one this clipper clips (torch's sequence
        would unscale/step gradients the clip never saw). True when the two hold the same
        parameters: only then can the coefficient ride in the optimizer's grad_scale (which
        applies to all of its gradients and to none of the clipper's others); False sends the
        step down the plain path, which rescales exactly the clipper's gradients."""
        key = (id(optimizer), tuple(len(g["params"]) for g in optimizer.param_groups))
        cached = self._coverage_cache.get(key)
        if cached is not None:
            return cached
        mine = {id(p) for p in self._params}
        theirs = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not theirs <= mine:
            raise ValueError(
                f"optimizer holds {len(theirs - mine)} parameter(s) this Clipper does not clip; build the "
                "Clipper over every parameter the optimizer steps"
            )
        self._coverage_cache[key] = exact = theirs == mine
        return exact

    def _raise_if_nonfinite(self, nonfinite: Tensor, per_param: Tensor | None) -> None:
        if not bool(nonfinite):  # the one host sync of nonfinite="error", as torch's error_if_nonfinite
            return
        if per_param is None:
            per_param = self._run(clip=False, want=True)[1]
        bad = [
            n
            for n, f in zip(self.names, torch.logical_not(torch.isfinite(per_param)).tolist(), strict=True)
            if f
        ]
        raise RuntimeError(
            f"the total gradient norm of order {self.norm_type} is non-finite (nonfinite='error'); "
            f"non-finite gradients: {', '.join(bad) if bad else '(none: the norm overflowed)'}. "
            "Nothing was modified."
        )

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The clipper's configuration and history (device tensors, cloned), for checkpoints."""
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "names": list(self.names),
            "max_norm": self.max_norm if self._policy is None else repr(self._policy),
            "norm_type": self.norm_type,
            "per_param_norms": self.per_param_norms,
        }
        if self.history is not None:
            state["history"] = self.history.state_dict()
        if self._policy is not None:
            state["threshold"] = {"policy": type(self._policy).__name__, "state": self._policy.state_dict()}
        if self._skips is not None:
            state["skips"] = self._skips.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict() of a clipper over the same parameters (same names, history size,
        per_param_norms, spike_window), so a resumed run continues exactly: same spike decisions,
        same report. Everything is checked before anything is modified (ValueError otherwise).
        max_norm and norm_type are this clipper's own (construct it with the values you want)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state_dict version {state.get('version')!r}, expected {_STATE_VERSION}")
        if list(state.get("names", ())) != list(self.names):
            raise ValueError("state_dict['names'] differs from this clipper's parameter names")
        saved = state.get("history")
        if (saved is None) != (self.history is None):
            has = "has" if saved is not None else "has no"
            raise ValueError(
                f"state_dict {has} history, this clipper was built with history={bool(self.history)}"
            )
        threshold = state.get("threshold")
        if (threshold is None) != (self._policy is None):
            raise ValueError("state_dict and this clipper disagree on whether max_norm is a threshold policy")
        if threshold is not None and threshold["policy"] != type(self._policy).__name__:
            raise ValueError(
                f"state_dict holds a {threshold['policy']} state, this clipper a {type(self._policy).__name__}"
            )
        if ("skips" in state) != (self._skips is not None):
            raise ValueError("state_dict and this clipper disagree on max_consecutive_skips")
        if self.history is not None:
            self.history.check_state_dict(saved)
        if threshold is not None:
            self._policy.load_state_dict(threshold["state"])
        if self._skips is not None:
            self._skips.load_state_dict(state["skips"])
        if self.history is not None:
            self.history.load_state_dict(saved)

    # -- host-side views ----------------------------------------------------------------------

    def report(self, top: int = 10) -> str:
        """A text summary of the recorded history (needs history > 0); one host transfer."""
        from gradclip import report  # noqa: PLC0415 (host-side, imported on use)

        return report.text(self, top=top)

    def plot(self, path: str) -> str:
        """Write a PNG of the recorded history to `path` (needs matplotlib); returns `path`."""
        from gradclip import report  # noqa: PLC0415

        return report.plot(self, path)
