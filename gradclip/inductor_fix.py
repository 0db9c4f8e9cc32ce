"""A workaround for an Inductor defect that made a copy of a gradient taken after clipping alias it.

The defect (torch 2.13, any in-place op on graph inputs that Inductor re-inplaces: gradclip's ops,
whose gradient list is `Tensor(a!)[]`, and `torch._foreach_mul_(grads, 0.5)` alike). For

    gradclip.clip_grad_norm_(params, 1.0)
    momentum = [torch.clone(p.grad) for p in params]

AOT autograd functionalizes the in-place op into `new = op(grads)`, `momentum = clone(new)` and an
epilogue `grad.copy_(new)`. Inductor's graph passes then run, in this order:
1. `remove_noop_ops` (in `joint_graph_passes`, run on inference graphs too, and again first in the
   post-grad passes) drops `clone(new)`: `new` is an intermediate, not a graph input, so removing
   the clone seems to add no input/output aliasing; `momentum` becomes `new` itself.
2. `reinplace_inplaceable_ops` (post-grad) turns `op(grads)` + `grad.copy_(new)` back into one in-place call on
   the inputs and replaces `new` by `grad`.
Together: the graph returns the gradient as "momentum", and AOT autograd, which recorded a fresh
output, hands the gradient itself to the user. The next backward or `zero_grad()` overwrites the
"copy" (issue 11: a compiled SGD step with momentum trained wrong).

The fix, a joint-graph custom pre-pass (Inductor runs it just before step 1): a `clone` of a value that the graph
writes back into one of its inputs is no no-op, since that value becomes the input once the op is
re-inplaced; the pass rewrites such a clone into `gradclip::copy_of`, the same copy (`x.clone()`)
as an opaque op, which `remove_noop_ops` does not remove (Inductor calls it as an extern kernel,
so that copy is not fused with neighbouring pointwise code). Only clones the user wrote are kept (eager makes the same copy);
the clip op itself is still re-inplaced with no copy of any gradient. The pass is appended to
`torch._inductor.config.joint_custom_pre_pass` (next to any pass already there; its uuid joins
Inductor's cache key, so no graph compiled without it is reused) the first time Dynamo traces a
gradclip call, so `import gradclip` does not import Inductor.
"""

from __future__ import annotations

import torch

from gradclip import backends

_VERSION = "gradclip-keep-clones-of-written-back-values-1"


def keep_clones_of_written_back_values(graph: torch.fx.Graph) -> int:
    """Rewrite every `aten.clone(x)` whose `x` shares storage with a value copied back into a graph
    input (`input.copy_(x)`, the functionalized form of an in-place op) into `gradclip::copy_of(x)`.

    Returns the number of clones rewritten. Works on the fake-tensor storages in
    `node.meta["val"]`, so views of the written-back value count too.
    """
    from torch._inductor.fx_utils import get_node_storage  # noqa: PLC0415

    def storage(node) -> int | None:
        return get_node_storage(node) if isinstance(node, torch.fx.Node) else None

    aten = torch.ops.aten
    written_back = set()
    for node in graph.find_nodes(op="call_function", target=aten.copy_.default):
        dst, src = node.args[0], node.args[1]
        if isinstance(dst, torch.fx.Node) and dst.op == "placeholder":
            written = storage(src)
            if written is not None:
                written_back.add(written)
    if not written_back:
        return 0
    rewritten = 0
    for node in list(graph.find_nodes(op="call_function", target=aten.clone.default)):
        if storage(node.args[0]) in written_back and _same_layout(node, node.args[0]):
            node.target = torch.ops.gradclip.copy_of.default
            node.kwargs = {}
            rewritten += 1
    return rewritten


def _same_layout(clone: torch.fx.Node, src: torch.fx.Node) -> bool:
    """copy_of copies with preserve_format; a clone with another memory_format that changes the
    strides is kept as it is (Inductor does not remove it: its layout differs from its input's)."""
    if clone.kwargs.get("memory_format") in (None, torch.preserve_format):
        return True
    a, b = clone.meta.get("val"), src.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.stride() == b.stride()


_pass = None


@backends.constant_under_compile
def install() -> bool:
    """Append the pass to Inductor's joint-graph custom pre-passes (idempotent). Returns True.

    A constant to torch.compile: Dynamo runs it while tracing a gradclip call, before Inductor
    compiles that graph."""
    global _pass
    from torch._inductor import config  # noqa: PLC0415 (only once something is compiled)
    from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: PLC0415

    if _pass is None:

        class _KeepClones(CustomGraphPass):
            def __call__(self, graph: torch.fx.Graph) -> None:
                keep_clones_of_written_back_values(graph)

            def uuid(self) -> str:
                return _VERSION

        _pass = _KeepClones()
    current = config.joint_custom_pre_pass
    passes = list(current) if isinstance(current, list | tuple) else ([] if current is None else [current])
    if not any(p is _pass for p in passes):
        config.joint_custom_pre_pass = passes + [_pass] if passes else _pass
    return True
