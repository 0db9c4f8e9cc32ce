"""`python -m gradclip profile` smoke test (fast: a tiny model, a few steps) and the factory hook."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from gradclip import __main__ as cli
from gradclip import profile


def test_profile_command_writes_trace_report_and_plot(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    factory = tmp_path / "tiny_factory.py"
    factory.write_text(
        textwrap.dedent(
            """
            import torch

            def make():
                torch.manual_seed(0)
                model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

                def loss_fn(m, step):
                    g = torch.Generator().manual_seed(step)
                    x = torch.randn(4, 6, generator=g)
                    return m(x).pow(2).mean() * (1000.0 if step == 3 else 1.0)

                return model, loss_fn
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    argv = ["profile", "--from-module", "tiny_factory:make", "--steps", "3", "--warmup", "1"]
    argv += ["--profile-steps", "1", "--out", str(out), "--max-norm", "0.5"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for provider in profile.PROVIDERS:
        assert f"\n{provider} " in printed
    assert "clip share" in printed and "ops dispatched" in printed
    summary = json.loads((out / "profile.json").read_text())
    assert set(summary["providers"]) == set(profile.PROVIDERS)
    for row in summary["providers"].values():
        assert 0 < row["clip_ms"] < row["step_ms"] and 0 < row["clip_share"] < 1
        assert row["regions"] == 1 and row["ops_per_clip"] > 0  # the clip region was found in the trace
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"clip/torch", "clip/gradclip", "clip/telemetry", "gradclip.Clipper.clip_"} <= names
    report = (out / "report.txt").read_text()
    assert "5 steps seen" in report and "suggested max_norm" in report
    assert (out / "clipper.png").read_bytes()[:4] == b"\x89PNG"


def test_from_module_errors_are_clear():
    with pytest.raises(SystemExit, match="pkg.module:factory"):
        profile.load_factory("no_colon")
    with pytest.raises(SystemExit, match="cannot import"):
        profile.load_factory("surely_not_a_module_xyz:make")
    with pytest.raises(SystemExit, match="no callable 'nope'"):
        profile.load_factory(f"{__name__ if __name__ in sys.modules else 'json'}:nope")


def test_builtin_model_trains():
    model, loss_fn = profile.tiny_gpt(batch=2)
    loss = loss_fn(model, 0)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in model.parameters())
