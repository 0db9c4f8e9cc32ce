"""The first thing to run: `make demo` (or `python -m gradclip demo`).

Trains a small LSTM on the adding problem (sum the two marked numbers of a long random sequence,
a classic exploding-gradient task) at a learning rate where unclipped training blows up, three
times from the same initial weights: without clipping, with torch's clip_grad_norm_, and with
gradclip's. Prints a table per run and writes a PNG of loss and gradient norm per step.
Needs no download; runs on the GPU when there is one, else on 2 CPU cores in well under 2 minutes.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn

import gradclip


class AddingModel(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=2, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1]).squeeze(-1)


def adding_batch(
    batch: int, length: int, generator: torch.Generator, device
) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.rand(batch, length, generator=generator)
    marks = torch.zeros(batch, length)
    first = torch.randint(0, length // 2, (batch,), generator=generator)
    second = torch.randint(length // 2, length, (batch,), generator=generator)
    rows = torch.arange(batch)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    return torch.stack([values, marks], dim=-1).to(device), target.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(clip: str, args, device: torch.device) -> dict:
    """One run; clip is "none", "torch" or "gradclip". Same seed, so the same init and data."""
    torch.manual_seed(args.seed)
    model = AddingModel(args.hidden).to(device)
    optimizer = (
        torch.optim.Adam(model.parameters(), lr=args.lr)
        if args.optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    clip_fn = {"torch": torch.nn.utils.clip_grad_norm_, "gradclip": gradclip.clip_grad_norm_}.get(clip)
    losses, norms, clip_seconds, nonfinite = [], [], 0.0, 0
    for _ in range(args.steps):
        x, y = adding_batch(args.batch, args.length, generator, device)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_fn is None:
            norm = gradclip.get_total_norm([p.grad for p in model.parameters()])  # logged, not timed
        else:
            _sync(device)
            start = time.perf_counter()
            norm = clip_fn(model.parameters(), args.max_norm)
            _sync(device)
            clip_seconds += time.perf_counter() - start
        optimizer.step()
        loss_value, norm_value = loss.item(), norm.item()
        nonfinite += not (math.isfinite(loss_value) and math.isfinite(norm_value))
        losses.append(loss_value)
        norms.append(norm_value)
    finite_norms = [n for n in norms if math.isfinite(n)]
    return {
        "clip": clip,
        "losses": losses,
        "norms": norms,
        "final_loss": sum(losses[-20:]) / 20,
        "max_norm": max(finite_norms) if finite_norms else math.nan,
        "nonfinite_steps": nonfinite,
        "clip_ms_per_step": 1e3 * clip_seconds / args.steps,
    }


def print_table(runs: list[dict]) -> None:
    print(
        f"{'clipping':<10} {'final loss':>11} {'max grad norm':>14} {'non-finite steps':>17} {'clip ms/step':>13}"
    )
    for r in runs:
        print(
            f"{r['clip']:<10} {r['final_loss']:>11.4g} {r['max_norm']:>14.4g} {r['nonfinite_steps']:>17d} "
            f"{r['clip_ms_per_step']:>13.3f}"
        )


def plot(runs: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for r in runs:
        ax_loss.plot(r["losses"], label=r["clip"], alpha=0.8)
        ax_norm.plot(r["norms"], label=r["clip"], alpha=0.8)
    ax_loss.set(yscale="log", ylabel="training loss (MSE)", title="LSTM on the adding problem")
    ax_norm.set(yscale="log", ylabel="gradient norm (before clipping)", xlabel="step")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- Telemetry view (issue 14): which layer explodes, and when ------------------------------------


def explosion_view(args, device: torch.device, steps: int, out_dir: str) -> dict:
    """Re-run the first `steps` of the unclipped training with a Clipper that only measures
    (per-parameter norms and history, gradients untouched), then print the per-layer norms
    around the step where the norm explodes, the Clipper's report, and write its plot."""
    torch.manual_seed(args.seed)
    model = AddingModel(args.hidden).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed + 1)
    clipper = gradclip.Clipper(
        model.named_parameters(), max_norm=args.max_norm, per_param_norms=True, history=steps
    )
    for _ in range(steps):
        x, y = adding_batch(args.batch, args.length, generator, device)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clipper.measure()  # no host sync, no clipping: the unclipped run, observed
        optimizer.step()
    snap = clipper.history.snapshot()  # the one read of the whole history
    norms = snap["norm"]
    first_nonfinite = next((i for i, n in enumerate(norms) if not math.isfinite(n)), None)
    # the explosion: the first step whose norm is 100x the first step's (or the first non-finite one)
    explode = next((i for i, n in enumerate(norms) if not (n < 100 * norms[0])), None)
    print(f"\nTelemetry of the unclipped run (gradclip.Clipper, per-parameter norms, first {steps} steps):")
    if explode is None:
        print(f"  the norm stayed below 100x its first value for {steps} steps: no explosion to show")
        return {"explode_step": None, "first_nonfinite": None}
    shown = list(range(max(0, explode - 2), min(len(norms), explode + 4)))
    if first_nonfinite is not None and first_nonfinite not in shown:
        shown += [first_nonfinite]
    width = max(len(n) for n in clipper.names) + 2
    print(f"  {'step':<{width}}" + "".join(f"{s:>10d}" for s in shown))
    print(f"  {'total':<{width}}" + "".join(f"{norms[s]:>10.3g}" for s in shown))
    for j, name in enumerate(clipper.names):
        print(f"  {name:<{width}}" + "".join(f"{snap['per_param'][s][j]:>10.3g}" for s in shown))
    row = snap["per_param"][explode]
    culprit = clipper.names[max(range(len(row)), key=lambda j: row[j] if math.isfinite(row[j]) else math.inf)]
    print(
        f"  the norm explodes at step {explode} (max_norm {args.max_norm} would have clipped it), "
        f"led by {culprit}"
        + (f"; it is non-finite from step {first_nonfinite}" if first_nonfinite is not None else "")
    )
    print("\n" + clipper.report(top=3))
    try:
        path = clipper.plot(os.path.join(out_dir, "telemetry.png"))
        print(f"wrote {path}")
    except ImportError as exc:
        print(f"no telemetry plot: {exc}")
    return {"explode_step": explode, "first_nonfinite": first_nonfinite, "culprit": culprit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradclip demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=10, help="sequence length")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.2, help="high enough that unclipped training blows up")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--momentum", type=float, default=0.5)
    parser.add_argument("--max-norm", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="demo_out", help="folder for the PNG")
    parser.add_argument(
        "--telemetry-steps",
        type=int,
        default=40,
        help="steps of the per-layer view of the unclipped run (0: skip)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(
        f"Adding problem, length {args.length}, LSTM hidden {args.hidden}, SGD lr {args.lr}, "
        f"{args.steps} steps on {device}; gradclip backend: {gradclip.backends.requested('auto')}"
    )
    runs = []
    for clip in ("none", "torch", "gradclip"):
        start = time.perf_counter()
        runs.append(train(clip, args, device))
        print(f"  trained with clipping={clip:<8} in {time.perf_counter() - start:.1f} s")
    print_table(runs)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "demo.png")
    if plot(runs, path):
        print(f"wrote {path}")
    if args.telemetry_steps > 0:
        explosion_view(args, device, args.telemetry_steps, args.out)
    return 0
