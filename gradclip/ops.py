"""The `torch.library` ops: schemas and fake (meta) implementations, all defined here in Python.

Each backend owns one family of six ops, `gradclip::{backend}_{op}`, with the same schema:

    {b}_total_norm(Tensor[] grads, float norm_type) -> Tensor
    {b}_clip_grad_norm_(Tensor(a!)[] grads, float max_norm, float norm_type) -> Tensor
    {b}_clip_grads_with_norm_(Tensor(a!)[] grads, float max_norm, Tensor total_norm) -> ()
    {b}_clip_grad_value_(Tensor(a!)[] grads, float clip_value) -> ()
    {b}_per_param_norms(Tensor[] grads, float norm_type) -> (Tensor, Tensor)
    {b}_clip_grad_norm_per_param_(Tensor(a!)[] grads, float max_norm, float norm_type) -> (Tensor, Tensor)

The two per-param ops return (total, per_param): `total` exactly (bitwise) what `{b}_total_norm`
returns, `per_param` a 1-D tensor of len(grads) norms in input order, in the norm dtype (fp32, fp64
if any gradient is fp64) on the gradients' device; the clip variant rescales exactly as
`{b}_clip_grad_norm_` does.

Every op takes the gradients of one device (dtypes may be mixed). The mutated list is declared
`Tensor(a!)[]`, so torch.compile functionalizes it as an in-place update of the gradients; every
op stays opaque to Inductor (CompositeExplicitAutograd is not decomposed) and Inductor's reinplace
pass turns auto_functionalized_v2 back into one call on the gradients themselves, with no clone or
copy back (tests/test_compile.py shows it on the post-grad graph and the generated code).

Defining the schemas here lets `import gradclip` work without the compiled extension: the
`reference` ops get their implementation below (CompositeExplicitAutograd: any device), the
`triton` ops are implemented in `gradclip/triton_backend.py` (registered on import there), the
`cuda` ops in C++ (`csrc/cuda/cuda_ops.cpp`, TORCH_LIBRARY_IMPL for the CUDA key) and the `cpu` ops
in C++ (`csrc/cpu/`, TORCH_LIBRARY_IMPL for the CPU key); those two register when `gradclip._C`
is imported, and have no Python implementation.
"""

from __future__ import annotations

import torch

from gradclip import labels, reference

BACKENDS = ("reference", "triton", "cuda", "cpu")
OP_NAMES = (
    "total_norm",
    "clip_grad_norm_",
    "clip_grads_with_norm_",
    "clip_grad_value_",
    "per_param_norms",
    "clip_grad_norm_per_param_",
)

_SCHEMAS = {
    "total_norm": "(Tensor[] grads, float norm_type) -> Tensor",
    "clip_grad_norm_": "(Tensor(a!)[] grads, float max_norm, float norm_type) -> Tensor",
    "clip_grads_with_norm_": "(Tensor(a!)[] grads, float max_norm, Tensor total_norm) -> ()",
    "clip_grad_value_": "(Tensor(a!)[] grads, float clip_value) -> ()",
    "per_param_norms": "(Tensor[] grads, float norm_type) -> (Tensor, Tensor)",
    "clip_grad_norm_per_param_": "(Tensor(a!)[] grads, float max_norm, float norm_type) -> (Tensor, Tensor)",
}

_lib = torch.library.Library("gradclip", "DEF")  # noqa: TOR901 (kept alive for the process)


def _fake_norm(grads):
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty((), dtype=reference.norm_dtype(g.dtype for g in grads), device=device)


def _fake_total_norm(grads, norm_type):
    return _fake_norm(grads)


def _fake_clip_grad_norm_(grads, max_norm, norm_type):
    return _fake_norm(grads)


def _fake_norms(grads):
    total = _fake_norm(grads)
    return total, total.new_empty((len(grads),))


def _fake_per_param_norms(grads, norm_type):
    return _fake_norms(grads)


def _fake_clip_grad_norm_per_param_(grads, max_norm, norm_type):
    return _fake_norms(grads)


def _fake_none(*args):
    return None


_FAKES = {
    "total_norm": _fake_total_norm,
    "clip_grad_norm_": _fake_clip_grad_norm_,
    "clip_grads_with_norm_": _fake_none,
    "clip_grad_value_": _fake_none,
    "per_param_norms": _fake_per_param_norms,
    "clip_grad_norm_per_param_": _fake_clip_grad_norm_per_param_,
}

_REFERENCE_IMPLS = {
    "total_norm": reference.total_norm,
    "clip_grad_norm_": reference.clip_grad_norm_,
    "clip_grads_with_norm_": reference.clip_grads_with_norm_,
    "clip_grad_value_": reference.clip_grad_value_,
    "per_param_norms": reference.per_param_norms,
    "clip_grad_norm_per_param_": reference.clip_grad_norm_per_param_,
}


def qualified_name(backend: str, op: str) -> str:
    return f"gradclip::{backend}_{op}"


for _backend in BACKENDS:
    for _op in OP_NAMES:
        _lib.define(f"{_backend}_{_op}{_SCHEMAS[_op]}")
        torch.library.register_fake(qualified_name(_backend, _op), _FAKES[_op], lib=_lib)

for _op, _fn in _REFERENCE_IMPLS.items():
    _lib.impl(f"reference_{_op}", _fn, "CompositeExplicitAutograd")


def op(backend: str, name: str):
    """The OpOverload `torch.ops.gradclip.{backend}_{name}.default`; while a profiler records, it
    runs inside a region named after the op (see gradclip.labels: free when nothing records)."""
    return labels.labelled(
        getattr(torch.ops.gradclip, f"{backend}_{name}").default, qualified_name(backend, name)
    )
