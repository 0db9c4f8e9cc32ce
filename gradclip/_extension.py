"""Lazy loader of the native core `gradclip._C`.

Importing it registers the compiled kernels (CPU everywhere it was built; CUDA when it was built
against a CUDA torch with nvcc). It is loaded on first use, never at `import gradclip`, so a
machine without the build pays nothing and can still say why the native code is missing.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

from gradclip import _native_sources

_BUILD_HINT = "pip install --no-build-isolation -e ."


@functools.cache
def load() -> tuple[ModuleType | None, str]:
    """(module, "") when the extension imports, else (None, why it did not)."""
    try:
        from gradclip import _C  # noqa: PLC0415 (lazy by design)
    except ImportError as exc:
        return None, f"the native extension gradclip._C is not built ({exc}); build it with: {_BUILD_HINT}"
    stale = why_stale(_C.__file__)
    return (None, stale) if stale else (_C, "")


# The native sources beside the package: present in a source checkout (an editable install).
_CHECKOUT_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def why_stale(extension_file: str, csrc: str = _CHECKOUT_CSRC) -> str:
    """Empty unless `csrc` is gradclip's source tree (a checkout: setup.py beside it) and differs
    from the sources the extension was built from (setup.py records them beside it:
    gradclip/_native_sources.py)."""
    if not (os.path.isdir(csrc) and os.path.isfile(os.path.join(os.path.dirname(csrc), "setup.py"))):
        return ""  # an installed wheel: built from the sources it was shipped with
    stamp = os.path.join(os.path.dirname(extension_file), _native_sources.STAMP)
    try:
        with open(stamp) as f:
            built_from = f.read().strip()
    except OSError:
        built_from = ""
    if built_from == _native_sources.digest(csrc):
        return ""
    return (
        f"gradclip._C ({extension_file}) was built from other native sources than {csrc} (a build "
        f"older than a pull or an edit, or one without a record {_native_sources.STAMP}), so its "
        f"kernels are not used; rebuild it with: {_BUILD_HINT}"
    )


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
