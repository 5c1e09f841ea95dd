#!/usr/bin/env bash
# GPU check for a lent CUDA machine: < 5 minutes on a bare one, trains nothing, no network.
#
#   benchmarks/gpu_prepare.sh [RUN] [DATA]  # HERE, once: wheels + a small trained run (+ DATA's test split)
#                                           # into gpu_carry/ (<= 64 MiB)
#   benchmarks/gpu_check.sh [RUN]       # THERE (device tool: carry ["gpu_carry"]); RUN default gpu_carry/run
#
# Steps: environment (a venv over the machine's own torch, installing only the wheels in
# gpu_carry/wheels, no index), nvidia-smi, the PyTorch CUDA path of the served graphs at
# batch 1/8/32 (fp32, fp16 autocast, CUDA graphs; CPU fp32 baseline in the same run), and
# where gpu_carry/data (or CMG_GPU_CHECK_DATA) holds a test split, the scores' AUROC and changes
# at fp32 / fp16 autocast on the device against CPU fp32 (the FP16 engines' question), and
# where `tensorrt` imports: `cmg build --target tensorrt` + the standalone engine runner.
# At most 8 files go into $OUT (default ./gpu_check_out): steps.txt, gpu_check.log,
# torch.json, accuracy.json, trt.json. Exits non-zero when a step failed; a step that cannot run
# (TensorRT absent) is recorded as SKIPPED with the reason, never left out.
# CMG_GPU_CHECK_DEVICE=cpu runs the same script on a CPU-only host (the test suite does).
# The lent machine has no TensorRT, and TensorRT's wheels do not fit the 64 MiB carry: there
# the TensorRT steps are SKIPPED, and the engines are checked only where TensorRT is installed
# (the NGC TensorRT or Triton container: `cmg build --target tensorrt`, `trtexec.sh`). On CPU
# every graph passes the TensorRT 10 op check (`build/opcheck.py`) in the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CARRY=${CMG_GPU_CARRY:-$ROOT/gpu_carry}
DEVICE=${CMG_GPU_CHECK_DEVICE:-cuda}
ITERS=${CMG_GPU_CHECK_ITERS:-50}
BATCHES=${CMG_GPU_CHECK_BATCHES:-1,8,32}
export ROOT OUT CARRY
STEPS=$OUT/steps.txt
LOG=$OUT/gpu_check.log
: > "$STEPS"
: > "$LOG"
failed=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# step NAME TIMEOUT_S CMD...: runs CMD with its output in OUT/NAME.log; records ok/FAILED.
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "== $name: $*" | tee -a "$LOG"
  set +e
  if declare -F "$1" > /dev/null; then  # a shell function: timeout needs a program to run
    timeout "$limit" bash -c "$(declare -f "$1"); set -euo pipefail; $*" >> "$LOG" 2>&1
  else
    timeout "$limit" "$@" >> "$LOG" 2>&1
  fi
  rc=$?
  set -e
  local dt=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then
    echo "$name ok ${dt}s" | tee -a "$STEPS"
  else
    [ "$rc" -eq 124 ] && echo "(timed out after ${limit}s)" >> "$LOG"
    echo "$name FAILED rc=$rc ${dt}s (log $LOG)" | tee -a "$STEPS"
    tail -n 20 "$LOG" >&2
    failed=1
  fi
  return "$rc"
}

skip() {
  echo "$1 SKIPPED: $2" | tee -a "$STEPS"
}

setup_venv() {
  if [ -d "$CARRY/wheels" ]; then
    # Bare machine: a venv that sees the machine's torch/numpy/onnx, plus the carried wheels only.
    [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
    # python3 may itself be a venv (the lent machine's is /opt/torch/.venv): --system-site-packages
    # then reaches only the base interpreter, so a .pth adds python3's own site-packages.
    python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
      > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/host_python3.pth"
    "$VENV/bin/python" -m pip install -q --no-index --no-deps --find-links "$CARRY/wheels" "$CARRY"/wheels/*.whl
  fi
  # Every step's imports, here: a missing or mismatched carried wheel fails this step, not a later one
  "$VENV/bin/python" -c "import cmg, cmg_train.checkpoint, cmg.dataset, cmg_bench.gpu_check, cmg_build.repository, onnx, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
}
export VENV=${VENV:-$ROOT/.venv}
[ -d "$CARRY/wheels" ] && export VENV=$ROOT/.gpu_venv

if ! step env 120 setup_venv; then
  echo "gpu_check: no usable environment; see $LOG" >&2
  exit 1
fi
PY=$VENV/bin/python
CMG=$VENV/bin/cmg

if command -v nvidia-smi > /dev/null; then
  step nvidia_smi 30 nvidia-smi || true
else
  skip nvidia_smi "nvidia-smi not on PATH"
fi

RUN=${1:-${CMG_RUN:-$CARRY/run}}
if [ ! -f "$RUN/checkpoint.pt" ]; then
  echo "gpu_check: no trained run at $RUN (this check trains nothing: run benchmarks/gpu_prepare.sh here first)" | tee -a "$STEPS" >&2
  exit 1
fi
RUN=$(cd "$RUN" && pwd)

step torch 180 "$PY" -m cmg_bench.gpu_check torch --run "$RUN" --out "$OUT" --device "$DEVICE" \
  --iterations "$ITERS" --batches "$BATCHES" || true

DATA=${CMG_GPU_CHECK_DATA:-$CARRY/data}
if [ -d "$DATA/test" ]; then
  step accuracy 240 "$PY" -m cmg_bench.gpu_check accuracy --run "$RUN" --data "$DATA" --out "$OUT" \
    --device "$DEVICE" || true
else
  skip accuracy "no test split at $DATA (benchmarks/gpu_prepare.sh RUN DATA carries one)"
fi

if "$PY" -c "import tensorrt" > /dev/null 2>&1; then
  REPO=$ROOT/.gpu_repo_tensorrt  # engines stay outside $OUT: only results come back
  if step trt_build 240 "$CMG" build --run "$RUN" --target tensorrt --out "$REPO"; then
    step trt_engines 120 "$PY" -m cmg_bench.gpu_check trt --repo "$REPO" --out "$OUT" \
      --iterations "$ITERS" --batches "$BATCHES" || true
  else
    skip trt_engines "engine build failed (see $LOG)"
  fi
else
  skip trt_build "tensorrt does not import ($("$PY" -c 'import tensorrt' 2>&1 | tail -n 1))"
fi

echo "== summary ($OUT)"
cat "$STEPS"
exit "$failed"
