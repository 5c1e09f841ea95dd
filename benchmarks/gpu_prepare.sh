#!/usr/bin/env bash
# Prepares gpu_carry/ HERE for benchmarks/gpu_check.sh on a lent GPU machine (no network there).
#
#   benchmarks/gpu_prepare.sh [RUN] [DATA]   RUN: a small trained run (default out/demo/run, from
#                                            `./dev demo`); DATA: a folder whose test split (and
#                                            ground_truth/) goes along for the accuracy step
#
# gpu_carry/wheels: this project as a wheel plus exactly what the GPU machine lacks for the
#   check (its Python 3.12 has torch, numpy, onnx, onnxruntime, PyYAML, tqdm, cuda-python):
#   tritonclient + grpcio + protobuf + python-rapidjson, which `cmg build` needs for Triton's
#   ModelConfig, at this venv's versions (tritonclient's generated code needs its protobuf).
#   No open_clip, sklearn or matplotlib: loading a run, its graphs and the test split needs
#   only torch, numpy and Pillow.
# gpu_carry/run: RUN's checkpoint, config and ONNX export (no eval plots, no logs).
# Fails when the folder exceeds 56 MiB (the device tool carries 64 MiB with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-out/demo/run}
CARRY=gpu_carry
PY=${PYTHON:-.venv/bin/python}
[ -f "$RUN/checkpoint.pt" ] || { echo "gpu_prepare: no trained run at $RUN (run ./dev demo first)" >&2; exit 2; }
ver() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/run/onnx"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY/wheels" .
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/wheels" \
  "tritonclient==$(ver tritonclient)" "grpcio==$(ver grpcio)" "protobuf==$(ver protobuf)" \
  "python-rapidjson==$(ver python-rapidjson)"
cp "$RUN/checkpoint.pt" "$RUN/config.yaml" "$CARRY/run/"
cp "$RUN"/onnx/*.onnx "$RUN"/onnx/*.json "$CARRY/run/onnx/"
if [ -n "${2:-}" ]; then
  [ -d "$2/test" ] || { echo "gpu_prepare: no test split at $2/test" >&2; exit 2; }
  mkdir -p "$CARRY/data"
  cp -r "$2/test" "$CARRY/data/"
  [ -d "$2/ground_truth" ] && cp -r "$2/ground_truth" "$CARRY/data/"
fi
size=$(du -sm "$CARRY" | cut -f1)
if [ "$size" -gt 56 ] && [ -f "$CARRY/run/onnx/cmer_teacher.onnx" ]; then
  # The torch check needs only the checkpoint; the trt step's `cmg build` needs every graph
  # (cmg_exact too), and TensorRT itself cannot travel in 64 MiB, so the teacher graph goes first.
  rm "$CARRY/run/onnx/cmer_teacher.onnx"
  echo "gpu_prepare: left out cmer_teacher.onnx (the exact mode's graph) to fit; the trt step would need it"
  size=$(du -sm "$CARRY" | cut -f1)
fi
ls -la "$CARRY/wheels"
echo "gpu_prepare: $CARRY is ${size} MiB (run: $RUN)"
if [ "$size" -gt 56 ]; then
  echo "gpu_prepare: $CARRY exceeds 56 MiB: use a smaller run" >&2
  exit 1
fi
