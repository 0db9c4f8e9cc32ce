"""A Lightning callback that clips with a `gradclip.Clipper` and logs its metrics.

    from gradclip.integrations.lightning import GradclipCallback
    trainer = lightning.Trainer(callbacks=[GradclipCallback(max_norm=1.0)])   # leave gradient_clip_val unset

It clips in `on_before_optimizer_step`, which Lightning calls after the backward pass(es) of a step
and before the optimizer step, so it also serves gradient accumulation. The Clipper is built in
`on_fit_start` from `pl_module.named_parameters()` (after the strategy has set the module up). With
16-bit mixed precision the gradients are unscaled first through the precision plugin's GradScaler
(`scaler.unscale_`, which the later `scaler.step` honours), as Lightning's own clipping does.

Under Lightning's FSDPStrategy (FSDP1: each rank holds plain tensors, its shards of the flat
gradients) the Clipper is built over the wrapped model's parameters with the FSDP process group,
so the norm is the global one, as `FullyShardedDataParallel.clip_grad_norm_` computes it (tested
for FULL_SHARD and NO_SHARD, the Clipper alone also for SHARD_GRAD_OP; the hybrid strategies take
the same rule, their shard group, untested). This is what Lightning itself does not offer
(Lightning issue 19235: its FSDP precision plugin refuses clipping by norm). Under
ModelParallelStrategy (FSDP2, tensor parallel) the gradients are DTensors and need nothing.

Logged with `pl_module.log` as device tensors (Lightning reads them at its logging cadence), under
Lightning's own names (those of `lightning.pytorch.utilities.grad_norm`):
`grad_{p}_norm_total` (pre-clip), `grad_{p}_norm/<name>` with per_param_norms=True, plus
`grad_norm_clipped` and `clip_coef`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover (depends on the environment)
    raise ImportError(
        "gradclip.integrations.lightning needs Lightning: pip install -r requirements-integrations.txt"
    ) from error

from gradclip.clipper import Clipper


def _module_and_group(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.nn.Module, Any]:
    """The module whose parameters the Clipper takes, and the process group its norm sums over."""
    if "torch.distributed.fsdp" not in sys.modules:  # FSDP1 never imported: not in use
        return pl_module, None
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy  # noqa: PLC0415

    model = getattr(trainer.strategy, "model", None)
    wrapped = FullyShardedDataParallel.fsdp_modules(model) if isinstance(model, torch.nn.Module) else []
    if not wrapped:
        return pl_module, None
    strategies = {m.sharding_strategy for m in wrapped}
    groups = {m.process_group for m in wrapped}
    if len(strategies) != 1 or len(groups) != 1:
        raise NotImplementedError(
            "GradclipCallback: FSDP modules with different sharding strategies or process groups "
            f"({sorted(s.name for s in strategies)}, {len(groups)} groups) are not supported"
        )
    (strategy,) = strategies
    # FSDP's own parameters: the flat parameters (or, with use_orig_params, views of them) whose
    # gradients are this rank's shards; NO_SHARD keeps whole gradients, identical on every rank.
    return model, None if strategy is ShardingStrategy.NO_SHARD else groups.pop()


class GradclipCallback(pl.Callback):
    """Clip the global gradient norm with gradclip every optimizer step; log it without a host sync.

    Keyword arguments are those of `gradclip.Clipper` (max_norm may be a threshold policy such as
    gradclip.ZClip). `log_every_n_steps` is Lightning's; `prog_bar` shows the pre-clip norm.
    Trainer's `gradient_clip_val` must stay unset (the callback raises otherwise: clipping twice).
    """

    def __init__(
        self, max_norm: Any = 1.0, norm_type: float = 2.0, *, prog_bar: bool = False, **clipper_kwargs: Any
    ):
        super().__init__()
        self.max_norm, self.norm_type = max_norm, norm_type
        self.clipper_kwargs = clipper_kwargs
        self.prog_bar = prog_bar
        self.clipper: Clipper | None = None
        self.last_stats = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.gradient_clip_val:
            raise ValueError(
                "GradclipCallback clips the gradients itself: leave Trainer(gradient_clip_val=...) unset"
            )
        module, process_group = _module_and_group(trainer, pl_module)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.clipper = Clipper(
            named, self.max_norm, self.norm_type, process_group=process_group, **self.clipper_kwargs
        )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            from torch.amp.grad_scaler import OptState

            if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
                scaler.unscale_(optimizer)  # fused optimizers reach here still scaled
        stats = self.clipper.clip_()
        self.last_stats = stats
        p = f"{float(self.norm_type)}"
        logged = {
            f"grad_{p}_norm_total": stats.total_norm,
            "grad_norm_clipped": stats.total_norm * stats.clip_coef,
            "clip_coef": stats.clip_coef,
        }
        if stats.per_param_norms is not None:
            logged.update(
                {
                    f"grad_{p}_norm/{n}": v
                    for n, v in zip(self.clipper.names, stats.per_param_norms.unbind(0), strict=True)
                }
            )
        pl_module.log_dict(logged, on_step=True, on_epoch=False, prog_bar=False)
        if self.prog_bar:
            pl_module.log("grad_norm", stats.total_norm, on_step=True, on_epoch=False, prog_bar=True)

    def state_dict(self) -> dict[str, Any]:
        return {"clipper": self.clipper.state_dict()} if self.clipper is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict.get("clipper")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending = getattr(self, "_pending_state", None)
        if pending is not None and self.clipper is not None:
            self.clipper.load_state_dict(pending)
            self._pending_state = None
