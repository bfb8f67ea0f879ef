"""Task metrics against scikit-learn / scipy."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from rankwise.metrics import compute_metrics, metric_names_for


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    p = np.where(rng.random(200) < 0.7, y, 1 - y)
    m = compute_metrics("glue", "mrpc", p, y)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert m["f1"] == pytest.approx(skm.f1_score(y, p))
    c = compute_metrics("glue", "cola", p, y)
    assert c["matthews_correlation"] == pytest.approx(skm.matthews_corrcoef(y, p))
    r = compute_metrics("glue", "rte", p, y)
    assert set(r) == {"accuracy", "f1"}
    # RTE labels: 0 = entailment, the class whose F1 GLUE reports
    assert r["f1"] == pytest.approx(skm.f1_score(y, p, pos_label=0))
    hand = compute_metrics("glue", "rte", np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1]))
    assert hand["f1"] == pytest.approx(0.8)  # entailment: tp 2, fp 0, fn 1 (not_entailment's: 2/3)


def test_glue_scores_by_hand():
    from rankwise.metrics import glue_score

    m = {"validation_accuracy": 0.80, "validation_f1": 0.90, "validation_matthews_correlation": 0.55,
         "validation_pearson": 0.88, "validation_spearmanr": 0.86, "validation_mismatched_accuracy": 0.78}
    assert glue_score("cola", m) == pytest.approx(0.55)
    assert glue_score("stsb", m) == pytest.approx((0.88 + 0.86) / 2)
    assert glue_score("mrpc", m) == pytest.approx((0.90 + 0.80) / 2)
    assert glue_score("qqp", m) == pytest.approx(0.85)
    assert glue_score("mnli", m) == pytest.approx(0.79)
    del m["validation_mismatched_accuracy"]
    assert glue_score("mnli", m) == pytest.approx(0.80)  # matched alone when mismatched is missing
    for task in ("sst2", "qnli", "rte"):
        assert glue_score(task, m) == pytest.approx(0.80)
    assert glue_score("cola", {"validation_accuracy": 0.8}) is None


def test_verdict_metrics_follow_the_glue_convention():
    from rankwise.data.tasks import get_task

    primary = {t: get_task("glue", t).primary_metric for t in
               ("cola", "stsb", "mrpc", "qqp", "mnli", "sst2", "qnli", "rte")}
    assert primary == {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1", "qqp": "f1",
                       "mnli": "accuracy", "sst2": "accuracy", "qnli": "accuracy", "rte": "accuracy"}


def test_regression_metrics_match_scipy():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 300)
    p = y + rng.normal(0, 1, 300)
    m = compute_metrics("glue", "stsb", p, y)
    assert m["pearson"] == pytest.approx(stats.pearsonr(p, y)[0])
    assert m["spearmanr"] == pytest.approx(stats.spearmanr(p, y)[0])


def test_multiclass_accuracy_and_degenerate_cases():
    y = np.array([0, 1, 2, 2, 1])
    p = np.array([0, 2, 2, 2, 1])
    assert compute_metrics("glue", "mnli", p, y)["accuracy"] == pytest.approx(0.8)
    const = np.zeros(10, dtype=int)
    assert compute_metrics("glue", "cola", const, const)["matthews_correlation"] == 0.0


def test_reference_metric_name_resolves():
    assert "validation_accuracy" in metric_names_for("glue", "mnli")
    assert "validation_mismatched_accuracy" in metric_names_for("glue", "mnli")
    assert "validation_f1" in metric_names_for("glue", "rte")
