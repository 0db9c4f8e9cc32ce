"""One call of every gradclip op per available kernel backend on small CUDA gradients, checked
against the reference: the workload `compute-sanitizer` runs in `bench/gpu_check.sh`.

    compute-sanitizer --tool memcheck python bench/sanitize.py

Covers mixed dtypes, sizes 1/3/127/vector-width+1, a misaligned (offset) view, a tensor larger
than one chunk, and both clipping regimes. Exits 1 on a mismatch, 2 when no kernel backend runs.
"""

from __future__ import annotations

import sys

import torch

import gradclip
from gradclip import backends, reference


def grads(device) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for i, n in enumerate((1, 3, 127, 9, 4096, 3 << 16, 5)):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        out.append(torch.randn(n, generator=gen).to(dtype).to(device))
    base = torch.randn(1001, generator=gen).to(device)
    out.append(base[1:])  # misaligned start
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize.py: no CUDA device")
        return 2
    device = torch.device("cuda")
    ran, failures = [], []
    for backend in ("cuda", "triton"):
        why = backends.why_unavailable(backend, "cuda")
        if why:
            print(f"{backend}: skipped ({why})")
            continue
        for name, max_norm in (("clip_grad_norm_ active", 1.0), ("clip_grad_norm_ inactive", 1e30)):
            g, r = grads(device), grads(device)
            got = gradclip.clip_grad_norm_(g, max_norm, backend=backend)
            want = reference.clip_grad_norm_(r, max_norm, 2.0)
            torch.cuda.synchronize()
            if not torch.allclose(got.double(), want.double(), rtol=1e-5) or not all(
                torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-6) for a, b in zip(g, r, strict=True)
            ):
                failures.append(f"{backend} {name}")
        g = grads(device)
        got = gradclip.get_total_norm(g, 2.0, backend=backend)
        want = reference.total_norm(g, 2.0)
        if not torch.allclose(got.double(), want.double(), rtol=1e-5):
            failures.append(f"{backend} get_total_norm")
        for norm_type in (1.0, float("inf")):
            got = gradclip.get_total_norm(g, norm_type, backend=backend)
            if not torch.allclose(got.double(), reference.total_norm(g, norm_type).double(), rtol=1e-5):
                failures.append(f"{backend} get_total_norm p={norm_type}")
        g, r = grads(device), grads(device)
        gradclip.clip_grads_with_norm_(g, 1.0, torch.tensor(50.0, device=device), backend=backend)
        reference.clip_grads_with_norm_(r, 1.0, torch.tensor(50.0, device=device))
        gradclip.clip_grad_value_(g, 0.01, backend=backend)
        reference.clip_grad_value_(r, 0.01)
        torch.cuda.synchronize()
        if not all(
            torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-6) for a, b in zip(g, r, strict=True)
        ):
            failures.append(f"{backend} clip_grads_with_norm_/clip_grad_value_")
        ran.append(backend)
    print(f"sanitize.py: ran {ran or 'no kernel backend'}; failures: {failures or 'none'}")
    if failures:
        return 1
    return 0 if ran else 2


if __name__ == "__main__":
    sys.exit(main())
