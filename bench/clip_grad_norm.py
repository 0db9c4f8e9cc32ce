"""Benchmark clip_grad_norm_: torch foreach, torch for-loop, torch.compile, each gradclip backend,
apex if importable, against the 1-pass and 3-pass floors measured in the same run.

    python -m gradclip bench                        # anchor workloads on CUDA (quick set on CPU)
    python -m gradclip.bench --model llama-7B --dtype bf16 --regime active
    python -m gradclip.bench --from-module torchvision.models:resnet18 --dtype mixed

Per provider, correctness comes first: on fresh random gradients the provider's norm and clipped
gradients are compared with gradclip's fp64 reference (`backend="reference"`); a provider that
fails is reported as REFUSED and gets no figures. Then, on the timing data (the same seed for
every provider): GPU time (one call captured in a CUDA graph, each replay timed with events:
median, p20, p80), host wall time per call in steady state, kernel launches per call (profiler),
achieved GB/s and the ratios to torch foreach and to the floors.

Regimes. "active": clipping in every timed call. max_norm=1 alone cannot do that: after one clip
the norm sits at max_norm and torch's coefficient max_norm/(norm+1e-6) settles at exactly 1, so
later calls stop rescaling (the harness saw this). Instead the k-th timed call gets
max_norm = n0 * 0.97**(k+1), where n0 is the norm of the timing data: every call clips with a
coefficient of 0.97, and the gradients are restored (re-generated from the seed, untimed, outside
the CUDA events) before each batch or graph replay of at most 256 calls. After timing, the
harness replays 4 calls from restored data and checks the norm came out as n0 * 0.97**4
(`clips_every_call` in the JSON). The gate itself uses max_norm=1 on fresh data.
"inactive": max_norm=1e30, the coefficient clamps to 1, and the gradients must come back
bit-identical (checked in the gate).

Floors: a device-to-device copy of 1 GiB (host memcpy of 256 MiB on CPU) gives the bandwidth B
(bytes read + written); 1-pass floor = grad bytes / B, 3-pass floor = 3 x grad bytes / B.
Achieved GB/s counts the bytes a two-pass implementation must move: 3 x grad bytes when
clipping, 1 x when not (and for norm-only providers).

Buffers are not rotated: the same gradients are clipped on every call, as in the anchors, so a
workload that fits in L2 (resnet50 bf16: 51 MB vs H100's 50 MB) can beat the floors.

CPU runs use host timers only and are not the product's headline: the kernels are GPU kernels.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

import gradclip
from gradclip import reference

from . import providers as prov
from . import report, timing, workloads

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "out")
REGIMES = {"active": 1.0, "inactive": 1e30}  # max_norm of the gate; timing: see the docstring
ACTIVE_RATIO = 0.97  # clip coefficient of every timed call in the active regime
SEQUENCE = 256  # timed calls between two restores
CPU_NOTICE = (
    "NOTE: CPU run. gradclip's kernels are GPU kernels; CPU figures (host timers, the reference "
    "backend) check the harness and are not the product's headline."
)

# Correctness limits, relative to gradclip's fp64 reference: |norm - ref| / ref and
# ||grads - ref|| / ||ref||. gradclip accumulates in fp32 at least and never rounds a norm to the
# gradient dtype; torch's foreach norm rounds per-tensor norms to bf16, hence its looser limit.
NORM_LIMIT = {"gradclip": 1e-5, "torch": {torch.float32: 1e-4, torch.bfloat16: 2e-2}}
GRAD_LIMIT = {
    "gradclip": {torch.float32: 1e-5, torch.bfloat16: 5e-3},
    "torch": {torch.float32: 1e-4, torch.bfloat16: 2e-2},
}
REAL_DATA_NORM_LIMIT = 1e-4  # first timed call on the full workload: a sanity check, not the gate
GATE_MAX_BYTES = {"cuda": 2 << 30, "cpu": 256 << 20}  # above this the gate runs on workloads.sample


@dataclass
class Config:
    device: torch.device
    workloads: list[workloads.Workload]
    dtypes: list[str]
    regimes: list[str]
    backends: list[str] | None
    compile_for: set[str]
    budget_s: float
    seed: int
    out: str | None
    extra_providers: list[prov.Provider] = field(default_factory=list)
    only_providers: list[str] | None = None
    quiet: bool = False


_T0 = time.perf_counter()


def progress(cfg: Config, msg: str) -> None:
    """A progress line on stderr (long runs), with the seconds since the harness was imported."""
    if not cfg.quiet:
        print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = float(b.abs())
    return float((a - b).abs()) / denom if denom else float((a - b).abs())


def _grads_rel(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(
        float(torch.linalg.vector_norm(o.double() - r.double()) ** 2) for o, r in zip(out, ref, strict=True)
    )
    den = sum(float(torch.linalg.vector_norm(r.double()) ** 2) for r in ref)
    return math.sqrt(num / den) if den else math.sqrt(num)


def _worst_dtype(params) -> torch.dtype:
    return torch.bfloat16 if any(p.grad.dtype == torch.bfloat16 for p in params) else torch.float32


def gate(provider: prov.Provider, call, params, max_norm: float, seed: int, device) -> dict:
    """Run `call` once on fresh random gradients (from `seed`) and compare with the reference.

    Norms within NORM_LIMIT; clipped gradients within GRAD_LIMIT; gradients that must not change
    (coefficient clamped to 1, or a norm-only provider) bit-identical. NaN never passes.
    """
    workloads.randomize(params, seed)
    expected = [p.grad.clone() for p in params]
    ref_norm = reference.clip_grad_norm_(expected, max_norm, 2.0)
    if provider.norm_only:
        expected = [p.grad.clone() for p in params]
    out_norm, first_call_s = prov.timed_call(call, lambda: timing.sync(device))
    dtype = _worst_dtype(params)
    norm_err = _rel(out_norm.detach().reshape(()), ref_norm)
    norm_limit = NORM_LIMIT["torch"][dtype] if provider.is_baseline else NORM_LIMIT["gradclip"]
    clipped = bool(reference.clip_coefficient(max_norm, ref_norm) < 1) and not provider.norm_only
    grads = [p.grad for p in params]
    errors = []
    if not norm_err <= norm_limit:
        errors.append(f"norm off by {norm_err:.2e} relative (limit {norm_limit:.0e})")
    if clipped:
        grad_err = _grads_rel(grads, expected)
        grad_limit = GRAD_LIMIT["torch" if provider.is_baseline else "gradclip"][dtype]
        if not grad_err <= grad_limit:
            errors.append(f"clipped grads off by {grad_err:.2e} relative (limit {grad_limit:.0e})")
    else:
        grad_err = 0.0 if all(torch.equal(g, e) for g, e in zip(grads, expected, strict=True)) else math.nan
        if grad_err != 0.0:
            errors.append("gradients changed although no clipping was needed")
    del expected
    return {
        "ok": not errors,
        "errors": errors,
        "norm_rel_err": norm_err,
        "grad_rel_err": grad_err,
        "first_call_s": first_call_s,
    }


def max_norms(regime: str, n0: float) -> list[float]:
    """The timed sequence: coefficient ACTIVE_RATIO in every call, or a bound that never clips."""
    if regime == "inactive":
        return [REGIMES["inactive"]] * SEQUENCE
    return [n0 * ACTIVE_RATIO ** (k + 1) for k in range(SEQUENCE)]


def clips_every_call(calls, params, restore, n0: float) -> tuple[bool, float]:
    """Replay 4 calls from restored data; (True, err) when the norm came out as n0 * ratio**4."""
    restore()
    for call in calls[:4]:
        call()
    total = float(reference.total_norm([p.grad for p in params], 2.0))
    err = abs(total / (n0 * ACTIVE_RATIO**4) - 1)
    return err < 1e-3, err


def bench_provider(
    cfg: Config, provider: prov.Provider, wl, dtype_name, regime, params, gate_params, ref
) -> dict:
    """Gate, then time one provider on one (workload, dtype, regime). Never raises."""
    row: dict = {"provider": provider.name, "status": "ok", "notes": list(provider.notes)}
    device = cfg.device
    n0 = float(ref)
    try:
        gate_call = provider.make(gate_params, [REGIMES[regime]])[0]
        checked = gate(
            provider, gate_call, gate_params, REGIMES[regime], cfg.seed + 1000 + len(provider.name), device
        )
        checked["checked_on"] = (
            "full workload" if gate_params is params else "capped sample (same count/dtypes)"
        )
        row["correctness"] = checked
        if provider.compiled:
            row["compile_s"] = checked["first_call_s"]
        if not checked["ok"]:
            row["status"] = "refused"
            row["reason"] = "; ".join(checked["errors"])
            return row
        calls = provider.make(params, max_norms(regime, n0))
        restore = (lambda: workloads.randomize(params, cfg.seed)) if regime == "active" else None
        workloads.randomize(params, cfg.seed)
        out_norm, first_s = prov.timed_call(calls[0], lambda: timing.sync(device))
        if provider.compiled and gate_params is not params:
            row["compile_s"] = first_s
        real_err = _rel(out_norm.detach().reshape(()), ref)
        row["correctness"]["timing_data_norm_rel_err"] = real_err
        limit = NORM_LIMIT["torch"][_worst_dtype(params)] if provider.is_baseline else REAL_DATA_NORM_LIMIT
        if not real_err <= limit:
            row["status"] = "refused"
            row["reason"] = f"norm on the timing data off by {real_err:.2e} relative (limit {limit:.0e})"
            return row
        row["wall_us"] = timing.wall_us(calls, device, cfg.budget_s, restore).as_dict()
        if device.type == "cuda":
            try:
                row["gpu_us"] = timing.graph_us(calls, device, cfg.budget_s, restore).as_dict()
            except Exception as exc:  # noqa: BLE001 (a provider that cannot be captured still gets wall time)
                row["gpu_us"] = None
                row["notes"].append(f"no CUDA-graph time: {type(exc).__name__}: {str(exc)[:200]}")
            row["launches"] = timing.launches_per_call(calls, device, restore)
        if regime == "active" and not provider.norm_only:
            ok, err = clips_every_call(calls, params, restore, n0)
            row["clips_every_call"] = ok
            if not ok:
                row["notes"].append(f"did not clip by {ACTIVE_RATIO} per call (norm off by {err:.1e})")
    except Exception as exc:  # noqa: BLE001 (one broken provider must not stop the run)
        row["status"] = "error"
        row["reason"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        timing.sync(device)
    return row


def _derive(rows: list[dict], nbytes: int, regime: str, bandwidth: float, device) -> None:
    """Add achieved GB/s, ratios to torch foreach and to the floors (in place)."""
    floor1 = nbytes / bandwidth * 1e6
    key = "gpu_us" if device.type == "cuda" else "wall_us"
    base = next((r for r in rows if r["provider"] == "torch foreach" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            continue
        t = (r.get(key) or {}).get("median")
        passes = 1 if (regime == "inactive" or "norm only" in r["provider"]) else 3
        if t:
            r["gbps"] = passes * nbytes / (t * 1e-6) / 1e9
            r["vs_floor_1pass"] = t / floor1
            r["vs_floor_3pass"] = t / (3 * floor1)
        for timer in ("gpu_us", "wall_us"):
            mine, theirs = (r.get(timer) or {}).get("median"), ((base or {}).get(timer) or {}).get("median")
            if mine and theirs:
                r[f"speedup_vs_torch_{timer[:-3]}"] = theirs / mine


def run(cfg: Config) -> dict:
    """Run the whole benchmark; returns the JSON-ready result (also written under cfg.out)."""
    device = cfg.device
    all_providers, skipped = prov.providers(device, cfg.backends, with_compile=bool(cfg.compile_for))
    all_providers += cfg.extra_providers
    if cfg.only_providers:
        all_providers = [
            p for p in all_providers if p.name in cfg.only_providers or p.name == "torch foreach"
        ]
    copy_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    if not cfg.quiet and device.type == "cpu":
        print(CPU_NOTICE, flush=True)
    progress(cfg, f"measuring copy bandwidth ({copy_bytes >> 20} MiB, {device})")
    bandwidth = timing.copy_bandwidth(device, copy_bytes)
    progress(cfg, f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    results: list[dict] = []
    doc = {
        "meta": metadata(device, bandwidth),
        "skipped_providers": skipped,
        "compile_for": sorted(cfg.compile_for),
        "complete": False,  # the JSON is rewritten after every block, so a killed run keeps its results
        "results": results,
    }
    for wl in cfg.workloads:
        for dtype_name in cfg.dtypes:
            params = workloads.make_params(wl, dtype_name, device)
            nbytes = workloads.grad_bytes(wl, dtype_name)
            fits = nbytes <= GATE_MAX_BYTES.get(device.type, GATE_MAX_BYTES["cuda"])
            gate_params = params if fits else workloads.make_params(workloads.sample(wl), dtype_name, device)
            workloads.randomize(params, cfg.seed)
            ref = reference.total_norm([p.grad for p in params], 2.0)
            for regime in cfg.regimes:
                rows = []
                for p in all_providers:
                    if p.compiled and wl.name not in cfg.compile_for:
                        continue
                    progress(cfg, f"{wl.name} {dtype_name} {regime}: {p.name}")
                    rows.append(bench_provider(cfg, p, wl, dtype_name, regime, params, gate_params, ref))
                _derive(rows, nbytes, regime, bandwidth, device)
                floor1 = nbytes / bandwidth * 1e6
                results.append(
                    {
                        "workload": wl.name,
                        "dtype": dtype_name,
                        "regime": regime,
                        "bound": "max_norm=1e30, coefficient 1"
                        if regime == "inactive"
                        else f"max_norm = norm x {ACTIVE_RATIO} every call",
                        "tensors": wl.tensors,
                        "elements": wl.elements,
                        "grad_bytes": nbytes,
                        "floor_1pass_us": floor1,
                        "floor_3pass_us": 3 * floor1,
                        "providers": rows,
                    }
                )
                _write_json(cfg, doc)
            del params, gate_params
            prov.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    doc["complete"] = True
    _write_json(cfg, doc)
    if cfg.out:
        chart = report.chart(doc, os.path.join(cfg.out, "bench.png"))
        if chart:
            doc["meta"]["chart"] = chart
    return doc


def _write_json(cfg: Config, doc: dict) -> None:
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        tmp = os.path.join(cfg.out, "bench.json.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(tmp, os.path.join(cfg.out, "bench.json"))


def _git_commit() -> str:
    try:
        root = os.path.dirname(HERE)
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return "unknown (not a git checkout)"
        return commit.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def metadata(device: torch.device, bandwidth: float) -> dict:
    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "gradclip": gradclip.__version__,
        "commit": _git_commit(),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "argv": sys.argv,
        "headline": device.type == "cuda",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu"] = props.name
        meta["sms"] = props.multi_processor_count
        meta["l2_MB"] = getattr(props, "L2_cache_size", 0) / 1e6
        meta["driver"] = _nvidia_smi_driver()
    else:
        meta["note"] = CPU_NOTICE
    return meta


def _nvidia_smi_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m gradclip bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        action="append",
        default=[],
        help=f"workload (repeat or comma list): {', '.join(workloads.names())}, or 'anchors'",
    )
    ap.add_argument(
        "--from-module",
        action="append",
        default=[],
        metavar="PKG.MOD:FACTORY",
        help="a model factory, built on the meta device; its parameter shapes become a workload",
    )
    ap.add_argument(
        "--dtype",
        default="fp32,bf16",
        help="comma list of fp32, bf16, mixed (alternating fp32/bf16 tensors); default fp32,bf16",
    )
    ap.add_argument(
        "--regime",
        default="both",
        choices=["active", "inactive", "both"],
        help="clipping active (max_norm=1) or not needed (max_norm=1e30)",
    )
    ap.add_argument(
        "--backend",
        default=None,
        help="comma list of gradclip backends to time (default: the kernel backends available; reference on CPU)",
    )
    ap.add_argument(
        "--providers",
        default=None,
        help="comma list of provider names to keep (torch foreach is always kept)",
    )
    ap.add_argument(
        "--compile",
        default="auto",
        help="workloads to run torch.compile on: auto (CUDA: workloads up to 200 tensors and 1 GB; CPU: none), all, none, or a comma list",
    )
    ap.add_argument("--no-compile", action="store_true", help="same as --compile none")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small workloads, fp32 only, short timers (the default on CPU when no --model is given)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per timer per provider (default 0.3 on CUDA, 0.5 on CPU, 0.1 with --quick)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"folder for bench.json, bench.png and table.txt (default {DEFAULT_OUT}); '' for none",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    names = [n for m in args.model for n in m.split(",") if n]
    quick = args.quick or (device.type == "cpu" and not names and not args.from_module)
    if "anchors" in names:
        names = [n for n in names if n != "anchors"] + list(workloads.ANCHORS)
    if not names and not args.from_module:
        names = list(workloads.QUICK if quick else workloads.ANCHORS)
    wls = [workloads.named(n) for n in names] + [workloads.from_module(s) for s in args.from_module]
    dtypes = [d for d in args.dtype.split(",") if d]
    if quick and args.dtype == "fp32,bf16":
        dtypes = ["fp32"]
    for d in dtypes:
        if d not in workloads.DTYPES:
            raise SystemExit(f"--dtype {d!r}: choose from {', '.join(workloads.DTYPES)}")
    regimes = ["active", "inactive"] if args.regime == "both" else [args.regime]
    which = "none" if args.no_compile else args.compile
    if which == "auto":
        compile_for = {
            w.name for w in wls if device.type == "cuda" and w.tensors <= 200 and w.elements * 4 <= (1 << 30)
        }
    elif which == "all":
        compile_for = {w.name for w in wls}
    elif which == "none":
        compile_for = set()
    else:
        compile_for = set(which.split(","))
    budget = args.budget or (0.1 if quick else 0.3 if device.type == "cuda" else 0.5)
    cfg = Config(
        device=device,
        workloads=wls,
        dtypes=dtypes,
        regimes=regimes,
        backends=args.backend.split(",") if args.backend else None,
        compile_for=compile_for,
        budget_s=budget,
        seed=args.seed,
        out=args.out or None,
        only_providers=args.providers.split(",") if args.providers else None,
        quiet=args.quiet,
    )
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    """`python -m gradclip bench [options]`: 0 when every provider passed its gate, else 1."""
    cfg, _ = parse_args(argv)
    doc = run(cfg)
    text = report.table(doc)
    print(text)
    if cfg.out:
        with open(os.path.join(cfg.out, "table.txt"), "w") as f:
            f.write(text + "\n")
        print(
            f"wrote {os.path.join(cfg.out, 'bench.json')}, table.txt"
            + (", bench.png" if doc["meta"].get("chart") else "")
        )
    bad = [r for res in doc["results"] for r in res["providers"] if r["status"] != "ok"]
    return 1 if bad else 0
