#!/usr/bin/env bash
# GPU check for a CUDA machine, with or without TensorRT (< 5 minutes with a trained run).
#
#   benchmarks/gpu_check.sh [RUN]        RUN: trained run folder (or $CMG_RUN)
#
# Without RUN it synthesizes tiny data and trains the tiny config first (slower: minutes).
# Steps: environment (venv), nvidia-smi, torch CUDA timing (scorer + detector, batch 1/8/32,
# medians), and where `tensorrt` imports: `cmg build --target tensorrt` + engine latency.
# Everything goes into $OUT (default ./gpu_check_out): one log per step, steps.txt with each
# step's status and time, *.json results. Exits non-zero when any step failed; a step that
# cannot run (TensorRT absent) is recorded as SKIPPED with the reason, never left out.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export ROOT
export VENV=${VENV:-$ROOT/.venv}
STEPS=$OUT/steps.txt
: > "$STEPS"
failed=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# step NAME TIMEOUT_S CMD...: runs CMD with its output in OUT/NAME.log; records ok/FAILED.
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "== $name: $*"
  set +e
  if declare -F "$1" > /dev/null; then  # a shell function: timeout needs a program to run
    timeout "$limit" bash -c "$(declare -f "$1"); set -euo pipefail; $*" > "$OUT/$name.log" 2>&1
  else
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  fi
  rc=$?
  set -e
  local dt=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then
    echo "$name ok ${dt}s" | tee -a "$STEPS"
    tail -n 5 "$OUT/$name.log"
  else
    [ "$rc" -eq 124 ] && echo "(timed out after ${limit}s)" >> "$OUT/$name.log"
    echo "$name FAILED rc=$rc ${dt}s (log $OUT/$name.log)" | tee -a "$STEPS"
    tail -n 20 "$OUT/$name.log" >&2
    failed=1
  fi
  return "$rc"
}

skip() {
  echo "$1 SKIPPED: $2" | tee -a "$STEPS"
}

setup_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -e "$ROOT"
  fi
  "$VENV/bin/python" -c "import cmg, cmg_train, cmg_bench, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
}

if ! step env 240 setup_venv; then
  echo "gpu_check: no usable environment; see $OUT/env.log" >&2
  exit 1
fi
PY=$VENV/bin/python
CMG=$VENV/bin/cmg

if command -v nvidia-smi > /dev/null; then
  step nvidia_smi 30 nvidia-smi || true
else
  skip nvidia_smi "nvidia-smi not on PATH"
fi

RUN=${1:-${CMG_RUN:-}}
if [ -z "$RUN" ]; then
  RUN=$OUT/run
  if [ ! -f "$RUN/checkpoint.pt" ]; then
    step synth 120 "$CMG" data synth --out "$OUT/data" --preset tiny || exit 1
    step train 600 "$CMG" train --config tiny --data "$OUT/data" --out "$RUN" || exit 1
  fi
fi
RUN=$(cd "$RUN" && pwd)

step torch_cuda 180 "$PY" -m cmg_bench.gpu_check torch --run "$RUN" --out "$OUT" --device cuda || true

if "$PY" -c "import tensorrt" > /dev/null 2>&1; then
  if [ ! -f "$RUN/onnx/export.json" ]; then
    step export 300 "$CMG" export --run "$RUN" || true
  fi
  if step trt_build 600 "$CMG" build --run "$RUN" --target tensorrt --out "$OUT/repo_tensorrt"; then
    step trt_engines 180 "$PY" -m cmg_bench.gpu_check trt --repo "$OUT/repo_tensorrt" --out "$OUT" || true
  else
    skip trt_engines "engine build failed (see $OUT/trt_build.log)"
  fi
else
  skip trt_build "tensorrt does not import in $VENV ($("$PY" -c 'import tensorrt' 2>&1 | tail -n 1))"
fi

echo "== summary ($OUT)"
cat "$STEPS"
exit "$failed"
