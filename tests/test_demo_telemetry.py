"""The demo's telemetry view (issue 14): the unclipped LSTM's explosion, located per layer."""

from __future__ import annotations

import argparse

import pytest
import torch

from gradclip import demo


def test_explosion_view_finds_the_step_and_the_layer(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    args = argparse.Namespace(
        batch=32, length=10, hidden=32, lr=1.2, optimizer="sgd", momentum=0.5, max_norm=0.5, seed=0
    )
    torch.set_num_threads(min(2, torch.get_num_threads()))
    found = demo.explosion_view(args, torch.device("cpu"), 30, str(tmp_path))
    out = capsys.readouterr().out
    # the unclipped run explodes within a few steps and turns non-finite later (seeded, CPU)
    assert found["explode_step"] is not None and found["explode_step"] < 10
    assert found["first_nonfinite"] is not None and found["first_nonfinite"] > found["explode_step"]
    assert found["culprit"].startswith(("lstm.", "head."))
    assert f"the norm explodes at step {found['explode_step']}" in out
    assert "gradclip.Clipper report: 30 steps seen" in out and "non-finite" in out
    assert (tmp_path / "telemetry.png").read_bytes()[:4] == b"\x89PNG"
    # a gentle learning rate does not explode: the view says so instead of inventing a step
    calm = argparse.Namespace(**{**vars(args), "lr": 1e-3})
    assert demo.explosion_view(calm, torch.device("cpu"), 10, str(tmp_path))["explode_step"] is None
