"""Backend selection: which backend serves a group of gradients, and why the others cannot.

Kernel backends ("cuda", "triton" on CUDA tensors, "cpu" on CPU tensors) serve fp16/bf16/fp32
gradients and norm types 1, 2 and inf; everything else (fp64, complex, other p) goes to
"reference". Availability checks import nothing at `import gradclip` time and are cached, so a
call costs a dict lookup (the first "cpu" check imports gradclip._C, which registers its kernels).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from gradclip import _extension

CHOICES = ("auto", "cuda", "triton", "cpu", "reference")
KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
KERNEL_NORM_TYPES = frozenset({1.0, 2.0, math.inf})
ENV_BACKEND = "GRADCLIP_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve these gradients."""


def constant_under_compile(fn):
    """Mark `fn` as torch.compiler.assume_constant_result does: Dynamo calls it while tracing and
    bakes in the result instead of tracing into it (imports, cached checks, os.environ).

    That public decorator sets this one attribute but imports torch._dynamo first, which would add
    ~0.9 s to `import gradclip`. tests/test_compile.py breaks if torch stops honouring the attribute.
    """
    fn._dynamo_marked_constant = True
    return fn


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@constant_under_compile
def _env_backend() -> str:
    """$GRADCLIP_BACKEND, read at every eager call; under torch.compile, once per compilation."""
    return os.environ.get(ENV_BACKEND, "auto") or "auto"


@functools.cache
def _triton_import() -> str:
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError as exc:
        return f"triton is not installed ({exc}); fix: pip install triton==3.6.0"
    import gradclip.triton_backend  # noqa: F401, PLC0415 (registers the gradclip::triton_* ops)

    return ""


@functools.cache
def _cuda_runtime() -> str:
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return ""


@functools.cache
def _native_cpu() -> str:
    """Empty when gradclip._C (and with it the gradclip::cpu_* kernels) imports, else why not."""
    module, why = _extension.load()
    return why if module is None else ""


@constant_under_compile
def why_unavailable(backend: str, device_type: str) -> str:
    """Empty string when `backend` can run on `device_type` here, else the missing piece.

    A constant to torch.compile: Dynamo runs it (imports, cached checks) instead of tracing it.
    """
    if backend == "reference":
        return ""
    if backend == "triton":
        if device_type == "cpu" and not triton_interpret():
            return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (tests)"
        if device_type not in ("cpu", "cuda"):
            return f"the triton backend does not run on {device_type} tensors"
        return _triton_import() or (_cuda_runtime() if device_type == "cuda" else "")
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device_type} tensors"
        return _cuda_runtime() or _extension.why_no_cuda_kernels()
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device_type} tensors"
        return _native_cpu()
    raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")


def _kernel_can_serve(dtype: torch.dtype, norm_type: float | None) -> bool:
    return dtype in KERNEL_DTYPES and (norm_type is None or norm_type in KERNEL_NORM_TYPES)


def requested(backend: str) -> str:
    """The backend asked for: the argument, with GRADCLIP_BACKEND overriding "auto"."""
    if backend == "auto":
        backend = _env_backend()
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    return backend


def choose(backend: str, device: torch.device, dtype: torch.dtype, norm_type: float | None) -> str:
    """The backend serving gradients of `dtype` on `device` (norm_type None: no norm involved).

    "auto" prefers cuda, then triton, then reference on CUDA tensors (the order is a guess until
    a GPU benchmark in bench/RESULTS.md says otherwise); on CPU tensors the native "cpu" kernels
    when gradclip._C is built, else the reference (quietly; the Triton interpreter is a test tool).
    An explicit backend that cannot serve raises BackendUnavailableError.
    """
    if backend == "auto":
        if _kernel_can_serve(dtype, norm_type):
            if device.type == "cuda":
                for candidate in ("cuda", "triton"):
                    if not why_unavailable(candidate, device.type):
                        return candidate
            elif device.type == "cpu" and not why_unavailable("cpu", "cpu"):
                return "cpu"
        return "reference"
    if backend != "reference":
        if not _kernel_can_serve(dtype, norm_type):
            what = f"{dtype} gradients" if dtype not in KERNEL_DTYPES else f"norm_type={norm_type}"
            raise BackendUnavailableError(
                f"backend={backend!r} cannot serve {what}: the kernels take float16/bfloat16/float32 "
                "gradients and norm types 1, 2 and inf; fix: backend='auto' or backend='reference'"
            )
        why = why_unavailable(backend, device.type)
        if why:
            raise BackendUnavailableError(f"backend={backend!r} is unavailable: {why}")
    return backend


def report() -> dict[str, str]:
    """{backend: "available" or why not} for `python -m gradclip info` (CUDA tensors for cuda and
    triton, CPU tensors for cpu)."""
    status = {b: why_unavailable(b, "cuda") or "available" for b in ("cuda", "triton")}
    if not torch.cuda.is_available():
        # The extension's own status is worth showing even where no GPU could run it.
        status["cuda"] += "; " + (_extension.why_no_cuda_kernels() or "gradclip._C holds the CUDA kernels")
        status["triton"] += "; " + (
            _triton_import() or "triton imports (CPU tensors under TRITON_INTERPRET=1)"
        )
    why_cpu = why_unavailable("cpu", "cpu")
    if why_cpu:
        status["cpu"] = why_cpu
    else:
        module, _ = _extension.load()
        status["cpu"] = f"available (CPU tensors; gradclip._C, {module.CPU_CAPABILITY} vectors)"
    status["reference"] = "available (pure PyTorch, any device)"
    return status
