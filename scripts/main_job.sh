#!/usr/bin/env bash
# The main job: Full FT vs LoRA on MiniLM / GLUE SST-2 (4,000 training examples, 2 epochs,
# full validation set) on CPU, then the cross-run comparison. About 9 minutes on 2 cores.
# Data: $RANKWISE_DATA_DIR, else ../shared/data/glue beside the checkout, else the hub.
# Arguments are run-config overrides for both runs (e.g. training.bf16=true training.cpu_autocast=true).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RESULTS=${RESULTS:-results/main}
if [ -z "${RANKWISE_DATA_DIR:-}" ] && [ -d ../shared/data/glue ]; then
  export RANKWISE_DATA_DIR=../shared/data/glue
fi
for run in minilm-sst2-full-ft minilm-sst2-lora; do
  "$PY" -m rankwise.main run=$run results_dir="$RESULTS" mode=full "$@"
done
"$PY" -m rankwise.evaluate results_dir="$RESULTS" run_ids='["minilm-sst2-full-ft","minilm-sst2-lora"]'
cat "$RESULTS/comparison/summary.md"
