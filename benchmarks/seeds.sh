#!/usr/bin/env bash
# Accuracy over training seeds: train CONFIG on DATA with seeds 0 1 2, then the ablation table
# with medians, ranges and the pooled paired interval of each row's gain over the baseline.
#   benchmarks/seeds.sh DATA OUT [CONFIG]   -> OUT_s0, OUT_s1, OUT_s2, OUT_seeds/seeds.{md,json}
set -euo pipefail
data=${1:?usage: seeds.sh DATA OUT [CONFIG]}
out=${2:?usage: seeds.sh DATA OUT [CONFIG]}
config=${3:-small}
for seed in 0 1 2; do
  [ -f "${out}_s${seed}/checkpoint.pt" ] || cmg train --config "$config" --data "$data" --out "${out}_s${seed}" --seed "$seed" --no-progress
done
cmg eval --ablation --data "$data" --run "${out}_s0" --run "${out}_s1" --run "${out}_s2" --out "${out}_seeds" --no-progress
