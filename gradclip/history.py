"""Device-side history of a Clipper: a ring buffer of the last N steps, the spike rule, spike snapshots.

Everything lives in tensors on the clipper's device and is updated with device ops only
(index_copy_ at a slot computed on the device, torch.where for conditional writes), so recording
a step never synchronises with the host and traces under torch.compile. The host reads it only
when asked (`snapshot()`, for the report and the plot), in one transfer.

The spike rule (OLMo-core's SkipStepOptimizer): a step is a spike when its total norm exceeds the
mean of the previous `window` recorded norms by more than `sigma` standard deviations (unbiased,
as torch.std_mean), once at least `min_steps` norms are recorded. Unlike OLMo-core, a non-finite
norm is not recorded into the window (it would make the mean and std NaN for the next `window`
steps, hiding every later spike); it is flagged as non-finite instead. Spikes themselves are
recorded, as in OLMo-core.

Events (spikes and non-finite steps) are kept separately from the ring, the last `EVENTS` of them,
each with its step, norm and (when per-parameter norms are on) a snapshot of the per-parameter
norms, so a report can name the layers at a spike long after the ring has moved on.
"""

from __future__ import annotations

import torch
from torch import Tensor

EVENTS = 64  # spike / non-finite snapshots kept (the latest ones)

FLAG_SPIKE = 1
FLAG_NONFINITE = 2

_F64 = torch.float64
_F32 = torch.float32


class History:
    """Ring buffer of `size` steps plus the spike window and the event snapshots, on `device`."""

    def __init__(
        self,
        size: int,
        n_params: int,
        per_param: bool,
        device: torch.device,
        sigma: float,
        window: int,
        min_steps: int,
    ) -> None:
        self.size, self.n_params, self.per_param = size, n_params, per_param
        self.sigma, self.window, self.min_steps = float(sigma), window, min_steps
        self.device = device
        z = dict(device=device)
        width = n_params if per_param else 0
        self.buffers: dict[str, Tensor] = {
            "steps": torch.zeros((), dtype=torch.int64, **z),  # clip_() calls recorded so far
            # per step: (norm, coef, flags) in one row, so a step is one write
            "scalars": torch.full((size, 3), float("nan"), dtype=_F64, **z),
            "per_param": torch.full((size, width), float("nan"), dtype=_F32, **z),
            "window": torch.zeros((window,), dtype=_F64, **z),
            "window_count": torch.zeros((), dtype=torch.int64, **z),  # finite norms ever recorded
            "event_count": torch.zeros((), dtype=torch.int64, **z),
            "event_scalars": torch.full((EVENTS, 3), float("nan"), dtype=_F64, **z),  # (step, norm, flags)
            "event_per_param": torch.full((EVENTS, width), float("nan"), dtype=_F32, **z),
        }
        self._window_slots = torch.arange(window, **z)

    def is_spike(self, total: Tensor) -> Tensor:
        """0-dim bool: `total` exceeds mean + sigma * std of the recorded window (no host sync)."""
        b = self.buffers
        n = torch.clamp(b["window_count"], max=self.window)
        valid = self._window_slots < n
        values = torch.where(valid, b["window"], 0.0)
        count = n.to(_F64)
        mean = values.sum() / torch.clamp(count, min=1.0)
        centred = torch.where(valid, b["window"] - mean, 0.0)
        std = torch.sqrt((centred * centred).sum() / torch.clamp(count - 1.0, min=1.0))
        t = total.to(_F64)
        return (n >= self.min_steps) & torch.isfinite(t) & (t - mean > self.sigma * std)

    def record(
        self, total: Tensor, coef: Tensor, per_param: Tensor | None, spike: Tensor, nonfinite: Tensor
    ) -> None:
        """Append one step: ring slot steps % size, spike window (finite norms only), event if any."""
        b = self.buffers
        t = total.to(device=self.device, dtype=_F64).reshape(1)
        flags = (spike.to(_F64) * FLAG_SPIKE + nonfinite.to(_F64) * FLAG_NONFINITE).reshape(1)
        slot = torch.remainder(b["steps"], self.size).reshape(1)
        b["scalars"].index_copy_(
            0, slot, torch.cat([t, coef.to(device=self.device, dtype=_F64).reshape(1), flags])[None]
        )
        row = None
        if self.per_param:
            row = per_param.to(device=self.device, dtype=_F32).reshape(1, self.n_params)
            b["per_param"].index_copy_(0, slot, row)
        # Spike window: written only for a finite norm (else the slot keeps its value).
        finite = torch.isfinite(t)
        w_slot = torch.remainder(b["window_count"], self.window).reshape(1)
        b["window"].index_copy_(0, w_slot, torch.where(finite, t, b["window"].index_select(0, w_slot)))
        b["window_count"].add_(finite.reshape(()).to(torch.int64))
        # Events: written only on a spike or a non-finite norm.
        event = flags.ne(0)
        e_slot = torch.remainder(b["event_count"], EVENTS).reshape(1)

        def keep(name: str, value: Tensor) -> None:
            buf = b[name]
            old = buf.index_select(0, e_slot)
            cond = event.reshape((1,) + (1,) * (old.dim() - 1))
            buf.index_copy_(0, e_slot, torch.where(cond, value, old))

        keep("event_scalars", torch.cat([b["steps"].to(_F64).reshape(1), t, flags])[None])
        if row is not None:
            keep("event_per_param", row)
        b["event_count"].add_(event.reshape(()).to(torch.int64))
        b["steps"].add_(1)

    def state_dict(self) -> dict[str, Tensor]:
        return {name: buf.clone() for name, buf in self.buffers.items()}

    def check_state_dict(self, state: dict[str, Tensor]) -> None:
        """Raise ValueError naming the first entry that does not fit this history (nothing is modified)."""
        missing = sorted(set(self.buffers) - set(state))
        if missing:
            raise ValueError(f"state_dict['history'] lacks {missing}")
        for name, buf in self.buffers.items():
            value = state[name]
            if not isinstance(value, Tensor) or value.shape != buf.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"state_dict['history'][{name!r}] has shape {shape}, this clipper needs "
                    f"{tuple(buf.shape)} (history, per_param_norms, spike_window and the "
                    "parameters must match the clipper that saved it)"
                )

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.check_state_dict(state)
        for name, buf in self.buffers.items():
            buf.copy_(state[name])

    def snapshot(self) -> dict[str, list]:
        """The whole history on the host, oldest step first, in one device-to-host transfer.

        Keys: steps (int), step/norm/coef/flags (lists per recorded step), per_param (list of rows,
        empty without per-parameter norms), events (list of dicts: step, norm, flags, per_param).
        """
        b = self.buffers
        w = self.n_params if self.per_param else 0
        parts = [
            b["steps"].reshape(1).to(_F64),
            b["event_count"].reshape(1).to(_F64),
            b["scalars"].t().reshape(-1),  # norms, then coefs, then flags
            b["per_param"].reshape(-1).to(_F64),
            b["event_scalars"].t().reshape(-1),  # steps, norms, flags
            b["event_per_param"].reshape(-1).to(_F64),
        ]
        flat = torch.cat(parts).cpu().tolist()  # the one transfer
        pos = 0

        def take(n: int) -> list:
            nonlocal pos
            pos += n
            return flat[pos - n : pos]

        steps, event_count = int(take(1)[0]), int(take(1)[0])
        norm, coef, flags = take(self.size), take(self.size), take(self.size)
        per_param = take(self.size * w)
        e_step, e_norm, e_flags, e_pp = take(EVENTS), take(EVENTS), take(EVENTS), take(EVENTS * w)
        n = min(steps, self.size)
        order = [(steps - n + i) % self.size for i in range(n)]
        events = []
        n_events = min(event_count, EVENTS)
        for i in range(n_events):
            slot = (event_count - n_events + i) % EVENTS
            events.append(
                {
                    "step": int(e_step[slot]),
                    "norm": e_norm[slot],
                    "flags": int(e_flags[slot]),
                    "per_param": e_pp[slot * w : (slot + 1) * w],
                }
            )
        return {
            "steps": steps,
            "step": [steps - n + i for i in range(n)],
            "norm": [norm[s] for s in order],
            "coef": [coef[s] for s in order],
            "flags": [int(flags[s]) for s in order],
            "per_param": [per_param[s * w : (s + 1) * w] for s in order] if w else [],
            "events": events,
            "events_seen": event_count,
        }
