"""Check, in a fresh process, that a built gradclip._C imports and registers a kernel for every op.

    python tools/native_registration.py [--expect-from DIR] [--require-cuda]

Imports `gradclip` and `gradclip._C` (from sys.path: the CUDA build check runs it from a staging
directory holding a copy of the package and the freshly built module), then for every op of the
`gradclip` namespace:
- `gradclip::cuda_*` must have a kernel for the CUDA dispatch key,
- `gradclip::cpu_*` (once they are defined) must have one for the CPU key,
checked with torch._C._dispatch_has_kernel_for_dispatch_key. With --expect-from DIR, the module
must have been loaded from under DIR (so a stale build elsewhere cannot pass). Exits 1 on any
missing kernel, printing each; nothing is executed on a device.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect-from", help="gradclip._C must be loaded from under this directory")
    parser.add_argument("--require-cuda", action="store_true", help="fail unless _C holds the CUDA kernels")
    args = parser.parse_args(argv)

    import torch

    import gradclip  # noqa: F401  (defines the op schemas: gradclip/ops.py)
    from gradclip import _C

    where = os.path.realpath(_C.__file__)
    print(
        f"gradclip._C: {where} (torch {torch.__version__}, CUDA {torch.version.cuda}, WITH_CUDA={_C.WITH_CUDA})"
    )
    problems = []
    if args.expect_from and not where.startswith(os.path.realpath(args.expect_from) + os.sep):
        problems.append(f"gradclip._C was loaded from {where}, not from under {args.expect_from}")
    if args.require_cuda and not _C.WITH_CUDA:
        problems.append("gradclip._C was built without the CUDA kernels (WITH_CUDA is False)")

    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("gradclip::"))
    families = {"cuda": "CUDA", "cpu": "CPU"}
    for family, key in families.items():
        ops = [n for n in names if n.startswith(f"gradclip::{family}_")]
        if not ops:
            if family == "cuda" and args.require_cuda:
                problems.append("no gradclip::cuda_* op is defined")
            print(f"gradclip::{family}_*: none defined (nothing to check)")
            continue
        missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(n, key)]
        print(f"gradclip::{family}_*: {len(ops) - len(missing)}/{len(ops)} ops have a {key} kernel")
        problems += [f"{n} has no kernel for the {key} dispatch key" for n in missing]
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
