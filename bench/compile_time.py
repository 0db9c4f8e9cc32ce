"""Compile time that clipping adds to a compiled training step (issue 7: target <= 2 s).

Each measurement runs in a fresh child process with an empty Inductor cache directory and the
FX/AOT caches off, so every number is a cold compile: the time of the first call of
`torch.compile(step, fullgraph=True)` minus the time of an eager call of the same step. Providers:

    none        the step without clipping (SGD update of every parameter, under no_grad)
    gradclip    gradclip.clip_grad_norm_ then the update
    torch       torch.nn.utils.clip_grad_norm_ (foreach) then the update

    python bench/compile_time.py [--device cpu|cuda] [--layers 4] [--width 256] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

PROVIDERS = ("none", "gradclip", "torch")


def _child(provider: str, device: str, layers: int, width: int) -> float:
    """One cold compile of the step; returns seconds (first compiled call minus one eager call)."""
    import time

    import torch

    import gradclip

    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch.manual_seed(0)
    blocks = [
        torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.LayerNorm(width)) for _ in range(layers)
    ]
    model = torch.nn.Sequential(*blocks).to(device)
    params = list(model.parameters())
    model(torch.randn(8, width, device=device)).sum().backward()

    def step():
        norm = None
        if provider == "gradclip":
            norm = gradclip.clip_grad_norm_(params, 1.0)
        elif provider == "torch":
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-1e-3)
        return norm

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # warm eager (lazy imports, allocator)
    eager = timed(step)
    compiled = torch.compile(step, fullgraph=True)
    return timed(compiled) - eager


def _measure(provider: str, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        cmd = [sys.executable, __file__, "--child", provider, "--device", args.device]
        cmd += ["--layers", str(args.layers), "--width", str(args.width)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(_child(args.child, args.device, args.layers, args.width))
        return

    import torch

    seconds = {p: [_measure(p, args) for _ in range(args.repeats)] for p in PROVIDERS}
    median = {p: statistics.median(s) for p, s in seconds.items()}
    print(
        f"compile time of a fullgraph step ({args.layers} x Linear({args.width})+LayerNorm, "
        f"{2 * args.layers * 2} params, {args.device}, torch {torch.__version__}, median of {args.repeats})"
    )
    print(f"{'provider':10} {'compile s':>10} {'added s':>8}   runs")
    for p in PROVIDERS:
        runs = " ".join(f"{s:.2f}" for s in seconds[p])
        print(f"{p:10} {median[p]:10.2f} {median[p] - median['none']:8.2f}   {runs}")
    added = median["gradclip"] - median["none"]
    print(f"gradclip adds {added:.2f} s (target <= 2 s): {'OK' if added <= 2.0 else 'OVER'}")
    if args.json:
        result = {
            "device": args.device,
            "torch": torch.__version__,
            "layers": args.layers,
            "width": args.width,
            "seconds": seconds,
            "median": median,
            "gradclip_added_s": added,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
