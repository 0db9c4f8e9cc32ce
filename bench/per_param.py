"""What per-parameter norms cost on top of the global norm (issue 14): `{b}_per_param_norms` against
`{b}_total_norm`, and `{b}_clip_grad_norm_per_param_` against `{b}_clip_grad_norm_` (no-clip regime:
max_norm above the norm, so no gradient is rewritten and every call does the same work).

    python -m bench.per_param                       # CUDA when available, else CPU
    python -m bench.per_param --device cpu --workloads tiny,small-mlp --backends cpu,reference
    python -m bench.per_param --out bench/out/per_param.json

Every backend is checked before it is timed (per-parameter norms against fp64 torch.linalg.vector_norm
of each gradient, the total bitwise equal to the norm-only op's); a failing backend prints no
figures. GPU: CUDA-graph replay timed with events (median, p20/p80) and host wall time per call; CPU:
host wall time. The pair (without, with) is measured in alternating rounds, and the ratio is of the
medians. Figures from a machine shared with other work are indicative only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys

import torch

from bench import timing, workloads
from gradclip import backends, ops

PAIRS = {
    "norm": ("total_norm", "per_param_norms"),
    "clip-no-op": ("clip_grad_norm_", "clip_grad_norm_per_param_"),
}


def check(backend: str, grads: list[torch.Tensor]) -> str:
    """Empty string when the backend's per-parameter norms are right, else what is wrong."""
    total, per_param = ops.op(backend, "per_param_norms")(grads, 2.0)
    expected = torch.stack([torch.linalg.vector_norm(g.double(), 2.0) for g in grads]).cpu()
    err = ((per_param.double().cpu() - expected).abs() / expected.clamp_min(1e-30)).max().item()
    if not err <= 1e-5:
        return f"per-parameter norms off by {err:.2e} relative"
    if not torch.equal(total, ops.op(backend, "total_norm")(grads, 2.0)):
        return "total differs from the norm-only op's"
    return ""


def measure(backend: str, grads, device, budget_s: float, rounds: int) -> dict:
    out = {}
    norm = float(ops.op(backend, "total_norm")(grads, 2.0))
    big = 2.0 * norm + 1.0  # no clipping: gradients untouched, each call the same work
    for pair, (base, with_pp) in PAIRS.items():
        samples: dict[str, dict[str, list[float]]] = {
            base: {"wall": [], "gpu": []},
            with_pp: {"wall": [], "gpu": []},
        }
        for _ in range(rounds):
            for name in (base, with_pp):
                op = ops.op(backend, name)
                args = (grads, 2.0) if "clip" not in name else (grads, big, 2.0)
                calls = [lambda op=op, args=args: op(*args)] * 64
                samples[name]["wall"].append(timing.wall_us(calls, device, budget_s / rounds).median)
                if device.type == "cuda":
                    samples[name]["gpu"].append(timing.graph_us(calls, device, budget_s / rounds).median)
        row = {}
        for kind in ("gpu", "wall"):
            if not samples[base][kind]:
                continue
            a, b = statistics.median(samples[base][kind]), statistics.median(samples[with_pp][kind])
            row[kind] = {"without_us": a, "with_us": b, "ratio": b / a, "rounds": rounds}
        out[pair] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.per_param", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument(
        "--workloads", default=None, help="comma-separated (default: anchors on GPU, small ones on CPU)"
    )
    ap.add_argument("--dtype", default="bf16", choices=sorted(workloads.DTYPES))
    ap.add_argument(
        "--backends", default=None, help="comma-separated (default: every available kernel backend)"
    )
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per (op, measurement)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of (without, with)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default_workloads = workloads.ANCHORS if device.type == "cuda" else ("tiny", "small-mlp", "many-small-4k")
    names = args.workloads.split(",") if args.workloads else list(default_workloads)
    candidates = args.backends.split(",") if args.backends else ["cuda", "triton", "cpu"]
    chosen = [b for b in candidates if b == "reference" or not backends.why_unavailable(b, device.type)]
    if not chosen:
        print(f"no backend available on {device.type} among {candidates}", file=sys.stderr)
        return 1
    results = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "workloads": {},
    }
    print(f"per-parameter norms cost on {results['device']} ({device.type}), {args.dtype} gradients")
    print(
        f"{'workload':<16} {'backend':<10} {'op':<11} {'time':<5} {'without us':>11} {'with us':>10} {'ratio':>7}"
    )
    failed = 0
    for name in names:
        workload = workloads.named(name)
        params = workloads.make_params(workload, args.dtype, device)
        workloads.randomize(params, seed=0)
        grads = [p.grad for p in params]
        for backend in chosen:
            why = check(backend, grads)
            if why:
                print(f"{name:<16} {backend:<10} CHECK FAILED: {why}; no figures")
                failed += 1
                continue
            row = measure(backend, grads, device, args.budget, args.rounds)
            results["workloads"].setdefault(name, {})[backend] = row
            for pair, kinds in row.items():
                for kind, r in kinds.items():
                    print(
                        f"{name:<16} {backend:<10} {pair:<11} {kind:<5} {r['without_us']:>11.1f} "
                        f"{r['with_us']:>10.1f} {r['ratio']:>7.3f}"
                    )
        del params, grads
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
