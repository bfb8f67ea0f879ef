#!/usr/bin/env bash
# One experiment's CPU twins on MiniLM, through the grid (python -m rankwise.grid), then the
# comparison (comparison/summary.md).
#   scripts/experiment_cpu.sh 1 [SST-2|MRPC|CoLA] [results dir] [grid keys ...]
#     experiment 1: IW-LoRA, LoRA r=8, AdaLoRA, Full FT and the uniform-L2 control (each searched
#     with the same number of trials, then seeds 1-5)
#   scripts/experiment_cpu.sh 2 [SST-2|MRPC|ListOps] [results dir] [grid keys ...]
#     experiment 2: TABS, LoRA r=8, BHSP, CBSP and the TABS ablations
# Grid keys after the results dir go to the grid, e.g. workers=2 or 'seeds=[1,2]'.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
EXPERIMENT=${1:?usage: scripts/experiment_cpu.sh 1|2 [TASK] [results dir] [grid keys ...]}
case "$EXPERIMENT" in
  1) TASK=${2:-SST-2} ;;
  2) TASK=${2:-SST-2} ;;
  *) echo "experiment must be 1 or 2, got '$EXPERIMENT'" >&2; exit 2 ;;
esac
RESULTS=${3:-results/experiment$EXPERIMENT-cpu-$TASK}
shift $(( $# < 3 ? $# : 3 ))
if [ -z "${RANKWISE_DATA_DIR:-}" ] && [ -d ../shared/data/glue ]; then
  export RANKWISE_DATA_DIR=../shared/data/glue
fi
status=0
"$PY" -m rankwise.grid experiment="$EXPERIMENT" scale=cpu "tasks=[$TASK]" results_dir="$RESULTS" "$@" || status=$?
if [ -f "$RESULTS/comparison/summary.md" ]; then cat "$RESULTS/comparison/summary.md"; fi
exit "$status"
