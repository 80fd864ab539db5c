#!/usr/bin/env bash
# Every GPU check in one run: kernel parity and speed, full-size trainer steps against the baseline loop,
# a profiler trace of one SDXL DPO step, and synth/reward throughput. Results land flat in one folder
# (JSON per step, summary.md, log.txt) so they can be copied back from a device machine.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR            # on a CUDA machine
#   bash benchmarks/gpu_suite.sh OUT_DIR --cpu-dry-run   # tiny sizes on CPU, to check the script itself
#
# Wheels for what the GPU image lacks (diffusers, open_clip_torch, ...) are installed from .whl/ when present.
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUT_DIR [--cpu-dry-run]}
MODE=${2:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
LOG="$OUT/log.txt"
: > "$LOG"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/diffalign-site .whl/*.whl >>"$LOG" 2>&1 \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH=/tmp/diffalign-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

DRY=()
if [ "$MODE" = "--cpu-dry-run" ]; then
  DRY=(--cpu-dry-run)
  export DIFFALIGN_KERNELS=torch
fi

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  echo "$name $rc $((SECONDS - t0))" >> "$OUT/steps.txt"
}

: > "$OUT/steps.txt"
step env 60 python3 benchmarks/env_report.py --out "$OUT/env.json"
if [ ${#DRY[@]} -eq 0 ]; then
  # Kernel parity on CUDA (the CPU interpreter tests run in CI).
  step kernel_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
fi
step kernels 120 python3 benchmarks/kernels.py --out "$OUT" "${DRY[@]}"
step train_step 330 python3 benchmarks/train_step.py --full-size --out "$OUT/train_step.json" "${DRY[@]}"
step profile 90 python3 benchmarks/profile_step.py --out "$OUT/profile.json" "${DRY[@]}"
step synth 60 python3 benchmarks/synth_throughput.py --full-size --out "$OUT/synth.json" "${DRY[@]}"
python3 benchmarks/collect.py "$OUT" > "$OUT/summary.md" 2>>"$LOG"
cat "$OUT/summary.md"
