#!/usr/bin/env bash
# A methods × tasks GLUE table at CPU size: LoRA r=8 (role proposed), DoRA and PiSSA at LoRA's
# rank, alpha and dropout (the same run with another model.adapter.type) and Full FT (baseline)
# on the packaged MiniLM, four GLUE tasks (CoLA, SST-2, MRPC, STS-B), small subsets, seeds 1-3,
# then one evaluate over all runs (comparison/summary.md: the table with glue_avg, and the
# verdicts within each task).
#   scripts/glue_table_cpu.sh [results dir] [max train examples] [max eval examples]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RESULTS=${1:-results/glue-table-cpu}
N_TRAIN=${2:-400}
N_EVAL=${3:-400}
if [ -z "${RANKWISE_DATA_DIR:-}" ] && [ -d ../shared/data/glue ]; then
  export RANKWISE_DATA_DIR=../shared/data/glue
fi
ids=()
for task in cola sst2 mrpc stsb; do
  for method in lora dora pissa full-ft; do
    run="glue-${task}-${method}"
    case "$method" in
      lora|full-ft) source=(run="minilm-sst2-${method}") ;;
      *) source=(run=minilm-sst2-lora model.adapter.type="$method" method=comparative-1) ;;
    esac
    "$PY" -m rankwise.main "${source[@]}" run_id="$run" results_dir="$RESULTS" mode=full \
      dataset.subset="$task" dataset.max_train_samples="$N_TRAIN" dataset.max_eval_samples="$N_EVAL" \
      optuna.metric_name=validation_loss optuna.direction=minimize \
      training.inference_measurement.enabled=false 'training.seeds=[1,2,3]'
    ids+=("\"$run\"")
  done
done
"$PY" -m rankwise.evaluate results_dir="$RESULTS" run_ids="[$(IFS=,; echo "${ids[*]}")]"
cat "$RESULTS/comparison/summary.md"
