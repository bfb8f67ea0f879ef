"""What a research pipeline relies on: trial mode catches what full mode would refuse, split
names checked at load, run configs found under ``config/runs/``, extra top-level sections kept,
no run folder left by an error before training, per-run figures named by run id, the
``rankwise`` command. Tiny random models on the session's fake GLUE mirror."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd
import pytest
import tomllib
import yaml

from rankwise.config.loader import load_job, packaged_configs
from rankwise.errors import ConfigError
from rankwise.main import main

RUN = "comparative-1-DeBERTaV3-base-86-M--GLUE-MNLI"
ROOT = Path(__file__).resolve().parents[1]


def rte_args(results: Path, glue: Path, *extra: str, run: str = RUN, mode: str = "trial") -> list[str]:
    return [f"run={run}", f"results_dir={results}", f"mode={mode}", "model.name=tiny-bert",
            f"dataset.data_dir={glue}", "dataset.subset=rte", "dataset.splits.validation=validation",
            "training.fp16=false", "training.inference_measurement.lengths=[16]", *extra]


def tiny_run_file(path: Path, run_id: str, **sections) -> Path:
    cfg = {"run_id": run_id, "method": "baseline", "model": {"name": "tiny-bert"},
           "dataset": {"name": "glue", "subset": "rte"},
           "training": {"epochs": 1, "batch_size": 16, "fp16": False}, **sections}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- 1. trial mode checks everything full mode checks ------------------------------------------

UNKNOWN_KNOB = "optuna.search_space.not_a_knob={type:uniform,low:0.0,high:1.0}"


@pytest.mark.parametrize("mode", ["trial", "full"])
def test_unknown_search_space_entry_exits_2_in_both_modes_and_writes_nothing(
        mode, tmp_path, fake_glue, capsys):
    assert main(rte_args(tmp_path, fake_glue, UNKNOWN_KNOB, mode=mode)) == 2
    err = capsys.readouterr().err
    assert "optuna.search_space.not_a_knob" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_trial_mode_checks_the_search_bounds_of_the_full_config(tmp_path, fake_glue, capsys):
    # A batch size of 0 is one of the categorical choices: the full run's search would refuse it.
    assert main(rte_args(tmp_path, fake_glue, "optuna.search_space.batch_size.choices=[0,16]")) == 2
    assert "training.batch_size" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_trial_mode_needs_wandb_installed_when_full_mode_would(tmp_path, fake_glue, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert main(rte_args(tmp_path, fake_glue, "wandb.mode=offline")) == 2
    assert "wandb" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def glue_with_bad_row(tmp_path_factory):
    """RTE whose training row 90 has an empty sentence: beyond trial mode's 2 × 32 rows."""
    from conftest import write_fake_glue

    root = tmp_path_factory.mktemp("badglue")
    path = write_fake_glue(root, "rte", "train", 96)
    write_fake_glue(root, "rte", "validation", 40, seed=3)
    frame = pd.read_parquet(path)
    frame.loc[90, "sentence1"] = ""
    frame.to_parquet(path)
    return root


def test_trial_mode_validates_the_rows_the_full_run_reads(tmp_path, glue_with_bad_row, capsys):
    code = main(rte_args(tmp_path, glue_with_bad_row, "optuna.n_trials=0", "training.batch_size=32"))
    assert code == 3
    assert "row 90, column 'sentence1'" in capsys.readouterr().err
    # an error before training starts leaves no run folder behind
    assert not (tmp_path / RUN).exists()


# --- 2. split names, and no run folder from an error before training --------------------------

@pytest.mark.parametrize(("key", "value", "hint"), [
    ("dataset.splits.validation", "validation_matchd", "validation_matched"),
    ("dataset.splits.train", "trian", "train"),
    ("dataset.splits.extra_validation", "[validation_mismatchd]", "validation_mismatched"),
])
def test_unknown_split_is_refused_at_load_with_a_suggestion(key, value, hint, tmp_path, fake_glue):
    with pytest.raises(ConfigError, match=rf"did you mean '{hint}'") as err:
        load_job([f"run={RUN}", f"results_dir={tmp_path}", f"{key}={value}"])
    assert err.value.key.startswith(key)
    assert not tmp_path.joinpath(RUN).exists()


def test_unknown_split_exits_2_through_the_cli(tmp_path, fake_glue, capsys):
    args = [f"run={RUN}", f"results_dir={tmp_path}", "mode=trial", "model.name=tiny-bert",
            f"dataset.data_dir={fake_glue}", "dataset.splits.validation=validation_matchd"]
    assert main(args) == 2
    assert "dataset.splits.validation" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_listops_splits_are_checked_too(tmp_path):
    with pytest.raises(ConfigError, match=r"splits: train, validation, test"):
        load_job(["run=cpu-tabs-comparative-1-MiniLM-L6--ListOps", f"results_dir={tmp_path}",
                  "dataset.splits.validation=dev"])


def test_model_error_before_training_leaves_no_folder(tmp_path, fake_glue):
    assert main(rte_args(tmp_path, fake_glue, "model.name=./no-such-model", "optuna.n_trials=0")) == 4
    assert not (tmp_path / RUN).exists()


def test_error_before_training_keeps_an_earlier_complete_run_untouched(tmp_path, fake_glue):
    assert main(rte_args(tmp_path, fake_glue, "optuna.n_trials=0")) == 0
    run_dir = tmp_path / RUN
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(rte_args(tmp_path, fake_glue, "optuna.n_trials=0", "model.name=./no-such-model")) == 4
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


# --- 3. where run=<id> is looked for ----------------------------------------------------------

def test_run_id_resolves_path_then_runs_dir_then_packaged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = RUN
    # only packaged
    assert load_job([f"run={packaged}"]).run.method == "comparative-1"
    # config/runs/<id>.yaml under the working directory wins over the packaged file
    tiny_run_file(tmp_path / "config" / "runs" / f"{packaged}.yaml", packaged)
    assert load_job([f"run={packaged}"]).run.method == "baseline"
    # a new id only in config/runs
    tiny_run_file(tmp_path / "config" / "runs" / "my-run.yaml", "my-run")
    assert load_job(["run=my-run"]).run.run_id == "my-run"
    # runs_dir moves the folder
    tiny_run_file(tmp_path / "elsewhere" / "other.yaml", "other")
    assert load_job(["run=other", "runs_dir=elsewhere"]).run.run_id == "other"
    # a path is taken as it is
    path = tiny_run_file(tmp_path / "direct.yaml", "direct")
    assert load_job([f"run={path}"]).run.run_id == "direct"


def test_missing_run_id_error_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_run_file(tmp_path / "config" / "runs" / "my-run.yaml", "my-run")
    with pytest.raises(ConfigError) as err:
        load_job(["run=my-rnu"])
    message = str(err.value)
    assert "did you mean 'my-run'" in message
    assert str(Path("config/runs/my-rnu.yaml")) in message
    assert str(packaged_configs() / "runs" / "my-rnu.yaml") in message


# --- 4. unknown top-level sections -------------------------------------------------------------

EXTRA = {"logging": {"level": "debug", "to": ["wandb"]}, "compute": {"gpus": 1},
         "callbacks": [{"name": "early_stopping", "patience": 3}]}


def test_unknown_sections_are_kept_aside(tmp_path):
    path = tiny_run_file(tmp_path / "run.yaml", "extra", **EXTRA)
    job = load_job([f"run={path}"])
    assert job.ignored_sections == EXTRA
    assert set(job.run_dict) <= {"run_id", "method", "model", "dataset", "training", "optuna"}


@pytest.mark.parametrize(("section", "known"), [("modle", "model"), ("trainig", "training"),
                                                ("datset", "dataset"), ("Optuna", "optuna")])
def test_a_section_close_to_a_known_one_is_a_typo(section, known, tmp_path):
    path = tiny_run_file(tmp_path / "run.yaml", "typo", **{section: {"name": "tiny-bert"}})
    with pytest.raises(ConfigError, match=rf"did you mean '{known}'"):
        load_job([f"run={path}"])


def test_unknown_key_inside_a_known_section_stays_an_error(tmp_path):
    path = tiny_run_file(tmp_path / "run.yaml", "inner", **EXTRA)
    with pytest.raises(ConfigError, match=r"training.epohcs.*did you mean 'epochs'"):
        load_job([f"run={path}", "training.epohcs=2"])


def test_kept_sections_warn_once_and_land_in_metrics(tmp_path, fake_glue, caplog):
    lora = {"name": "tiny-bert", "adapter": {"type": "lora", "rank": 2}}
    path = tiny_run_file(tmp_path / "runs" / "extra.yaml", "extra", model=lora, **EXTRA)
    with caplog.at_level(logging.WARNING, logger="rankwise"):
        assert main([f"run={path}", f"results_dir={tmp_path / 'r'}", "mode=trial",
                     f"dataset.data_dir={fake_glue}", "dataset.max_train_samples=32",
                     "training.inference_measurement.lengths=[16]"]) == 0
    warnings = [r for r in caplog.records if "ignored_sections" in r.getMessage()]
    assert len(warnings) == 1 and all(k in warnings[0].getMessage() for k in EXTRA)
    run_dir = tmp_path / "r" / "extra"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["ignored_sections"] == EXTRA
    assert "logging" not in metrics["config"]
    # 6. per-run figures at the top of the run folder, named by run id and seed
    assert (run_dir / "extra_flops_vs_length_seed42.png").stat().st_size > 0
    assert (run_dir / "extra_flops_vs_length_seed42.pdf").stat().st_size > 0
    assert not list((run_dir / "seed42").glob("*.p*f")) and not list((run_dir / "seed42").glob("*.png"))


def test_run_figure_stem_names():
    from rankwise.results import run_figure_stem

    assert run_figure_stem(Path("R/my-run/seed3"), "gate_histogram") == Path(
        "R/my-run/my-run_gate_histogram_seed3")
    # a search trial's folder keeps its own files
    assert run_figure_stem(Path("R/my-run/optuna/trials/7"), "importance_heatmap") == Path(
        "R/my-run/optuna/trials/7/importance_heatmap")


# --- 8. ListOps on relative positions ----------------------------------------------------------

def test_listops_length_check_covers_relative_position_backbones(tmp_path, capsys):
    # tiny-deberta has relative positions only; samples up to 99 tokens need 101 positions
    args = ["run=cpu-tabs-comparative-1-MiniLM-L6--ListOps", f"results_dir={tmp_path}",
            "mode=trial", "model.name=tiny-deberta", "dataset.max_seq_length=64",
            "dataset.preprocessing.truncation=true"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "dataset.max_seq_length" in err and "ListOps samples reach 99 tokens" in err
    assert "at most" not in err  # no position limit to quote for relative positions
    assert not list(tmp_path.iterdir())


# --- 9. the rankwise command -------------------------------------------------------------------

def test_pyproject_declares_the_console_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["rankwise"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def test_rankwise_run_is_rankwise_main(tmp_path, fake_glue):
    from rankwise.cli import main as cli

    assert cli(["run", *rte_args(tmp_path, fake_glue, "optuna.n_trials=0")]) == 0
    assert json.loads((tmp_path / RUN / "metrics.json").read_text())["status"] == "complete"
    assert cli(["run", f"run={RUN}", "dataset.splits.train=trian"]) == 2


def test_rankwise_dispatch_and_errors(monkeypatch, capsys):
    import types

    from rankwise.cli import main as cli

    seen = {}
    fake = types.ModuleType("rankwise.grid")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "rankwise.grid", fake)
    assert cli(["grid", "plan", "x=1"]) == 0 and seen["argv"] == ["plan", "x=1"]
    monkeypatch.setitem(sys.modules, "rankwise.grid", None)  # as if the module were absent
    assert cli(["grid", "plan"]) == 2
    assert "rankwise.grid" in capsys.readouterr().err
    assert cli(["evalute"]) == 2
    assert "did you mean 'evaluate'" in capsys.readouterr().err
    assert cli(["--help"]) == 0 and "bench" in capsys.readouterr().out
    assert cli(["bench"]) != 0  # the benchmark's own usage error
