"""Host overhead per call, and the small workloads where host time is all there is.

    python -m gradclip.bench.host_overhead [--tensors 2000] [--parts-only | --small-only] [--json PATH]

Two tables, CPU tensors:

1. Where the host time goes for `--tensors` gradients: the native fast path's whole host part
   (gather `.grad`, validate, choose the backend: everything a gradclip call does before the op,
   `gradclip.fast_path.plan`), then the Python routing's parts (gather, validate, plan) and, when
   triton imports, the Triton backend's table-cache lookup. The fast-path row is the "host overhead
   per call" of issue 13 (target <= 60 us at 2,000 tensors): the same C++ path runs before the
   launch on a GPU machine.
2. The small workloads of issue 13 as ratios to torch.nn.utils.clip_grad_norm_ on the same
   gradients, the two interleaved batch by batch in one run: 2,000 one-element tensors, a PPO
   policy (stable-baselines3's default MlpPolicy for an 8-dim observation and 4 discrete actions:
   pi/vf MLPs 64x64 tanh, action_net, value_net; 12 tensors) as a list and through
   `module.parameters()`. "clipping": every timed call clips with coefficient 0.97 (max_norm =
   n0 * 0.97**(k+1) for the k-th call of a batch, gradients restored untimed before each batch, as
   bench/clip_grad_norm.py does); "no clipping": max_norm = 1e30. Correctness is checked first
   (norm and gradients against torch; gradients bit-identical when not clipping); a workload that
   fails gets no figures.

Medians over batches; on a loaded machine take the figures as preliminary.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradclip
from gradclip import _extension, fast_path, routing

RATIO = 0.97
BATCH = 64


def per_call_us(fn: Callable[[], object], calls: int = 20, repeats: int = 7) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def parts(tensors: int, numel: int) -> list[tuple[str, float]]:
    params = [torch.nn.Parameter(torch.zeros(numel)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(numel)
    grads = routing.grads_of(params)
    rows = []
    if fast_path.plan("clip_grad_norm_", params) is not None:
        rows.append(
            (
                "native fast path: whole host part (gather+validate+choose)",
                lambda: fast_path.plan("clip_grad_norm_", params),
            )
        )
    else:
        print(f"(native fast path unavailable: {_extension.load()[1] or 'declined this input'})")
    rows += [
        ("python routing: gather .grad", lambda: routing.grads_of(params)),
        ("python routing: validate", lambda: routing.check_grads(grads)),
        ("python routing: plan (backend per device/dtype)", lambda: routing.plan(grads, 2.0, "auto")),
    ]
    native = fast_path.native()
    if native is not None and hasattr(native, "tensor_table_key"):
        rows.append(
            (
                "C++ tensor_table_key (the Triton table key alone)",
                lambda: native.tensor_table_key(grads),
            )
        )
    try:
        from gradclip import triton_backend

        rows.append(("triton table-cache lookup (key + hit)", lambda: triton_backend._table(grads)))
    except ImportError as exc:
        print(f"(triton backend not importable: {exc})")
    return [(name, per_call_us(fn)) for name, fn in rows]


# --- the small workloads -----------------------------------------------------------------------


class MlpExtractor(nn.Module):
    def __init__(self, obs: int, width: int = 64) -> None:
        super().__init__()
        self.policy_net = nn.Sequential(nn.Linear(obs, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.value_net = nn.Sequential(nn.Linear(obs, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())


class PPOPolicy(nn.Module):
    """The module tree of stable-baselines3's ActorCriticPolicy with the default MlpPolicy."""

    def __init__(self, obs: int = 8, actions: int = 4) -> None:
        super().__init__()
        self.features_extractor = nn.Flatten()
        self.pi_features_extractor = self.features_extractor
        self.vf_features_extractor = self.features_extractor
        self.mlp_extractor = MlpExtractor(obs)
        self.action_net = nn.Linear(64, actions)
        self.value_net = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features_extractor(x)
        return (
            self.action_net(self.mlp_extractor.policy_net(h)).sum()
            + self.value_net(self.mlp_extractor.value_net(h)).sum()
        )


def _tiny(n: int) -> tuple[list[nn.Parameter], None]:
    params = [nn.Parameter(torch.zeros(1)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(1)
    return params, None


def _ppo() -> tuple[list[nn.Parameter], nn.Module]:
    torch.manual_seed(0)
    policy = PPOPolicy()
    policy(torch.randn(64, 8)).backward()
    params = list(policy.parameters())
    assert len(params) == 12, len(params)
    return params, policy


def _snapshot(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def _restore(params, saved) -> None:
    for p, s in zip(params, saved, strict=True):
        p.grad.copy_(s)


def check(clip: Callable, params, saved, max_norm: float) -> str:
    """'' when gradclip's clip matches torch's on these gradients, else what differs."""
    _restore(params, saved)
    theirs = torch.nn.utils.clip_grad_norm_([p for p in params], max_norm)
    expected = _snapshot(params)
    _restore(params, saved)
    ours = clip(max_norm)
    got = _snapshot(params)
    _restore(params, saved)
    try:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-30)
        if max_norm >= 1e30 and not all(torch.equal(g, s) for g, s in zip(got, saved, strict=True)):
            return "gradients changed although no clipping was needed"
    except AssertionError as exc:
        return str(exc).splitlines()[0]
    return ""


def interleaved(
    providers: dict[str, Callable], params, saved, clipping: bool, rounds: int
) -> dict[str, float]:
    """Median µs per call of each provider, batches of BATCH calls alternating between providers."""
    n0 = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    bounds = [n0 * RATIO ** (k + 1) for k in range(BATCH)] if clipping else [1e30] * BATCH
    samples: dict[str, list[float]] = {name: [] for name in providers}
    for r in range(rounds + 1):
        for name, clip in providers.items():
            _restore(params, saved)
            start = time.perf_counter()
            for bound in bounds:
                clip(bound)
            elapsed = (time.perf_counter() - start) / BATCH * 1e6
            if r:  # round 0 warms up
                samples[name].append(elapsed)
    _restore(params, saved)
    return {name: statistics.median(s) for name, s in samples.items()}


def small(tensors: int, rounds: int) -> list[dict]:
    tiny, _ = _tiny(tensors)
    ppo, policy = _ppo()
    workloads = [
        (f"{tensors:,} tensors of 1 element", tiny, lambda: tiny),
        ("PPO policy (12 tensors), list", ppo, lambda: ppo),
        ("PPO policy, module.parameters()", ppo, policy.parameters),
    ]
    rows = []
    for name, params, source in workloads:
        saved = _snapshot(params)
        providers = {
            "torch": lambda m, source=source: torch.nn.utils.clip_grad_norm_(source(), m),
            "gradclip": lambda m, source=source: gradclip.clip_grad_norm_(source(), m),
        }
        for clipping in (True, False):
            bound = 1e-3 if clipping else 1e30
            error = check(providers["gradclip"], params, saved, bound)
            row = {"workload": name, "regime": "clipping" if clipping else "no clipping", "error": error}
            if not error:
                before = fast_path.counts()[0]
                times = interleaved(providers, params, saved, clipping, rounds)
                row.update(torch_us=times["torch"], gradclip_us=times["gradclip"])
                row["speedup"] = times["torch"] / times["gradclip"]
                row["fast_path_served"] = fast_path.counts()[0] > before
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--numel", type=int, default=1, help="elements per tensor in the parts table")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved batches per provider")
    parser.add_argument("--parts-only", action="store_true")
    parser.add_argument("--small-only", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    doc = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if not args.small_only:
        rows = parts(args.tensors, args.numel)
        print(f"host time per call, {args.tensors} tensors of {args.numel} elements, CPU tensors")
        for name, us in rows:
            print(f"  {name:<62} {us:>9.1f} us")
        doc["parts"] = dict(rows)
    if not args.parts_only:
        rows = small(args.tensors, args.rounds)
        print(
            "\nsmall workloads, clip_grad_norm_, median us per call (interleaved), speedup = torch / gradclip"
        )
        print(f"  {'workload':<36} {'regime':<12} {'torch':>9} {'gradclip':>9} {'speedup':>8}  fast path")
        for r in rows:
            if r["error"]:
                print(f"  {r['workload']:<36} {r['regime']:<12} REFUSED: {r['error']}")
                continue
            print(
                f"  {r['workload']:<36} {r['regime']:<12} {r['torch_us']:>9.1f} {r['gradclip_us']:>9.1f} "
                f"{r['speedup']:>7.1f}x  {'served' if r['fast_path_served'] else 'NOT served'}"
            )
        doc["small"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
