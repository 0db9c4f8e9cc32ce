"""Lazy loader of the native core `gradclip._C`.

Importing it registers the compiled kernels (CPU everywhere it was built; CUDA when it was built
against a CUDA torch with nvcc). It is loaded on first use, never at `import gradclip`, so a
machine without the build pays nothing and can still say why the native code is missing.
"""

from __future__ import annotations

import functools
from types import ModuleType

_BUILD_HINT = "pip install --no-build-isolation -e ."


@functools.cache
def load() -> tuple[ModuleType | None, str]:
    """(module, "") when the extension imports, else (None, why it did not)."""
    try:
        from gradclip import _C  # noqa: PLC0415 (lazy by design)
    except ImportError as exc:
        return None, f"the native extension gradclip._C is not built ({exc}); build it with: {_BUILD_HINT}"
    return _C, ""


def why_no_cuda_kernels() -> str:
    """Empty when gradclip._C holds the CUDA kernels, else why not."""
    module, why = load()
    if module is None:
        return why
    if not module.WITH_CUDA:
        return (
            "gradclip._C was built without CUDA kernels (CPU-only torch or no nvcc); rebuild on a "
            f"machine with a CUDA-enabled torch and nvcc: {_BUILD_HINT}"
        )
    return ""
