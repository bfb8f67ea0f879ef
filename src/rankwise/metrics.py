"""Task metrics (methods.md §6), computed with numpy/scipy and checked against scikit-learn.

Metric names in results are ``<split>_<metric>`` (e.g. ``validation_accuracy``,
``validation_mismatched_accuracy``); ``glue_avg`` averages each task's primary score.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from rankwise.data.tasks import get_task


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(preds == labels))


def f1_binary(preds: np.ndarray, labels: np.ndarray) -> float:
    tp = float(np.sum((preds == 1) & (labels == 1)))
    fp = float(np.sum((preds == 1) & (labels == 0)))
    fn = float(np.sum((preds == 0) & (labels == 1)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    tp = float(np.sum((preds == 1) & (labels == 1)))
    tn = float(np.sum((preds == 0) & (labels == 0)))
    fp = float(np.sum((preds == 1) & (labels == 0)))
    fn = float(np.sum((preds == 0) & (labels == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    if np.std(preds) == 0 or np.std(labels) == 0:
        return 0.0
    return float(stats.pearsonr(preds, labels)[0])


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    if np.std(preds) == 0 or np.std(labels) == 0:
        return 0.0
    return float(stats.spearmanr(preds, labels)[0])


METRIC_FNS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearman,
}

LOWER_IS_BETTER = {"loss"}


def is_lower_better(metric_name: str) -> bool:
    """True for metrics where smaller is better (``*_loss``, latency, FLOPs)."""
    leaf = metric_name.rsplit("_", 1)[-1]
    return leaf in LOWER_IS_BETTER or any(
        k in metric_name for k in ("latency", "flops", "violations", "wall_time")
    )


def compute_metrics(dataset_name: str, subset: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Task metrics for one split; ``preds`` are class ids (or scores for regression)."""
    task = get_task(dataset_name, subset)
    return {name: METRIC_FNS[name](preds, labels) for name in task.metrics}


def metric_names_for(dataset_name: str, subset: str) -> list[str]:
    """Every metric name a run on this task can report (for optuna.metric_name checks)."""
    task = get_task(dataset_name, subset)
    splits = ("validation",) + task.extra_validation
    names = [f"{s}_{m}" for s in splits for m in task.metrics] + [f"{s}_loss" for s in splits]
    names += ["glue_avg"] if dataset_name == "glue" else []
    return names
