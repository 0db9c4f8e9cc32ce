"""A whole optimizer step, clip + fused AdamW: torch's sequence against `gradclip.Clipper.step`.

    python -m gradclip.bench.optimizer_step [--workload gpt2-124M] [--device cpu|cuda] [--reps 7] [--out DIR]

Providers, in one run, interleaved step by step, on the same fp32 gradients (restored before every
timed step, untimed),
with clipping active (max_norm far below the norm, so every step rescales):
  bare             fused AdamW step alone, no clipping                      grad passes: 1 (R)
  read-floor       one read of every gradient (cpu: _C.cpu_floor_read;     1 (R)
                   cuda: _foreach_norm(p=1))
  write-floor      one write of every gradient (_foreach_zero_)             1 (W)
  rw-floor         one in-place read-write of every gradient (_foreach_mul_) 2 (R+W, one pass)
  torch            clip_grad_norm_ + opt.step()                             4 (norm R, rescale R+W, step R)
  gradclip         clipper.step(opt)                                        3 (norm R, step R + W back)
  fold/torch-norm  torch's get_total_norm, coefficient into grad_scale      3 (as gradclip: the fold
                   alone, separated from the speed of gradclip's norm backend on this device)
  norm             gradclip.get_total_norm of the gradients alone           1 (R: the fold's norm)
  torch+scaler     scaler.unscale_ + clip_grad_norm_ + scaler.step + update 6 (unscale R+W, + torch's 4)
  gradclip+scaler  clipper.step(opt, scaler) + update                       3 (as gradclip)
(passes over gradient memory only; every provider also reads/writes params and moments, the same
bytes in all of them). Targets of issue 15: (gradclip - bare) <= 1.1 x "one read plus one write",
and torch+scaler / gradclip+scaler >= 1.3. What clipping adds with the fold is a separate read pass
(the norm) plus the write-back inside the optimizer's own pass, so the floor it is compared with is
read-floor + write-floor; the in-place rw-floor (one pass that reads and writes, what torch's
rescale is) is reported beside it. Ratios are medians over rounds of per-round ratios (each round
times every provider once, in a rotated order), so a change of machine load between rounds cancels.
A correctness gate (one step of each pair, compared on the parameters) runs first; no number is
printed when it fails.

CPU timings on a shared machine are preliminary. On a GPU the steps are timed with a device sync
at both ends of each step (host wall time per step, median and p20/p80).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import gradclip
from gradclip import _extension, optim

from . import workloads

MAX_NORM = 1e-3  # random normal gradients have norms in the thousands: every step clips
SCALE = 1024.0
PASSES = {
    "bare": 1,
    "read-floor": 1,
    "write-floor": 1,
    "rw-floor": 2,
    "torch": 4,
    "gradclip": 3,
    "fold/torch-norm": 3,
    "norm": 1,
    "torch+scaler": 6,
    "gradclip+scaler": 3,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Setup:
    """Parameters (real tensors: AdamW writes them), gradients, the master copy and the optimizer."""

    def __init__(self, workload: workloads.Workload, device: torch.device, scaled: bool) -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        self.params = [
            torch.nn.Parameter(torch.randn(s, generator=gen, device=device) * 0.02) for s in workload.shapes
        ]
        self.master = [torch.randn(s, generator=gen, device=device) for s in workload.shapes]
        if scaled:
            for m in self.master:
                m.mul_(SCALE)
        for p in self.params:
            p.grad = torch.empty_like(p)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=True)
        self.scaler = (
            torch.amp.GradScaler(device.type, init_scale=SCALE, growth_interval=10**9) if scaled else None
        )
        self.clipper = gradclip.Clipper(self.params, max_norm=MAX_NORM)
        self.restore()

    def restore(self) -> None:
        torch._foreach_copy_([p.grad for p in self.params], self.master)

    def scale_marker(self) -> None:
        if self.scaler is not None and self.scaler._scale is None:  # lazily created by scale()
            self.scaler.scale(torch.ones((), device=self.params[0].device))


def step_fn(name: str, s: Setup):
    grads = [p.grad for p in s.params]
    one = torch.tensor(1.0, device=s.params[0].device)
    if name == "bare":
        return s.opt.step
    if name == "read-floor":
        native = _extension.load()[0] if s.params[0].device.type == "cpu" else None
        if native is not None:
            return lambda: native.cpu_floor_read(grads)
        return lambda: torch._foreach_norm(grads, 1)
    if name == "write-floor":
        return lambda: torch._foreach_zero_(grads)
    if name == "rw-floor":
        return lambda: torch._foreach_mul_(grads, one)
    if name == "torch":
        return lambda: (torch.nn.utils.clip_grad_norm_(s.params, MAX_NORM), s.opt.step())
    if name == "gradclip":
        return lambda: s.clipper.step(s.opt)
    if name == "fold/torch-norm":

        def fold():
            total = torch.nn.utils.get_total_norm(grads)
            coef = torch.clamp(MAX_NORM / (total + 1e-6), max=1.0)
            optim.fused_step(s.opt, coef.reciprocal(), None)

        return fold
    if name == "norm":
        return lambda: gradclip.get_total_norm(grads)
    if name == "torch+scaler":

        def torch_scaled():
            s.scaler.unscale_(s.opt)
            torch.nn.utils.clip_grad_norm_(s.params, MAX_NORM)
            s.scaler.step(s.opt)
            s.scaler.update()

        return torch_scaled
    if name == "gradclip+scaler":
        return lambda: (s.clipper.step(s.opt, s.scaler), s.scaler.update())
    raise ValueError(name)


def gate(workload: workloads.Workload, device: torch.device) -> list[str]:
    """One step of torch's sequence and of clipper.step from the same state; the parameter
    differences allowed are those of one rounding per gradient element fed through one AdamW step."""
    failures = []
    small = workloads.sample(workload, cap=1 << 14)
    for scaled in (False, True):
        a, b = Setup(small, device, scaled), Setup(small, device, scaled)
        for s in (a, b):
            s.scale_marker()
        step_fn("torch+scaler" if scaled else "torch", a)()
        step_fn("gradclip+scaler" if scaled else "gradclip", b)()
        for i, (p, q) in enumerate(zip(a.params, b.params, strict=True)):
            if not torch.allclose(p, q, rtol=1e-6, atol=1e-9):
                failures.append(f"scaled={scaled} tensor {i}: max diff {(p - q).abs().max().item():.3g}")
                break
    return failures


def time_providers(names: list[str], setups: dict[bool, Setup], reps: int) -> dict[str, list[float]]:
    """Seconds per step for each provider, interleaved (one step of each per round, `reps` rounds
    after one warm-up round, the order rotated each round), so a change of load on a shared machine
    hits all of them alike and no provider always follows the same one."""
    fns = {n: (step_fn(n, setups["scaler" in n]), setups["scaler" in n]) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps + 1):  # round 0 is a warm-up (allocations, the clipper's first call)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            fn, s = fns[name]
            device = s.params[0].device
            s.restore()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i:
                samples[name].append(time.perf_counter() - t0)
    return samples


def paired_ratios(samples: dict[str, list[float]]) -> dict[str, float]:
    """The issue's ratios, each the median over rounds of that round's ratio."""

    def median(fn) -> float:
        return statistics.median(fn(i) for i in range(len(samples["bare"])))

    def t(name: str, i: int) -> float:
        return samples[name][i]

    def added(name: str, i: int) -> float:
        return t(name, i) - t("bare", i)

    def rw(i: int) -> float:
        return t("read-floor", i) + t("write-floor", i)

    return {
        "gradclip_added_over_read_plus_write": median(lambda i: added("gradclip", i) / rw(i)),
        "gradclip_added_over_rw": median(lambda i: added("gradclip", i) / t("rw-floor", i)),
        "torch_added_over_read_plus_write": median(lambda i: added("torch", i) / rw(i)),
        "torch_added_over_rw": median(lambda i: added("torch", i) / t("rw-floor", i)),
        "fold_torch_norm_added_over_read_plus_write": median(lambda i: added("fold/torch-norm", i) / rw(i)),
        "norm_over_read_floor": median(lambda i: t("norm", i) / t("read-floor", i)),
        "torch_over_gradclip": median(lambda i: t("torch", i) / t("gradclip", i)),
        "scaler_torch_over_gradclip": median(lambda i: t("torch+scaler", i) / t("gradclip+scaler", i)),
    }


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="gpt2-124M", choices=workloads.names())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    workload = workloads.named(args.workload)
    failures = gate(workload, device)
    if failures:
        print("correctness gate FAILED, no timings:", *failures, sep="\n  ")
        return 1
    grad_mb = workload.elements * 4 / 1e6
    print(
        f"# {workload.name}: {workload.tensors} tensors, {workload.elements / 1e6:.1f}M fp32 "
        f"({grad_mb:.0f} MB of gradients), device {device}, torch {torch.__version__}, commit {_commit()}"
    )
    results = {}
    setups = {scaled: Setup(workload, device, scaled) for scaled in (False, True)}
    for setup in setups.values():
        setup.scale_marker()
    samples = time_providers(list(PASSES), setups, args.reps)
    for name, times in samples.items():
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
        results[name] = {
            "median_ms": statistics.median(times) * 1e3,
            "p20_ms": q[0] * 1e3,
            "p80_ms": q[3] * 1e3,
            "grad_passes": PASSES[name],
        }
    del setups
    print(f"{'provider':<16} {'median ms':>10} {'p20':>9} {'p80':>9} {'grad passes':>12}")
    for name, r in results.items():
        print(
            f"{name:<16} {r['median_ms']:>10.2f} {r['p20_ms']:>9.2f} {r['p80_ms']:>9.2f} {r['grad_passes']:>12}"
        )
    ratios = paired_ratios(samples)
    added = results["gradclip"]["median_ms"] - results["bare"]["median_ms"]
    print(
        f"clipping adds (gradclip): {added:.2f} ms = {ratios['gradclip_added_over_read_plus_write']:.2f} x "
        f"(read-floor + write-floor) (target <= 1.1) = {ratios['gradclip_added_over_rw']:.2f} x the in-place "
        f"rw-floor; torch adds {ratios['torch_added_over_read_plus_write']:.2f} x / "
        f"{ratios['torch_added_over_rw']:.2f} x"
    )
    print(
        f"  of which the norm pass (gradclip's norm over the gradients alone) is "
        f"{ratios['norm_over_read_floor']:.2f} x read-floor; the fold alone (torch's norm, coefficient "
        f"in grad_scale) adds {ratios['fold_torch_norm_added_over_read_plus_write']:.2f} x (read + write)"
    )
    print(
        f"whole step torch / gradclip: {ratios['torch_over_gradclip']:.2f}x; "
        f"with GradScaler: {ratios['scaler_torch_over_gradclip']:.2f}x (target >= 1.3)"
    )
    speedup = ratios["scaler_torch_over_gradclip"]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"optimizer_step_{device.type}.json")
    meta = {
        "workload": workload.name,
        "device": str(device),
        "torch": torch.__version__,
        "commit": _commit(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "max_norm": MAX_NORM,
        "reps": args.reps,
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results, "ratios": ratios}, f, indent=2)
    print(f"wrote {path}")
    return 0 if math.isfinite(speedup) else 1


if __name__ == "__main__":
    sys.exit(main())
