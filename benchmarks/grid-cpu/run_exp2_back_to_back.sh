#!/usr/bin/env bash
# Experiment 2's SST-2 twin (6 roles x 5 seeds, reduced: 160 training and 160 validation rows,
# 1 epoch, 20 timed latency batches, 2 sweep passes), one grid version after the other, each from
# its own source tree, then the comparison of their wall times, core-times and predictions.
#   benchmarks/grid-cpu/run_exp2_back_to_back.sh BEFORE_SRC AFTER_SRC OUT_DIR
# BEFORE_SRC / AFTER_SRC: the src/ folders of two checkouts (e.g. git worktrees of two commits).
set -euo pipefail
before=$1 after=$2 out=$3
root="$(cd "$(dirname "$0")/../.." && pwd)"
PY=${PYTHON:-$root/.venv/bin/python}
ARGS=(experiment=2 scale=cpu 'tasks=[SST-2]' 'seeds=[1,2,3,4,5]' dataset.max_train_samples=160
      dataset.max_eval_samples=160 training.epochs=1 training.inference_measurement.timed_batches=20
      training.inference_measurement.repeats=2)
run() {  # name src [grid keys...]: prints the wall time in seconds
  local name=$1 src=$2; shift 2
  rm -rf "$out/$name"
  local t0 t1
  t0=$(date +%s.%N)
  PYTHONPATH=$src "$PY" -m rankwise.grid "${ARGS[@]}" results_dir="$out/$name" "$@" > "$out/$name.log" 2>&1
  t1=$(date +%s.%N)
  python3 -c "print(round($t1 - $t0, 1))"
}
mkdir -p "$out"
w_default=$(run before-default "$before")
w_2x1=$(run before-2x1 "$before" workers=2 cpus_per_run=1)
w_new=$(run seed-cells "$after")
"$PY" "$root/scripts/grid_benchmark.py" "before-default=$out/before-default:$w_default:2" \
    "before-2x1=$out/before-2x1:$w_2x1:1" "seed-cells=$out/seed-cells:$w_new:1" --baseline before-default
