"""Evaluation rules scored without retraining: every trial of a gated run's search scores each
rule on its held-out selection slice; ``eval_gates: select`` takes the best trial's best rule
for the final run. Tiny random BERT on the session's fake GLUE mirror."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import yaml
from conftest import history_share

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
        for row in scores.values():
            assert row["spectral_budget_violations"] == 0 and row["capacity_ratio"] >= 0
        # the projection holds the budget, so the rules that hold are those within the capacity
        # bounds: the best of them, else the one nearest the bounds
        holding = [rule for rule, row in scores.items() if 0.67 <= row["capacity_ratio"] <= 1.5]
        gap = {rule: max(0.0, 0.67 - row["capacity_ratio"], row["capacity_ratio"] - 1.5)
               for rule, row in scores.items()}
        if holding:
            assert trial.value == scores[chosen]["value"] == max(scores[r]["value"] for r in holding)
        else:
            assert gap[chosen] == min(gap.values())
        # the trial's constraints, as TPE reads them
        # and the budget penalty's distance from its share bounds (a learned multiplier has none)
        reg_gap = 0.0
        if trial.params.get("model.adapter.budget_control", "penalty") == "penalty":
            share = history_share(run_dir / "optuna" / "trials" / str(trial.number) / "history.jsonl",
                                  "budget_penalty")
            reg_gap = max(0.0, 0.01 - share, share - 0.5)
        assert trial.constraints == {"budget_violations": 0.0, "capacity_gap": pytest.approx(gap[chosen]),
                                     "regulariser_gap": pytest.approx(reg_gap)}
        assert any(row["capacity_ratio"] > 0 for row in scores.values())
        # the training loop's own last evaluation (the configured rule while training: prob_open)
        # is the same pass as the post-hoc scoring under that rule
        history = [json.loads(line) for line in
                   (run_dir / "optuna" / "trials" / str(trial.number) / "history.jsonl").read_text().splitlines()]
        last = [r for r in history if r.get("type") == "eval"][-1]
        assert last["validation_accuracy"] == scores["prob_open"]["value"]
    # the best feasible trial, else the one with the smallest sum of violated constraints
    best = min(trials, key=lambda t: (sum(max(v, 0) for v in t.constraints.values()), -t.value, t.number))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["adapter"]["eval_gates"] == best.user_attrs["eval_gates"]
    assert metrics["search"]["best_overrides"]["model.adapter.eval_gates"] == best.user_attrs["eval_gates"]
    assert metrics["search"]["eval_rule_scores"] == best.user_attrs["eval_rule_scores"]
    assert metrics["search"]["budget_violations"] == 0
    assert metrics["search"]["capacity_gap"] == best.user_attrs["capacity_gap"]


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


def test_a_rule_over_budget_or_out_of_capacity_never_wins_over_one_that_holds():
    from rankwise.methods.engagement import THRESHOLDS
    from rankwise.runner import best_rule

    def row(value, violations, ratio):
        return {"value": value, "spectral_budget_violations": violations, "capacity_ratio": ratio}

    scores = {"sign": row(0.60, 0, 0.9), "prob_open": row(0.85, 3, 1.0),
              "louizos": row(0.87, 1, 1.1), "expected_count": row(0.70, 0, 1.2)}
    assert best_rule(scores, "maximize", THRESHOLDS) == "expected_count"
    assert best_rule(scores, "minimize", THRESHOLDS) == "sign"
    # a rule that shuts the gates meets any budget but not the capacity bounds
    shut = {**scores, "expected_count": row(0.95, 0, 0.1)}
    assert best_rule(shut, "maximize", THRESHOLDS) == "sign"
    over = {rule: {**r, "spectral_budget_violations": r["spectral_budget_violations"] + 1}
            for rule, r in scores.items()}
    assert best_rule(over, "maximize", THRESHOLDS) == "expected_count"  # none holds: the fewest violations
    starved = {"sign": row(0.9, 0, 0.0), "prob_open": row(0.5, 0, 0.5)}
    assert best_rule(starved, "maximize", THRESHOLDS) == "prob_open"  # then the nearest to the bounds
    ungated = {"only": {"value": 0.5, "spectral_budget_violations": None, "capacity_ratio": None}}
    assert best_rule(ungated, "maximize", THRESHOLDS) == "only"


def test_the_best_trial_is_the_best_feasible_one():
    from optuna.distributions import FloatDistribution

    from rankwise.search.trials import _best_trial

    def trial(number, value, violations=None, **constraints):
        if violations is not None:
            constraints["budget_violations"] = float(violations)
        made = optuna.trial.create_trial(
            value=value, params={"lr": 0.1}, distributions={"lr": FloatDistribution(0.01, 1)},
            constraints=constraints or None)
        made.number = number
        return made

    trials = [trial(0, 0.90, violations=1), trial(1, 0.80, violations=0), trial(2, 0.85)]
    assert _best_trial(trials, "maximize").number == 2  # no budget recorded: feasible
    assert _best_trial(trials[:2], "maximize").number == 1
    assert _best_trial([trial(0, 0.9, 2), trial(1, 0.7, 1)], "maximize").number == 1
    mixed = trial(3, 0.95, violations=0, capacity_gap=0.3)
    assert _best_trial([*trials[:2], mixed], "maximize").number == 1  # a capacity gap is infeasible too
    assert _best_trial([trials[0], mixed], "maximize").number == 3  # the smaller sum of violations
