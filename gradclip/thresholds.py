"""Adaptive clipping thresholds computed on the device (issue 15): ZClip, AutoClip, AGC.

Pass one as `max_norm` to `gradclip.Clipper`. Each keeps its state in device tensors (part of the
clipper's `state_dict`) and never reads a value back to the host: every branch of the published
rules is a `torch.where`.

Two kinds:
- Global thresholds (`ZClip`, `AutoClip`): `threshold(total_norm, accept)` returns the 0-dim
  threshold for this step's global norm, used exactly where a float `max_norm` would be
  (coefficient `min(threshold / (total_norm + 1e-6), 1)`), and records the step in the state only
  where `accept` is True (the clipper passes False for non-finite norms and skipped steps, so a NaN
  never enters the statistics; the published implementations would keep it forever).
- Unit-wise clipping (`AGC`): `clip_(params, grads, inv_scale)` rescales every unit of every
  selected gradient in place and returns the smallest coefficient it applied.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def _check_number(value: float, name: str, *, low: float | None = None, high: float | None = None) -> float:
    value = float(value)
    if math.isnan(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a number {bounds}, got {value}")
    return value


class ZClip:
    """ZClip (Kumar et al. 2025, bluorion-com/ZClip), z-score mode, on the device.

    Rule, per step with global norm g (pre-clip):
    - warm-up (the first `warmup_steps` accepted steps, at least one): threshold `max_grad_norm`
      (no clipping when None); g is recorded; after the last warm-up step the EMA starts from the
      mean and the population variance of the recorded norms;
    - then, with std = sqrt(var) and z = (g - mean) / (std + eps): when z > z_thresh the norm is
      an outlier and is clipped to `(mean + z_thresh * std / (z / z_thresh)) * clip_factor`
      (clip_option="adaptive_scaling") or to `mean` (clip_option="mean"); otherwise the adaptive
      value is g itself; the threshold is that value, capped by `max_grad_norm` when not None;
    - the EMA is fed with the adaptive value (the clipped norm when clipped): mean = a * mean +
      (1 - a) * x, then var = a * var + (1 - a) * (x - mean)^2 with the new mean; with
      skip_update_on_spike=True an outlier step leaves the EMA as it was.
    Statistics are kept in fp64; the threshold is returned in the norm's dtype.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_grad_norm: float | None = 1.0,
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        eps: float = 1e-6,
        skip_update_on_spike: bool = False,
    ) -> None:
        self.alpha = _check_number(alpha, "alpha", low=0.0, high=1.0)
        self.z_thresh = _check_number(z_thresh, "z_thresh", low=0.0)
        if self.z_thresh == 0:
            raise ValueError("z_thresh must be positive, got 0.0")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.max_grad_norm = (
            None if max_grad_norm is None else _check_number(max_grad_norm, "max_grad_norm", low=0)
        )
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        self.clip_option = clip_option
        self.clip_factor = _check_number(clip_factor, "clip_factor", low=0.0)
        self.eps = _check_number(eps, "eps", low=0.0)
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self._state: dict[str, Tensor] | None = None

    def _warm(self) -> int:  # the reference initialises after max(warmup_steps, 1) norms
        return max(self.warmup_steps, 1)

    def _ensure_state(self, device: torch.device) -> dict[str, Tensor]:
        if self._state is None:
            f64 = {"dtype": torch.float64, "device": device}
            self._state = {
                "buffer": torch.zeros(self._warm(), **f64),
                "count": torch.zeros((), dtype=torch.int64, device=device),
                "mean": torch.zeros((), **f64),
                "var": torch.zeros((), **f64),
            }
        elif self._state["mean"].device != device:
            self._state = {k: v.to(device) for k, v in self._state.items()}
        return self._state

    def threshold(self, total_norm: Tensor, accept: Tensor) -> Tensor:
        """This step's threshold for `total_norm` (0-dim); records the step where `accept`. No sync."""
        st = self._ensure_state(total_norm.device)
        g = total_norm.detach().to(torch.float64)
        accept = accept.to(device=g.device, dtype=torch.bool) & torch.isfinite(g)
        count, mean, var = st["count"], st["mean"], st["var"]
        warm = count < self._warm()
        std = var.sqrt()
        z = (g - mean) / (std + self.eps)
        outlier = z > self.z_thresh
        if self.clip_option == "adaptive_scaling":
            adaptive = (mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
        else:
            adaptive = mean
        value = torch.where(outlier, adaptive, g)  # the adaptive clip value (g when no outlier)
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        threshold = torch.where(warm, torch.full_like(g, cap), value.clamp(max=cap))

        # State update, masked by `accept` and by the phase.
        slot = count.clamp(max=self._warm() - 1).reshape(1)
        record = accept & warm
        old = st["buffer"].gather(0, slot)
        st["buffer"].scatter_(0, slot, torch.where(record, g.reshape(1), old))
        new_count = count + record.to(torch.int64)
        just_ready = record & (new_count == self._warm())
        init_mean = st["buffer"].mean()
        init_var = (st["buffer"] - init_mean).square().mean()
        ema_mean = self.alpha * mean + (1 - self.alpha) * value
        ema_var = self.alpha * var + (1 - self.alpha) * (value - ema_mean).square()
        feed = accept & ~warm
        if self.skip_update_on_spike:
            feed = feed & ~outlier
        st["mean"] = torch.where(just_ready, init_mean, torch.where(feed, ema_mean, mean))
        st["var"] = torch.where(just_ready, init_var, torch.where(feed, ema_var, var))
        st["count"] = new_count
        return threshold.to(total_norm.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.clone() for k, v in (self._state or {}).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._state = None
            return
        missing = {"buffer", "count", "mean", "var"} - set(state)
        if missing:
            raise KeyError(f"ZClip state_dict lacks {sorted(missing)}")
        if state["buffer"].numel() != self._warm():
            raise ValueError(
                f"ZClip state_dict has {state['buffer'].numel()} warm-up slots, this ZClip {self._warm()}"
            )
        self._state = {k: state[k].clone() for k in ("buffer", "count", "mean", "var")}

    def __repr__(self) -> str:
        return (
            f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, warmup_steps={self.warmup_steps}, "
            f"max_grad_norm={self.max_grad_norm}, clip_option={self.clip_option!r}, clip_factor={self.clip_factor})"
        )


class AutoClip:
    """AutoClip (Seetharaman et al. 2020): the p-th percentile of the history of global norms.

    Each accepted step's pre-clip norm is appended to the history first (as the paper's code
    does), then the threshold is the `percentile`-th percentile of the whole history, or of its
    last `window` entries, with numpy's default linear interpolation. An empty history (only
    non-finite norms so far) gives an infinite threshold. The history lives on the device in
    fp64; without a window it grows by doubling, decided from the host's call count (an upper
    bound of its length), so nothing is read back.
    """

    def __init__(self, percentile: float = 10.0, window: int | None = None) -> None:
        self.percentile = _check_number(percentile, "percentile", low=0.0, high=100.0)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or a positive int, got {window!r}")
        self.window = window
        self._history: Tensor | None = None
        self._count: Tensor | None = None  # accepted steps recorded (device int64)
        self._calls = 0  # host: calls made, an upper bound of _count

    def _ensure_state(self, device: torch.device) -> None:
        capacity = self.window if self.window is not None else 64
        if self._history is None:
            self._history = torch.zeros(capacity, dtype=torch.float64, device=device)
            self._count = torch.zeros((), dtype=torch.int64, device=device)
        elif self._history.device != device:
            self._history, self._count = self._history.to(device), self._count.to(device)
        if self.window is None and self._calls >= self._history.numel():
            grown = torch.zeros(2 * self._history.numel(), dtype=torch.float64, device=device)
            grown[: self._history.numel()] = self._history
            self._history = grown

    def threshold(self, total_norm: Tensor, accept: Tensor) -> Tensor:
        """This step's threshold (0-dim, the norm's dtype); records the norm where `accept`. No sync."""
        self._ensure_state(total_norm.device)
        hist, count = self._history, self._count
        g = total_norm.detach().to(torch.float64)
        accept = accept.to(device=g.device, dtype=torch.bool) & torch.isfinite(g)
        capacity = hist.numel()
        slot = (count % capacity).reshape(1)
        hist.scatter_(0, slot, torch.where(accept, g, hist.gather(0, slot).reshape(())).reshape(1))
        count = count + accept.to(torch.int64)
        self._count = count
        self._calls += 1
        n = count.clamp(max=capacity)
        valid = torch.arange(capacity, device=hist.device) < n
        ordered = torch.where(valid, hist, torch.full_like(hist, math.inf)).sort().values
        last = (n - 1).clamp(min=0)
        pos = (self.percentile / 100.0) * last.to(torch.float64)
        lo = pos.floor().to(torch.int64)
        hi = torch.minimum(lo + 1, last)
        t = pos - lo.to(torch.float64)
        a = ordered.gather(0, lo.reshape(1)).reshape(())
        b = ordered.gather(0, hi.reshape(1)).reshape(())
        diff = b - a
        value = torch.where(t >= 0.5, b - diff * (1 - t), a + diff * t)  # numpy's _lerp
        value = torch.where(hi == lo, a, value)
        threshold = torch.where(n > 0, value, torch.full_like(value, math.inf))
        return threshold.to(total_norm.dtype)

    def state_dict(self) -> dict[str, Any]:
        if self._history is None:
            return {}
        return {"history": self._history.clone(), "count": self._count.clone(), "calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._history, self._count, self._calls = None, None, 0
            return
        if self.window is not None and state["history"].numel() != self.window:
            raise ValueError(
                f"AutoClip state_dict has a window of {state['history'].numel()}, this one {self.window}"
            )
        self._history = state["history"].clone()
        self._count = state["count"].clone()
        self._calls = int(state["calls"])

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, window={self.window})"


Exclude = str | Iterable[str] | Callable[[str, Tensor], bool] | None


class AGC:
    """Adaptive gradient clipping (Brock et al. 2021) with timm's `adaptive_clip_grad` semantics.

    For every selected parameter W with gradient G, unit-wise over all dims but the first (a 0-/1-D
    tensor is one unit): max_u = max(||W_u||, eps) * clip_factor; G_u is kept when ||G_u|| < max_u
    and otherwise scaled by max_u / max(||G_u||, 1e-6). `exclude` leaves parameters unclipped (the
    paper leaves the final classifier alone): names (exact, or fnmatch patterns such as "head.*"),
    or a predicate `(name, param) -> bool`. Norms are accumulated in fp32 (fp64 for fp64 tensors).

    Launches: one foreach norm over all whole-tensor units (0-/1-D parameters) of a dtype and one
    per >= 2-D tensor for its rows, then one in-place multiply per tensor. It is NOT one fused
    launch for all units; it is a device implementation with no host sync.
    """

    def __init__(
        self, clip_factor: float = 0.01, eps: float = 1e-3, *, exclude: Exclude = None, norm_type: float = 2.0
    ):
        self.clip_factor = _check_number(clip_factor, "clip_factor", low=0.0)
        self.eps = _check_number(eps, "eps", low=0.0)
        self.norm_type = float(norm_type)
        if math.isnan(self.norm_type):
            raise ValueError("norm_type is NaN")
        if exclude is None or callable(exclude):
            self._exclude = exclude
        else:
            patterns = [exclude] if isinstance(exclude, str) else list(exclude)
            if not all(isinstance(p, str) for p in patterns):
                raise TypeError(
                    "exclude must be a name, an iterable of names, or a predicate (name, param) -> bool"
                )
            self._exclude = patterns

    def selects(self, name: str, param: Tensor) -> bool:
        """True when `param` (named `name`) is clipped, False when `exclude` leaves it alone."""
        if self._exclude is None:
            return True
        if callable(self._exclude):
            return not self._exclude(name, param)
        return not any(name == p or fnmatch.fnmatchcase(name, p) for p in self._exclude)

    def _unit_norms(self, tensors: list[Tensor]) -> list[Tensor]:
        """One norm tensor per input: 0-dim for <= 1-D tensors, shape (rows, 1, ..., 1) otherwise."""
        out: list[Tensor | None] = [None] * len(tensors)
        flat: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            if t.ndim <= 1:
                flat.setdefault(t.dtype, []).append(i)
            else:
                dims = tuple(range(1, t.ndim))
                out[i] = torch.linalg.vector_norm(
                    t, self.norm_type, dim=dims, keepdim=True, dtype=_acc(t.dtype)
                )
        for dtype, idx in flat.items():
            norms = torch._foreach_norm([tensors[i] for i in idx], self.norm_type, dtype=_acc(dtype))
            for i, n in zip(idx, norms, strict=True):
                out[i] = n
        return out  # type: ignore[return-value]

    def clip_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        inv_scale: Tensor | None = None,
        skip: Tensor | None = None,
    ) -> Tensor:
        """Clip `grads` (of `params`, same order, already filtered by `selects`) in place, unit-wise.

        With `inv_scale` the gradients are scaled by a GradScaler: units are compared at
        `inv_scale * ||G_u||` and the gradients stay scaled (the optimizer unscales them). Returns
        the smallest coefficient applied (0-dim fp32, 1.0 when nothing was clipped). Where `skip`
        (a 0-dim bool) is True nothing is rescaled (coefficients 1). No host sync.
        """
        if len(params) != len(grads):
            raise ValueError("params and grads must have the same length")
        if not grads:
            return torch.ones(())
        with torch.no_grad():
            w_norms = self._unit_norms([p.detach() for p in params])
            g_norms = self._unit_norms(grads)
            smallest = []
            for g, wn, gn in zip(grads, w_norms, g_norms, strict=True):
                if inv_scale is not None:
                    gn = gn * inv_scale.to(device=gn.device, dtype=gn.dtype)
                max_norm = wn.clamp(min=self.eps) * self.clip_factor
                keep = gn < max_norm if skip is None else (gn < max_norm) | skip.to(gn.device)
                coef = torch.where(keep, torch.ones_like(gn), max_norm / gn.clamp(min=1e-6))
                g.mul_(coef)
                smallest.append(coef.amin().to(device=grads[0].device, dtype=torch.float32))
            return torch.stack(smallest).amin()

    def state_dict(self) -> dict[str, Any]:
        return {}  # stateless

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError("AGC keeps no state; got a non-empty state_dict")

    def __repr__(self) -> str:
        return f"AGC(clip_factor={self.clip_factor}, eps={self.eps})"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
