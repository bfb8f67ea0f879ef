#!/usr/bin/env bash
# Experiment 2 at CPU size: LoRA r=8, BHSP, CBSP, TABS and the two TABS ablations on MiniLM
# (SST-2 subset, RTE subset or short ListOps), then the comparison. Usage: scripts/experiment2_cpu.sh [SST-2|RTE|ListOps] [results dir]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TASK=${1:-SST-2}
RESULTS=${2:-results/experiment2-cpu-$TASK}
if [ -z "${RANKWISE_DATA_DIR:-}" ] && [ -d ../shared/data/glue ]; then
  export RANKWISE_DATA_DIR=../shared/data/glue
fi
ids=()
for role in comparative-1 comparative-2 comparative-3 proposed ablation-no-projection ablation-shared-gates; do
  run="cpu-tabs-$role-MiniLM-L6--$TASK"
  "$PY" -m rankwise.main run="$run" results_dir="$RESULTS" mode=full
  ids+=("\"$run\"")
done
"$PY" -m rankwise.evaluate results_dir="$RESULTS" run_ids="[$(IFS=,; echo "${ids[*]}")]"
cat "$RESULTS/comparison/summary.md"
