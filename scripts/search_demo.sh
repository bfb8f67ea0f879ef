#!/usr/bin/env bash
# Optuna search demo on CPU: the reference comparative config (LoRA r=8; search space:
# learning_rate loguniform [1e-5, 5e-4], batch_size in {16, 32, 64}) with 8 trials, on the
# packaged MiniLM and GLUE SST-2 cut to 240 training / 120 validation examples, 2 epochs,
# sequences of 64 tokens. MiniLM + LoRA trains at about 39 examples/s on 2 CPU cores, so a trial
# takes about 15 s and the whole job (8 trials + the final run) about 3 minutes; with pruning on,
# trials below the median after epoch 1 stop early once 5 trials have finished.
#
#   bash scripts/search_demo.sh [on|off] [results_dir] [extra overrides ...]
#
# on (default): median pruner; off: optuna.pruner=none. Results: <results_dir>/<run_id>/
# (metrics.json of the final run with a "search" block; optuna/ with study.db, trials.csv,
# best_params.json, top_trials.md and one folder per trial). Re-running the same command resumes
# the study; a second terminal running it joins the study as a second worker.
# Watch it live: optuna-dashboard sqlite:///<results_dir>/<run_id>/optuna/study.db
set -euo pipefail
cd "$(dirname "$0")/.."

pruning="${1:-on}"
case "$pruning" in
    on) pruner=median ;;
    off) pruner=none ;;
    *) echo "usage: $0 [on|off] [results_dir] [overrides ...]" >&2; exit 2 ;;
esac
results="${2:-results/search-demo-pruning-$pruning}"
python="${PYTHON:-.venv/bin/python}"

exec "$python" -m rankwise.main run=comparative-1-DeBERTaV3-base-86-M--GLUE-MNLI \
    results_dir="$results" mode=full \
    model.name=minilm dataset.data_dir="${RANKWISE_DATA_DIR:-../shared/data/glue}" \
    dataset.subset=sst2 dataset.splits.validation=validation \
    dataset.max_train_samples=240 dataset.max_eval_samples=120 dataset.max_seq_length=64 \
    training.epochs=2 training.warmup_ratio=0.06 \
    optuna.n_trials=8 optuna.pruner="$pruner" "${@:3}"
