"""Optuna search: search-space translation, config overrides, study files, pruning,
crash-resume after SIGKILL and several workers on one storage. Objectives are toy functions
(no training); every expectation is written out or recomputed independently of the module."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from importlib import resources
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from search_worker import toy_metric, toy_run_config

from rankwise.config.schema import SearchSpaceEntry, parse_run_config
from rankwise.config.search_aliases import SEARCH_ALIASES, resolve_search_key
from rankwise.config.typed import from_mapping
from rankwise.errors import ConfigError, NonFiniteLossError
from rankwise.search import (
    SearchAborted,
    TrialReporter,
    apply_params,
    build_pruner,
    run_search,
    suggest_params,
    validate_search_space,
)

WORKER = Path(__file__).with_name("search_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def packaged_run(name: str) -> dict:
    text = (resources.files("rankwise") / "configs" / "runs" / f"{name}.yaml").read_text()
    return yaml.safe_load(text)


@pytest.fixture
def proposed() -> dict:
    return packaged_run("proposed-DeBERTaV3-base-86-M--GLUE-MNLI")


@pytest.fixture
def comparative() -> dict:
    return packaged_run("comparative-1-DeBERTaV3-base-86-M--GLUE-MNLI")


def toy_config(n_trials: int, **optuna_block) -> dict:
    return toy_run_config("toy", {"n_trials": n_trials, **optuna_block})


def optuna_block(cfg: dict):
    return parse_run_config(cfg).optuna


def load_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def stored_trials(study_dir: Path, run_id: str = "toy", url: str | None = None):
    url = url or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    return optuna.load_study(study_name=run_id, storage=url).get_trials(deepcopy=False)


# --- search space ------------------------------------------------------------------------


def test_reference_config_search_space_becomes_optuna_distributions(proposed):
    # The YAML holds ``low: 1e-5`` (a string for PyYAML); the schema makes it a float.
    assert proposed["optuna"]["search_space"]["learning_rate"]["low"] == "1e-5"
    space = parse_run_config(proposed).optuna.search_space
    trial = optuna.create_study().ask()
    params = suggest_params(trial, space)
    assert trial.distributions == {
        "learning_rate": FloatDistribution(low=1e-5, high=5e-4, log=True),
        "batch_size": CategoricalDistribution([16, 32, 64]),
        "iw_reg_alpha": FloatDistribution(low=1e-5, high=1e-3, log=True),
    }
    assert 1e-5 <= params["learning_rate"] <= 5e-4
    assert params["batch_size"] in (16, 32, 64)


ENTRY_CASES = [
    (
        {"type": "loguniform", "low": "1e-4", "high": "1e-1"},
        FloatDistribution(1e-4, 1e-1, log=True),
    ),
    ({"type": "uniform", "low": 0.0, "high": 0.3}, FloatDistribution(0.0, 0.3)),
    (
        {"type": "float", "low": 0.0, "high": 0.3, "step": 0.05},
        FloatDistribution(0.0, 0.3, step=0.05),
    ),
    (
        {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
        FloatDistribution(1e-3, 1.0, log=True),
    ),
    (
        {"type": "discrete_uniform", "low": 0, "high": 1, "step": 0.25},
        FloatDistribution(0, 1, step=0.25),
    ),
    ({"type": "int", "low": 100, "high": 1000, "step": 100}, IntDistribution(100, 1000, step=100)),
    ({"type": "int", "low": 2, "high": 64, "log": True}, IntDistribution(2, 64, log=True)),
    (
        {"type": "categorical", "choices": ["linear", "cosine"]},
        CategoricalDistribution(["linear", "cosine"]),
    ),
]


@pytest.mark.parametrize(
    "raw, expected",
    ENTRY_CASES,
    ids=[f"{raw['type']}-{i}" for i, (raw, _) in enumerate(ENTRY_CASES)],
)
def test_each_entry_type_maps_to_its_distribution(raw, expected):
    entry = from_mapping(SearchSpaceEntry, raw, "optuna.search_space.x")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = []
    for _ in range(30):
        trial = study.ask()
        values.append(suggest_params(trial, {"x": entry})["x"])
        assert trial.distributions == {"x": expected}
        study.tell(trial, 0.0)
    # Values lie in the declared set, computed here from the YAML numbers alone.
    if raw["type"] == "categorical":
        assert set(values) <= set(raw["choices"])
    elif raw.get("step"):
        grid = np.arange(float(raw["low"]), float(raw["high"]) + 1e-12, float(raw["step"]))
        assert all(np.isclose(grid, v).any() for v in values)
    else:
        assert all(float(raw["low"]) <= v <= float(raw["high"]) for v in values)
    assert all(type(v) is int for v in values) == (raw["type"] == "int")


# --- aliases and overrides ---------------------------------------------------------------


def test_apply_params_writes_each_alias_at_its_path(proposed):
    params = {
        "learning_rate": 3e-4,
        "batch_size": 64,
        "weight_decay": 0.05,
        "warmup_steps": 100,
        "iw_reg_alpha": 2e-5,
        "lora_rank": 16,
        "lora_alpha": 32.0,
        "lora_dropout": 0.2,
    }
    assert set(params) == set(SEARCH_ALIASES)
    original = json.dumps(proposed, sort_keys=True)
    out = apply_params(proposed, params)
    assert json.dumps(proposed, sort_keys=True) == original  # input untouched
    assert out["training"]["learning_rate"] == 3e-4
    assert out["training"]["batch_size"] == 64
    assert out["training"]["weight_decay"] == 0.05
    assert out["training"]["warmup_steps"] == 100
    assert out["model"]["importance_weighted_regularisation"]["reg_alpha"] == 2e-5
    assert out["model"]["adapter"]["rank"] == 16
    assert out["model"]["adapter"]["lora_alpha"] == 32.0
    assert out["model"]["adapter"]["dropout"] == 0.2  # absent from the YAML, schema default 0.1
    cfg = parse_run_config(out)
    assert (cfg.training.learning_rate, cfg.model.adapter.rank, cfg.model.adapter.dropout) == (
        3e-4,
        16,
        0.2,
    )
    assert out["training"]["optimizer"] == proposed["training"]["optimizer"]  # rest preserved


def test_dotted_paths_reach_schema_defaults_not_written_in_the_run_file(comparative):
    assert "adam_beta2" not in comparative["training"]
    assert resolve_search_key("training.adam_beta2", comparative) == "training.adam_beta2"
    out = apply_params(comparative, {"training.adam_beta2": 0.98, "dataset.max_seq_length": 128})
    assert out["training"]["adam_beta2"] == 0.98 and out["dataset"]["max_seq_length"] == 128


@pytest.mark.parametrize(
    "name, hint",
    [
        ("learning_rte", "did you mean 'learning_rate'"),
        ("training.learnig_rate", "did you mean 'training.learning_rate'"),
        ("model.adapter.rnak", "did you mean 'model.adapter.rank'"),
        ("optuna.n_trials", "only model, dataset, training keys"),
    ],
)
def test_unknown_search_key_names_its_search_space_entry(proposed, name, hint):
    with pytest.raises(ConfigError) as err:
        resolve_search_key(name, proposed)
    assert err.value.key == f"optuna.search_space.{name}"
    assert hint in err.value.message


def test_adapter_alias_on_a_run_without_adapter_is_refused():
    with pytest.raises(ConfigError) as err:
        resolve_search_key("lora_rank", toy_config(1))
    assert err.value.key == "optuna.search_space.lora_rank"
    assert "model.adapter.rank" in err.value.message


def test_reference_search_spaces_validate(proposed, comparative):
    for cfg in (proposed, comparative):
        validate_search_space(cfg, parse_run_config(cfg).optuna)


@pytest.mark.parametrize(
    "space, key, needle",
    [
        (
            {"batch_size": {"type": "categorical", "choices": [16, 0]}},
            "training.batch_size",
            "value 0: choice #1 of optuna.search_space.batch_size",
        ),
        (
            {"batch_size": {"type": "categorical", "choices": [16, 32.5]}},
            "training.batch_size",
            "expected an integer",
        ),
        (
            {"lora_dropout": {"type": "uniform", "low": 0.0, "high": 1.0}},
            "model.adapter.dropout",
            "value 1.0: high of optuna.search_space.lora_dropout",
        ),
        (
            {"lora_rank": {"type": "uniform", "low": 4, "high": 16}},
            "optuna.search_space.lora_rank.type",
            "integer",
        ),
        (
            {"dataset.preprocessing.padding": {"type": "uniform", "low": 0, "high": 1}},
            "optuna.search_space.dataset.preprocessing.padding.type",
            "categorical",
        ),
        (
            {"weight_decay": {"type": "discrete_uniform", "low": 0, "high": 0.1}},
            "optuna.search_space.weight_decay.step",
            "required",
        ),
        (
            {
                "learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
                "training.learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
            },
            "optuna.search_space.training.learning_rate",
            "as 'learning_rate' does",
        ),
        (
            {"training.target_modules": {"type": "categorical", "choices": [["query"]]}},
            "optuna.search_space.training.target_modules",
            "not a value",
        ),
        (
            {"model.target_modules": {"type": "categorical", "choices": [["query"]]}},
            "optuna.search_space.model.target_modules.choices.0",
            "what Optuna can store",
        ),
    ],
)
def test_validate_search_space_names_the_offending_key(comparative, space, key, needle):
    comparative["optuna"]["search_space"] = space
    with pytest.raises(ConfigError) as err:
        validate_search_space(comparative, optuna_block(comparative))
    assert err.value.key == key
    assert needle in err.value.message


def test_tuning_iw_strength_of_a_run_without_iw_is_refused(comparative):
    comparative["optuna"]["search_space"]["iw_reg_alpha"] = {
        "type": "loguniform",
        "low": 1e-5,
        "high": 1e-3,
    }
    with pytest.raises(ConfigError) as err:
        validate_search_space(comparative, optuna_block(comparative))
    assert err.value.key == "optuna.search_space.iw_reg_alpha"


def test_direction_must_agree_with_the_metric(comparative):
    comparative["optuna"]["direction"] = "minimize"
    with pytest.raises(ConfigError) as err:
        validate_search_space(comparative, optuna_block(comparative))
    assert err.value.key == "optuna.direction"


@pytest.mark.parametrize(
    "block, key",
    [
        ({"heartbeat_interval": 30, "grace_period": 30}, "optuna.grace_period"),
        ({"pruner_percentile": 100}, "optuna.pruner_percentile"),
        ({"pruner_warmup_epochs": -1}, "optuna.pruner_warmup_epochs"),
        ({"timeout_s": 0}, "optuna.timeout_s"),
    ],
)
def test_optuna_block_checks_name_their_key(block, key):
    with pytest.raises(ConfigError) as err:
        parse_run_config(toy_config(1, **block))
    assert err.value.key == key


# --- one worker --------------------------------------------------------------------------


def test_four_trial_study_writes_best_params_and_trials_csv(tmp_path, caplog):
    cfg = toy_config(4, heartbeat_interval=1)
    seen = []

    def objective(trial_cfg, reporter):
        value = toy_metric(trial_cfg)
        seen.append(
            (
                reporter.trial_number,
                trial_cfg["training"]["learning_rate"],
                trial_cfg["training"]["weight_decay"],
                trial_cfg["training"]["seed"],
                value,
            )
        )
        reporter.report(value, 1)
        return value

    caplog.set_level(logging.INFO, logger="rankwise.search")
    result = run_search("toy", cfg, optuna_block(cfg), 11, tmp_path, objective)
    assert (result.n_complete, result.n_pruned, result.n_failed) == (4, 0, 0)
    best = max(seen, key=lambda s: s[4])
    assert result.best_value == best[4] and result.best_trial_number == best[0]
    assert result.best_params == {"learning_rate": best[1], "weight_decay": best[2]}
    assert all(s[3] == 11 for s in seen)  # every trial trains with the search seed

    summary = json.loads((tmp_path / "best_params.json").read_text())
    assert summary["best_value"] == best[4] and summary["best_trial_number"] == best[0]
    assert summary["best_params"] == result.best_params
    assert summary["best_overrides"] == {
        "training.learning_rate": best[1],
        "training.weight_decay": best[2],
    }
    rows = load_csv(tmp_path / "trials.csv")
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    for row, (number, lr, wd, seed, value) in zip(rows, sorted(seen)):
        assert row["state"] == "COMPLETE" and int(row["seed"]) == seed
        assert float(row["value"]) == value
        assert float(row["params_learning_rate"]) == lr and float(row["params_weight_decay"]) == wd
        assert float(row["duration_s"]) >= 0

    log = caplog.text
    assert "trial 4/4" in log and "ETA" in log
    for number, lr, wd, _, _ in seen:  # one line as each trial starts, with its parameters
        assert f"trial #{number} started" in log and f"learning_rate={lr:.4g}" in log
    md = (tmp_path / "top_trials.md").read_text().splitlines()
    table_rows = [line.split("|")[1:-1] for line in md if line.startswith("| ")][1:]
    assert [int(cells[1]) for cells in table_rows] == [
        s[0] for s in sorted(seen, key=lambda s: (-s[4], s[0]))
    ]
    assert "4 complete, 0 pruned, 0 fail" in "\n".join(md)
    table = log[log.index("top trials") :]
    ranked = [s[0] for s in sorted(seen, key=lambda s: -s[4])]
    positions = [table.index(f"{v:.4g}") for v in sorted((s[4] for s in seen), reverse=True)]
    assert positions == sorted(positions), f"top-5 table not ordered by value: {ranked}"


def test_top_trials_table_without_rich_is_plain_text_in_value_order(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.console", None)  # makes ``import rich.console`` fail
    cfg = toy_config(3, heartbeat_interval=1, direction="maximize")
    values = iter([0.2, 0.7, 0.5])
    caplog.set_level(logging.INFO, logger="rankwise.search")
    run_search("toy", cfg, optuna_block(cfg), 0, tmp_path, lambda c, r: next(values))
    lines = caplog.text[caplog.text.index("top trials") :].splitlines()[1:5]
    assert lines[0].split()[:3] == ["rank", "trial", "validation_accuracy"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["1", "1", "0.7"],
        ["2", "2", "0.5"],
        ["3", "0", "0.2"],
    ]


def test_same_seed_same_suggestions_and_resumed_study_does_not_repeat_them(tmp_path):
    def params_of(study_dir, n_trials, seed=3):
        cfg = toy_config(n_trials, heartbeat_interval=1)
        run_search("toy", cfg, optuna_block(cfg), seed, study_dir, lambda c, r: toy_metric(c))
        return [
            tuple(t.params.values())
            for t in sorted(stored_trials(study_dir), key=lambda t: t.number)
        ]

    first = params_of(tmp_path / "a", 2)
    assert params_of(tmp_path / "b", 2) == first
    assert params_of(tmp_path / "c", 2, seed=4) != first
    # Resume with a larger budget: two more trials, new parameters (one sampler seeded once per
    # process would replay trials 0 and 1 here), then nothing more to do.
    extended = params_of(tmp_path / "a", 4)
    assert extended[:2] == first and len(extended) == 4
    assert len(set(extended)) == 4
    assert params_of(tmp_path / "a", 4) == extended


def test_resuming_with_another_search_space_is_refused(tmp_path):
    cfg = toy_config(1, heartbeat_interval=1)
    run_search("toy", cfg, optuna_block(cfg), 0, tmp_path, lambda c, r: toy_metric(c))
    cfg["optuna"]["search_space"]["learning_rate"]["high"] = "1e-1"
    with pytest.raises(ConfigError) as err:
        run_search("toy", cfg, optuna_block(cfg), 0, tmp_path, lambda c, r: toy_metric(c))
    assert err.value.key == "optuna.search_space"


@pytest.mark.parametrize(
    "pruner, warmup, pruned_after",
    [
        ("median", 0, 1),
        ("median", 1, 2),
        ("percentile", 0, 1),
        ("none", 0, None),
    ],
)
def test_pruner_stops_a_trial_reporting_bad_values(tmp_path, pruner, warmup, pruned_after):
    """Trials 0, 1 and 3 report 0.9 at epochs 1-3; trial 2 reports 0.1. With two start-up
    trials the median (and 25th percentile) at every epoch is 0.9, so trial 2 is pruned at the
    first epoch the warm-up allows, and never reports after it."""
    cfg = toy_config(
        4, heartbeat_interval=1, pruner=pruner, n_startup_trials=2, pruner_warmup_epochs=warmup
    )
    reported: dict[int, list[int]] = {}

    def objective(trial_cfg, reporter):
        value = 0.1 if reporter.trial_number == 2 else 0.9
        for epoch in (1, 2, 3):
            reported.setdefault(reporter.trial_number, []).append(epoch)
            reporter.report(value, epoch)
        return value

    result = run_search("toy", cfg, optuna_block(cfg), 0, tmp_path, objective)
    states = {t.number: t.state for t in stored_trials(tmp_path)}
    if pruned_after is None:
        assert set(states.values()) == {TrialState.COMPLETE} and result.n_pruned == 0
        return
    assert states == {
        0: TrialState.COMPLETE,
        1: TrialState.COMPLETE,
        2: TrialState.PRUNED,
        3: TrialState.COMPLETE,
    }
    assert reported[2] == list(range(1, pruned_after + 1))
    assert (result.n_complete, result.n_pruned) == (3, 1)
    row = load_csv(tmp_path / "trials.csv")[2]
    assert row["state"] == "PRUNED" and f"pruned after epoch {pruned_after}" in row["note"]


def test_pruner_choice_follows_config():
    block = optuna_block(toy_config(1, pruner="hyperband", pruner_warmup_epochs=2))
    assert isinstance(build_pruner(block), optuna.pruners.HyperbandPruner)
    assert isinstance(
        build_pruner(optuna_block(toy_config(1, pruner="none"))), optuna.pruners.NopPruner
    )


def test_reporter_counts_epochs_from_one():
    reporter = TrialReporter(optuna.create_study().ask(), "validation_accuracy")
    with pytest.raises(ValueError, match="starts at 1"):
        reporter.report(0.5, 0)


def test_diverged_trial_fails_and_search_goes_on(tmp_path):
    cfg = toy_config(3, heartbeat_interval=1)

    def objective(trial_cfg, reporter):
        if reporter.trial_number == 1:
            raise NonFiniteLossError("loss is nan at step 7 (term: task)")
        return toy_metric(trial_cfg)

    result = run_search("toy", cfg, optuna_block(cfg), 0, tmp_path, objective)
    assert (result.n_complete, result.n_failed) == (3, 1)
    rows = load_csv(tmp_path / "trials.csv")
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "NonFiniteLossError: loss is nan at step 7" in rows[1]["note"]


def test_search_stops_when_failures_exceed_the_limit_and_on_unexpected_errors(tmp_path):
    cfg = toy_config(3, heartbeat_interval=1)

    def always_nan(trial_cfg, reporter):
        raise NonFiniteLossError("loss is nan")

    with pytest.raises(SearchAborted, match="3 failed trials"):
        run_search(
            "toy", cfg, optuna_block(cfg), 0, tmp_path / "a", always_nan, max_failed_trials=2
        )
    assert len(load_csv(tmp_path / "a" / "trials.csv")) == 3

    def bug(trial_cfg, reporter):
        raise KeyError("no such column")

    with pytest.raises(KeyError):
        run_search("toy", cfg, optuna_block(cfg), 0, tmp_path / "b", bug)
    rows = load_csv(tmp_path / "b" / "trials.csv")
    assert [r["state"] for r in rows] == ["FAIL"] and "KeyError" in rows[0]["note"]


def test_timeout_stops_starting_new_trials(tmp_path):
    cfg = toy_config(50, heartbeat_interval=1, timeout_s=0.3)

    def slow(trial_cfg, reporter):
        time.sleep(0.4)
        return toy_metric(trial_cfg)

    result = run_search("toy", cfg, optuna_block(cfg), 0, tmp_path, slow)
    assert result.n_complete == 1


# --- several processes -------------------------------------------------------------------


def test_last_slot_goes_to_the_lowest_numbered_started_trial():
    """n_trials = 3 with 2 finished: of two trials started together only the first may run,
    and a queued retry with a smaller number holds the slot against a newer trial."""
    from rankwise.search import _holds_a_slot

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    first, second = study.ask(), study.ask()
    assert _holds_a_slot(study, first.number, 3) and not _holds_a_slot(study, second.number, 3)
    study.tell(first, state=TrialState.FAIL)  # the first one failed: its slot is free again
    assert _holds_a_slot(study, second.number, 3)
    study.tell(second, state=TrialState.FAIL)

    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))  # e.g. a retry
    study.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING))  # started after it
    numbers = {t.state: t.number for t in study.get_trials()}
    assert numbers[TrialState.WAITING] < numbers[TrialState.RUNNING]
    assert not _holds_a_slot(study, numbers[TrialState.RUNNING], 3)
    assert _holds_a_slot(study, numbers[TrialState.RUNNING], 4)


def spawn_worker(**spec) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env)


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"worker exited with {proc.returncode} before {path.name}"
        assert time.monotonic() < deadline, f"timed out waiting for {path.name}"
        time.sleep(0.05)


def test_sigkilled_worker_trial_is_failed_and_retried_on_restart(tmp_path):
    study_dir = tmp_path / "optuna"
    url = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    record = tmp_path / "record.txt"
    proc = spawn_worker(
        run_id="toy",
        storage=url,
        study_dir=str(study_dir),
        n_trials=4,
        heartbeat_interval=1,
        grace_period=2,
        trial_seconds=0.0,
        record=str(record),
        hang_on_trial=2,
    )
    try:
        wait_for(Path(f"{record}.hanging"), proc)
        assert {t.number: t.state for t in stored_trials(study_dir)} == {
            0: TrialState.COMPLETE,
            1: TrialState.COMPLETE,
            2: TrialState.RUNNING,
        }
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    dead_params = stored_trials(study_dir)[2].params

    cfg = toy_config(4, storage=url, heartbeat_interval=1, grace_period=2)
    result = run_search("toy", cfg, optuna_block(cfg), 7, study_dir, lambda c, r: toy_metric(c))
    trials = stored_trials(study_dir)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(finished) == 4 and [t.number for t in failed] == [2]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 2]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == dead_params
    assert (result.n_complete, result.n_failed) == (4, 1)
    notes = {int(r["number"]): r["note"] for r in load_csv(study_dir / "trials.csv")}
    assert "no heartbeat" in notes[2] and f"retried as trial {retries[0].number}" in notes[2]


def run_two_workers(tmp_path: Path, url: str, run_id: str, n_trials: int) -> None:
    """One worker in a subprocess and one in this process, released together."""
    study_dir = tmp_path / "optuna"
    sub_record, own_record, own_file = tmp_path / "sub.txt", [], tmp_path / "own.txt"
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = spawn_worker(
        run_id=run_id,
        storage=url,
        study_dir=str(study_dir),
        n_trials=n_trials,
        heartbeat_interval=1,
        grace_period=3,
        trial_seconds=0.3,
        record=str(sub_record),
        ready=str(ready),
        go=str(go),
        partner_record=str(own_file),
    )
    try:
        wait_for(ready, proc)
        cfg = toy_config(n_trials, storage=url, heartbeat_interval=1, grace_period=3)
        cfg["run_id"] = run_id

        def objective(trial_cfg, reporter):
            own_record.append(reporter.trial_number)
            own_file.touch()
            if len(own_record) == 1:  # both workers hold a trial before either goes on
                wait_for(sub_record, proc, timeout_s=60.0)
            time.sleep(0.3)
            return toy_metric(trial_cfg)

        go.touch()
        run_search(run_id, cfg, optuna_block(cfg), 7, study_dir, objective)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    theirs = [int(line.split()[1]) for line in sub_record.read_text().split("\n") if line]
    trials = optuna.load_study(study_name=run_id, storage=url).get_trials(deepcopy=False)
    # The worker's toy objective reports epoch 1, so the default median pruner may prune some.
    finished = sorted(
        t.number for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    )
    assert len(finished) == n_trials
    assert theirs and own_record, "both workers should have run trials"
    assert not set(theirs) & set(own_record)
    assert sorted(theirs + own_record) == finished
    # Trial-number seeding: concurrent workers do not propose the same parameters.
    assert len({tuple(t.params.values()) for t in trials if t.params}) == n_trials
    rows = load_csv(study_dir / "trials.csv")
    assert sum(r["state"] in ("COMPLETE", "PRUNED") for r in rows) == n_trials


def test_two_worker_processes_share_one_sqlite_study(tmp_path):
    url = f"sqlite:///{(tmp_path / 'optuna' / 'study.db').resolve()}"
    (tmp_path / "optuna").mkdir()
    run_two_workers(tmp_path, url, "toy", n_trials=8)


@pytest.mark.postgres
def test_two_worker_processes_share_one_postgres_study(tmp_path, postgres_url):
    run_id = f"toy-{uuid.uuid4().hex[:8]}"
    try:
        run_two_workers(tmp_path, postgres_url, run_id, n_trials=8)
    finally:
        optuna.delete_study(study_name=run_id, storage=postgres_url)


# --- trials whose parameters make an invalid config --------------------------------------


def test_invalid_config_trial_fails_naming_the_key_and_search_goes_on(tmp_path):
    cfg = toy_config(3, heartbeat_interval=1)

    def objective(trial_cfg, reporter):
        if reporter.trial_number in (1, 2):
            raise ConfigError("model.adapter.tinit", "AdaLoRA needs tinit < total_step - tfinal")
        return toy_metric(trial_cfg)

    # The crash limit (max_failed_trials=1) is not reached by invalid-config trials once a
    # trial has finished.
    result = run_search("toy", cfg, optuna_block(cfg), 0, tmp_path, objective, max_failed_trials=1)
    assert (result.n_complete, result.n_failed, result.n_invalid) == (3, 2, 2)
    rows = load_csv(tmp_path / "trials.csv")
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    for row in rows[1:3]:
        assert row["note"].startswith("invalid configuration (model.adapter.tinit): AdaLoRA needs")
    invalid = [t for t in stored_trials(tmp_path) if t.state == TrialState.FAIL]
    assert [t.user_attrs["invalid_config_key"] for t in invalid] == ["model.adapter.tinit"] * 2
    assert json.loads((tmp_path / "best_params.json").read_text())["n_invalid_config"] == 2


def test_search_where_every_trial_is_invalid_stops(tmp_path):
    cfg = toy_config(2, heartbeat_interval=1)

    def never_valid(trial_cfg, reporter):
        raise ConfigError("training.batch_size", "too large for the data")

    with pytest.raises(SearchAborted, match=r"all 3 trials failed .*training\.batch_size"):
        run_search("toy", cfg, optuna_block(cfg), 0, tmp_path, never_valid)


def test_config_error_outside_the_run_still_stops_the_search(tmp_path):
    cfg = toy_config(2, heartbeat_interval=1)

    def no_gpu(trial_cfg, reporter):
        raise ConfigError("device", "cuda requested but no CUDA device is available")

    with pytest.raises(ConfigError, match="device"):
        run_search("toy", cfg, optuna_block(cfg), 0, tmp_path, no_gpu)
    assert [r["state"] for r in load_csv(tmp_path / "trials.csv")] == ["FAIL"]


def test_trials_csv_says_which_split_scored_each_trial(tmp_path):
    for split, label in ((None, "train_holdout_0.1"), (0.25, "train_holdout_0.25"),
                         ("validation", "validation")):
        extra = {} if split is None else {"selection_split": split}
        cfg = toy_config(1, heartbeat_interval=1, **extra)
        out = tmp_path / label
        run_search("toy", cfg, optuna_block(cfg), 0, out, lambda c, r: toy_metric(c))
        assert [r["selection_split"] for r in load_csv(out / "trials.csv")] == [label]


def test_resuming_with_another_selection_split_is_refused(tmp_path):
    cfg = toy_config(1, heartbeat_interval=1)
    run_search("toy", cfg, optuna_block(cfg), 0, tmp_path, lambda c, r: toy_metric(c))
    other = toy_config(2, heartbeat_interval=1, selection_split="validation")
    with pytest.raises(ConfigError, match="optuna.selection_split"):
        run_search("toy", other, optuna_block(other), 0, tmp_path, lambda c, r: toy_metric(c))


@pytest.mark.parametrize("value", [0, 1, 1.5, "train", -0.1])
def test_selection_split_must_be_a_fraction_or_validation(value):
    cfg = toy_config(1, selection_split=value)
    with pytest.raises(ConfigError, match="optuna.selection_split"):
        parse_run_config(cfg)
