"""Evaluation rules scored without retraining: every trial of a gated run's search scores each
rule on its held-out selection slice; ``eval_gates: select`` takes the best trial's best rule
for the final run. Tiny random BERT on the session's fake GLUE mirror."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import yaml

from rankwise.main import main
from rankwise.methods import get_method
from rankwise.methods.spectral import TABSConfig, spectral_layers
from rankwise.methods.spectral.gates import EVAL_RULES
from rankwise.methods.targets import resolve_target_modules

RUN = "cpu-tabs-proposed-MiniLM-L6--SST-2"


def args(results, glue, *extra):
    return [f"run={RUN}", f"results_dir={results}", "mode=full", "model.name=tiny-bert",
            f"dataset.data_dir={glue}", "dataset.max_seq_length=32", "model.adapter.R=4",
            "model.adapter.budget=2", "training.epochs=1", "training.batch_size=16",
            "training.seeds=[1]", "training.log_every_n_steps=1", "training.inference_measurement.enabled=false",
            "optuna.search_space={learning_rate: {type: loguniform, low: 1e-4, high: 1e-2}}", *extra]


def test_the_rule_context_switches_every_gate_and_restores_the_configured_rule(tiny_bert):
    model, tokenizer = tiny_bert
    config = TABSConfig(R=4, budget=2.0, eval_gates="louizos")
    method = get_method("tabs").method_cls(config, None)
    wrapped = method.wrap(model, resolve_target_modules(model))
    assert method.evaluation_rules() == EVAL_RULES
    batch = dict(tokenizer(["a good movie", "bad"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        for layer in spectral_layers(wrapped).values():
            for p in layer.gate_source.parameters():
                p.normal_(0, 2.0)
    wrapped.eval()
    opened = {}
    for rule in EVAL_RULES:
        with method.evaluation_rule(wrapped, rule), torch.no_grad():
            assert {layer.gate.eval_rule for layer in spectral_layers(wrapped).values()} == {rule}
            method.begin_evaluation(wrapped, "validation")
            wrapped(**batch)
            opened[rule] = method.end_evaluation(wrapped)["spectral_open_gates_per_token"]
    assert {layer.gate.eval_rule for layer in spectral_layers(wrapped).values()} == {"louizos"}
    assert len(set(opened.values())) > 1  # the rules open different gates on the same model
    with pytest.raises(ValueError, match="no evaluation rule"):
        with method.evaluation_rule(wrapped, "median"):
            pass


def test_select_scores_every_rule_on_the_selection_slice_and_the_final_run_takes_the_best(tmp_path, fake_glue):
    results = tmp_path / "r"
    assert main(args(results, fake_glue, "optuna.n_trials=2", "model.adapter.eval_gates=select")) == 0
    run_dir = results / RUN
    study = optuna.load_study(study_name=RUN, storage=f"sqlite:///{run_dir / 'optuna' / 'study.db'}")
    trials = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 2
    for trial in trials:
        scores = trial.user_attrs["eval_rule_scores"]
        assert set(scores) == set(EVAL_RULES)
        chosen = trial.user_attrs["eval_gates"]
        assert trial.value == scores[chosen]["value"] == max(s["value"] for s in scores.values())
        for row in scores.values():
            assert row["spectral_budget_violations"] == 0 and row["capacity_ratio"] >= 0
        # the trial's constraint, as TPE stored it (feasible: the rules met the budget)
        assert trial.user_attrs["budget_violations"] == 0
        assert trial.constraints == {"budget_violations": 0.0}
        assert any(row["capacity_ratio"] > 0 for row in scores.values())
        # the training loop's own last evaluation (the configured rule while training: prob_open)
        # is the same pass as the post-hoc scoring under that rule
        history = [json.loads(line) for line in
                   (run_dir / "optuna" / "trials" / str(trial.number) / "history.jsonl").read_text().splitlines()]
        last = [r for r in history if r.get("type") == "eval"][-1]
        assert last["validation_accuracy"] == scores["prob_open"]["value"]
    best = max(trials, key=lambda t: (t.value, -t.number))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["adapter"]["eval_gates"] == best.user_attrs["eval_gates"]
    assert metrics["search"]["best_overrides"]["model.adapter.eval_gates"] == best.user_attrs["eval_gates"]
    assert metrics["search"]["eval_rule_scores"] == best.user_attrs["eval_rule_scores"]
    assert metrics["search"]["budget_violations"] == 0


def test_select_without_a_search_is_refused_naming_the_key(tmp_path, fake_glue, capsys):
    assert main(args(tmp_path / "r", fake_glue, "optuna.n_trials=0", "model.adapter.eval_gates=select")) == 2
    assert "model.adapter.eval_gates" in capsys.readouterr().err
    assert not (tmp_path / "r" / RUN / "metrics.json").exists()


def test_the_summary_lists_every_rule_of_the_best_trial():
    from rankwise.summary import rule_scores_section

    run = {"run_id": "tabs", "method": "proposed", "algorithm": "tabs"}
    report = {"selection": {"tabs": {"eval_rule_scores": {
        "sign": {"value": 0.61, "spectral_open_gates_per_token": 0.9, "capacity_ratio": 0.11,
                 "spectral_budget_violations": 0},
        "prob_open": {"value": 0.79, "spectral_open_gates_per_token": 8.1, "capacity_ratio": 0.95,
                      "spectral_budget_violations": 0}}}}}
    lines = "\n".join(rule_scores_section(report, [run]))
    assert "`sign` | 0.6100 | 0.90 | 0.11 | 0" in lines and "`prob_open` | 0.7900 | 8.10 | 0.95 | 0" in lines
    assert rule_scores_section({"selection": {}}, [run]) == []


def test_a_rule_over_budget_never_wins_over_one_that_meets_it():
    from rankwise.runner import best_rule

    scores = {"sign": {"value": 0.60, "spectral_budget_violations": 0},
              "prob_open": {"value": 0.85, "spectral_budget_violations": 3},
              "louizos": {"value": 0.87, "spectral_budget_violations": 1},
              "expected_count": {"value": 0.70, "spectral_budget_violations": 0}}
    assert best_rule(scores, "maximize") == "expected_count"
    assert best_rule(scores, "minimize") == "sign"
    over = {rule: {**row, "spectral_budget_violations": row["spectral_budget_violations"] + 1}
            for rule, row in scores.items()}
    assert best_rule(over, "maximize") == "expected_count"  # none meets it: the fewest violations
    ungated = {"only": {"value": 0.5, "spectral_budget_violations": None}}
    assert best_rule(ungated, "maximize") == "only"


def test_the_best_trial_is_the_best_one_that_meets_its_budget():
    from optuna.distributions import FloatDistribution

    from rankwise.search.trials import _best_trial

    def trial(number, value, violations=None):
        made = optuna.trial.create_trial(
            value=value, params={"lr": 0.1}, distributions={"lr": FloatDistribution(0.01, 1)},
            constraints=None if violations is None else {"budget_violations": float(violations)})
        made.number = number
        return made

    trials = [trial(0, 0.90, violations=1), trial(1, 0.80, violations=0), trial(2, 0.85)]
    assert _best_trial(trials, "maximize").number == 2  # no budget recorded: feasible
    assert _best_trial(trials[:2], "maximize").number == 1
    assert _best_trial([trial(0, 0.9, 2), trial(1, 0.7, 1)], "maximize").number == 1
