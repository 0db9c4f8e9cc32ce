"""Every gradclip kernel op, once per kernel backend, on small gradients, checked against the
reference: the workload `compute-sanitizer` runs in bench/gpu_check.sh.

    compute-sanitizer --tool memcheck python bench/sanitize.py
    python bench/sanitize.py --device cpu      # rehearsal: the Triton ops under TRITON_INTERPRET=1

It calls the backend ops themselves (`torch.ops.gradclip.{cuda,triton}_*`), not the public API
(which takes parameters and reads `.grad`; review fix: plain tensors have none, so nothing ran),
and proves each kernel ran:
- cuda: the op has a kernel for the CUDA dispatch key (the C++ ops have no fallback: calling one
  launches its kernel or raises);
- triton: the gradients have a cached tensor table (the kernel path, not the reference fallback),
  and the norm kernels overwrite partial slots poisoned with NaN first; on a GPU the fused launch
  also flips bit 31 of its barrier counter.
Covers mixed dtypes, sizes 1/3/127/vector-width+1, a misaligned (offset) view, a tensor larger
than one chunk, more tensors than the CUDA backend's inline table, both clipping regimes, p = 1, 2, inf.
Exit status: 0 all ran and matched; 1 a mismatch; 2 a kernel meant to be checked did not run (or
no kernel backend is available); 3 no CUDA device (without --device cpu).
"""

from __future__ import annotations

import argparse
import math
import os
import sys


def grads(device, many: bool = False):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    out = []
    sizes = (1, 3, 127, 9, 4096, 3 << 16, 5) if device.type == "cuda" else (1, 3, 127, 9, 4096 + 3, 5)
    for i, n in enumerate(sizes):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        out.append(torch.randn(n, generator=gen).to(dtype).to(device))
    base = torch.randn(1001, generator=gen).to(device)
    out.append(base[1:])  # misaligned start
    if many:  # past the CUDA backend's inline table (1,024 tensors): the cached device table
        out += [torch.randn(3, generator=gen).to(device) for _ in range(1100)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    from gradclip import backends, reference

    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize.py: no CUDA device")
        return 3
    device = torch.device(args.device)
    ops = torch.ops.gradclip
    ran, failures, not_run = [], [], []

    def close(a, b, rtol):
        return torch.allclose(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=1e-6, equal_nan=True)

    for backend in ("cuda", "triton"):
        why = backends.why_unavailable(backend, device.type)
        if why:
            print(f"{backend}: skipped ({why})")
            continue
        tb = None
        if backend == "triton":
            from gradclip import triton_backend as tb
        elif not torch._C._dispatch_has_kernel_for_dispatch_key("gradclip::cuda_total_norm", "CUDA"):
            not_run.append("cuda: gradclip::cuda_total_norm has no CUDA kernel")
            continue

        def op(name, _backend=backend):
            return getattr(ops, f"{_backend}_{name}")

        def evidence(gs, what, fused, _tb=tb, _backend=backend):
            """For triton: (entry, poisoned) before the call; check() after proves the kernel ran."""
            if _tb is None:
                return lambda: None
            entry = _tb._table(gs)
            if entry is None:
                not_run.append(f"{_backend} {what}: no tensor table (the reference fallback would run)")
                return lambda: None
            scratch = _tb._scratch(entry)
            scratch.partials.fill_(math.nan)
            before = int(scratch.sync.item())

            def verify():
                if not fused:
                    return
                if not bool(scratch.partials.isfinite().all()):
                    not_run.append(f"{_backend} {what}: partial slots not written (the kernel did not run)")
                if device.type == "cuda" and (int(scratch.sync.item()) ^ before) & 0x80000000 == 0:
                    not_run.append(
                        f"{_backend} {what}: barrier counter unchanged (the fused launch did not run)"
                    )

            return verify

        for many in (False, True) if device.type == "cuda" else (False,):  # the interpreter is slow
            tag = " (1,100+ tensors)" if many else ""
            for name, max_norm in (("clip_grad_norm_ active", 1.0), ("clip_grad_norm_ inactive", 1e30)):
                g, r = grads(device, many), grads(device, many)
                check = evidence(g, name + tag, fused=True)
                got = op("clip_grad_norm_")(g, max_norm, 2.0)
                want = reference.clip_grad_norm_(r, max_norm, 2.0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                check()
                if not close(got, want, 1e-5) or not all(
                    close(a, b, 1e-2) for a, b in zip(g, r, strict=True)
                ):
                    failures.append(f"{backend} {name}{tag}")
            g = grads(device, many)
            for p in (1.0, 2.0, math.inf):
                check = evidence(g, f"total_norm p={p}{tag}", fused=True)
                got = op("total_norm")(g, p)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                check()
                if not close(got, reference.total_norm(g, p), 1e-5):
                    failures.append(f"{backend} total_norm p={p}{tag}")
            g, r = grads(device, many), grads(device, many)
            norm = torch.tensor(50.0, device=device)
            check = evidence(g, "clip_grads_with_norm_" + tag, fused=False)
            op("clip_grads_with_norm_")(g, 1.0, norm)
            reference.clip_grads_with_norm_(r, 1.0, norm)
            check()
            check = evidence(g, "clip_grad_value_" + tag, fused=False)
            op("clip_grad_value_")(g, 0.01)
            reference.clip_grad_value_(r, 0.01)
            check()
            if device.type == "cuda":
                torch.cuda.synchronize()
            changed = any(not torch.equal(a, b) for a, b in zip(g, grads(device, many), strict=True))
            if not changed or not all(close(a, b, 1e-2) for a, b in zip(g, r, strict=True)):
                failures.append(f"{backend} clip_grads_with_norm_/clip_grad_value_{tag}")
        ran.append(backend)

    print(f"sanitize.py: ran {ran or 'no kernel backend'} on {device}; failures: {failures or 'none'}")
    for line in not_run:
        print(f"sanitize.py: NOT RUN: {line}")
    if failures:
        return 1
    return 0 if ran and not not_run else 2


if __name__ == "__main__":
    sys.exit(main())
