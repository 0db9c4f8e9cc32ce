#!/usr/bin/env bash
# The project's environment, made ready for `make demo` / `make test` (and run by them): a virtual
# environment (default .venv in the checkout) with torch, the dev tools and an editable gradclip.
#
#   bash tools/setup_env.sh            # what the Makefile runs; prints the venv's python on success
#   GRADCLIP_SETUP_FORCE=1 bash tools/setup_env.sh    # redo every step even if the stamp is fresh
#
# Guarantees:
# - A torch the machine already has is reused, never replaced: if the base interpreter (python3, or
#   $GRADCLIP_BASE_PYTHON) imports torch, the venv is made with --system-site-packages plus a .pth
#   line naming the base interpreter's own site-packages (so a base that is itself a venv, as on the
#   GPU image, is seen too). Only where no torch is importable is `torch==2.13.0` installed (the CPU
#   wheel on this project's machines). Likewise an importable triton (any version) is kept; else
#   triton==3.6.0 is installed.
# - Idempotent: a stamp (.venv/.gradclip-setup-stamp) holds a hash of setup.py, pyproject.toml,
#   csrc/** and this script; when it matches, the script exits after that check (no python start).
#   Any change there re-runs the missing installs and the editable build.
# - A failing step prints what failed, the command to retry and the log path; logs are kept under
#   build/setup/ (the build's own log: build/setup/install.log).
# Environment: GRADCLIP_VENV (venv path, default .venv), GRADCLIP_BASE_PYTHON (default python3),
# GRADCLIP_SETUP_FORCE=1, and whatever setup.py reads (GRADCLIP_REQUIRE_NATIVE=1 makes a failed native
# build fatal; CI sets it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${GRADCLIP_VENV:-.venv}"
BASE_PY="${GRADCLIP_BASE_PYTHON:-python3}"
VPY="$VENV/bin/python"
STAMP="$VENV/.gradclip-setup-stamp"
LOGDIR="build/setup"
RETRY="make setup   (or: bash tools/setup_env.sh; GRADCLIP_SETUP_FORCE=1 to redo every step)"

say() { echo "setup: $*" >&2; }
fail() {  # fail WHAT LOG
  say "FAILED: $1"
  if [ -n "${2:-}" ] && [ -f "$2" ]; then
    say "last lines of $2:"
    tail -n 25 "$2" >&2
    say "full log kept at $2"
  fi
  say "retry with: $RETRY"
  exit 1
}

fingerprint() {
  {
    echo "venv=$VENV base=$BASE_PY"
    sha256sum setup.py pyproject.toml tools/setup_env.sh
    find csrc -type f | LC_ALL=C sort | xargs sha256sum
  } | sha256sum | cut -d' ' -f1
}

want="$(fingerprint)"
if [ "${GRADCLIP_SETUP_FORCE:-0}" != 1 ] && [ -x "$VPY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0  # up to date
fi
mkdir -p "$LOGDIR"

# 1. The venv, created if missing.
if [ ! -x "$VPY" ]; then
  command -v "$BASE_PY" >/dev/null 2>&1 || fail "no base interpreter '$BASE_PY' (set GRADCLIP_BASE_PYTHON)"
  if "$BASE_PY" -c "import torch" >/dev/null 2>&1; then
    torch_desc="$("$BASE_PY" -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda)")"
    say "creating $VENV on $("$BASE_PY" -c 'import sys; print(sys.executable)'), reusing its torch ($torch_desc)"
    "$BASE_PY" -m venv --system-site-packages "$VENV" >"$LOGDIR/venv.log" 2>&1 || fail "python3 -m venv $VENV" "$LOGDIR/venv.log"
    # --system-site-packages exposes the *base* installation's packages only; when $BASE_PY is itself
    # a venv (the GPU image's python3 is), its site-packages come in through this .pth line.
    purelib="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$BASE_PY" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() if p))' \
      >"$purelib/_gradclip_base_site.pth"
  else
    say "creating $VENV (no torch importable by $BASE_PY: torch==2.13.0 will be installed)"
    "$BASE_PY" -m venv "$VENV" >"$LOGDIR/venv.log" 2>&1 || fail "python3 -m venv $VENV" "$LOGDIR/venv.log"
  fi
fi

has() { "$VPY" -c "import $1" >/dev/null 2>&1; }

# 2. torch: reuse whatever is importable; install the pinned CPU wheel only where none is.
if has torch; then
  say "torch: $("$VPY" -c 'import torch; print(torch.__version__, "at", torch.__file__)') (kept)"
else
  say "installing torch==2.13.0 (no torch importable)"
  "$VPY" -m pip install --disable-pip-version-check "torch==2.13.0" >"$LOGDIR/torch.log" 2>&1 ||
    fail "pip install torch==2.13.0" "$LOGDIR/torch.log"
fi

# 3. The other dependencies: only the missing ones, so a machine that cannot install anything (the
# GPU image) but has them passes. triton of any version is kept; ruff is for `make lint` only.
missing=()
has triton || missing+=("triton==3.6.0")
for pair in pybind11:pybind11 ninja:ninja pytest:pytest matplotlib:matplotlib numpy:numpy; do
  has "${pair%%:*}" || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  # torch is pinned to the installed one through a constraint, so nothing here can swap it.
  "$VPY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$LOGDIR/constraints.txt"
  "$VPY" -m pip install --disable-pip-version-check -c "$LOGDIR/constraints.txt" "${missing[@]}" \
    >"$LOGDIR/deps.log" 2>&1 || fail "pip install ${missing[*]}" "$LOGDIR/deps.log"
fi
if ! has ruff && ! [ -x "$VENV/bin/ruff" ]; then
  "$VPY" -m pip install --disable-pip-version-check ruff >"$LOGDIR/ruff.log" 2>&1 ||
    say "WARNING: ruff not installable here (only \`make lint\` needs it); see $LOGDIR/ruff.log"
fi

# 4. gradclip itself, editable, built against the torch above (no isolation: an isolated build would
# fetch another torch). --no-deps: nothing may pull a torch.
say "building gradclip (pip install --no-build-isolation --no-deps -e .); log: $LOGDIR/install.log"
if ! "$VPY" -m pip install --disable-pip-version-check -v --no-build-isolation --no-deps -e . \
  >"$LOGDIR/install.log" 2>&1; then
  fail "the editable install of gradclip (its native build is in the log)" "$LOGDIR/install.log"
fi
grep -h "gradclip: native extension\|gradclip: WARNING" "$LOGDIR/install.log" | sort -u >&2 || true
"$VPY" -c "import gradclip" >"$LOGDIR/import.log" 2>&1 || fail "import gradclip after the install" "$LOGDIR/import.log"
echo "$want" >"$STAMP"
say "ready: $VPY"
