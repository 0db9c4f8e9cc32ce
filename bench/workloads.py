"""Workloads: the parameter-shape sets of the anchors, user models built on the meta device, and
their gradients.

Every workload is a list of shapes; `make_params` turns it into parameters that are zero-stride
views (`expand` of one scalar), so only the gradients take memory, as the anchor measurements did.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]

DTYPES = {"fp32": (torch.float32,), "bf16": (torch.bfloat16,), "mixed": (torch.float32, torch.bfloat16)}


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[Shape, ...]

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def gpt2(vocab: int = 50257, d: int = 768, layers: int = 12, context: int = 1024) -> list[Shape]:
    """GPT-2 (HF/nanoGPT layout, Conv1D weights (in, out)); tied lm head: 148 tensors, 124.4M."""
    shapes: list[Shape] = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1
        shapes += [(d, 3 * d), (3 * d,)]  # attn.c_attn
        shapes += [(d, d), (d,)]  # attn.c_proj
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,)]  # mlp.c_fc
        shapes += [(4 * d, d), (d,)]  # mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def llama(d: int, layers: int, ffn: int, vocab: int, kv: int) -> list[Shape]:
    """Llama layout (no biases, RMSNorm weights, untied lm head): 9 tensors per layer + 3."""
    shapes: list[Shape] = [(vocab, d)]  # embed_tokens
    for _ in range(layers):
        shapes += [(d, d), (kv, d), (kv, d), (d, d)]  # q, k, v, o
        shapes += [(ffn, d), (ffn, d), (d, ffn)]  # gate, up, down
        shapes += [(d,), (d,)]  # input_layernorm, post_attention_layernorm
    shapes += [(d,), (vocab, d)]  # final norm, lm_head
    return shapes


def resnet50(num_classes: int = 1000) -> list[Shape]:
    """torchvision.models.resnet50() parameters in `named_parameters()` order: 161, 25,557,032.

    Written by hand (torchvision is not needed): stem conv + bn, four stages of Bottleneck blocks
    [3, 4, 6, 3] of widths 64..512 (expansion 4; the 3x3 conv carries the stride), a 1x1 conv + bn
    downsample on the first block of each stage, then the fc layer.
    """
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True):
        for block in range(blocks):
            out = width * 4
            shapes += [(width, inplanes, 1, 1), (width,), (width,)]  # conv1, bn1
            shapes += [(width, width, 3, 3), (width,), (width,)]  # conv2, bn2
            shapes += [(out, width, 1, 1), (out,), (out,)]  # conv3, bn3
            if block == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]  # downsample conv, bn
            inplanes = out
    shapes += [(num_classes, 2048), (num_classes,)]
    return shapes


def _named() -> dict[str, list[Shape]]:
    return {
        "gpt2-124M": gpt2(),
        "resnet50": resnet50(),
        "many-small-4k": [(4096,)] * 2000,
        # Issue 13's CPU row: GPT-2's 4 first transformer blocks and ln_f (no embeddings), 50
        # tensors, 28,351,488 elements.
        "gpt2-4layer": gpt2(layers=4)[2:],
        "llama-1B": llama(d=2048, layers=16, ffn=8192, vocab=128256, kv=512),
        "llama-7B": llama(d=4096, layers=32, ffn=11008, vocab=32000, kv=4096),
        # Not anchors: small sets for CPU runs and the harness's own tests.
        "tiny": [(3,), (127,), (1,), (257, 33), (8, 16, 3, 3), (1000,)] * 4,
        "small-mlp": [(1024, 1024), (1024,)] * 8 + [(32000, 256)],
    }


ANCHORS = ("gpt2-124M", "resnet50", "many-small-4k", "llama-1B", "llama-7B")
QUICK = ("tiny", "resnet50", "many-small-4k")


def names() -> list[str]:
    return list(_named())


def named(name: str) -> Workload:
    table = _named()
    if name not in table:
        raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(table)} or use --from-module")
    return Workload(name, tuple(table[name]))


def from_module(spec: str) -> Workload:
    """`pkg.mod:factory`: build the user's model on the meta device and take its parameter shapes.

    Nothing is allocated: only the gradients materialise later, in the benchmark's dtype. Only
    parameters with requires_grad count, and shared parameters count once (as `parameters()` does).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"--from-module takes pkg.mod:factory, got {spec!r}")
    factory = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    with torch.device("meta"):
        model = factory()
    params = model.parameters() if hasattr(model, "parameters") else model
    shapes = tuple(tuple(p.shape) for p in params if p.requires_grad)
    if not shapes:
        raise SystemExit(f"{spec} has no parameters that require grad")
    return Workload(f"{attr}({module_name})", shapes)


def dtype_of(dtype_name: str, index: int) -> torch.dtype:
    """The gradient dtype of tensor `index`: "mixed" alternates fp32, bf16, fp32, ..."""
    choices = DTYPES[dtype_name]
    return choices[index % len(choices)]


def grad_bytes(workload: Workload, dtype_name: str) -> int:
    return sum(math.prod(s) * dtype_of(dtype_name, i).itemsize for i, s in enumerate(workload.shapes))


def make_params(workload: Workload, dtype_name: str, device: torch.device) -> list[torch.Tensor]:
    """Zero-stride parameters with uninitialised gradients of the workload's shapes.

    Fill the gradients with `randomize` before use (never time on uninitialised or zero data).
    """
    params = []
    for i, shape in enumerate(workload.shapes):
        dtype = dtype_of(dtype_name, i)
        p = torch.zeros((), dtype=dtype, device=device).expand(shape)
        p.grad = torch.empty(shape, dtype=dtype, device=device)
        params.append(p)
    return params


def randomize(params: list[torch.Tensor], seed: int) -> None:
    """Standard-normal gradients from `seed` (generated in place, no extra memory)."""
    gen = torch.Generator(device=params[0].device).manual_seed(seed) if params else None
    for p in params:
        p.grad.normal_(generator=gen)


def sample(workload: Workload, cap: int = 1 << 18) -> Workload:
    """The same tensor count and dtype pattern with every tensor capped at `cap` elements.

    Used for the correctness gate of workloads too large to hold a second copy of: it keeps what
    the multi-tensor launch metadata sees (count, order, dtypes) and keeps tensors above one chunk.
    """
    shapes = tuple(
        s if math.prod(s) <= cap else (cap + (i * 7919) % 1021,) for i, s in enumerate(workload.shapes)
    )
    return Workload(workload.name + " (sample)", shapes)
