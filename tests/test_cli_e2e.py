"""End to end through the real CLI on tiny models and a local fake GLUE mirror."""

import json
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
    procs = {}
    for run_id, model in zip(REFS, ["tiny-deberta", "tiny-bert"]):
        # the unchanged reference configs: MNLI, validation_matched; only model and data are local
        procs[run_id] = run_cli("rankwise.main", f"run={run_id}", f"results_dir={out}", "mode=trial",
                                f"model.name={model}", f"dataset.data_dir={fake_glue}")
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
    for key in ("validation_accuracy", "validation_loss", "validation_mismatched_accuracy", "glue_avg"):
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
