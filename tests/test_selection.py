"""Honest selection: trials train on the training split minus a seeded, stratified held-out
slice and are scored on it; the final run trains on every training row and reports on
validation. Also: an AdaLoRA search with batch 64 in its space finishes (schedule as
fractions of the real step count)."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter

import datasets
import numpy as np
import optuna
from optuna.trial import TrialState

from rankwise.data.loading import EvalSplit, TaskData
from rankwise.data.selection import selection_data, selection_indices
from rankwise.data.tasks import get_task


def imbalanced_labels(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice([0, 1, 2], size=n, p=[0.6, 0.3, 0.1])


def test_slice_is_disjoint_complete_stratified_and_seeded():
    labels = imbalanced_labels()
    train, held = selection_indices(labels, 0.1, seed=5)
    assert not set(train) & set(held)
    assert sorted([*train, *held]) == list(range(len(labels)))
    assert len(held) == math.ceil(0.1 * len(labels))
    # Stratified: each class's share of the slice is its share of the data, to one row.
    for c, n_c in Counter(labels.tolist()).items():
        assert abs(int((labels[held] == c).sum()) - 0.1 * n_c) <= 1, c
    again_train, again_held = selection_indices(labels, 0.1, seed=5)
    assert np.array_equal(again_held, held) and np.array_equal(again_train, train)
    _, other = selection_indices(labels, 0.1, seed=6)
    assert not np.array_equal(other, held)


def test_regression_targets_are_stratified_by_quintile():
    y = np.random.default_rng(1).normal(size=500) ** 3  # skewed
    _, held = selection_indices(y, 0.2, seed=0, regression=True)
    edges = np.quantile(y, [0.2, 0.4, 0.6, 0.8])
    counts = np.bincount(np.searchsorted(edges, y[held], side="right"), minlength=5)
    assert all(abs(c - 20) <= 1 for c in counts), counts


def test_selection_data_trains_without_the_slice_and_scores_on_it():
    labels = imbalanced_labels(200)
    train = datasets.Dataset.from_dict({"idx": list(range(200)), "labels": labels.tolist()})
    data = TaskData(get_task("glue", "mnli"), train, [EvalSplit("validation", train.select(range(5)))])
    picked = selection_data(data, 0.1, seed=3)
    trial_rows, slice_rows = set(picked.train["idx"]), set(picked.evals[0].data["idx"])
    assert [e.name for e in picked.evals] == ["validation"]  # metrics keep their names
    assert not trial_rows & slice_rows and trial_rows | slice_rows == set(range(200))
    assert len(slice_rows) == 20


def search_cli_args(tmp_path, glue, run, n_trials, *extra):
    return [f"run={run}", f"results_dir={tmp_path}", "mode=full", "model.name=tiny-bert",
            f"dataset.data_dir={glue}", "dataset.max_train_samples=96", "training.epochs=1",
            "training.warmup_steps=0", "training.fp16=false", f"optuna.n_trials={n_trials}",
            "optuna.heartbeat_interval=1", "optuna.grace_period=2", "optuna.pruner=none",
            "training.inference_measurement.enabled=false", *extra]


def run_search_cli(tmp_path, glue, run, n_trials, *extra):
    from rankwise.main import main

    assert main(search_cli_args(tmp_path, glue, run, n_trials, *extra)) == 0
    run_dir = tmp_path / run
    url = f"sqlite:///{(run_dir / 'optuna' / 'study.db').resolve()}"
    trials = optuna.load_study(study_name=run, storage=url).get_trials(deepcopy=False)
    with (run_dir / "optuna" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    return run_dir, trials, rows, json.loads((run_dir / "metrics.json").read_text())


def eval_steps(history_file):
    rows = [json.loads(line) for line in history_file.read_text().splitlines()]
    return [r["step"] for r in rows if r.get("type") == "eval"]


def test_search_selects_on_a_held_out_slice_and_final_run_uses_all_rows(tmp_path, fake_glue):
    run = "comparative-1-DeBERTaV3-base-86-M--GLUE-MNLI"
    run_dir, trials, rows, metrics = run_search_cli(
        tmp_path, fake_glue, run, 2, "dataset.subset=rte", "dataset.splits.validation=validation",
        "optuna.search_space.batch_size.choices=[8]", "optuna.search_space.learning_rate.low=1e-4",
        "optuna.search_space.learning_rate.high=1e-2")
    held = math.ceil(0.1 * 96)
    for t in trials:
        assert t.user_attrs["train_rows"] == 96 - held and t.user_attrs["selection_rows"] == held
        assert eval_steps(run_dir / "optuna" / "trials" / str(t.number) / "history.jsonl") == [
            math.ceil((96 - held) / 8)]
    assert [r["selection_split"] for r in rows] == ["train_holdout_0.1"] * 2
    assert metrics["search"]["selection_split"] == "train_holdout_0.1"
    assert metrics["search"]["selection_optimistic"] is False
    # The final run trains on all 96 rows (12 batches of 8) and reports on validation (40 rows).
    assert eval_steps(run_dir / "seed42" / "history.jsonl") == [math.ceil(96 / 8)]
    n_validation = sum(1 for _ in (run_dir / "predictions" / "validation" / "seed42.jsonl").open())
    assert n_validation == 40


ADALORA_RTE = "comparative-2-DeBERTaV3-base-86-M--GLUE-RTE"
ADALORA_SEARCH = ("training.seeds=[1]", "training.save_strategy=no",
                  "model.adapter.deltaT=1", "optuna.search_space.batch_size.choices=[16,64]")


def test_adalora_search_with_batch_64_finishes(tmp_path, fake_glue):
    """The RTE experiment config's AdaLoRA search with batch 64 in its space (tiny model, 96
    RTE-like rows): 86 trial rows make 2 steps at batch 64, and the schedule, given as fractions
    (0.154, 0.462), resolves to tinit 0 < 2 - 1 instead of the paper's 600 + 1800 steps."""
    run_dir, trials, _, metrics = run_search_cli(
        tmp_path, fake_glue, ADALORA_RTE, 2, *ADALORA_SEARCH)
    assert isinstance(metrics["config"]["model"]["adapter"]["tinit"], float)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    assert 64 in {t.params["batch_size"] for t in trials}, [t.params for t in trials]
    assert metrics["status"] == "complete" and metrics["search"]["states"]["failed"] == 0
    report = json.loads((run_dir / "seed1" / "rank_pattern.json").read_text())
    assert report["allocated"]


def test_adalora_search_with_step_counts_records_invalid_trials_then_stops(tmp_path, fake_glue, capsys):
    """The old absolute schedule (600 + 1800 steps) makes every trial invalid: each is FAIL naming
    model.adapter.tinit and the study goes on until the failures exceed n_trials (exit 6)."""
    from rankwise.main import main

    args = search_cli_args(tmp_path, fake_glue, ADALORA_RTE, 1, *ADALORA_SEARCH,
                           "model.adapter.tinit=600", "model.adapter.tfinal=1800")
    assert main(args) == 6
    assert "model.adapter.tinit" in capsys.readouterr().err
    with (tmp_path / ADALORA_RTE / "optuna" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["FAIL", "FAIL"]
    assert all(r["note"].startswith("invalid configuration (model.adapter.tinit)") for r in rows)
