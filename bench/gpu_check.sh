#!/usr/bin/env bash
# One command for a lent GPU (make gpu-check), inside one 10-minute device call:
#   1. build the extension   2. the whole pytest suite on CUDA   3. compute-sanitizer (memcheck,
#   racecheck, synccheck) on bench/sanitize.py   4. the benchmark on the anchor workloads
#   5. logs and JSON under $OUT (else bench/out/gpu-check)   6. a short summary table, printed last.
# Every step has its own timeout inside a global deadline (GRADCLIP_CHECK_DEADLINE_S, default 540 s);
# a failing step does not stop the later ones; the exit code is the number of failed steps (capped at 99).
# Knobs: PYTHON (default python3), GRADCLIP_CHECK_COMPILE (workloads for torch.compile, default none:
# it costs 15-330 s per workload), GRADCLIP_CHECK_MODELS (default anchors), GRADCLIP_CHECK_DTYPES
# (default fp32,bf16), TORCH_CUDA_ARCH_LIST (default: the visible GPU's arch only, to build faster).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${GRADCLIP_CHECK_DEADLINE_S:-540}))
OUTDIR=${OUT:-bench/out/gpu-check}
mkdir -p "$OUTDIR"
LOGS=$(mktemp -d)
declare -a NAMES STATUS SECS NOTES
FAILED=0

# run_step NAME CAP_S RESERVE_S CMD...: run CMD with timeout min(CAP, time left - RESERVE for later steps).
run_step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local now left limit t0 rc note
    now=$(date +%s)
    left=$((DEADLINE - now - reserve))
    limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        NAMES+=("$name"); STATUS+=("SKIPPED"); SECS+=(0); NOTES+=("no time left in the deadline")
        FAILED=$((FAILED + 1))
        return
    fi
    echo "=== [$(($(date +%s) - START))s] $name (timeout ${limit}s): $*" | tee -a "$LOGS/steps.log"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    note=$(grep -E "passed|failed|error|ERROR SUMMARY|sanitize.py:|wrote " "$LOGS/$name.log" | tail -n 1 | cut -c1-110)
    if ((rc == 124 || rc == 137)); then note="TIMED OUT after ${limit}s; $note"; fi
    NAMES+=("$name"); SECS+=($(($(date +%s) - t0))); NOTES+=("$note")
    if ((rc == 0)); then STATUS+=("ok"); else STATUS+=("FAIL rc=$rc"); FAILED=$((FAILED + 1)); fi
    tail -n 5 "$LOGS/$name.log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1
    nvcc --version 2>&1 | tail -n 2
    compute-sanitizer --version 2>&1 | head -n 2
    git log -1 --format='commit %H %ci' 2>&1; git status --short 2>&1 | head -n 20
} >"$LOGS/env.log" 2>&1

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    [[ -n "$ARCH" ]] && export TORCH_CUDA_ARCH_LIST=$ARCH
fi
export MAX_JOBS=${MAX_JOBS:-16}

run_step build 210 270 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
run_step pytest 150 210 $PY -m pytest -q -p no:cacheprovider tests
run_step memcheck 60 170 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 $PY bench/sanitize.py
run_step racecheck 60 130 compute-sanitizer --tool racecheck --error-exitcode 99 $PY bench/sanitize.py
run_step synccheck 45 100 compute-sanitizer --tool synccheck --error-exitcode 99 $PY bench/sanitize.py
# gradclip.bench exists once the editable install maps bench/; if the build failed, run it from the tree.
BENCH_MOD=gradclip.bench
$PY -c "import gradclip.bench" >/dev/null 2>&1 || BENCH_MOD=bench
run_step bench 420 15 $PY -m $BENCH_MOD --model "${GRADCLIP_CHECK_MODELS:-anchors}" \
    --dtype "${GRADCLIP_CHECK_DTYPES:-fp32,bf16}" --regime both --compile "${GRADCLIP_CHECK_COMPILE:-none}" \
    --budget 0.2 --out "$OUTDIR"

SUMMARY="$OUTDIR/summary.txt"
{
    echo "gradclip gpu-check: $(head -n 2 "$LOGS/env.log" | tail -n 1); total $(($(date +%s) - START)) s"
    printf '%-10s %-12s %6s  %s\n' step status secs note
    for i in "${!NAMES[@]}"; do
        printf '%-10s %-12s %6s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
    done
    echo
    if [[ -f "$OUTDIR/bench.json" ]]; then
        $PY bench/summary.py "$OUTDIR/bench.json" 2>&1
    else
        echo "no bench.json (the benchmark did not get far enough)"
    fi
    echo
    echo "files: $OUTDIR/{summary.txt,bench.json,bench.png,table.txt,logs.tar.gz}; failed steps: $FAILED"
} >"$SUMMARY" 2>&1
tar -czf "$OUTDIR/logs.tar.gz" -C "$LOGS" . 2>/dev/null
rm -rf "$LOGS"
cat "$SUMMARY"
exit $((FAILED > 99 ? 99 : FAILED))
