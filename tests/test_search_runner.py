"""The search wired into the CLI: ``mode=full`` with ``optuna.n_trials > 0`` trains one Trainer
per trial, feeds each epoch's metric to the pruner, then trains the best configuration as a
run without search would. Two workers share one study; a SIGKILLed search resumes.

Tiny random BERT on the session's fake GLUE mirror; trials take about a second."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import release_together
from optuna.trial import TrialState

RUN = "comparative-1-DeBERTaV3-base-86-M--GLUE-MNLI"
# The shared two-worker study selects on validation, so the final run (same seed, same data)
# must retrain the best trial exactly; the default held-out selection is tested in
# test_selection.py.
ON_VALIDATION = "optuna.selection_split=validation"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# A CLI process whose optimizer steps are slowed (numerics unchanged), so that trials last long
# enough to be shared between workers or killed mid-way. With a ``go`` file it imports
# everything first, touches ``ready`` and waits for ``go``: workers start their search together.
SLOW_WORKER = """
import sys, time, pathlib
from rankwise.training.loop import Trainer
import rankwise.runner, rankwise.search
from rankwise.main import main
delay, ready, go = float(sys.argv[1]), sys.argv[2], sys.argv[3]
orig = Trainer._optimizer_step
def slow(self):
    time.sleep(delay)
    return orig(self)
Trainer._optimizer_step = slow
if go != "-":
    pathlib.Path(ready).touch()
    while not pathlib.Path(go).exists():
        time.sleep(0.02)
sys.exit(main(sys.argv[4:]))
"""


def search_args(results: Path, glue: Path, n_trials: int, *extra: str) -> list[str]:
    return [f"run={RUN}", f"results_dir={results}", "mode=full", "model.name=tiny-bert",
            f"dataset.data_dir={glue}", "dataset.subset=rte", "dataset.splits.validation=validation",
            "training.epochs=2", "training.warmup_steps=0", "training.log_every_n_steps=1",
            "training.fp16=false", f"optuna.n_trials={n_trials}", "optuna.heartbeat_interval=1",
            "optuna.grace_period=2", "optuna.search_space.learning_rate.low=1e-4",
            "optuna.search_space.learning_rate.high=1e-2",
            "optuna.search_space.batch_size.choices=[16,32]", *extra]


def start_worker(args: list[str], delay: float, ready: Path | None = None,
                 go: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_WORKER, str(delay), str(ready or "-"),
                             str(go or "-"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def load_trials(run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    url = f"sqlite:///{(run_dir / 'optuna' / 'study.db').resolve()}"
    return optuna.load_study(study_name=RUN, storage=url).get_trials(deepcopy=False)


def eval_records(history_file: Path) -> list[dict]:
    rows = [json.loads(line) for line in history_file.read_text().splitlines()]
    return [r for r in rows if r.get("type") == "eval"]


def started_trials(stderr: str) -> set[int]:
    return {int(n) for n in re.findall(r"trial #(\d+) started", stderr)}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, fake_glue):
    """Two CLI processes with the same command and storage, released together."""
    out = tmp_path_factory.mktemp("search")
    args = search_args(out, fake_glue, 4, ON_VALIDATION)
    ready = [out / "ready0", out / "ready1"]
    go = out / "go"
    procs = [start_worker(args, 0.1, r, go) for r in ready]
    outputs = release_together(procs, ready, go, start_timeout=120)
    return out / RUN, [(p.returncode, o, e) for p, (o, e) in zip(procs, outputs)]


def test_two_workers_share_the_study_and_one_writes_the_final_run(two_workers):
    run_dir, results = two_workers
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    trials = load_trials(run_dir)
    finished = sorted(t.number for t in trials if t.state in FINISHED)
    assert len(finished) == 4
    mine, theirs = (started_trials(err) for _, _, err in results)
    assert mine and theirs, "both workers should have trained trials"
    assert not mine & theirs and sorted(mine | theirs) == finished
    final_lines = [out.strip().splitlines()[-1] for _, out, _ in results]
    writers = [line for line in final_lines if "complete: validation_accuracy=" in line]
    assert len(writers) == 1, final_lines
    other = next(line for line in final_lines if line not in writers)
    assert "another worker" in other or "already complete" in other
    assert any("trial 4/4" in err and "ETA" in err for _, _, err in results)


def test_each_trial_trains_in_its_own_folder_and_reports_every_epoch(two_workers):
    run_dir, _ = two_workers
    for t in load_trials(run_dir):
        evals = eval_records(run_dir / "optuna" / "trials" / str(t.number) / "history.jsonl")
        # The pruner saw each epoch's validation accuracy, epochs counted from 1.
        assert t.intermediate_values == {r["epoch"]: r["validation_accuracy"] for r in evals}
        assert t.value == evals[-1]["validation_accuracy"]
        assert not list((run_dir / "optuna" / "trials" / str(t.number)).glob("checkpoints/*"))
    # The final run's outputs hold no trial files, and the study folder no final-run files.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        f"{RUN}_flops_vs_length_seed42.pdf", f"{RUN}_flops_vs_length_seed42.png",
        "config.yaml", "metrics.json", "optuna", "predictions", "seed42"]
    assert not list((run_dir / "optuna").glob("seed*"))


def test_final_run_is_the_best_trial_configuration_run_without_search(two_workers):
    run_dir, _ = two_workers
    complete = [t for t in load_trials(run_dir) if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: (-t.value, t.number))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    search = metrics["search"]
    assert search["n_trials"] == 4 and search["best_trial_number"] == best.number
    assert search["best_value"] == best.value and search["best_params"] == best.params
    assert search["selection_split"] == "validation" and search["selection_optimistic"] is True
    assert search["best_overrides"] == {"training.learning_rate": best.params["learning_rate"],
                                        "training.batch_size": best.params["batch_size"]}
    states = search["states"]
    assert states["complete"] + states["pruned"] == 4 and states["failed"] == 0
    assert states["complete"] == len(complete)
    for config in (metrics["config"], yaml.safe_load((run_dir / "config.yaml").read_text())):
        assert config["training"]["learning_rate"] == best.params["learning_rate"]
        assert config["training"]["batch_size"] == best.params["batch_size"]
        assert config["training"]["save_strategy"] == "epoch"  # trials' no-save is not carried
    # Same configuration and seed as the best trial: the final run retrains it exactly.
    final_evals = eval_records(run_dir / "seed42" / "history.jsonl")
    best_evals = eval_records(run_dir / "optuna" / "trials" / str(best.number) / "history.jsonl")
    assert [r["step"] for r in final_evals] == [r["step"] for r in best_evals]
    for a, b in zip(final_evals, best_evals):
        assert a["validation_loss"] == pytest.approx(b["validation_loss"], abs=1e-6)
    assert metrics["final"]["validation_accuracy"] == pytest.approx(best.value, abs=1e-9)
    assert (run_dir / "predictions" / "validation" / "seed42.jsonl").is_file()
    assert list((run_dir / "seed42" / "checkpoints").glob("step-*.pt"))


def test_study_files_list_every_trial_and_the_top_ones(two_workers):
    run_dir, _ = two_workers
    study_dir = run_dir / "optuna"
    summary = json.loads((study_dir / "best_params.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert summary["best_params"] == metrics["search"]["best_params"]
    rows = (study_dir / "trials.csv").read_text().splitlines()[1:]
    assert sum(r.split(",")[1] in ("COMPLETE", "PRUNED") for r in rows) == 4
    top = (study_dir / "top_trials.md").read_text()
    table = [line for line in top.splitlines() if line.startswith("| ")][1:]
    assert table and table[0].split("|")[2].strip() == str(summary["best_trial_number"])


def test_rerunning_a_finished_search_keeps_its_final_run(two_workers):
    run_dir, _ = two_workers
    before = (run_dir / "metrics.json").read_text()
    from rankwise.main import main

    args = search_args(run_dir.parent, Path(json.loads(before)["config"]["dataset"]["data_dir"]), 4,
                       ON_VALIDATION)
    assert main(args) == 0
    assert (run_dir / "metrics.json").read_text() == before
    assert len([t for t in load_trials(run_dir) if t.state in FINISHED]) == 4


@pytest.mark.parametrize("override, key", [
    ("optuna.search_space.bogus={type: uniform, low: 0, high: 1}", "optuna.search_space.bogus"),
    ("optuna.search_space.batch_size={type: uniform, low: 8, high: 16}",
     "optuna.search_space.batch_size.type"),
    ("optuna.search_space.batch_size.choices=[0,16]", "training.batch_size"),
])
def test_bad_search_space_exits_2_before_anything_is_written(tmp_path, fake_glue, capsys,
                                                             override, key):
    from rankwise.main import main

    assert main(search_args(tmp_path / "R", fake_glue, 2, override)) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert not (tmp_path / "R").exists()


@pytest.mark.parametrize("value, pruner", [
    ("none", optuna.pruners.NopPruner), ("median", optuna.pruners.MedianPruner),
    ("percentile", optuna.pruners.PercentilePruner), ("hyperband", optuna.pruners.HyperbandPruner),
])
def test_pruner_is_chosen_on_the_command_line(value, pruner):
    from rankwise.config.loader import load_job
    from rankwise.search import build_pruner

    job = load_job([f"run={RUN}", f"optuna.pruner={value}"])
    assert isinstance(build_pruner(job.run.optuna), pruner)


def test_default_pruner_is_median_and_unknown_names_are_refused():
    from rankwise.config.loader import load_job
    from rankwise.errors import ConfigError

    assert load_job([f"run={RUN}"]).run.optuna.pruner == "median"
    with pytest.raises(ConfigError) as exc:
        load_job([f"run={RUN}", "optuna.pruner=off"])
    assert exc.value.key == "optuna.pruner"


@pytest.mark.long  # several processes; CI's second step (pytest -m long)
def test_sigkilled_search_resumes_to_exactly_n_trials(tmp_path, fake_glue):
    args = search_args(tmp_path, fake_glue, 3)
    run_dir = tmp_path / RUN
    proc = start_worker(args, 0.3)
    try:
        deadline = time.monotonic() + 300
        marker = run_dir / "optuna" / "trials" / "1" / "history.jsonl"
        while not marker.exists():  # trial 1 has taken its first step
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert {t.number: t.state for t in load_trials(run_dir)}[1] == TrialState.RUNNING
    assert not (run_dir / "metrics.json").exists()

    again = subprocess.run([sys.executable, "-m", "rankwise.main", *args], capture_output=True,
                           text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = load_trials(run_dir)
    assert sum(t.state in FINISHED for t in trials) == 3
    dead = next(t for t in trials if t.number == 1)
    assert dead.state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.state in FINISHED and retry.params == dead.params
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["search"]["states"]["failed"] == 1


@pytest.mark.postgres
def test_search_on_a_postgres_storage(tmp_path, fake_glue, postgres_url):
    from rankwise.main import main

    run_id = f"pg-{uuid.uuid4().hex[:8]}"  # the study's name on a server other tests may share
    try:
        args = search_args(tmp_path, fake_glue, 2, f"run_id={run_id}", f"optuna.storage={postgres_url}")
        assert main(args) == 0
        trials = optuna.load_study(study_name=run_id, storage=postgres_url).get_trials()
        assert sum(t.state in FINISHED for t in trials) == 2
        metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
        assert metrics["status"] == "complete"
        assert metrics["search"]["storage"].startswith("postgresql")
        assert not (tmp_path / run_id / "optuna" / "study.db").exists()
        assert (tmp_path / run_id / "optuna" / "trials.csv").is_file()
    finally:
        optuna.delete_study(study_name=run_id, storage=postgres_url)
