"""Mechanism checks (``engagement`` in metrics.json): each check is shown to pass and to fail
on evidence built by hand, every registered method says which checks apply to it, and an
IW-LoRA run whose term is too weak to matter says so end to end.

References: the shares, ratios and movements are recomputed here from the numbers the
evidence holds; the gate movement is checked against parameters moved by hand.
"""

import copy
import json

import numpy as np
import pytest
import torch
from test_method_contract import row

from rankwise.config.schema import parse_run_config
from rankwise.errors import ConfigError
from rankwise.methods import build_method, registered_methods
from rankwise.methods.engagement import (
    THRESHOLDS,
    SeedEvidence,
    regulariser_share,
    resolve_thresholds,
)
from rankwise.methods.spectral.method import budget_met, capacity_ratio, gate_movement
from rankwise.methods.targets import resolve_target_modules
from rankwise.verdicts import above_chance


def steps(task: float, reg: float, n: int = 4, name: str = "iw_reg") -> list[dict]:
    return [{"step": 10 * (k + 1), "task_loss": task, f"reg/{name}": reg, "loss": task + reg}
            for k in range(n)]


def method_of(name: str):
    cfg = parse_run_config({"run_id": "checks", "method": "baseline",
                            "model": {"name": "tiny-bert", **row(name)}})
    return build_method(cfg)


FULL_EVIDENCE = {  # every key any method's checks read, at values that pass
    "adalora_rank_total": 24, "adalora_rank_budget": 24, "gate_movement": 0.5,
    "validation_spectral_open_gates_per_token": 2.0, "train_expected_open_gates_per_token": 2.1,
    "validation_spectral_budget_violations": 0,
}


def test_every_registered_method_says_which_checks_apply():
    """Each registered method (its contract row) declares its checks, runs exactly those on
    evidence that holds every key, and passes them there."""
    for name in registered_methods():
        history = steps(0.6, 0.06, name="iw_reg") + steps(0.6, 0.06, name="budget_penalty")
        evidence = [SeedEvidence(1, FULL_EVIDENCE, history)]
        method = method_of(name)
        checks = method.engagement_checks(evidence, dict(THRESHOLDS))
        assert [c.name for c in checks] == list(method.engagement_check_names), name
        assert all(c.passed for c in checks), (name, [c for c in checks if not c.passed])


def test_mechanisms_have_their_checks():
    assert method_of("iw_lora").engagement_check_names == ("regulariser_share",)
    assert method_of("adalora").engagement_check_names == ("rank_budget_met",)
    assert set(method_of("tabs").engagement_check_names) == {
        "capacity_ratio", "budget_met", "gate_movement", "regulariser_share"}
    assert method_of("lora").engagement_check_names == ()  # nothing beyond training


def test_regulariser_share_passes_fails_low_and_fails_high():
    ok = regulariser_share([SeedEvidence(1, {}, steps(0.6, 0.06))], "iw_reg", THRESHOLDS)
    assert ok.passed and ok.value == pytest.approx(0.06 / 0.66)
    weak = regulariser_share([SeedEvidence(1, {}, steps(0.65, 3e-4)),
                              SeedEvidence(2, {}, steps(0.6, 0.06))], "iw_reg", THRESHOLDS)
    assert not weak.passed  # one seed below the floor fails the run
    assert weak.value == pytest.approx(np.mean([3e-4 / 0.6503, 0.06 / 0.66]))
    swamped = regulariser_share([SeedEvidence(1, {}, steps(0.69, 49.7, name="budget_penalty"))],
                                "budget_penalty", THRESHOLDS)
    assert not swamped.passed and swamped.value == pytest.approx(49.7 / 50.39)
    missing = regulariser_share([SeedEvidence(1, {}, [])], "iw_reg", THRESHOLDS)
    assert not missing.passed and "no logged step" in missing.why


def test_capacity_ratio_flags_gates_trained_open_and_evaluated_shut():
    def ev(eval_open, train_open):
        return [SeedEvidence(1, {"validation_spectral_open_gates_per_token": eval_open,
                                 "train_expected_open_gates_per_token": train_open}, [])]

    shut = capacity_ratio(ev(0.9, 8.7), THRESHOLDS)
    assert not shut.passed and shut.value == pytest.approx(0.9 / 8.7)
    assert capacity_ratio(ev(8.0, 8.55), THRESHOLDS).passed
    assert not capacity_ratio(ev(16.0, 8.0), THRESHOLDS).passed  # opened twice what it trained
    assert capacity_ratio(ev(16.0, 8.0), {**THRESHOLDS, "capacity_ratio_max": 2.5}).passed


def test_budget_met_counts_violations_in_every_seed():
    ev = [SeedEvidence(s, {"validation_spectral_budget_violations": v,
                           "validation_spectral_open_gates_per_token": 2.0}, []) for s, v in ((1, 0), (2, 3))]
    check = budget_met(ev)
    assert not check.passed and check.value == 3
    assert budget_met(ev[:1]).passed
    assert budget_met([SeedEvidence(1, {}, [])]).passed  # no budget configured: nothing to meet


def test_gate_movement_floor_for_static_and_controller_gates():
    ev = [SeedEvidence(1, {"gate_movement": 0.06}, [])]
    assert not gate_movement(ev, THRESHOLDS, static=True).passed  # BHSP's 0.06 of a needed 1.6
    assert gate_movement(ev, THRESHOLDS, static=False).passed  # 6 % relative change of a controller


def test_rank_budget_met_fails_when_the_allocation_never_reached_its_target():
    adalora = method_of("adalora")
    never = [SeedEvidence(1, {"adalora_rank_total": 48, "adalora_rank_budget": 24}, [])]
    (check,) = adalora.engagement_checks(never, THRESHOLDS)
    assert check.name == "rank_budget_met" and not check.passed and check.value == pytest.approx(2.0)
    reached = [SeedEvidence(1, {"adalora_rank_total": 24, "adalora_rank_budget": 24}, [])]
    assert adalora.engagement_checks(reached, THRESHOLDS)[0].passed


def test_above_chance_against_the_majority_class_and_its_own_interval():
    rng = np.random.default_rng(0)
    labels = (rng.random(2000) < 0.6).astype(int)
    majority = np.ones((3, 2000), int)
    assert not above_chance(majority, labels, "accuracy", 1)["passed"]
    good = np.where(rng.random((3, 2000)) < 0.85, labels, 1 - labels)
    check = above_chance(good, labels, "accuracy", 1)
    assert check["passed"] and check["threshold"] == pytest.approx(labels.mean())
    # 62 of 100 right against a 60 % majority: above it, but inside its own interval (±0.095)
    y = np.array([1] * 60 + [0] * 40)
    slightly = np.where(np.arange(100) < 62, y, 1 - y)[None]
    check = above_chance(slightly, y, "accuracy", 1)
    assert check["value"] == pytest.approx(0.62) and check["threshold"] == pytest.approx(0.6)
    assert not check["passed"]


def test_thresholds_are_overridable_and_unknown_names_are_refused():
    assert resolve_thresholds({"capacity_ratio_min": 0.5})["capacity_ratio_min"] == 0.5
    with pytest.raises(ConfigError, match="engagement_thresholds.capacity_ratio_mni.*did you mean"):
        resolve_thresholds({"capacity_ratio_mni": 0.5})


def test_gate_movement_is_measured_from_initialisation(tiny_bert):
    backbone, _ = tiny_bert
    for name, static in (("bhsp", True), ("tabs", False)):
        method = method_of(name)
        model = method.wrap(copy.deepcopy(backbone), resolve_target_modules(backbone))
        params = [p for n, p in model.named_parameters() if "gate_source" in n]
        start = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(0.25)
        moved = method.gate_movement()
        if static:
            assert moved == pytest.approx(0.25, rel=1e-5)
        else:
            ref = (sum(float((p.detach() - s).square().sum()) for p, s in zip(params, start))
                   / sum(float(s.square().sum()) for s in start)) ** 0.5
            assert moved == pytest.approx(ref, rel=1e-5)


def test_iw_lora_with_a_negligible_alpha_is_not_engaged(tmp_path, fake_glue, capsys):
    from rankwise.main import main

    out = tmp_path / "r"
    code = main(["run=proposed-DeBERTaV3-base-86-M--GLUE-MNLI", f"results_dir={out}", "mode=trial",
                 "model.name=tiny-bert", f"dataset.data_dir={fake_glue}",
                 "model.importance_weighted_regularisation.reg_alpha=1e-12"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "NOT engaged" in stdout and "regulariser_share" in stdout
    metrics = json.loads((out / "proposed-DeBERTaV3-base-86-M--GLUE-MNLI" / "metrics.json").read_text())
    block = metrics["engagement"]
    share = next(c for c in block["checks"] if c["name"] == "regulariser_share")
    assert block["engaged"] is False and share["passed"] is False and share["value"] < 1e-6
    assert {c["name"] for c in block["checks"]} == {"above_chance", "regulariser_share"}


def test_a_search_records_how_far_each_trials_regulariser_is_from_engaged(tmp_path, fake_glue):
    import optuna
    from conftest import history_share

    from rankwise.main import main

    run = "proposed-DeBERTaV3-base-86-M--GLUE-MNLI"
    out = tmp_path / "r"
    # one trial whose term is a rounding error of the loss, one where it swamps it
    space = ("{iw_reg_alpha: {type: categorical, choices: [1.0e-12, 1.0e+10]}, "
             "learning_rate: {type: categorical, choices: [0.01]}, batch_size: {type: categorical, choices: [8]}}")
    assert main([f"run={run}", f"results_dir={out}", "mode=full", "model.name=tiny-bert",
                 f"dataset.data_dir={fake_glue}", "dataset.max_seq_length=32", "training.epochs=1",
                 "dataset.max_train_samples=64", "training.seeds=[1]", "training.log_every_n_steps=1",
                 "training.inference_measurement.enabled=false", "optuna.n_trials=2",
                 "model.importance_weighted_regularisation.sensitivity_warmup_steps=1",
                 f"optuna.search_space={space}"]) == 0
    run_dir = out / run
    study = optuna.load_study(study_name=run, storage=f"sqlite:///{run_dir / 'optuna' / 'study.db'}")
    trials = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    gaps = {}
    for trial in trials:
        share = history_share(run_dir / "optuna" / "trials" / str(trial.number) / "history.jsonl", "iw_reg")
        expected = max(0.0, 0.01 - share, share - 0.5)
        assert trial.constraints["regulariser_gap"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
        gaps[trial.params["iw_reg_alpha"]] = trial.constraints["regulariser_gap"]
    assert set(gaps) == {1.0e-12, 1.0e10}  # the two start-up points draw both strengths
    assert gaps[1.0e-12] > 0.0099 and gaps[1.0e10] > 0.2  # both ends are off, for the check's reasons
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = min(trials, key=lambda t: (sum(max(v, 0) for v in t.constraints.values()), -t.value, t.number))
    assert metrics["search"]["best_trial_number"] == best.number
    assert metrics["search"]["regulariser_gap"] == best.constraints["regulariser_gap"]
