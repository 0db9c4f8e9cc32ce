"""Host (CPU) overhead per call of the Python path, for many small tensors: where the time goes.

    python -m gradclip.bench.host_overhead [--tensors 2000]

Times, per call, on the host only: gathering `.grad`, validation, the backend plan, the whole
`gradclip.clip_grad_norm_` with the reference backend, torch's `clip_grad_norm_`, and (when triton
imports) the Triton backend's table-cache lookup. CPU tensors, so no kernel time is included in the
parts; medians of repeated batches. On a GPU machine the same parts run unchanged before the launch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradclip
from gradclip import routing


def per_call_us(fn, calls: int = 20, repeats: int = 5) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--numel", type=int, default=4096)
    args = parser.parse_args(argv)
    params = [torch.nn.Parameter(torch.zeros(args.numel)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn(args.numel)
    grads = routing.grads_of(params)
    rows = [
        ("gather .grad", lambda: routing.grads_of(params)),
        ("validate", lambda: routing.check_grads(grads)),
        ("plan (backend per device/dtype)", lambda: routing.plan(grads, 2.0, "auto")),
        ("gradclip.clip_grad_norm_ (reference, whole call)", lambda: gradclip.clip_grad_norm_(params, 1e30)),
        ("torch clip_grad_norm_ (whole call)", lambda: torch.nn.utils.clip_grad_norm_(params, 1e30)),
    ]
    try:
        from gradclip import triton_backend

        rows.append(("triton table-cache lookup (key + hit)", lambda: triton_backend._table(grads)))
    except ImportError as exc:
        print(f"(triton backend not importable: {exc})")
    print(f"host overhead per call, {args.tensors} tensors of {args.numel} elements, CPU tensors")
    for name, fn in rows:
        print(f"  {name:<50} {per_call_us(fn):>10.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
