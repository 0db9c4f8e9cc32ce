"""Clipper.step (issue 15): the clip folded into the optimizer step, skip policies, GradScaler.

Each comparison runs torch's own sequence (`scaler.unscale_(opt); clip_grad_norm_(...);
scaler.step(opt)`) on an identical copy of the model and optimizer, from the same state and the
same gradients, and requires the same result within the rounding of one multiplication per element.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gradclip
from gradclip import optim

MAX_NORM = 0.05


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


OPTIMIZERS = {
    "Adam": lambda ps, fused: torch.optim.Adam(ps, lr=1e-2, fused=fused),
    "AdamW": lambda ps, fused: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=fused),
    "SGD-momentum": lambda ps, fused: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=fused),
    "Adagrad": lambda ps, fused: torch.optim.Adagrad(ps, lr=0.1, fused=fused),
}


def backward(model, scaler, seed, poison=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=g)
    loss = model(x).square().mean() * 10
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if poison is not None:
        list(model.parameters())[poison].grad.view(-1)[0] = float("nan")


def torch_step(model, opt, scaler, max_norm=MAX_NORM):
    if scaler is not None:
        scaler.unscale_(opt)
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return total


def pair(opt_name, fused, with_scaler, warmup=3):
    """Two identical (model, optimizer, scaler) triples after `warmup` identical torch steps."""
    model = make_model()
    opt = OPTIMIZERS[opt_name](model.parameters(), fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if with_scaler else None
    for step in range(warmup):
        backward(model, scaler, step)
        torch_step(model, opt, scaler)
        opt.zero_grad()
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[opt_name](twin.parameters(), fused)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share tensors
    twin_scaler = None
    if with_scaler:
        twin_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        twin_scaler.load_state_dict(scaler.state_dict())
    return (model, opt, scaler), (twin, twin_opt, twin_scaler)


def resync(mine, theirs):
    """Copy mine's parameters and optimizer/scaler state into theirs, so that the next step starts
    from the same point (otherwise the next gradients differ by the drift of the last step)."""
    theirs[0].load_state_dict(mine[0].state_dict())
    theirs[1].load_state_dict(copy.deepcopy(mine[1].state_dict()))
    if mine[2] is not None:
        theirs[2].load_state_dict(mine[2].state_dict())


def assert_same_step(mine, theirs, grads_too=True):
    for p, q in zip(mine[0].parameters(), theirs[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
        if grads_too and q.grad is not None:
            # one extra rounding: g / (1/coef) (or g / (scale/coef)) against (g * inv_scale) * coef
            torch.testing.assert_close(p.grad, q.grad, rtol=4e-7, atol=1e-30)
    for a, b in zip(mine[1].state.values(), theirs[1].state.values(), strict=True):
        for k in b:
            # moments mix old and new values: entries near zero by cancellation get an absolute
            # tolerance relative to the tensor's scale
            atol = 1e-6 * float(b[k].abs().max()) if b[k].numel() else 0.0
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=atol)
    if mine[2] is not None:
        assert mine[2].get_scale() == theirs[2].get_scale()
        assert mine[2]._get_growth_tracker() == theirs[2]._get_growth_tracker()


@pytest.mark.parametrize("with_scaler", [False, True], ids=["no-scaler", "scaler"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_step_matches_torch_sequence(opt_name, fused, with_scaler):
    mine, theirs = pair(opt_name, fused, with_scaler)
    clipper = gradclip.Clipper(mine[0].named_parameters(), max_norm=MAX_NORM)
    for step in range(3, 6):
        backward(mine[0], mine[2], step)
        backward(theirs[0], theirs[2], step)
        stats = clipper.step(mine[1], mine[2])
        if mine[2] is not None:
            mine[2].update()
        total = torch_step(*theirs)
        torch.testing.assert_close(stats.total_norm, total, rtol=1e-6, atol=0)
        assert stats.clip_coef.item() < 1  # clipping is active
        assert not stats.skipped
        assert_same_step(mine, theirs)
        mine[1].zero_grad()
        theirs[1].zero_grad()
        resync(mine, theirs)


def test_comparison_can_fail():
    mine, theirs = pair("AdamW", True, False)
    clipper = gradclip.Clipper(mine[0].parameters(), max_norm=MAX_NORM * 1.01)
    backward(mine[0], None, 3)
    backward(theirs[0], None, 3)
    clipper.step(mine[1])
    torch_step(*theirs)
    with pytest.raises(AssertionError):
        assert_same_step(mine, theirs)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_scaler_overflow_skips_and_backs_off_like_torch(fused):
    mine, theirs = pair("AdamW", fused, True)
    clipper = gradclip.Clipper(mine[0].parameters(), max_norm=MAX_NORM)
    before = [p.detach().clone() for p in mine[0].parameters()]
    backward(mine[0], mine[2], 3, poison=2)
    backward(theirs[0], theirs[2], 3, poison=2)
    stats = clipper.step(mine[1], mine[2])
    mine[2].update()
    torch_step(*theirs)
    assert stats.skipped and stats.nonfinite
    assert all(torch.equal(p, b) for p, b in zip(mine[0].parameters(), before, strict=True))
    assert_same_step(mine, theirs, grads_too=False)
    assert mine[2].get_scale() == 2.0**9


def test_fused_step_needs_no_host_sync(monkeypatch):
    """On the fused path nothing is read back: Tensor.__bool__/item/tolist/cpu would be."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    clipper = gradclip.Clipper(
        model.named_parameters(),
        max_norm=gradclip.ZClip(warmup_steps=2),
        nonfinite="skip",
        history=16,
        spike_window=8,
        spike_min_steps=4,
        skip_spikes=True,
    )
    backward(model, scaler, 0)
    clipper.step(opt, scaler)  # first step: lazy state allocation
    scaler.update()
    opt.zero_grad()
    calls = []

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, **k):
            calls.append(name)
            return original(self, *a, **k)

        return wrapped

    backward(model, scaler, 1)
    with monkeypatch.context() as m:
        for name in ("__bool__", "item", "tolist", "cpu", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, forbid(name))
        clipper.step(opt, scaler)
    assert calls == []
    # the same probe does see a sync where there is one: a plain optimizer that may skip
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    backward(model, None, 2)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__bool__", forbid("__bool__"))
        gradclip.Clipper(model.parameters(), max_norm=1.0, nonfinite="skip").step(plain)
    assert calls == ["__bool__"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_nonfinite_skip_leaves_everything_untouched(fused):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    clipper = gradclip.Clipper(model.named_parameters(), max_norm=MAX_NORM, nonfinite="skip")
    backward(model, None, 0)
    assert not clipper.step(opt).skipped
    opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    backward(model, None, 1, poison=0)
    grads = [p.grad.clone() for p in model.parameters()]
    stats = clipper.step(opt)
    assert stats.skipped and stats.nonfinite
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))
    for a, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, equal_nan=True, rtol=0, atol=0)
    after = opt.state_dict()["state"]
    for k, v in state["state"].items():
        for name in v:
            assert torch.equal(v[name], after[k][name]), name


def test_propagate_is_torch_behaviour():
    (m1, o1, _), (m2, o2, _) = pair("AdamW", True, False)
    clipper = gradclip.Clipper(m1.parameters(), max_norm=MAX_NORM)
    backward(m1, None, 3, poison=1)
    backward(m2, None, 3, poison=1)
    stats = clipper.step(o1)
    torch_step(m2, o2, None)
    assert stats.nonfinite and not stats.skipped
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p, q, equal_nan=True)
    assert any(p.isnan().any() for p in m1.parameters())


def test_nonfinite_error_raises_before_modifying():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    clipper = gradclip.Clipper(model.named_parameters(), max_norm=MAX_NORM, nonfinite="error")
    params = [p.detach().clone() for p in model.parameters()]
    backward(model, None, 0, poison=2)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"non-finite gradients: 2\.weight"):
        clipper.step(opt)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))
    for a, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, equal_nan=True, rtol=0, atol=0)
    assert not opt.state


def test_max_consecutive_skips_names_the_culprit():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    clipper = gradclip.Clipper(
        model.named_parameters(), max_norm=MAX_NORM, nonfinite="skip", max_consecutive_skips=3
    )
    for step in range(2):  # two skipped, one good: the run restarts
        backward(model, None, step, poison=0)
        assert clipper.step(opt).skipped
        opt.zero_grad()
    backward(model, None, 9)
    assert not clipper.step(opt).skipped
    opt.zero_grad()
    for step in range(2):
        backward(model, None, step, poison=2)
        clipper.step(opt)
        opt.zero_grad()
    backward(model, None, 5, poison=2)
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row.*: 2\.weight$"):
        clipper.step(opt)
    opt.zero_grad()
    backward(model, None, 6)
    assert not clipper.step(opt).skipped  # the counter was reset by the error


def test_skip_spikes():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    clipper = gradclip.Clipper(
        model.parameters(), max_norm=10.0, history=32, spike_window=8, spike_min_steps=4, skip_spikes=True
    )
    for step in range(6):
        backward(model, None, step)
        assert not clipper.step(opt).skipped
        opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    backward(model, None, 7)
    for p in model.parameters():
        p.grad.mul_(1000)
    stats = clipper.step(opt)
    assert stats.spike and stats.skipped and not stats.nonfinite
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))


def test_fused_sgd_skipped_first_step_keeps_a_clean_momentum():
    """torch's fused SGD leaves empty_like momentum buffers after a skipped first step."""
    (m1, o1, _), (m2, o2, _) = pair("SGD-momentum", True, False, warmup=0)
    clipper = gradclip.Clipper(m1.parameters(), max_norm=MAX_NORM, nonfinite="skip")
    backward(m1, None, 0, poison=0)
    assert clipper.step(o1).skipped
    o1.zero_grad()
    backward(m1, None, 1)
    backward(m2, None, 1)
    clipper.step(o1)
    torch_step(m2, o2, None)  # torch: its first step, with the same gradients
    assert_same_step((m1, o1, None), (m2, o2, None))


def test_threshold_policy_in_step_matches_manual_clip():
    (m1, o1, _), (m2, o2, _) = pair("AdamW", True, False, warmup=0)
    clipper = gradclip.Clipper(m1.parameters(), max_norm=gradclip.AutoClip(percentile=50))
    norms = []
    for step in range(6):
        backward(m1, None, step)
        backward(m2, None, step)
        stats = clipper.step(o1)
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in m2.parameters()]).item())
        threshold = sorted(norms)[(len(norms) - 1) // 2] if len(norms) % 2 else None
        if threshold is None:
            s = sorted(norms)
            threshold = (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
        torch_step(m2, o2, None, max_norm=threshold)
        assert_same_step((m1, o1, None), (m2, o2, None))
        if step:
            assert stats.clip_coef.item() < 1 or norms[-1] <= threshold
        o1.zero_grad()
        o2.zero_grad()
        resync((m1, o1, None), (m2, o2, None))


@pytest.mark.parametrize("with_scaler", [False, True], ids=["no-scaler", "scaler"])
def test_agc_in_step(with_scaler):
    """AGC through step(), last layer excluded, against the timm rule applied before opt.step()."""
    (m1, o1, s1), (m2, o2, s2) = pair("AdamW", True, with_scaler)
    agc = gradclip.AGC(clip_factor=0.01, exclude="2.*")
    clipper = gradclip.Clipper(m1.named_parameters(), max_norm=agc)
    backward(m1, s1, 3)
    backward(m2, s2, 3)
    stats = clipper.step(o1, s1)
    if s1 is not None:
        s1.update()
        s2.unscale_(o2)
    for name, p in m2.named_parameters():
        if name.startswith("2."):
            continue
        dims = tuple(range(1, p.ndim))
        wn = p.detach().norm(2.0, dim=dims, keepdim=True) if p.ndim > 1 else p.detach().norm()
        gn = p.grad.norm(2.0, dim=dims, keepdim=True) if p.ndim > 1 else p.grad.norm()
        max_norm = wn.clamp(min=1e-3) * 0.01
        p.grad.copy_(torch.where(gn < max_norm, p.grad, p.grad * (max_norm / gn.clamp(min=1e-6))))
    if s2 is not None:
        s2.step(o2)
        s2.update()
    else:
        o2.step()
    assert stats.clip_coef.item() < 1
    assert_same_step((m1, o1, s1), (m2, o2, s2))


def test_state_dict_round_trip_with_policy():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    kw = {
        "nonfinite": "skip",
        "max_consecutive_skips": 4,
        "history": 8,
        "spike_window": 4,
        "spike_min_steps": 2,
    }
    a = gradclip.Clipper(model.parameters(), max_norm=gradclip.ZClip(warmup_steps=3), **kw)
    for step in range(5):
        backward(model, None, step)
        a.step(opt)
        opt.zero_grad()
    b = gradclip.Clipper(model.parameters(), max_norm=gradclip.ZClip(warmup_steps=3), **kw)
    b.load_state_dict(a.state_dict())
    backward(model, None, 9)
    grads = [p.grad.clone() for p in model.parameters()]
    sa = a.norms()
    ta = a._policy.threshold(sa[0], torch.tensor(True))
    tb = b._policy.threshold(sa[0], torch.tensor(True))
    assert torch.equal(ta, tb)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="threshold policy"):
        gradclip.Clipper(model.parameters(), max_norm=1.0, **kw).load_state_dict(a.state_dict())


def test_detection():
    ps = list(make_model().parameters())
    assert optim.fused_kind(torch.optim.AdamW(ps, fused=True)) == "AdamW"
    assert optim.fused_kind(torch.optim.Adam(ps, fused=True)) == "Adam"
    assert optim.fused_kind(torch.optim.SGD(ps, lr=0.1, fused=True)) == "SGD"
    assert optim.fused_kind(torch.optim.Adagrad(ps, fused=True)) == "Adagrad"
    assert optim.fused_kind(torch.optim.AdamW(ps)) is None
    assert optim.fused_kind(torch.optim.AdamW(ps, foreach=True)) is None
    assert optim.fused_kind(torch.optim.RMSprop(ps)) is None

    class OwnStep(torch.optim.AdamW):
        def step(self, closure=None):
            return super().step(closure)

    class SameStep(torch.optim.AdamW):
        pass

    assert optim.fused_kind(OwnStep(ps, fused=True)) is None
    assert optim.fused_kind(SameStep(ps, fused=True)) == "AdamW"
    mixed = torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:], "fused": False}], fused=True)
    assert optim.fused_kind(mixed) is None


def test_scaler_misuse_is_reported():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    clipper = gradclip.Clipper(model.parameters(), max_norm=MAX_NORM)
    backward(model, scaler, 0)
    clipper.step(opt, scaler)
    with pytest.raises(RuntimeError, match="already been called"):
        clipper.step(opt, scaler)
    with pytest.raises(TypeError, match="optimizer"):
        clipper.step(model)


def test_user_unscaled_first_is_honoured():
    (m1, o1, s1), (m2, o2, s2) = pair("AdamW", True, True)
    clipper = gradclip.Clipper(m1.parameters(), max_norm=MAX_NORM)
    backward(m1, s1, 3)
    backward(m2, s2, 3)
    s1.unscale_(o1)
    clipper.step(o1, s1)
    s1.update()
    torch_step(m2, o2, s2)
    assert_same_step((m1, o1, s1), (m2, o2, s2))


def test_bench_gate_and_a_tiny_run(tmp_path, monkeypatch):
    """bench/optimizer_step.py: its correctness gate passes and a tiny run writes its JSON."""
    import importlib
    import json
    import os
    import sys

    try:
        bench = importlib.import_module("gradclip.bench.optimizer_step")
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        bench = importlib.import_module("bench.optimizer_step")
    tiny = bench.workloads.Workload("tiny", ((64, 32), (32,), (300,)))
    assert bench.gate(tiny, torch.device("cpu")) == []
    monkeypatch.setattr(bench.workloads, "named", lambda name: tiny)
    assert bench.main(["--reps", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "optimizer_step_cpu.json").read_text())
    assert set(data["results"]) == set(bench.PASSES)
    assert data["results"]["gradclip"]["grad_passes"] == 3


def test_optimizer_and_clipper_must_agree_on_parameters():
    model = make_model()
    ps = list(model.parameters())
    backward(model, None, 0)
    with pytest.raises(ValueError, match="does not clip"):
        gradclip.Clipper(ps[:2], max_norm=MAX_NORM).step(torch.optim.AdamW(ps, fused=True))
    # a clipper over more parameters than the optimizer: the plain path, which rescales them all,
    # as torch's clip_grad_norm_ over those parameters would
    twin = copy.deepcopy(model)
    clipper = gradclip.Clipper(ps, max_norm=MAX_NORM)
    tps = list(twin.parameters())
    for p, q in zip(ps, tps, strict=True):
        q.grad = p.grad.clone()
    clipper.step(torch.optim.AdamW(ps[:2], lr=1e-2, fused=True))
    torch.nn.utils.clip_grad_norm_(tps, MAX_NORM)
    torch.optim.AdamW(tps[:2], lr=1e-2, fused=True).step()
    for p, q in zip(ps, tps, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(p.grad, q.grad, rtol=4e-7, atol=1e-30)


def test_detection_survives_torch_step_wrapping():
    """torch wraps `step` per class on first construction; an AdamW built before any Adam gets a
    wrapper of its own (regression: detection compared the wrapped functions)."""
    import subprocess
    import sys

    code = (
        "import torch; from gradclip import optim; ps = [torch.nn.Parameter(torch.randn(3))];"
        "a = torch.optim.AdamW(ps, fused=True); b = torch.optim.Adam(ps, fused=True);"
        "assert torch.optim.AdamW.step is not torch.optim.Adam.step;"
        "print(optim.fused_kind(a), optim.fused_kind(b))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AdamW", "Adam"]
