#!/usr/bin/env bash
# Experiment 1 at CPU size: Full FT, LoRA r=8, AdaLoRA and IW-LoRA on MiniLM / GLUE <TASK>
# (seeds 1-3 each), then the comparison. Usage: scripts/experiment1_cpu.sh [RTE|SST-2] [results dir]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TASK=${1:-RTE}
RESULTS=${2:-results/experiment1-cpu-$TASK}
if [ -z "${RANKWISE_DATA_DIR:-}" ] && [ -d ../shared/data/glue ]; then
  export RANKWISE_DATA_DIR=../shared/data/glue
fi
ids=()
for role in baseline comparative-1 comparative-2 proposed; do
  run="cpu-$role-MiniLM-L6--GLUE-$TASK"
  "$PY" -m rankwise.main run="$run" results_dir="$RESULTS" mode=full
  ids+=("\"$run\"")
done
"$PY" -m rankwise.evaluate results_dir="$RESULTS" run_ids="[$(IFS=,; echo "${ids[*]}")]"
cat "$RESULTS/comparison/summary.md"
