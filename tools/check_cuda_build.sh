#!/usr/bin/env bash
# make check-cuda-build: build gradclip._C for real against a CUDA torch (no GPU needed), then check it.
#
#   1. a cached venv OUTSIDE the checkout with the CUDA torch (default ~/.cache/gradclip-cuda-venv,
#      torch 2.14.1+cu130), created if missing from LOCAL wheels only (never downloaded: without a
#      local wheel the check says why and exits 0, skipped);
#   2. `setup.py build_ext` for TORCH_CUDA_ARCH_LIST (default "8.0;9.0") with CUDA_HOME at the real
#      toolkit root (an `nvcc` wrapper script on the PATH is followed) and the nvidia wheels' CUDA
#      headers on CPATH, out of tree (build/cuda-build/ by default: the checkout's own editable
#      gradclip/_C*.so is not touched), with GRADCLIP_REQUIRE_NATIVE=1 (a failed build fails);
#   3. in a fresh process, from a staging copy of the package: import gradclip._C, require its CUDA
#      kernels, and a kernel for the CUDA key of every gradclip::cuda_* op and for the CPU key of every
#      gradclip::cpu_* op (tools/native_registration.py);
#   4. ptxas registers / spills of every kernel of the build, per arch; any spill fails.
# It proves compile, link, symbol and registration errors of the binding are absent; it runs no kernel.
# Environment: GRADCLIP_CUDA_VENV, GRADCLIP_CUDA_TORCH (pip requirement, default torch==2.14.1),
# GRADCLIP_CUDA_WHEELS (space-separated local wheel dirs), GRADCLIP_CUDA_INDEXES (file:// indexes only), GRADCLIP_CUDA_BUILD_DIR, CUDA_HOME,
# TORCH_CUDA_ARCH_LIST, MAX_JOBS (default: all cores).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CVENV="${GRADCLIP_CUDA_VENV:-$HOME/.cache/gradclip-cuda-venv}"
CTORCH="${GRADCLIP_CUDA_TORCH:-torch==2.14.1}"
WHEELS="${GRADCLIP_CUDA_WHEELS:-/opt/pypi-more/files /opt/pypi/files /opt/wheels}"
INDEXES="${GRADCLIP_CUDA_INDEXES:-file:///opt/pypi/simple file:///opt/pypi-more/simple}"
BUILD="${GRADCLIP_CUDA_BUILD_DIR:-$ROOT/build/cuda-build}"
ARCHS="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
CPY="$CVENV/bin/python"
T0=$(date +%s)

say() { echo "check-cuda-build: $*"; }
skip() { say "SKIPPED: $*"; exit 0; }
die() { say "FAILED: $*" >&2; exit 1; }
load() { awk '{printf "load %s %s %s", $1, $2, $3}' /proc/loadavg 2>/dev/null; echo " on $(nproc) cores"; }

# 1. The CUDA torch venv (a ready marker guards against a half-made one).
venv_ready() {
  [ -x "$CPY" ] && "$CPY" -c "import torch, ninja, setuptools; assert torch.version.cuda" >/dev/null 2>&1
}
if ! venv_ready; then
  wheel=""
  req_version="${CTORCH#torch==}"
  for d in $WHEELS; do
    for f in "$d"/torch-"$req_version"-*.whl "$d"/torch-"$req_version"+cu*.whl; do
      [ -f "$f" ] && { wheel="$f"; break 2; }
    done
  done
  [ -n "$wheel" ] || skip "no CUDA torch venv at $CVENV and no local wheel for $CTORCH in: $WHEELS (it is never downloaded)"
  say "creating $CVENV from $wheel (local wheels only; ~5.5 GB) [$(load)]"
  t=$(date +%s)
  rm -rf "$CVENV"
  mkdir -p "$(dirname "$CVENV")"
  # Local sources only: pip's own config is ignored (PIP_CONFIG_FILE=/dev/null) and every index is a
  # file:// folder, so nothing can be downloaded.
  src=(--disable-pip-version-check)
  first=1
  for idx in $INDEXES; do
    case "$idx" in file://*) ;; *) die "GRADCLIP_CUDA_INDEXES may name file:// indexes only, got $idx" ;; esac
    [ -d "${idx#file://}" ] || continue
    if [ $first = 1 ]; then src+=(--index-url "$idx"); first=0; else src+=(--extra-index-url "$idx"); fi
  done
  [ $first = 1 ] && src+=(--no-index)
  for d in $WHEELS; do [ -d "$d" ] && src+=(--find-links "$d"); done
  python3 -m venv "$CVENV" || die "python3 -m venv $CVENV"
  export PIP_CONFIG_FILE=/dev/null
  if ! "$CPY" -m pip install -q "${src[@]}" "$CTORCH" ninja numpy pybind11 setuptools wheel >"$CVENV.log" 2>&1; then
    # Some dependency is not on local disk (here: cuda-bindings). torch itself and the build need
    # none of the missing ones: install torch alone, then each requirement that resolves locally.
    say "the full local resolve failed ($(grep -m1 'No matching distribution' "$CVENV.log" | cut -c1-120)); installing torch, then each dependency found locally"
    "$CPY" -m pip install -q "${src[@]}" --no-deps "$CTORCH" >>"$CVENV.log" 2>&1 || {
      tail -n 20 "$CVENV.log" >&2
      rm -rf "$CVENV"
      skip "no local wheel installs $CTORCH (log: $CVENV.log); nothing was downloaded"
    }
    reqs="$("$CPY" -c '
import importlib.metadata as m
from pip._vendor.packaging.requirements import Requirement
for r in m.requires("torch") or []:
    q = Requirement(r)
    if q.marker is None or q.marker.evaluate({"extra": ""}):
        q.marker = None
        print(str(q).replace(" ", ""))
')"
    missing=""
    for r in $reqs ninja numpy pybind11 setuptools wheel; do
      "$CPY" -m pip install -q "${src[@]}" "$r" >>"$CVENV.log" 2>&1 || missing="$missing $r"
    done
    say "not on local disk, left out:${missing:- nothing}"
  fi
  unset PIP_CONFIG_FILE
  venv_ready || die "the new venv $CVENV does not import a CUDA torch"
  say "venv created in $(($(date +%s) - t)) s"
fi
say "torch $("$CPY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') in $CVENV"

# 2. The toolkit: CUDA_HOME is the real root (the nvcc on the PATH may be a wrapper script).
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path="$(command -v nvcc || true)"
  [ -n "$nvcc_path" ] || skip "no nvcc on the PATH and CUDA_HOME unset"
  nvcc_real="$(readlink -f "$nvcc_path")"
  if head -c 2 "$nvcc_real" | grep -q '#!'; then  # a wrapper script: the first absolute .../bin/nvcc it names
    named="$(grep -o '/[^ "'"'"']*/bin/nvcc' "$nvcc_real" | head -n 1)"
    [ -n "$named" ] && nvcc_real="$(readlink -f "$named")"
  fi
  CUDA_HOME="$(dirname "$(dirname "$nvcc_real")")"
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || die "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
export CUDA_HOME
nv_inc="$("$CPY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))' 2>/dev/null || true)"
if [ -n "$nv_inc" ] && [ -d "$nv_inc" ]; then
  export CPATH="$nv_inc${CPATH:+:$CPATH}"
else
  nv_inc="(none: the toolkit's own headers only)"
fi
say "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*')), CPATH+=$nv_inc"

# 3. The build, out of tree, from scratch (so every kernel's ptxas report is printed).
rm -rf "$BUILD"
mkdir -p "$BUILD"
LOG="$BUILD/build.log"
export TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="${MAX_JOBS:-$(nproc)}" GRADCLIP_REQUIRE_NATIVE=1
unset GRADCLIP_SKIP_CUDA_BUILD GRADCLIP_SKIP_NATIVE_BUILD
say "building gradclip._C for sm ${ARCHS} with MAX_JOBS=$MAX_JOBS [$(load)]; log: ${LOG#"$ROOT"/}"
t=$(date +%s)
if ! "$CPY" setup.py -q build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib" >"$LOG" 2>&1; then
  grep -E "error|Error" "$LOG" | head -n 30 >&2
  tail -n 15 "$LOG" >&2
  die "the build failed (full log: $LOG)"
fi
build_s=$(($(date +%s) - t))
grep "gradclip: native extension" "$LOG"
so="$(find "$BUILD/lib" -name '_C*.so' | head -n 1)"
[ -n "$so" ] || die "the build produced no gradclip/_C*.so under $BUILD/lib"
say "built $(basename "$so") in ${build_s} s"

# 4. Import and registration, in a fresh process, from a staging copy (the checkout's gradclip/ holds
# the CPU build of another torch: it must not be what gets imported).
STAGE="$BUILD/stage"
mkdir -p "$STAGE/gradclip"
cp gradclip/*.py "$STAGE/gradclip/"
cp "$so" "$STAGE/gradclip/"
status=0
cp tools/native_registration.py "$STAGE/"
(cd "$STAGE" && env -u PYTHONPATH PYTHONNOUSERSITE=1 "$CPY" native_registration.py --require-cuda --expect-from "$STAGE") || status=1

# 5. ptxas resources of every kernel, per arch; a spill fails.
ptx="$(awk '
  /Compiling entry function/ { match($0, /_Z[^'"'"']*/); fn = substr($0, RSTART, RLENGTH);
                               match($0, /sm_[0-9]+a?/); arch = substr($0, RSTART, RLENGTH) }
  /spill stores/ { split($0, a, ","); st = a[2]; ld = a[3]; gsub(/[^0-9]/, "", st); gsub(/[^0-9]/, "", ld) }
  /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15);
                            printf "%s %s %s/%s %s\n", arch, regs, st, ld, fn }
' "$LOG" | sort -u)"
nk="$(printf '%s\n' "$ptx" | grep -c . || true)"
if [ "$nk" = 0 ]; then
  say "FAILED: no ptxas resource line in the build log (is -Xptxas=-v still in setup.py's nvcc flags?)" >&2
  status=1
else
  demangle=cat
  command -v c++filt >/dev/null 2>&1 && demangle="c++filt"
  printf '%s\n' "$ptx" | while read -r arch regs spill fn; do
    printf '  %-6s %4s regs  spill %-7s %s\n' "$arch" "$regs" "$spill" "$(echo "$fn" | $demangle | cut -c1-150)"
  done
  spills="$(printf '%s\n' "$ptx" | awk '$3 != "0/0"' | grep -c . || true)"
  say "ptxas: $nk kernel builds, $spills with spills"
  [ "$spills" = 0 ] || { say "FAILED: local-memory spills (bytes stores/loads above)" >&2; status=1; }
fi

total=$(($(date +%s) - T0))
if [ $status = 0 ]; then
  say "OK in ${total} s (build ${build_s} s) [$(load)]: compiled, linked, imported, every op registered; no kernel was run"
else
  say "FAILED after ${total} s (log: $LOG)" >&2
fi
exit $status
