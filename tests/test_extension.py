"""gradclip._extension: a native build older than the checkout's csrc/ is refused, with the fix."""

from __future__ import annotations

import os

import pytest

from gradclip import _extension, _native_sources


def make_tree(root):
    csrc = root / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    (csrc / "tests").mkdir()
    (csrc / "fast_path.cpp").write_text("int a;\n")
    (csrc / "cpu" / "kernels.h").write_text("#pragma once\n")
    (csrc / "tests" / "unit.cpp").write_text("int t;\n")
    (csrc / "notes.txt").write_text("not a source\n")
    (root / "setup.py").write_text("")
    ext = root / "gradclip" / "_C.so"
    ext.parent.mkdir()
    ext.write_bytes(b"")
    (ext.parent / _native_sources.STAMP).write_text(_native_sources.digest(str(csrc)) + "\n")
    return csrc, ext


def test_a_build_from_these_sources_is_accepted(tmp_path):
    csrc, ext = make_tree(tmp_path)
    assert _extension.why_stale(str(ext), str(csrc)) == ""
    # What the extension is not built from does not matter: unit tests, other files.
    (csrc / "tests" / "unit.cpp").write_text("int changed;\n")
    (csrc / "notes.txt").write_text("changed\n")
    assert _extension.why_stale(str(ext), str(csrc)) == ""


@pytest.mark.parametrize(
    "change",
    [
        lambda csrc: (csrc / "fast_path.cpp").write_text("int b;\n"),
        lambda csrc: (csrc / "cpu" / "kernels.h").write_text("#pragma once\n// edited\n"),
        lambda csrc: (csrc / "cpu" / "new_kernel.cpp").write_text("int c;\n"),
        lambda csrc: os.rename(csrc / "fast_path.cpp", csrc / "cpu" / "fast_path.cpp"),
        lambda csrc: (csrc.parent / "gradclip" / _native_sources.STAMP).unlink(),
    ],
    ids=["edited", "header", "added", "moved", "no-record"],
)
def test_a_stale_build_is_refused_with_the_fix(tmp_path, change):
    csrc, ext = make_tree(tmp_path)
    change(csrc)
    why = _extension.why_stale(str(ext), str(csrc))
    assert str(csrc) in why and "pip install --no-build-isolation -e ." in why


def test_an_installed_package_is_not_checked(tmp_path):
    csrc, ext = make_tree(tmp_path)
    (ext.parent / _native_sources.STAMP).unlink()
    assert _extension.why_stale(str(ext), str(tmp_path / "no-csrc-here")) == ""
    # Another project's csrc/ beside site-packages is not ours: no setup.py beside it.
    (tmp_path / "setup.py").unlink()
    assert _extension.why_stale(str(ext), str(csrc)) == ""


def test_this_checkout_s_build_is_current_when_built():
    module, why = _extension.load()
    if module is None and "not built" in why:
        pytest.skip("gradclip._C is not built here")
    assert module is not None, why  # built but stale: `make setup` rebuilds it
