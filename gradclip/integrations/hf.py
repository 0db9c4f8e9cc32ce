"""A Hugging Face `TrainerCallback` that clips with a `gradclip.Clipper` and logs its metrics.

    from gradclip.integrations.hf import GradclipCallback
    args = TrainingArguments(..., max_grad_norm=0)          # turn the Trainer's own clipping off
    trainer = Trainer(model, args, ..., callbacks=[GradclipCallback(max_norm=1.0)])

It clips in `on_pre_optimizer_step`, which the Trainer calls once per optimizer step (after the
last accumulation micro-batch) right before `optimizer.step()`. The Clipper is built on the first
call from `model.named_parameters()`. With fp16 mixed precision the gradients are unscaled first
through accelerate's GradScaler (`scaler.unscale_`, which its later `scaler.step` honours).

Metrics are merged into the Trainer's logs, under the Trainer's own name `grad_norm` (pre-clip),
plus `grad_norm_clipped` and `clip_coef` (and `grad_norm/<name>` with per_param_norms=True), at
the Trainer's logging cadence: the one host read happens then (`ClipStats.metrics()`). Callbacks
run in order: reporting integrations that run before this one (report_to=...) see the logs
without these keys, so for them add this callback first (`trainer.callback_handler` order) or
read `trainer.state.log_history`, which always has them.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover (depends on the environment)
    raise ImportError(
        "gradclip.integrations.hf needs transformers: pip install -r requirements-integrations.txt"
    ) from error

from gradclip.clipper import Clipper


class GradclipCallback(TrainerCallback):
    """Clip the global gradient norm with gradclip every optimizer step (no host sync per step).

    Keyword arguments are those of `gradclip.Clipper` (max_norm may be a threshold policy).
    Raises at train begin when `args.max_grad_norm` is set (the Trainer would clip as well).
    """

    def __init__(self, max_norm: Any = 1.0, norm_type: float = 2.0, **clipper_kwargs: Any) -> None:
        self.max_norm, self.norm_type = max_norm, norm_type
        self.clipper_kwargs = clipper_kwargs
        self.clipper: Clipper | None = None
        self.last_stats = None

    def on_train_begin(self, args, state, control, **kwargs):
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            raise ValueError(
                "GradclipCallback clips the gradients itself: set TrainingArguments(max_grad_norm=0)"
            )

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.clipper is None:
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self.clipper = Clipper(named, self.max_norm, self.norm_type, **self.clipper_kwargs)
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer
        if scaler is not None and scaler.is_enabled():
            from torch.amp.grad_scaler import OptState

            inner = optimizer.optimizer
            if scaler._per_optimizer_states[id(inner)]["stage"] is OptState.READY:
                scaler.unscale_(inner)
        self.last_stats = self.clipper.clip_()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.last_stats is None or logs is None or "loss" not in logs:
            return
        metrics = self.last_stats.metrics()  # the one host read, at the logging cadence
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
