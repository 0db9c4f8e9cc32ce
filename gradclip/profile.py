"""`python -m gradclip profile`: what does clipping cost in a training step, and what would gradclip save?

Trains a model for a few steps with three clipping providers in the same run, interleaved step by
step (so machine noise hits all of them alike), each on its own copy of the same initial model:

    torch      torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    gradclip   gradclip.Clipper(model.named_parameters(), max_norm).clip_()
    telemetry  the same Clipper with per_param_norms=True and history (what the report needs)

It prints the median time of each phase (forward+backward, clip, optimizer step) and the clip's
share of the step, then runs a few more steps under torch.profiler and reports, per provider,
the ops dispatched inside the clip region (and on a GPU the kernel launches), writes the trace
(Chrome/Perfetto JSON), and the telemetry Clipper's report and plot.

The model is a built-in one (no download) or `--from-module pkg.mod:factory`, where
`factory()` returns `(model, loss_fn)` and `loss_fn(model, step) -> Tensor` gives the scalar loss
of one step (its data included). Figures from a shared or loaded machine are indicative only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradclip

PROVIDERS = ("torch", "gradclip", "telemetry")
LAUNCH_NAMES = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
)


class TinyGPT(nn.Module):
    """A GPT-shaped model small enough for a CPU: token + position embeddings, pre-norm blocks."""

    def __init__(
        self, vocab: int = 256, dim: int = 64, layers: int = 2, heads: int = 4, context: int = 32
    ) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        block = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        x = self.tok(tokens) + self.pos(torch.arange(n, device=tokens.device))
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def tiny_gpt(batch: int = 8, device: str | torch.device = "cpu") -> tuple[nn.Module, Callable]:
    """The built-in model: TinyGPT on random tokens (next-token loss), data seeded by the step."""
    torch.manual_seed(0)
    model = TinyGPT().to(device)

    def loss_fn(m: nn.Module, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 256, (batch, m.context + 1), generator=g).to(device)
        logits = m(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    return model, loss_fn


def load_factory(spec: str) -> Callable[[], tuple[nn.Module, Callable]]:
    """`pkg.mod:factory` -> the factory, with errors that say what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"--from-module expects 'pkg.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"--from-module: cannot import {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SystemExit(f"--from-module: {module_name!r} has no callable {attr!r}")
    return factory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One provider: its model copy, optimizer and clip call."""

    def __init__(self, name: str, model: nn.Module, args, history: int) -> None:
        self.name, self.model = name, model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        self.clipper = None
        if name == "torch":
            params = list(model.parameters())
            self.clip = lambda: torch.nn.utils.clip_grad_norm_(params, args.max_norm)
        else:
            telemetry = name == "telemetry"
            self.clipper = gradclip.Clipper(
                model.named_parameters(),
                max_norm=args.max_norm,
                per_param_norms=telemetry,
                history=history if telemetry else 0,
                backend=args.backend,
            )
            self.clip = self.clipper.clip_
        self.times: dict[str, list[float]] = {"forward+backward": [], "clip": [], "optimizer": [], "step": []}


def _step(run: Run, loss_fn: Callable, step: int, device: torch.device, record: bool) -> None:
    _sync(device)
    t0 = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    loss_fn(run.model, step).backward()
    _sync(device)
    t1 = time.perf_counter()
    # the region only while profiling: record_function costs ~6 us, which would bias the timing
    with torch.profiler.record_function(f"clip/{run.name}") if not record else contextlib.nullcontext():
        run.clip()
    _sync(device)
    t2 = time.perf_counter()
    run.optimizer.step()
    _sync(device)
    t3 = time.perf_counter()
    if record:
        for key, value in zip(run.times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            run.times[key].append(value)


def _region_counts(prof, name: str) -> dict[str, float]:
    """Ops dispatched and kernel launches inside each `clip/<name>` region, averaged per step."""
    regions = [e for e in prof.events() if e.name == name and e.device_type == torch.autograd.DeviceType.CPU]
    ops = launches = 0
    for region in regions:
        stack = list(region.cpu_children)
        while stack:
            e = stack.pop()
            stack.extend(e.cpu_children)
            if e.name in LAUNCH_NAMES:
                launches += 1
            elif "::" in e.name:
                ops += 1
    n = max(1, len(regions))
    return {"ops_per_clip": ops / n, "kernel_launches_per_clip": launches / n, "regions": len(regions)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradclip profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-module", help="pkg.mod:factory returning (model, loss_fn(model, step))")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per provider")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--profile-steps", type=int, default=2, help="steps per provider under torch.profiler"
    )
    parser.add_argument("--batch", type=int, default=8, help="batch of the built-in model")
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", default="profile_out", help="folder for trace.json, report.txt, clipper.png, profile.json"
    )
    args = parser.parse_args(argv)
    for name in ("steps", "profile_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))  # small models: more threads only contend
    if args.from_module:
        model, loss_fn = load_factory(args.from_module)()
        model = model.to(device)
        label = args.from_module
    else:
        model, loss_fn = tiny_gpt(args.batch, device)
        label = f"built-in TinyGPT (batch {args.batch})"
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters())
    total_steps = args.warmup + args.steps + args.profile_steps
    runs = [Run(name, copy.deepcopy(model), args, history=total_steps) for name in PROVIDERS]
    print(
        f"gradclip profile: {label}, {n_tensors} tensors / {n_params / 1e6:.2f} M parameters on {device}; "
        f"max_norm {args.max_norm}; {args.warmup} warm-up + {args.steps} timed steps per provider, interleaved"
    )
    for step in range(args.warmup + args.steps):
        for run in runs:
            _step(run, loss_fn, step, device, record=step >= args.warmup)

    rows = {}
    print(
        f"{'provider':<10} {'fwd+bwd ms':>11} {'clip ms':>9} {'optim ms':>9} {'step ms':>9} {'clip share':>11}"
    )
    for run in runs:
        med = {k: 1e3 * statistics.median(v) for k, v in run.times.items()}
        share = med["clip"] / med["step"]
        rows[run.name] = {**{f"{k}_ms": v for k, v in med.items()}, "clip_share": share}
        print(
            f"{run.name:<10} {med['forward+backward']:>11.3f} {med['clip']:>9.3f} {med['optimizer']:>9.3f} "
            f"{med['step']:>9.3f} {100 * share:>10.1f}%"
        )
    base = rows["torch"]["clip_ms"]
    for name in ("gradclip", "telemetry"):
        rows[name]["clip_speedup_vs_torch"] = base / rows[name]["clip_ms"]
    print(
        f"clip time vs torch: gradclip {rows['gradclip']['clip_speedup_vs_torch']:.2f}x, "
        f"telemetry (per-param norms + history) {rows['telemetry']['clip_speedup_vs_torch']:.2f}x faster "
        "(> 1 is faster; medians of this run)"
    )

    os.makedirs(args.out, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for step in range(args.warmup + args.steps, total_steps):
            for run in runs:
                _step(run, loss_fn, step, device, record=False)
    trace = os.path.join(args.out, "trace.json")
    prof.export_chrome_trace(trace)
    what = "kernel launches" if device.type == "cuda" else "ops (no kernels on CPU)"
    print(f"under torch.profiler ({args.profile_steps} steps each), per clip: {what}")
    for run in runs:
        counts = _region_counts(prof, f"clip/{run.name}")
        rows[run.name].update(counts)
        extra = f", {counts['kernel_launches_per_clip']:.0f} kernel launches" if device.type == "cuda" else ""
        print(f"  {run.name:<10} {counts['ops_per_clip']:.0f} ops dispatched{extra}")
    print(f"wrote {trace} (open in https://ui.perfetto.dev or chrome://tracing; regions clip/<provider>)")

    clipper = runs[-1].clipper
    report = clipper.report()
    report_path = os.path.join(args.out, "report.txt")
    with open(report_path, "w") as f:
        f.write(report + "\n")
    print(report)
    print(f"wrote {report_path}")
    try:
        print(f"wrote {clipper.plot(os.path.join(args.out, 'clipper.png'))}")
    except ImportError as exc:
        print(f"no plot: {exc}")
    summary = {
        "model": label,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "gradclip": gradclip.__version__,
        "tensors": n_tensors,
        "parameters": n_params,
        "steps": args.steps,
        "providers": rows,
    }
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 0
