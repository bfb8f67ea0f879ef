"""End to end through the real CLI on tiny models and a local fake GLUE mirror."""

import json
import os
import subprocess
import sys

import pytest

REFS = ["proposed-DeBERTaV3-base-86-M--GLUE-MNLI", "comparative-1-DeBERTaV3-base-86-M--GLUE-MNLI"]


def run_cli(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trial_results(tmp_path_factory, fake_glue):
    out = tmp_path_factory.mktemp("results")
    running = {}
    for run_id, model in zip(REFS, ["tiny-deberta", "tiny-bert"]):
        # the unchanged reference configs: MNLI, validation_matched; only model and data are local.
        # Both at once (one core each), as a pipeline would start them.
        running[run_id] = subprocess.Popen(
            [sys.executable, "-m", "rankwise.main", f"run={run_id}", f"results_dir={out}", "mode=trial",
             f"model.name={model}", f"dataset.data_dir={fake_glue}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    procs = {}
    for run_id, proc in running.items():
        stdout, stderr = proc.communicate(timeout=300)
        procs[run_id] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out, procs


@pytest.mark.parametrize("run_id", REFS)
def test_reference_config_trial_run_writes_complete_results(trial_results, run_id):
    out, procs = trial_results
    proc = procs[run_id]
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert run_id in last and "complete" in last and "validation_accuracy=" in last
    run_dir = out / run_id
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    assert metrics["mode"] == "trial"
    for key in ("validation_accuracy", "validation_loss", "validation_mismatched_accuracy", "glue_score"):
        assert key in metrics["final"], key
    assert metrics["task"]["primary_metric"] == "validation_accuracy"
    assert metrics["params"]["trainable"] < metrics["params"]["total"]
    assert set(metrics["wall_time_s"]) >= {"calibration", "training", "evaluation", "total"}
    assert metrics["provenance"]["versions"]["torch"]
    assert "commit" in metrics["provenance"]["git"]
    assert metrics["config"]["run_id"] == run_id
    preds = (run_dir / "predictions" / "validation" / "seed42.jsonl").read_text().splitlines()
    assert len(preds) == 40  # the whole fake split: trial mode caps at 2 eval batches of 32
    row = json.loads(preds[0])
    assert set(row) == {"idx", "label", "prediction"}
    assert (run_dir / "config.yaml").is_file()
    history = [json.loads(line) for line in (run_dir / "seed42" / "history.jsonl").read_text().splitlines()]
    assert any(h.get("type") == "eval" for h in history)


def test_trial_run_of_proposed_logs_the_regulariser(trial_results):
    out, procs = trial_results
    history = [json.loads(line) for line in
               (out / REFS[0] / "seed42" / "history.jsonl").read_text().splitlines()]
    steps = [h for h in history if "task_loss" in h]
    assert steps and all("reg/iw_reg" in h for h in steps)


def test_evaluate_two_trial_runs(trial_results):
    out, procs = trial_results
    refused = run_cli("rankwise.evaluate", f"results_dir={out}", f"run_ids=[{REFS[0]},{REFS[1]}]")
    assert refused.returncode == 2 and "trial-mode run" in refused.stderr
    proc = run_cli("rankwise.evaluate", f"results_dir={out}", f"run_ids=[{REFS[0]},{REFS[1]}]",
                   "allow_trial=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    agg = json.loads((out / "comparison" / "aggregated_metrics.json").read_text())
    for key in ("primary_metric", "metrics", "best_proposed", "best_baseline", "gap", "significance"):
        assert key in agg, key
    assert agg["primary_metric"] == "validation_accuracy"
    assert set(agg["metrics"]["validation_accuracy"]) == set(REFS)
    assert agg["best_proposed"]["run_id"] == REFS[0] and agg["best_baseline"]["run_id"] == REFS[1]
    assert agg["significance"]["test"] == "hierarchical_bootstrap" and 0 <= agg["significance"]["p_value"] <= 1
    summary = (out / "comparison" / "summary.md").read_text()
    assert REFS[0] in summary and "±" in summary
    for name in ("comparison_validation_accuracy.png", "comparison_validation_accuracy.pdf",
                 "comparison_learning_curves.png"):
        assert (out / "comparison" / name).stat().st_size > 0


def test_evaluate_refuses_incomplete_run(trial_results, tmp_path):
    import shutil

    out, _ = trial_results
    shutil.copytree(out / REFS[1], tmp_path / REFS[1])
    m = json.loads((tmp_path / REFS[1] / "metrics.json").read_text())
    m["status"] = "interrupted"
    (tmp_path / REFS[1] / "metrics.json").write_text(json.dumps(m))
    proc = run_cli("rankwise.evaluate", f"results_dir={tmp_path}", f"run_ids=[{REFS[1]}]")
    assert proc.returncode == 2 and "interrupted" in proc.stderr and "Traceback" not in proc.stderr
    ok = run_cli("rankwise.evaluate", f"results_dir={tmp_path}", f"run_ids=[{REFS[1]}]", "allow_incomplete=true",
                 "allow_trial=true")
    assert ok.returncode == 0, ok.stderr[-2000:]
    missing = run_cli("rankwise.evaluate", f"results_dir={tmp_path}", "run_ids=[nope]")
    assert missing.returncode == 2 and "nope" in missing.stderr
