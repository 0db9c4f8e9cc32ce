"""The native host fast path: the common call of each public function in one C++ call.

gradclip/clip.py offers every eager call to gradclip._C first (csrc/fast_path.cpp). The C++ side
reads each `.grad`, validates, picks the backend as gradclip.routing would and calls the backend's
op through the dispatcher, with no Python per tensor. It serves every gradient on one cpu/cuda
device, dense, fp32/fp16/bf16, p in {1, 2, inf}, no Tensor subclass (DTensor), no gradient listed
twice, no process group, error_if_nonfinite=False. Anything else is handed back, and the Python
routing serves it exactly as before, with the same errors and warnings; an input drawn from a
generator comes back as a generator over the same items. An unstarted `module.parameters()`
generator is not run at all where torch.nn.Module's own iteration is in use: its items are read
from the module tree (csrc/module_walk.cpp), and a served call leaves it exhausted, as list() would.

The extension is loaded on the first call, never at `import gradclip`. Under torch.compile the
fast path is off, so Dynamo traces the Python routing and the torch.library ops.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable
from types import ModuleType

import torch

from gradclip import _extension, labels

ENV_DISABLE = "GRADCLIP_NO_FAST_PATH"

_module: ModuleType | bool | None = None  # gradclip._C once looked up; False: no fast path here


def _load() -> ModuleType | bool:
    global _module
    module, _ = _extension.load()
    if (
        os.environ.get(ENV_DISABLE, "0") == "1"
        or module is None
        or not hasattr(module, "fast_clip_grad_norm_")
    ):
        _module = False
    else:
        _module = module
    return _module


def native() -> ModuleType | None:
    """gradclip._C when the fast path may serve this call; None without the extension, under
    torch.compile (Dynamo traces the Python routing), while a profiler records (the Python routing
    labels each op call, gradclip.labels) or with GRADCLIP_NO_FAST_PATH=1 at first use."""
    if torch.compiler.is_compiling() or labels.recording():
        return None
    module = _module
    if module is None:
        module = _load()
    return module or None


def handback(original: object, unserved: tuple) -> object:
    """What the Python routing continues on after the fast path declined: `original` itself, or
    the items the C++ side already drew from it, as a generator again if it was one (so an empty
    generator still warns, from gradclip.routing)."""
    (rest,) = unserved
    if rest is not original and isinstance(original, types.GeneratorType):
        return (item for item in rest)
    return rest


def set_enabled(enabled: bool) -> bool:
    """Turn the fast path on or off for this process (tests, benchmarks); returns the previous state."""
    global _module
    previous = native() is not None
    _module = None if enabled else False
    if enabled:
        _load()
    return previous


def counts() -> tuple[int, int]:
    """(calls the fast path served, calls it handed back to the Python routing) since the last reset."""
    module, _ = _extension.load()
    return tuple(module.fast_path_counts()) if module is not None else (0, 0)


def plan(function: str, parameters: Iterable, norm_type: float = 2.0, backend: str = "auto") -> str | None:
    """The backend the fast path would call for `function` on `parameters`, or None where the
    Python routing would serve; runs everything a call does before the op, and nothing else."""
    module = native()
    if module is None:
        return None
    return module.fast_path_plan(function, parameters, float(norm_type), backend)
