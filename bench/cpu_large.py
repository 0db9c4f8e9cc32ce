"""The CPU kernels (backend "cpu") on large workloads, interleaved with torch and the native floors.

    python -m gradclip.bench.cpu_large                       # the issue-13 rows
    python -m gradclip.bench.cpu_large --workloads gpt2-4layer --dtypes bf16 --rounds 9

For each (workload, dtype, regime) it first checks correctness with the harness's gate
(bench/clip_grad_norm.py: norm and clipped gradients against gradclip's fp64 reference, gradients
bit-identical when no clipping is needed) for torch.nn.utils.clip_grad_norm_ and for
gradclip.clip_grad_norm_ (backend "auto", which must plan "cpu"), and refuses to time a provider
that fails. Then it times, in `rounds` rounds, one batch of each provider in turn (the order rotates
every round), so a load spike on a shared machine hits every provider alike:
- torch: torch.nn.utils.clip_grad_norm_(params, max_norm), torch's default (for-loop on CPU);
- gradclip: gradclip.clip_grad_norm_(params, max_norm);
- floor: the least work that touches the same bytes with the same chunks and threads
  (gradclip._C.cpu_floor_read: every gradient byte read once, the no-clipping floor;
  cpu_floor_read_write: read once, then read + written once in place, the clipping floor).
"clip": the k-th call of a batch gets max_norm = n0 * 0.97**(k+1) (n0: the norm of the data), so every
call rescales; the gradients are restored from a saved copy before each batch (untimed).
"no clip": max_norm = 1e30 (coefficient 1: torch still multiplies by 1, gradclip writes nothing).
Per round, ratios torch / gradclip and gradclip / floor; the table shows median times and the median
of the per-round ratios. Figures from a loaded machine are preliminary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import gradclip
from gradclip import routing

from . import clip_grad_norm as harness
from . import providers as prov
from . import timing, workloads

DEFAULT_WORKLOADS = ("many-small-4k", "gpt2-4layer")
DEFAULT_DTYPES = ("fp32", "bf16", "mixed")
REGIMES = ("clip", "no clip")


def _calls(params, grads, regime: str, n0: float, n: int, native) -> dict:
    bounds = [n0 * harness.ACTIVE_RATIO ** (k + 1) for k in range(n)] if regime == "clip" else [1e30] * n

    def torch_batch():
        for m in bounds:
            torch.nn.utils.clip_grad_norm_(params, m)

    def gradclip_batch():
        for m in bounds:
            gradclip.clip_grad_norm_(params, m)

    if regime == "clip":

        def floor_batch():
            for _ in bounds:
                native.cpu_floor_read_write(grads, 0)
    else:

        def floor_batch():
            for _ in bounds:
                native.cpu_floor_read(grads)

    return {"torch": torch_batch, "gradclip": gradclip_batch, "floor": floor_batch}


def _gate(params, gate_params, regime: str, seed: int) -> dict[str, dict]:
    device = torch.device("cpu")
    max_norm = harness.REGIMES["active" if regime == "clip" else "inactive"]
    out = {}
    for name, make in (("torch", prov._torch_foreach), ("gradclip", prov._gradclip("auto"))):
        provider = prov.Provider(name, make, is_baseline=name == "torch")
        call = make(gate_params, [max_norm])[0]
        out[name] = harness.gate(provider, call, gate_params, max_norm, seed, device)
    return out


def bench_block(wl, dtype_name: str, regime: str, rounds: int, seed: int, native, budget_s: float) -> dict:
    device = torch.device("cpu")
    params = workloads.make_params(wl, dtype_name, device)
    grads = [p.grad for p in params]
    nbytes = workloads.grad_bytes(wl, dtype_name)
    row: dict = {
        "workload": wl.name,
        "dtype": dtype_name,
        "regime": regime,
        "tensors": wl.tensors,
        "elements": wl.elements,
        "grad_bytes": nbytes,
    }
    planned = [g.backend for g in routing.plan(grads, 2.0, "auto")]
    row["auto_plans"] = planned
    gate_params = params if nbytes <= harness.GATE_MAX_BYTES["cpu"] else None
    if gate_params is None:
        gate_params = workloads.make_params(workloads.sample(wl), dtype_name, device)
    row["gate"] = _gate(params, gate_params, regime, seed + 1000)
    refused = [name for name, g in row["gate"].items() if not g["ok"]]
    if planned != ["cpu"]:
        refused.append(f"auto planned {planned}, not ['cpu']")
    if refused:
        row["status"] = "refused: " + ", ".join(refused)
        return row
    workloads.randomize(params, seed)
    saved = [g.clone() for g in grads]
    n0 = float(gradclip.get_total_norm(grads, backend="reference"))

    def restore():
        for g, s in zip(grads, saved, strict=True):
            g.copy_(s)

    probe = _calls(params, grads, regime, n0, 1, native)
    restore()
    probe["gradclip"]()  # warm-up (loads gradclip._C, fills caches)
    restore()
    start = time.perf_counter()
    probe["torch"]()
    per_call = max(time.perf_counter() - start, 1e-6)
    n = int(min(max(budget_s / per_call, 1), 64))
    batches = _calls(params, grads, regime, n0, n, native)
    times: dict[str, list[float]] = {k: [] for k in batches}
    order = list(batches)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            restore()
            start = time.perf_counter()
            batches[name]()
            times[name].append((time.perf_counter() - start) / n * 1e6)
    if regime == "clip":  # every timed call really rescaled: 4 calls from restored data
        restore()
        for k in range(4):
            gradclip.clip_grad_norm_(params, n0 * harness.ACTIVE_RATIO ** (k + 1))
        after = float(gradclip.get_total_norm(grads, backend="reference"))
        row["clips_every_call"] = abs(after / (n0 * harness.ACTIVE_RATIO**4) - 1) < 1e-3
    row["calls_per_batch"] = n
    row["us"] = {k: statistics.median(v) for k, v in times.items()}
    row["us_all"] = times
    row["speedup_vs_torch"] = statistics.median(
        t / g for t, g in zip(times["torch"], times["gradclip"], strict=True)
    )
    row["vs_floor"] = statistics.median(g / f for g, f in zip(times["gradclip"], times["floor"], strict=True))
    row["floor"] = "read once" if regime == "no clip" else "read + read-write"
    row["status"] = "ok"
    return row


def table(rows: list[dict]) -> str:
    head = "| workload | dtype | regime | torch us | gradclip us | floor us | torch / gradclip | gradclip / floor |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['workload']} ({r['tensors']} tensors, {r['elements'] / 1e6:.1f}M)"
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['dtype']} | {r['regime']} | {r['status']} | | | | |")
            continue
        us = r["us"]
        lines.append(
            f"| {name} | {r['dtype']} | {r['regime']} | {us['torch']:,.0f} | {us['gradclip']:,.0f} | "
            f"{us['floor']:,.0f} ({r['floor']}) | {r['speedup_vs_torch']:.2f}x | {r['vs_floor']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m gradclip.bench.cpu_large", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--workloads", default=",".join(DEFAULT_WORKLOADS), help=f"comma list of {workloads.names()}"
    )
    ap.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="comma list of fp32, bf16, mixed")
    ap.add_argument("--regimes", default="clip,no clip", help="comma list of: clip, no clip")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument(
        "--budget", type=float, default=0.15, help="seconds of torch work per batch (default 0.15)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", default=os.path.join(harness.DEFAULT_OUT, "cpu_large.json"), help="JSON path ('' for none)"
    )
    args = ap.parse_args(argv)
    why = gradclip.backends.why_unavailable("cpu", "cpu")
    if why:
        print(f"the cpu backend is unavailable: {why}", file=sys.stderr)
        return 2
    from gradclip import _C

    device = torch.device("cpu")
    meta = harness.metadata(device, timing.copy_bandwidth(device, 256 << 20))
    meta["cpu_capability"] = _C.CPU_CAPABILITY
    meta["loadavg"] = os.getloadavg()
    rows = []
    for name in args.workloads.split(","):
        wl = workloads.named(name)
        for dtype_name in args.dtypes.split(","):
            for regime in args.regimes.split(","):
                print(f"{wl.name} {dtype_name} {regime} ...", file=sys.stderr, flush=True)
                rows.append(bench_block(wl, dtype_name, regime, args.rounds, args.seed, _C, args.budget))
    meta["loadavg_after"] = os.getloadavg()
    text = table(rows)
    print(text)
    print(f"load average before/after: {meta['loadavg']} / {meta['loadavg_after']}")
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
        print(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
