"""The optional trainer integrations, each training a tiny model built from code (no download) on CPU.

Each run with gradclip's callback is compared with the same run clipped by the trainer itself
(Lightning's gradient_clip_val, HF's max_grad_norm): same parameters, same logged pre-clip norm.
Skipped when the trainer library is not installed (CI installs requirements-integrations.txt).
"""

from __future__ import annotations

import sys

import pytest
import torch

import gradclip

MAX_NORM = 0.05


def test_import_gradclip_does_not_import_the_integrations():
    import subprocess

    code = "import gradclip, sys; print(any(m.startswith(('lightning', 'transformers', 'gradclip.integrations')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Lightning


def _lightning_run(tmp_path, callback, clip_val):
    pl = pytest.importorskip("lightning.pytorch")

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y) * 100

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)

    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = Tiny()
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=clip_val,
        callbacks=[callback] if callback else [],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader)
    return model, trainer


def test_lightning_callback_clips_like_gradient_clip_val(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from gradclip.integrations.lightning import GradclipCallback

    callback = GradclipCallback(max_norm=MAX_NORM, per_param_norms=True)
    mine, trainer = _lightning_run(tmp_path / "a", callback, None)
    theirs, _ = _lightning_run(tmp_path / "b", None, MAX_NORM)
    for p, q in zip(mine.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    untouched, _ = _lightning_run(tmp_path / "c", None, None)  # the comparison can fail
    assert any(
        not torch.allclose(p, q) for p, q in zip(mine.parameters(), untouched.parameters(), strict=True)
    )
    logged = trainer.logged_metrics
    assert {"grad_2.0_norm_total", "grad_norm_clipped", "clip_coef", "grad_2.0_norm/net.0.weight"} <= set(
        logged
    )
    assert float(logged["clip_coef"]) < 1
    torch.testing.assert_close(logged["grad_norm_clipped"], torch.tensor(MAX_NORM), rtol=1e-4, atol=0)


def test_lightning_callback_refuses_double_clipping(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from gradclip.integrations.lightning import GradclipCallback

    with pytest.raises(ValueError, match="gradient_clip_val"):
        _lightning_run(tmp_path, GradclipCallback(max_norm=MAX_NORM), MAX_NORM)


def test_lightning_callback_with_a_threshold_policy(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from gradclip.integrations.lightning import GradclipCallback

    callback = GradclipCallback(max_norm=gradclip.AutoClip(percentile=10))
    _, trainer = _lightning_run(tmp_path, callback, None)
    assert float(trainer.logged_metrics["clip_coef"]) <= 1
    assert callback.clipper.state_dict()["threshold"]["policy"] == "AutoClip"


# ---------------------------------------------------------------------------------------------
# Hugging Face Trainer


def _hf_run(tmp_path, callback, max_grad_norm):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 64, (16,), generator=g) for _ in range(16)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        optim="adamw_torch_fused",
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[callback] if callback else []
    )
    trainer.train()
    return model, trainer


def test_hf_callback_clips_like_max_grad_norm(tmp_path):
    pytest.importorskip("transformers")
    from gradclip.integrations.hf import GradclipCallback

    mine, trainer = _hf_run(tmp_path / "a", GradclipCallback(max_norm=MAX_NORM), 0)
    theirs, their_trainer = _hf_run(tmp_path / "b", None, MAX_NORM)
    for p, q in zip(mine.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    untouched, _ = _hf_run(tmp_path / "c", None, 0)
    assert any(
        not torch.allclose(p, q) for p, q in zip(mine.parameters(), untouched.parameters(), strict=True)
    )
    ours = [h for h in trainer.state.log_history if "loss" in h]
    theirs_logs = [h for h in their_trainer.state.log_history if "loss" in h]
    assert len(ours) == 4 and all({"grad_norm", "grad_norm_clipped", "clip_coef"} <= set(h) for h in ours)
    for a, b in zip(ours, theirs_logs, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["clip_coef"] < 1


def test_hf_callback_refuses_double_clipping(tmp_path):
    pytest.importorskip("transformers")
    from gradclip.integrations.hf import GradclipCallback

    with pytest.raises(ValueError, match="max_grad_norm"):
        _hf_run(tmp_path, GradclipCallback(max_norm=MAX_NORM), 1.0)


def lightning_fsdp1_worker(rank: int, world: int, strategy_name: str) -> None:
    """GradclipCallback under Lightning's FSDPStrategy (FSDP1), driven through its hooks: the
    Trainer refuses FSDP on a CPU accelerator, so the strategy object holds a CPU FSDP1 model."""
    import types

    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy
    from test_clipper_distributed import _fsdp1

    from gradclip.integrations.lightning import GradclipCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.logged = {}

        def log_dict(self, values, **kwargs):
            self.logged.update(values)

    fsdp = _fsdp1(strategy_name, use_orig_params=True)
    strategy = FSDPStrategy()
    strategy.model = fsdp
    trainer = types.SimpleNamespace(
        gradient_clip_val=None, strategy=strategy, precision_plugin=types.SimpleNamespace(scaler=None)
    )
    module = Module()
    callback = GradclipCallback(max_norm=0.05)
    callback.on_fit_start(trainer, module)
    torch.manual_seed(1 + rank)
    fsdp(torch.randn(8, 13)).pow(2).sum().backward()
    params = list(fsdp.parameters())
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    expected = fsdp.clip_grad_norm_(0.05)
    clipped = [None if p.grad is None else p.grad.clone() for p in params]
    for p, g in zip(params, saved, strict=True):
        p.grad = g
    callback.on_before_optimizer_step(trainer, module, None)
    torch.testing.assert_close(module.logged["grad_2.0_norm_total"], expected, rtol=2e-6, atol=0)
    for p, g in zip(params, clipped, strict=True):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strategy_name", ["FULL_SHARD", "NO_SHARD"])
def test_lightning_callback_clips_by_norm_under_fsdp1(strategy_name):
    """Lightning issue 19235 (its FSDP plugin refuses clipping by norm): the callback gives
    FullyShardedDataParallel.clip_grad_norm_'s norm and gradients on 2 gloo ranks."""
    pytest.importorskip("lightning.pytorch")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    import dist_workers

    dist_workers.launch(lightning_fsdp1_worker, 2, strategy_name)
