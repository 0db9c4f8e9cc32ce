"""Route torch.nn.utils' clipping functions through gradclip, for code we cannot edit.

HF Trainer, Lightning and accelerate look the functions up on `torch.nn.utils` at call time, so
replacing the module attributes switches them with one line.

Patching is re-entrant: every `patch_torch()` call holds the patch, and torch's functions come back
only when the last hold is released (the outermost `with` block exits), or at once on
`unpatch_torch()`. So a library that uses `with gradclip.patch_torch():` internally leaves a
user's global `gradclip.patch_torch()` in force.
"""

from __future__ import annotations

import threading

import torch.nn.utils
import torch.nn.utils.clip_grad

from gradclip import clip

_NAMES = ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_")
_MODULES = (torch.nn.utils, torch.nn.utils.clip_grad)
_originals: dict[tuple[object, str], object] = {}
_lock = threading.RLock()
_holds = 0  # patch_torch() calls and `with` blocks not yet released
_generation = 0  # bumped by unpatch_torch(): holds taken before it are void


def _acquire() -> int:
    global _holds
    with _lock:
        if not _originals:
            for module in _MODULES:
                for name in (n for n in _NAMES if hasattr(module, n)):
                    _originals[(module, name)] = getattr(module, name)
                    setattr(module, name, getattr(clip, name))
        _holds += 1
        return _generation


def _release(generation: int) -> None:
    global _holds
    with _lock:
        if generation != _generation:  # unpatch_torch() ran since: nothing left to release
            return
        _holds -= 1
        if _holds == 0:
            _restore()


def _restore() -> None:
    global _holds, _generation
    for (module, name), original in _originals.items():
        setattr(module, name, original)
    _originals.clear()
    _holds = 0
    _generation += 1


class _Patched:
    """Returned by patch_torch(): a hold on the patch. `with` releases it when the block exits
    (on an exception too); the same object may be entered again, or nested in itself, each `with`
    holding the patch for its own block. Never entered, the hold lasts until unpatch_torch()."""

    def __init__(self, generation: int) -> None:
        self._generations = [generation]  # one entry per hold this object has not released
        self._fresh = True  # the patch_torch() call's hold, taken over by the first `with`

    def __enter__(self) -> _Patched:
        if self._fresh:
            self._fresh = False
        else:
            self._generations.append(_acquire())
        return self

    def __exit__(self, *exc) -> None:
        if self._generations:
            _release(self._generations.pop())


def patch_torch() -> _Patched:
    """Replace torch.nn.utils.{clip_grad_norm_, get_total_norm, clip_grads_with_norm_,
    clip_grad_value_} (and the same names in torch.nn.utils.clip_grad) with gradclip's (backend
    "auto", or $GRADCLIP_BACKEND).

    Re-entrant: called globally it patches until unpatch_torch(); as `with gradclip.patch_torch():`
    it patches for the block, and torch's functions are restored only when the outermost hold is
    released, so nested blocks and a global patch around a block stay patched."""
    return _Patched(_acquire())


def unpatch_torch() -> None:
    """Restore torch's own functions now, whatever the number of holds (a no-op when not patched).
    `with` blocks still open then restore nothing when they exit."""
    with _lock:
        if _originals:
            _restore()


def is_patched() -> bool:
    return bool(_originals)
