"""Adaptive thresholds (issue 15) against plain implementations of the published rules.

The plain implementations below are written from the papers' rules (host floats, numpy), not from
gradclip's code, and the device versions must give the same thresholds on the same norm sequences.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import gradclip
from gradclip.thresholds import AGC, AutoClip, ZClip

# ---------------------------------------------------------------------------------------------
# Plain rules


class PlainZClip:
    """ZClip, z-score mode (Kumar et al. 2025): warm-up buffer, EMA of mean/var fed with the clip value."""

    def __init__(self, alpha, z_thresh, warmup_steps, max_grad_norm, clip_option, clip_factor, eps=1e-6):
        self.a, self.zt, self.w, self.cap = alpha, z_thresh, warmup_steps, max_grad_norm
        self.option, self.factor, self.eps = clip_option, clip_factor, eps
        self.buf, self.mean, self.var = [], None, None

    def step(self, g):
        """Returns the effective threshold (inf when it would not clip)."""
        if self.mean is None:
            self.buf.append(g)
            if len(self.buf) >= self.w:
                self.mean = sum(self.buf) / len(self.buf)
                self.var = sum((x - self.mean) ** 2 for x in self.buf) / len(self.buf)
            return math.inf if self.cap is None else self.cap
        std = self.var**0.5
        z = (g - self.mean) / (std + self.eps)
        clip_val = None
        if z > self.zt:
            if self.option == "adaptive_scaling":
                clip_val = (self.mean + self.zt * std / (z / self.zt)) * self.factor
            else:
                clip_val = self.mean
        eff = clip_val if clip_val is not None else g
        if self.cap is not None:
            eff = min(eff, self.cap)
        x = clip_val if clip_val is not None else g
        self.mean = self.a * self.mean + (1 - self.a) * x
        self.var = self.a * self.var + (1 - self.a) * (x - self.mean) ** 2
        return eff


def plain_autoclip(norms, percentile, window):
    history, out = [], []
    for g in norms:
        history.append(g)
        seen = history if window is None else history[-window:]
        out.append(float(np.percentile(seen, percentile)))
    return out


def plain_agc(params, clip_factor, eps):
    """timm.utils.agc.adaptive_clip_grad, written from its rule."""
    for p in params:
        if p.grad is None:
            continue
        if p.ndim <= 1:
            wn, gn = p.detach().norm(), p.grad.norm()
        else:
            dims = tuple(range(1, p.ndim))
            wn, gn = p.detach().norm(2.0, dim=dims, keepdim=True), p.grad.norm(2.0, dim=dims, keepdim=True)
        max_norm = wn.clamp(min=eps) * clip_factor
        clipped = p.grad * (max_norm / gn.clamp(min=1e-6))
        p.grad.copy_(torch.where(gn < max_norm, p.grad, clipped))


def spiky_norms(n, seed):
    rng = random.Random(seed)
    norms = []
    for i in range(n):
        g = abs(rng.gauss(1.0, 0.1)) + 0.001 * i
        if rng.random() < 0.1:
            g *= rng.choice([3.0, 10.0, 50.0])
        norms.append(g)
    return norms


def thresholds_of(policy, norms, accept=True):
    out = []
    for g in norms:
        t = policy.threshold(torch.tensor(g, dtype=torch.float32), torch.tensor(accept))
        out.append(t.double().item())
    return out


# ---------------------------------------------------------------------------------------------
# ZClip


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"clip_option": "mean"},
        {"max_grad_norm": None, "warmup_steps": 5},
        {"max_grad_norm": 2.0, "clip_factor": 0.7, "alpha": 0.9, "z_thresh": 1.5},
        {"warmup_steps": 0},
    ],
    ids=["defaults", "mean", "no-cap", "custom", "no-warmup"],
)
def test_zclip_matches_plain_rule(kw):
    args = {"alpha": 0.97, "z_thresh": 2.5, "warmup_steps": 25, "max_grad_norm": 1.0}
    args |= {"clip_option": "adaptive_scaling", "clip_factor": 1.0} | kw
    norms = [float(np.float32(g)) for g in spiky_norms(200, seed=1)]
    plain = PlainZClip(**args)
    expected = [plain.step(g) for g in norms]
    got = thresholds_of(ZClip(**args), norms)
    exp32 = [float(np.float32(e)) for e in expected]
    np.testing.assert_allclose(got, exp32, rtol=2e-7)
    finite = [e for e in expected if math.isfinite(e)]
    assert len(set(finite)) > 10  # the sequence exercises the adaptive branch


def test_zclip_comparison_can_fail():
    norms = spiky_norms(100, seed=2)
    expected = [PlainZClip(0.97, 2.5, 25, 1.0, "adaptive_scaling", 1.0).step(g) for g in norms]
    got = thresholds_of(ZClip(alpha=0.9), norms)  # a different alpha must be caught
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_zclip_rejected_steps_do_not_enter_the_statistics():
    norms = spiky_norms(60, seed=3)
    z = ZClip(warmup_steps=10)
    thresholds_of(z, norms[:30])
    before = z.state_dict()
    z.threshold(torch.tensor(float("nan")), torch.tensor(True))
    z.threshold(torch.tensor(5.0), torch.tensor(False))
    after = z.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_zclip_state_dict_round_trip():
    norms = spiky_norms(80, seed=4)
    a = ZClip(warmup_steps=10)
    thresholds_of(a, norms[:40])
    b = ZClip(warmup_steps=10)
    b.load_state_dict(a.state_dict())
    assert thresholds_of(a, norms[40:]) == thresholds_of(b, norms[40:])
    with pytest.raises(ValueError, match="warm-up slots"):
        ZClip(warmup_steps=5).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"z_thresh": 0}, "z_thresh"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"clip_option": "median"}, "clip_option"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm"),
    ],
)
def test_zclip_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        ZClip(**kw)


# ---------------------------------------------------------------------------------------------
# AutoClip


@pytest.mark.parametrize(
    "percentile, window", [(10, None), (50, None), (90, 16), (0, 7), (100, None), (33.3, 200)]
)
def test_autoclip_matches_numpy_percentile(percentile, window):
    norms = [float(np.float32(g)) for g in spiky_norms(150, seed=5)]  # > 64: the history grows
    expected = [float(np.float32(e)) for e in plain_autoclip(norms, percentile, window)]
    got = thresholds_of(AutoClip(percentile, window), norms)
    np.testing.assert_allclose(got, expected, rtol=2e-7)


def test_autoclip_comparison_can_fail():
    norms = spiky_norms(50, seed=6)
    got = thresholds_of(AutoClip(10, None), norms)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(got, plain_autoclip(norms, 11, None), rtol=1e-6)


def test_autoclip_skips_rejected_and_nonfinite_norms():
    a = AutoClip(50, None)
    assert math.isinf(a.threshold(torch.tensor(float("inf")), torch.tensor(True)).item())
    a.threshold(torch.tensor(float("nan")), torch.tensor(True))
    a.threshold(torch.tensor(100.0), torch.tensor(False))
    assert a.threshold(torch.tensor(2.0), torch.tensor(True)).item() == 2.0
    assert a.threshold(torch.tensor(4.0), torch.tensor(True)).item() == 3.0


def test_autoclip_state_dict_round_trip():
    norms = spiky_norms(100, seed=7)
    a = AutoClip(20, 30)
    thresholds_of(a, norms[:50])
    b = AutoClip(20, 30)
    b.load_state_dict(a.state_dict())
    assert thresholds_of(a, norms[50:]) == thresholds_of(b, norms[50:])


@pytest.mark.parametrize("kw", [{"percentile": 101}, {"percentile": -1}, {"window": 0}, {"window": 2.5}])
def test_autoclip_bad_arguments(kw):
    with pytest.raises(ValueError):
        AutoClip(**kw)


# ---------------------------------------------------------------------------------------------
# AGC


def agc_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 16), torch.nn.Linear(16, 4)
    )
    model[0].bias.data.mul_(1e-5)  # small weights: eps floor active for this tensor
    x = torch.randn(5, 3, 6, 6)
    model(x).square().sum().mul(100).backward()
    return model


@pytest.mark.parametrize("clip_factor, eps", [(0.01, 1e-3), (0.1, 1e-3), (1e3, 1e-3), (0.05, 1.0)])
def test_agc_matches_timm_rule(clip_factor, eps):
    mine, theirs = agc_model(), agc_model()
    params = [p for p in mine.parameters() if p.grad is not None]
    coef = AGC(clip_factor, eps).clip_(params, [p.grad for p in params])
    plain_agc(theirs.parameters(), clip_factor, eps)
    for p, q in zip(mine.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert 0 < coef.item() <= 1
    if clip_factor < 1:
        assert coef.item() < 1  # something was clipped: the test exercises the rule


def test_agc_comparison_can_fail():
    mine, theirs = agc_model(), agc_model()
    params = list(mine.parameters())
    AGC(0.01).clip_(params, [p.grad for p in params])
    plain_agc(theirs.parameters(), 0.02, 1e-3)
    assert any(
        not torch.allclose(p.grad, q.grad)
        for p, q in zip(mine.parameters(), theirs.parameters(), strict=True)
    )


def test_agc_with_scaled_gradients():
    mine, theirs = agc_model(), agc_model()
    scale = torch.tensor(1024.0)
    params = list(mine.parameters())
    for p in params:
        p.grad.mul_(scale)
    AGC(0.01).clip_(params, [p.grad for p in params], inv_scale=scale.reciprocal())
    for p in params:
        p.grad.div_(scale)
    plain_agc(theirs.parameters(), 0.01, 1e-3)
    for p, q in zip(mine.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_agc_exclude():
    model = agc_model()
    names = [n for n, _ in model.named_parameters()]
    by_name = AGC(exclude=["3.weight", "3.bias"])
    by_pattern = AGC(exclude="3.*")
    by_predicate = AGC(exclude=lambda name, p: name.startswith("3."))
    for agc in (by_name, by_pattern, by_predicate):
        chosen = [n for n, p in model.named_parameters() if agc.selects(n, p)]
        assert chosen == names[:-2]
    with pytest.raises(TypeError, match="exclude"):
        AGC(exclude=[1, 2])


def test_thresholds_are_public():
    assert gradclip.ZClip is ZClip and gradclip.AutoClip is AutoClip and gradclip.AGC is AGC
