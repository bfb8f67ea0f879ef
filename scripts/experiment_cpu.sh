#!/usr/bin/env bash
# One experiment's CPU twins on MiniLM, then the comparison (comparison/summary.md).
#   scripts/experiment_cpu.sh 1 [RTE|SST-2] [results dir]
#     experiment 1: Full FT, LoRA r=8, AdaLoRA, IW-LoRA (seeds 1-3 each)
#   scripts/experiment_cpu.sh 2 [SST-2|RTE|ListOps] [results dir]
#     experiment 2: LoRA r=8, BHSP, CBSP, TABS and the two TABS ablations
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
EXPERIMENT=${1:?usage: scripts/experiment_cpu.sh 1|2 [TASK] [results dir]}
case "$EXPERIMENT" in
  1) TASK=${2:-RTE}
     roles=(baseline comparative-1 comparative-2 proposed)
     pattern="cpu-%s-MiniLM-L6--GLUE-$TASK" ;;
  2) TASK=${2:-SST-2}
     roles=(comparative-1 comparative-2 comparative-3 proposed ablation-no-projection ablation-shared-gates)
     pattern="cpu-tabs-%s-MiniLM-L6--$TASK" ;;
  *) echo "experiment must be 1 or 2, got '$EXPERIMENT'" >&2; exit 2 ;;
esac
RESULTS=${3:-results/experiment$EXPERIMENT-cpu-$TASK}
if [ -z "${RANKWISE_DATA_DIR:-}" ] && [ -d ../shared/data/glue ]; then
  export RANKWISE_DATA_DIR=../shared/data/glue
fi
ids=()
for role in "${roles[@]}"; do
  # shellcheck disable=SC2059
  run=$(printf "$pattern" "$role")
  "$PY" -m rankwise.main run="$run" results_dir="$RESULTS" mode=full
  ids+=("\"$run\"")
done
"$PY" -m rankwise.evaluate results_dir="$RESULTS" run_ids="[$(IFS=,; echo "${ids[*]}")]"
cat "$RESULTS/comparison/summary.md"
