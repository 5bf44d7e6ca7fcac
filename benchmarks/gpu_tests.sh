#!/usr/bin/env bash
# `bash benchmarks/gpu_tests.sh [LOGDIR]`: on a GPU machine, the GPU checks of docs/gpu.md in the order that
# matters most, each with a time limit and its whole output kept in LOGDIR (default gpu-logs/), so that a check
# cut short still shows where it was:
#   1. Jittor on the GPU through cascade.runtime (the CUDA 13 edits, cuDNN or not);
#   2. train.sh, test.sh, the demo and fine-tuning end to end (tests/test_end_to_end.py);
#   3. the model and runtime tests (CLIP, ConvNeXt-V2, the specialist's image path);
#   4. the towers against PyTorch (benchmarks/gpu_check.py).
# Prints one line per check (exit status, seconds, the log's last lines). Exits 2 without a usable GPU.
# Limits in seconds: GPU_LIMIT_JITTOR, GPU_LIMIT_E2E, GPU_LIMIT_MODELS, GPU_LIMIT_TOWERS (300, 400, 300, 300).
# Python: $PYTHON, else .venv/bin/python, else python3 (it needs the test extras: bash scripts/setup.sh --test).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
logs="${1:-gpu-logs}"
mkdir -p "$logs" || exit 1
export PYTHONUNBUFFERED=1

check() {   # check NAME LIMIT COMMAND...: run COMMAND under LIMIT seconds, its output in $logs/NAME.log
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  rc=$?
  [ $rc = 124 ] && echo "(stopped at the ${limit} s limit)" >> "$logs/$name.log"
  echo "== $name: exit $rc in $((SECONDS - t)) s ($logs/$name.log)"
  tail -n 3 "$logs/$name.log" | sed 's/^/   /'
  return $rc
}

check jittor "${GPU_LIMIT_JITTOR:-300}" "$py" -c "
from cascade import runtime
jt = runtime.jittor()
print('runtime', runtime.status)
raise SystemExit(0 if jt.flags.use_cuda else 'no usable GPU: Jittor runs on the CPU (docs/gpu.md)')" || exit 2
check end_to_end "${GPU_LIMIT_E2E:-400}" "$py" -m pytest -q -p no:cacheprovider --durations=10 \
  tests/test_end_to_end.py
check models "${GPU_LIMIT_MODELS:-300}" "$py" -m pytest -q -p no:cacheprovider --durations=10 \
  tests/test_clip.py tests/test_convnextv2.py tests/test_runtime.py tests/test_specialist.py
check towers "${GPU_LIMIT_TOWERS:-300}" "$py" benchmarks/gpu_check.py
exit 0
