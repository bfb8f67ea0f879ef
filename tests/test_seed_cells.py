"""One part of a run per process (the grid's cells): ``seed_only=N`` trains one seed,
``merge_seeds=true`` writes the run's ``metrics.json`` from them, ``max_trials=N`` runs N trials
of the run's search. Held to the run trained whole in one process: the same predictions, byte
for byte, and the same metrics.json apart from times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rankwise.main import main

RUN = "cpu-comparative-1-MiniLM-L6--GLUE-SST-2"  # LoRA r=8, on the tiny BERT below
TIMES = ("wall_time_s", "job_wall_time_s", "step_time_s", "peak_memory_mb", "provenance", "seed_cells")


def args(results: Path, glue: Path, *extra: str) -> list[str]:
    return [f"run={RUN}", f"results_dir={results}", "mode=full", "model.name=tiny-bert",
            f"dataset.data_dir={glue}", "dataset.max_train_samples=24", "dataset.max_eval_samples=16",
            "training.batch_size=8", "training.epochs=2", "training.inference_measurement.enabled=false",
            "training.seeds=[1,2]", "optuna.n_trials=0", *extra]


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


@pytest.fixture(scope="module")
def whole_and_parts(tmp_path_factory, fake_glue):
    whole, parts = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("parts")
    assert main(args(whole, fake_glue)) == 0
    for seed in (2, 1):  # any order, each its own process in the grid
        assert main(args(parts, fake_glue, f"seed_only={seed}")) == 0
    assert not (parts / RUN / "metrics.json").exists()
    assert main(args(parts, fake_glue, "merge_seeds=true")) == 0
    return whole / RUN, parts / RUN


def test_seed_cells_predict_byte_for_byte_as_the_whole_run(whole_and_parts):
    whole, parts = whole_and_parts
    files = sorted(p.relative_to(whole) for p in (whole / "predictions").rglob("*.jsonl"))
    assert [str(f) for f in files] == ["predictions/validation/seed1.jsonl", "predictions/validation/seed2.jsonl"]
    for f in files:
        assert (parts / f).read_bytes() == (whole / f).read_bytes()


def test_merged_metrics_are_the_whole_runs_apart_from_times(whole_and_parts):
    whole, parts = whole_and_parts
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((parts / "metrics.json").read_text())
    assert b["status"] == "complete" and b["seed_cells"] is True
    assert without_times(b) == without_times(a)
    assert (parts / "config.yaml").read_text() == (whole / "config.yaml").read_text()


def test_a_complete_seed_is_kept_and_resume_false_retrains_it(whole_and_parts, fake_glue, capsys):
    _, parts = whole_and_parts
    result = parts / "seed1" / "result.json"
    before = result.stat().st_mtime_ns
    assert main(args(parts.parent, fake_glue, "seed_only=1")) == 0
    assert "already complete" in capsys.readouterr().out
    assert result.stat().st_mtime_ns == before


def test_merge_refuses_a_missing_seed_naming_it(tmp_path, fake_glue, capsys):
    assert main(args(tmp_path, fake_glue, "seed_only=1")) == 0
    assert main(args(tmp_path, fake_glue, "merge_seeds=true")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "seed 2" in err and "seed_only=2" in err
    assert not (tmp_path / RUN / "metrics.json").exists()


def test_a_seed_of_another_configuration_is_not_merged(tmp_path, fake_glue, capsys):
    for seed in (1, 2):
        assert main(args(tmp_path, fake_glue, f"seed_only={seed}")) == 0
    assert main(args(tmp_path, fake_glue, "merge_seeds=true", "training.learning_rate=0.01")) == 1
    assert "seed 1 has no complete result of this configuration" in capsys.readouterr().err


@pytest.mark.parametrize("extra, key", [(("seed_only=7",), "seed_only"),
                                        (("seed_only=1", "merge_seeds=true"), "merge_seeds"),
                                        (("max_trials=1",), "max_trials"),
                                        (("max_trials=0", "optuna.n_trials=2"), "max_trials")])
def test_bad_parts_exit_2_naming_the_key(tmp_path, fake_glue, capsys, extra, key):
    assert main(args(tmp_path, fake_glue, *extra)) == 2
    assert f"'{key}'" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / RUN).exists()
