"""rankwise.evaluate on fake finished runs: keys, paired tests against scipy, task grouping, table."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from rankwise.evaluate import EvaluationError, evaluate


def fake_run(root: Path, run_id: str, role: str, algorithm: str, subset: str, correct_by_seed: dict,
             labels: np.ndarray, extra: dict | None = None) -> None:
    """A complete run whose seed-s predictions are right exactly where correct_by_seed[s] is True."""
    run_dir = root / run_id
    (run_dir / "predictions" / "validation").mkdir(parents=True)
    accs = []
    for seed, correct in correct_by_seed.items():
        preds = np.where(correct, labels, 1 - labels)
        rows = [json.dumps({"idx": i, "label": int(y), "prediction": int(p)})
                for i, (y, p) in enumerate(zip(labels, preds))]
        (run_dir / "predictions" / "validation" / f"seed{seed}.jsonl").write_text("\n".join(rows) + "\n")
        accs.append(float(correct.mean()))
    final = {"validation_accuracy": float(np.mean(accs)), "validation_loss": 0.5, **(extra or {})}
    metrics = {"run_id": run_id, "method": role, "algorithm": algorithm, "status": "complete",
               "task": {"dataset": "glue", "subset": subset, "primary_metric": "validation_accuracy",
                        "is_regression": False},
               "final": final, "seeds": list(correct_by_seed),
               "std": {"validation_accuracy": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0},
               "params": {"trainable": 1000, "total": 10000}, "wall_time_s": {"total": 12.5},
               "history": [{"step": 10, "epoch": 1, "validation_accuracy": final["validation_accuracy"]}]}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def results(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    labels = rng.integers(0, 2, n)
    base = {s: rng.random(n) < 0.7 for s in (1, 2)}
    better = {s: base[s] | (rng.random(n) < 0.5) for s in (1, 2)}  # strictly more right answers
    same = {s: base[s].copy() for s in (1, 2)}
    fake_run(tmp_path, "iw", "proposed", "iw_lora", "rte", better, labels,
             {"adapter_mflops_per_example": 1.5, "latency_ms_p99": 3.25, "validation_f1": 0.5,
              "validation_spectral_open_gates_per_token": 2.5})
    fake_run(tmp_path, "lora", "comparative-1", "lora", "rte", base, labels,
             {"adapter_mflops_per_example": 2.0, "latency_ms_p99": 4.0})
    fake_run(tmp_path, "lora-twin", "comparative-2", "lora", "rte", same, labels)
    fake_run(tmp_path, "other-task", "baseline", "full_ft", "sst2", base, labels)
    return tmp_path, base, better


def test_keys_pairwise_tests_and_table(results):
    root, base, better = results
    report = evaluate(root, ["iw", "lora", "lora-twin", "other-task"])
    for key in ("primary_metric", "metrics", "best_proposed", "best_baseline", "gap", "significance",
                "pairwise"):
        assert key in report
    assert report["best_proposed"]["run_id"] == "iw"
    # no paired test across tasks: iw (RTE) is only tested against the two RTE runs
    pairs = {tuple(t["runs"]) for t in report["pairwise"]}
    assert pairs == {("iw", "lora"), ("iw", "lora-twin")}
    test = next(t for t in report["pairwise"] if t["runs"] == ["iw", "lora"])
    # independent exact McNemar on the pooled seed-matched predictions
    a = np.concatenate([better[1], better[2]])
    b = np.concatenate([base[1], base[2]])
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    expected = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert test["p_value"] == pytest.approx(expected)
    assert test["n_pairs"] == 400 and test["seeds"] == [1, 2] and test["significant"]

    summary = (root / "comparison" / "summary.md").read_text()
    assert "adapter MFLOPs / example" in summary and "latency p99 (ms)" in summary
    assert "| 3.25 |" in summary and "| algorithm | task |" in summary
    assert "± " in summary and "(n=2)" in summary
    assert "validation_f1" in summary and "spectral_open_gates" not in summary  # method stats: JSON only
    agg = json.loads((root / "comparison" / "aggregated_metrics.json").read_text())
    assert agg["metrics"]["validation_accuracy"]["iw"] == pytest.approx(float(np.mean([better[1].mean(), better[2].mean()])))
    assert (root / "comparison" / "comparison_validation_accuracy.png").stat().st_size > 1000


def test_identical_predictions_are_marked_not_significant(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 100)
    correct = {1: rng.random(100) < 0.8}
    fake_run(tmp_path, "p", "proposed", "tabs", "rte", correct, labels)
    fake_run(tmp_path, "b", "comparative-1", "lora", "rte", {1: correct[1].copy()}, labels)
    report = evaluate(tmp_path, ["p", "b"])
    assert report["significance"]["p_value"] == 1.0 and not report["significance"]["significant"]
    assert "**not significant**" in (tmp_path / "comparison" / "summary.md").read_text()
    assert report["gap"] == pytest.approx(0.0)


def test_incomplete_run_is_refused(results):
    root, _, _ = results
    path = root / "lora" / "metrics.json"
    data = json.loads(path.read_text())
    data["status"] = "interrupted"
    path.write_text(json.dumps(data))
    with pytest.raises(EvaluationError, match="lora.*interrupted"):
        evaluate(root, ["iw", "lora"])
    assert evaluate(root, ["iw", "lora"], allow_incomplete=True)["best_baseline"]["run_id"] == "lora"
