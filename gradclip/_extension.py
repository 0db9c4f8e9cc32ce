"""Lazy loader of the compiled CUDA extension `gradclip._C`.

Importing it registers the `gradclip::cuda_*` kernels for the CUDA dispatch key. It is loaded on
first use, never at `import gradclip`, so a machine without the build (or without a GPU) pays
nothing and can still say why the backend is missing.
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def load() -> tuple[ModuleType | None, str]:
    """(module, "") when the extension imports, else (None, why it did not)."""
    try:
        from gradclip import _C  # noqa: PLC0415 (lazy by design)
    except ImportError as exc:
        return None, (
            f"the CUDA extension gradclip._C is not built ({exc}); build it on a machine with a "
            "CUDA-enabled torch and nvcc: pip install --no-build-isolation -e ."
        )
    return _C, ""
