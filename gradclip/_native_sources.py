"""The fingerprint of the native sources: setup.py records it next to the gradclip._C it builds,
and gradclip._extension refuses a build whose record does not match the checkout's csrc/ (an
editable install not rebuilt after a pull or an edit would otherwise run stale kernels, or lack
new ones). Standard library only: setup.py loads this file before gradclip is importable.
"""

from __future__ import annotations

import hashlib
import os

STAMP = "_C.sources"  # written next to the extension file
SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def digest(csrc: str) -> str:
    """sha256 over the relative path and bytes of every C++/CUDA file under `csrc` (csrc/tests,
    the torch-free unit tests, are not part of the extension)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(csrc):
        dirs[:] = sorted(d for d in dirs if not (root == csrc and d == "tests"))
        for name in sorted(files):
            if name.endswith(SUFFIXES):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, csrc).replace(os.sep, "/").encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()
