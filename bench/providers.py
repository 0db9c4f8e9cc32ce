"""The implementations compared side by side, each a factory `make(params, max_norms) -> calls`.

`calls[k]()` clips the gradients of `params` in place with max_norms[k] and returns the total norm
(a device tensor), so every provider is timed doing the same job. A provider that only computes the norm says so
(`norm_only`), and its figures compare with the 1-pass floor only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import gradclip
from gradclip import backends

Call = Callable[[], torch.Tensor]


@dataclass
class Provider:
    name: str
    make: Callable[[list[torch.Tensor], list[float]], list[Call]]
    is_baseline: bool = False  # torch's own code: checked with the loose, dtype-rounding tolerance
    norm_only: bool = False
    compiled: bool = False  # torch.compile: first call is the compile, timed separately
    notes: list[str] = field(default_factory=list)


def _torch_foreach(params, max_norms):
    # foreach=None is torch's default: the foreach kernels on CUDA, the for-loop on CPU (torch has
    # no CPU foreach norm), which is what a user's call gets.
    return [lambda m=m: torch.nn.utils.clip_grad_norm_(params, m) for m in max_norms]


def _torch_loop(params, max_norms):
    return [lambda m=m: torch.nn.utils.clip_grad_norm_(params, m, foreach=False) for m in max_norms]


_compiled: dict[int, tuple[list[torch.Tensor], Callable]] = {}


def _torch_compile(params, max_norms):
    """torch.compile of torch's clip_grad_norm_, compiled once per parameter list.

    max_norm is passed as a 0-dim device tensor (torch's clip accepts one), so the changing
    max_norms of a timed sequence do not recompile; one compiled graph serves every call.
    """
    if id(params) not in _compiled or _compiled[id(params)][0] is not params:

        def clip(max_norm):
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

        _compiled[id(params)] = (params, torch.compile(clip))
    fn = _compiled[id(params)][1]
    device = params[0].grad.device
    bounds = [torch.tensor(m, dtype=torch.float32, device=device) for m in max_norms]
    return [lambda b=b: fn(b) for b in bounds]


def reset() -> None:
    """Drop the compiled functions (and the parameters they hold) before the next workload."""
    _compiled.clear()
    torch._dynamo.reset()


def _gradclip(backend: str):
    def make(params, max_norms):
        return [lambda m=m: gradclip.clip_grad_norm_(params, m, backend=backend) for m in max_norms]

    return make


def _apex_clip(params, max_norms):
    from apex.contrib.clip_grad import clip_grad_norm_  # noqa: PLC0415

    return [lambda m=m: clip_grad_norm_(params, m) for m in max_norms]


def _apex_l2norm(params, max_norms):
    """apex multi_tensor_l2norm per dtype, combined: the norm only (one pass, no rescale)."""
    import amp_C  # noqa: PLC0415
    from apex.multi_tensor_apply import multi_tensor_applier  # noqa: PLC0415

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    flag = torch.zeros(1, dtype=torch.int, device=params[0].grad.device)

    def call():
        norms = [
            multi_tensor_applier(amp_C.multi_tensor_l2norm, flag, [g], False)[0] for g in by_dtype.values()
        ]
        return torch.linalg.vector_norm(torch.stack([n.float().reshape(()) for n in norms]))

    return [call for _ in max_norms]


def apex_status() -> tuple[str, str]:
    """("clip" | "l2norm" | "", why not) for apex on this machine."""
    try:
        import apex.contrib.clip_grad  # noqa: F401, PLC0415

        return "clip", ""
    except ImportError:
        pass
    try:
        import amp_C  # noqa: F401, PLC0415
        from apex.multi_tensor_apply import multi_tensor_applier  # noqa: F401, PLC0415

        return "l2norm", ""
    except ImportError as exc:
        return "", f"apex not importable ({exc})"


def gradclip_backends(device: torch.device, requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """(backends to time, {backend: why skipped}). Default: the kernel backends available here;
    on CPU the native "cpu" kernels, or the reference where gradclip._C is not built (the Triton
    interpreter is a test tool, never timed)."""
    if requested:
        wanted = requested
    elif device.type == "cuda":
        wanted = ["cuda", "triton"]
    else:
        wanted = ["cpu"] if not backends.why_unavailable("cpu", "cpu") else ["reference"]
    chosen, skipped = [], {}
    for b in wanted:
        if device.type == "cpu" and b == "triton":
            skipped[b] = "the Triton interpreter on CPU is a test tool, not timed"
            continue
        why = backends.why_unavailable(b, device.type)
        if why:
            skipped[b] = why
        else:
            chosen.append(b)
    return chosen, skipped


def providers(
    device: torch.device, backend_names: list[str] | None, with_compile: bool
) -> tuple[list[Provider], dict[str, str]]:
    """The providers for this run, torch foreach first (every ratio is taken against it)."""
    out = [
        Provider("torch foreach", _torch_foreach, is_baseline=True),
        Provider("torch for-loop", _torch_loop, is_baseline=True),
    ]
    skipped: dict[str, str] = {}
    if with_compile:
        out.append(Provider("torch.compile", _torch_compile, is_baseline=True, compiled=True))
    kernel_backends, why = gradclip_backends(device, backend_names)
    out += [Provider(f"gradclip {b}", _gradclip(b)) for b in kernel_backends]
    skipped.update({f"gradclip {b}": w for b, w in why.items()})
    if device.type == "cuda":
        kind, why_not = apex_status()
        if kind == "clip":
            out.append(Provider("apex clip_grad_norm_", _apex_clip, is_baseline=True))
        elif kind == "l2norm":
            out.append(Provider("apex l2norm (norm only)", _apex_l2norm, is_baseline=True, norm_only=True))
        else:
            skipped["apex"] = why_not
    return out, skipped


def timed_call(call: Call, sync: Callable[[], None]) -> tuple[torch.Tensor, float]:
    """(result, seconds) of one call, synchronised (the first call of torch.compile: the compile)."""
    start = time.perf_counter()
    result = call()
    sync()
    return result, time.perf_counter() - start
