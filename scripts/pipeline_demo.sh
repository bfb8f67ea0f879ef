#!/usr/bin/env bash
# What an automated research pipeline does with rankwise, end to end, from an empty directory:
#   1. writes two run configs under config/runs/ (one carries an extra `logging:` section),
#   2. runs each in trial mode (the cheap check: every error full mode would raise),
#   3. runs each in full mode on MiniLM / RTE (128 training and 128 evaluation examples,
#      1 epoch, 64 tokens); the LoRA run has a 2-trial search that two workers share,
#   4. compares them with `evaluate` and lists the figures.
#
# Usage: mkdir /tmp/demo && cd /tmp/demo && bash <checkout>/scripts/pipeline_demo.sh
# GLUE data: $RANKWISE_DATA_DIR, else ../shared/data/glue beside the checkout.
# The `rankwise` command is used when installed, else `python -m rankwise.cli`
# ($PYTHON, default python3). A few minutes on 2 CPU cores.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export RANKWISE_DATA_DIR="${RANKWISE_DATA_DIR:-$HERE/../../shared/data/glue}"
if [[ ! -f "$RANKWISE_DATA_DIR/rte/train-00000-of-00001.parquet" ]]; then
  echo "no GLUE RTE under $RANKWISE_DATA_DIR; set RANKWISE_DATA_DIR to a GLUE mirror" >&2
  exit 2
fi
if command -v rankwise >/dev/null 2>&1; then
  RANKWISE=(rankwise)
else
  RANKWISE=("${PYTHON:-python3}" -m rankwise.cli)
fi
if [[ -n "$(ls -A . 2>/dev/null)" ]]; then
  echo "run me from an empty directory (this one holds: $(ls -A | head -5 | tr '\n' ' '))" >&2
  exit 2
fi
step() { printf '\n=== %s\n' "$*"; }
# run a rankwise command into a log; show its warnings and result line, stop if it fails
rw() {
  local log="log-$(( ++N )).txt"
  echo "+ rankwise $*"
  if ! "${RANKWISE[@]}" "$@" >"$log" 2>&1; then tail -5 "$log" >&2; exit 1; fi
  tr '\r' '\n' <"$log" | grep -E "WARNING|error:|complete|wrote" | sed 's/^[[:space:]]*//' | cut -c1-220 || true
}
N=0

step "1. run configs under config/runs/"
mkdir -p config/runs
cat > config/runs/demo-lora-rte.yaml <<'YAML'
run_id: demo-lora-rte
method: proposed
model:
  name: minilm
  adapter: {type: lora, rank: 8, lora_alpha: 16}
dataset:
  name: glue
  subset: rte
  splits: {train: train, validation: validation}
  max_seq_length: 64
  max_train_samples: 128
  max_eval_samples: 128
training:
  epochs: 1
  batch_size: 16
  learning_rate: 5.0e-4
  warmup_steps: 0
  seed: 42
  log_every_n_steps: 2
optuna:
  direction: maximize
  metric_name: validation_accuracy
  n_trials: 2
  pruner: none
  search_space:
    learning_rate: {type: loguniform, low: 1e-4, high: 1e-3}
logging:              # not a rankwise section: kept, warned about, recorded in metrics.json
  level: info
  sinks: [console, wandb]
YAML
cat > config/runs/demo-fullft-rte.yaml <<'YAML'
run_id: demo-fullft-rte
method: baseline
model:
  name: minilm
dataset:
  name: glue
  subset: rte
  splits: {train: train, validation: validation}
  max_seq_length: 64
  max_train_samples: 128
  max_eval_samples: 128
training:
  epochs: 1
  batch_size: 16
  learning_rate: 5.0e-5
  warmup_steps: 0
  seed: 42
  log_every_n_steps: 2
YAML
ls config/runs

step "2. trial mode (cheap check of everything full mode checks)"
for id in demo-lora-rte demo-fullft-rte; do
  rw run run="$id" results_dir=results-trial mode=trial
done

step "3. full mode; demo-lora-rte: two workers share its study"
pids=()
for w in 1 2; do
  "${RANKWISE[@]}" run run=demo-lora-rte results_dir=results mode=full >"worker$w.out" 2>"worker$w.err" &
  pids+=($!)
done
for i in 0 1; do
  if ! wait "${pids[$i]}"; then
    echo "worker $((i + 1)) failed:" >&2; tail -5 "worker$((i + 1)).err" >&2; exit 1
  fi
done
for w in 1 2; do
  echo "worker $w: $(grep -c 'trial #[0-9]* started' "worker$w.err") trial(s); $(tail -1 "worker$w.out")"
done
rw run run=demo-fullft-rte results_dir=results mode=full
python3 - <<'PY'
import json
for rid in ("demo-lora-rte", "demo-fullft-rte"):
    m = json.load(open(f"results/{rid}/metrics.json"))
    s = m.get("search") or {}
    print(rid, m["status"], "validation_accuracy=%.4f" % m["final"]["validation_accuracy"],
          "ignored_sections=%s" % sorted(m.get("ignored_sections") or {}),
          "search: %s trials, best %s" % (s.get("n_trials"), s.get("best_params")) if s else "")
PY

step "4. evaluate"
rw evaluate results_dir=results 'run_ids=[demo-lora-rte,demo-fullft-rte]'
sed -n '1,20p' results/comparison/summary.md

step "figures"
find results -name '*.pdf' -o -name '*.png' | sort
