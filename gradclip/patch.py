"""Route torch.nn.utils' clipping functions through gradclip, for code we cannot edit.

HF Trainer, Lightning and accelerate look the functions up on `torch.nn.utils` at call time, so
replacing the module attributes switches them with one line.
"""

from __future__ import annotations

import torch.nn.utils
import torch.nn.utils.clip_grad

from gradclip import clip

_NAMES = ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_")
_MODULES = (torch.nn.utils, torch.nn.utils.clip_grad)
_originals: dict[tuple[object, str], object] = {}


class _Patched:
    """Returned by patch_torch(); leaving its `with` block undoes the patch."""

    def __enter__(self) -> _Patched:
        return self

    def __exit__(self, *exc) -> None:
        unpatch_torch()


def patch_torch() -> _Patched:
    """Replace torch.nn.utils.{clip_grad_norm_, get_total_norm, clip_grads_with_norm_,
    clip_grad_value_} with gradclip's (backend "auto", or $GRADCLIP_BACKEND). Idempotent.
    Usable as `with gradclip.patch_torch(): ...`."""
    for module in _MODULES:
        for name in (n for n in _NAMES if hasattr(module, n)):
            _originals.setdefault((module, name), getattr(module, name))
            setattr(module, name, getattr(clip, name))
    return _Patched()


def unpatch_torch() -> None:
    """Restore torch's own functions (a no-op when not patched)."""
    for (module, name), original in _originals.items():
        setattr(module, name, original)
    _originals.clear()


def is_patched() -> bool:
    return bool(_originals)
