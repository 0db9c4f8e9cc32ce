"""Short summary of a bench.json: per workload the best gradclip provider against torch foreach and
the floors, then the issue's targets (met / missed / not measured).

    python -m gradclip.bench.summary bench/out/bench.json
"""

from __future__ import annotations

import json
import sys


def _best(res: dict) -> tuple[dict | None, dict | None]:
    rows = [r for r in res["providers"] if r["status"] == "ok"]
    torch_row = next((r for r in rows if r["provider"] == "torch foreach"), None)
    ours = [r for r in rows if r["provider"].startswith("gradclip")]
    key = lambda r: (r.get("gpu_us") or r.get("wall_us") or {}).get("median") or float("inf")  # noqa: E731
    return (min(ours, key=key) if ours else None), torch_row


def _t(r: dict | None, timer: str) -> float | None:
    return ((r or {}).get(timer) or {}).get("median")


def targets(doc: dict) -> list[str]:
    """The issue-6 targets, judged from the results present (GPU time; wall time for many-small)."""
    if not doc["meta"].get("headline"):
        return ["NOT MEASURED  all targets: they are GPU targets and this is a CPU run"]
    by = {(r["workload"], r["dtype"], r["regime"]): r for r in doc["results"]}
    out = []

    def judge(label, key, test):
        res = by.get(key)
        if res is None:
            out.append(f"NOT MEASURED  {label}")
            return
        best, base = _best(res)
        if best is None or _t(best, "gpu_us") is None and "wall" not in label:
            out.append(f"NOT MEASURED  {label} (no passing gradclip provider with GPU time)")
            return
        ok, detail = test(res, best, base)
        out.append(f"{'MET   ' if ok else 'MISSED'}        {label}: {detail} ({best['provider']})")

    for wl, dt in (
        ("llama-7B", "bf16"),
        ("llama-1B", "fp32"),
        ("llama-1B", "bf16"),
        ("gpt2-124M", "fp32"),
        ("gpt2-124M", "bf16"),
    ):
        judge(
            f"{wl} {dt} active GPU <= 1.05x 3-pass floor",
            (wl, dt, "active"),
            lambda res, b, t: (
                b["gpu_us"]["median"] <= 1.05 * res["floor_3pass_us"],
                f"{b['gpu_us']['median'] / res['floor_3pass_us']:.2f}x",
            ),
        )
    judge(
        "llama-7B bf16 active >= 1.25x faster than torch foreach",
        ("llama-7B", "bf16", "active"),
        lambda res, b, t: (
            (b.get("speedup_vs_torch_gpu") or 0) >= 1.25,
            f"{b.get('speedup_vs_torch_gpu') or 0:.2f}x",
        ),
    )
    for wl in ("llama-7B", "llama-1B", "gpt2-124M"):
        for dt in ("fp32", "bf16"):
            judge(
                f"{wl} {dt} inactive GPU <= 1.10x 1-pass floor",
                (wl, dt, "inactive"),
                lambda res, b, t: (
                    b["gpu_us"]["median"] <= 1.10 * res["floor_1pass_us"],
                    f"{b['gpu_us']['median'] / res['floor_1pass_us']:.2f}x, {b.get('speedup_vs_torch_gpu') or 0:.2f}x torch",
                ),
            )
    for dt in ("fp32", "bf16"):
        for regime in ("active", "inactive"):
            judge(
                f"many-small-4k {dt} {regime} wall <= 60 us",
                ("many-small-4k", dt, regime),
                lambda res, b, t: (_t(b, "wall_us") <= 60, f"{_t(b, 'wall_us'):.1f} us"),
            )
    judge(
        "resnet50 bf16 active GPU < 3-pass floor",
        ("resnet50", "bf16", "active"),
        lambda res, b, t: (
            b["gpu_us"]["median"] < res["floor_3pass_us"],
            f"{b['gpu_us']['median'] / res['floor_3pass_us']:.2f}x",
        ),
    )
    launches = [
        (res["workload"], res["dtype"], res["regime"], r["provider"], r.get("launches"))
        for res in doc["results"]
        for r in res["providers"]
        if r["provider"].startswith("gradclip") and r["status"] == "ok"
    ]
    measured = [x for x in launches if x[4] is not None]
    if not measured:
        out.append("NOT MEASURED  one kernel launch per call (no profiler counts)")
    else:
        bad = [x for x in measured if x[4] != 1]
        out.append(
            f"{'MET   ' if not bad else 'MISSED'}        one kernel launch per call: "
            + (
                f"{len(measured)} rows all 1"
                if not bad
                else "; ".join(f"{w} {d} {g} {p}: {n:g}" for w, d, g, p, n in bad[:6])
            )
        )
    return out


def summarize(doc: dict) -> str:
    meta = doc["meta"]
    lines = [
        f"{meta['gpu'] or 'CPU (not the headline)'} | torch {meta['torch']} | commit {meta['commit']} | copy {meta['copy_bandwidth_GBps']:.0f} GB/s"
        + ("" if doc.get("complete", True) else " | INCOMPLETE RUN")
    ]
    lines.append(
        f"{'workload':<14} {'dtype':<5} {'regime':<8} {'torch µs':>9} {'best gradclip':<16} {'µs':>9} {'x torch':>7} {'/1p':>5} {'/3p':>5} {'wall µs':>9} launches"
    )
    for res in doc["results"]:
        best, base = _best(res)
        timer = "gpu_us" if _t(base, "gpu_us") else "wall_us"
        refused = [r["provider"] for r in res["providers"] if r["status"] != "ok"]
        tb, tm = _t(base, timer), _t(best, timer)
        lines.append(
            f"{res['workload']:<14} {res['dtype']:<5} {res['regime']:<8} {tb or float('nan'):9.1f} {(best or {}).get('provider', '-'):<16} "
            f"{tm or float('nan'):9.1f} {(tb / tm) if tb and tm else float('nan'):7.2f} {(tm or float('nan')) / res['floor_1pass_us']:5.2f} "
            f"{(tm or float('nan')) / res['floor_3pass_us']:5.2f} {_t(best, 'wall_us') or float('nan'):9.1f} {(best or {}).get('launches', '-')}"
            + (f"  REFUSED/ERROR: {', '.join(refused)}" if refused else "")
        )
    lines += ["", "targets (issue 6):"] + ["  " + t for t in targets(doc)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0] if argv else "bench/out/bench.json") as f:
        print(summarize(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
