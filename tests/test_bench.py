"""Fast CPU smoke tests of the benchmark harness (bench/, installed as gradclip.bench)."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
import torch


def _bench_pkg(name: str = ""):
    """gradclip.bench when the install maps it, else bench/ from the source tree."""
    try:
        return importlib.import_module("gradclip.bench" + (f".{name}" if name else ""))
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if root not in sys.path:
            sys.path.insert(0, root)
        return importlib.import_module("bench" + (f".{name}" if name else ""))


workloads = _bench_pkg("workloads")
cgn = _bench_pkg("clip_grad_norm")
prov = _bench_pkg("providers")
summary = _bench_pkg("summary")


@pytest.mark.parametrize(
    "name, tensors, elements",
    [
        ("gpt2-124M", 148, 124_439_808),
        ("resnet50", 161, 25_557_032),
        ("many-small-4k", 2000, 8_192_000),
        ("llama-1B", 147, 1_498_482_688),
        ("llama-7B", 291, 6_738_415_616),
    ],
)
def test_anchor_workload_shapes(name, tensors, elements):
    wl = workloads.named(name)
    assert (wl.tensors, wl.elements) == (tensors, elements)


@pytest.mark.parametrize(
    "name, dtype, mb",  # grad MB column of the anchors table
    [
        ("gpt2-124M", "fp32", 497.8),
        ("gpt2-124M", "bf16", 248.9),
        ("resnet50", "bf16", 51.1),
        ("llama-7B", "fp32", 26953.7),
    ],
)
def test_grad_bytes_match_anchors(name, dtype, mb):
    assert round(workloads.grad_bytes(workloads.named(name), dtype) / 1e6, 1) == mb


def test_resnet50_matches_torchvision_when_installed():
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = tv.models.resnet50()
    assert tuple(tuple(p.shape) for p in model.parameters()) == workloads.named("resnet50").shapes


def test_from_module_builds_on_meta():
    wl = workloads.from_module("torch.nn:Transformer")
    with torch.device("meta"):
        ref = torch.nn.Transformer()
    assert wl.tensors == len(list(ref.parameters()))
    assert wl.elements == sum(p.numel() for p in ref.parameters())


def test_params_are_zero_stride_and_mixed_alternates():
    params = workloads.make_params(workloads.named("tiny"), "mixed", torch.device("cpu"))
    assert all(p.stride() == (0,) * p.dim() for p in params)
    assert [p.grad.dtype for p in params[:3]] == [torch.float32, torch.bfloat16, torch.float32]
    assert all(p.grad.shape == p.shape for p in params)


def test_sample_keeps_count_and_caps_size():
    wl = workloads.named("llama-7B")
    s = workloads.sample(wl)
    assert s.tensors == wl.tensors
    assert max(max(1, *shape) for shape in s.shapes) < (1 << 18) + 1021


def _wrong(params, max_norms):
    # Clips to 1% less than asked: exactly the kind of error the gate must catch.
    return [lambda m=m: torch.nn.utils.clip_grad_norm_(params, m * 0.99) * 0.99 for m in max_norms]


def _config(tmp_path, **kw):
    base = dict(
        device=torch.device("cpu"),
        workloads=[workloads.named("tiny")],
        dtypes=["fp32"],
        regimes=["active", "inactive"],
        backends=None,
        compile_for=set(),
        budget_s=0.01,
        seed=0,
        out=str(tmp_path),
        quiet=True,
    )
    base.update(kw)
    return cgn.Config(**base)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gate_refuses_a_wrong_provider(dtype):
    params = workloads.make_params(workloads.named("tiny"), dtype, torch.device("cpu"))
    wrong = prov.Provider("wrong", _wrong)
    checked = cgn.gate(wrong, wrong.make(params, [1.0])[0], params, 1.0, 0, torch.device("cpu"))
    assert not checked["ok"] and checked["errors"]
    right = prov.Provider("gradclip reference", prov._gradclip("reference"))
    assert cgn.gate(right, right.make(params, [1.0])[0], params, 1.0, 0, torch.device("cpu"))["ok"]


def test_gate_refuses_grads_changed_without_clipping():
    def scale_anyway(params, max_norms):
        def call():
            for p in params:
                p.grad.mul_(1.0000001 if p.grad.dtype == torch.float32 else 1.01)
            return torch.nn.utils.clip_grad_norm_(params, 1e30)

        return [call for _ in max_norms]

    params = workloads.make_params(workloads.named("tiny"), "fp32", torch.device("cpu"))
    bad = prov.Provider("scales anyway", scale_anyway)
    checked = cgn.gate(bad, bad.make(params, [1e30])[0], params, 1e30, 0, torch.device("cpu"))
    assert not checked["ok"]


def test_tiny_cpu_run_writes_json_and_refuses_wrong_provider(tmp_path, capsys):
    cfg = _config(tmp_path, extra_providers=[prov.Provider("wrong", _wrong)], dtypes=["fp32", "mixed"])
    doc = cgn.run(cfg)
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert on_disk["complete"] is True
    for key in ("gpu", "torch", "triton", "cuda", "python", "commit", "date", "copy_bandwidth_GBps"):
        assert key in on_disk["meta"]
    assert len(on_disk["results"]) == 4  # 2 dtypes x 2 regimes
    for res in doc["results"]:
        for key in (
            "workload",
            "dtype",
            "regime",
            "tensors",
            "grad_bytes",
            "floor_1pass_us",
            "floor_3pass_us",
        ):
            assert key in res
        rows = {r["provider"]: r for r in res["providers"]}
        assert rows["wrong"]["status"] == "refused" and "wall_us" not in rows["wrong"]
        # The default gradclip backend on CPU: "cpu" where gradclip._C is built, else "reference".
        (default,) = prov.gradclip_backends(torch.device("cpu"), None)[0]
        for name in ("torch foreach", "torch for-loop", f"gradclip {default}"):
            row = rows[name]
            assert row["status"] == "ok", row
            assert row["wall_us"]["median"] > 0 and row["gbps"] > 0
            assert row["correctness"]["ok"]
            if res["regime"] == "active":
                assert row["clips_every_call"], row
        assert rows["torch foreach"]["speedup_vs_torch_wall"] == 1.0
    text = cgn.report.table(doc)
    assert "REFUSED" in text and "NOT the headline" in text
    assert "CPU run" in summary.summarize(doc)
    if cgn.report.chart(doc, str(tmp_path / "c.png")):
        assert (tmp_path / "c.png").stat().st_size > 0


def test_main_quick_cpu(tmp_path, capsys):
    rc = cgn.main(
        [
            "--quick",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--quiet",
            "--budget",
            "0.01",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "not the product's headline" in out and "torch foreach" in out
    assert (tmp_path / "bench.json").exists() and (tmp_path / "table.txt").exists()
