"""Task metrics (methods.md#metrics), computed with numpy/scipy and checked against scikit-learn.

Metric names in results are ``<split>_<metric>`` (e.g. ``validation_accuracy``,
``validation_mismatched_accuracy``). Each GLUE run also reports ``glue_score``, the task's
score as GLUE papers report it (:func:`glue_score`); the cross-task ``glue_avg`` is computed
by the comparison (``rankwise.evaluate``) over the tasks every method has.
"""

from __future__ import annotations

import numpy as np

from rankwise.data.tasks import get_task


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(preds == labels))


def f1_binary(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the class ``positive`` (RTE: 0 = entailment; MRPC, QQP: 1)."""
    tp = float(np.sum((preds == positive) & (labels == positive)))
    fp = float(np.sum((preds == positive) & (labels != positive)))
    fn = float(np.sum((preds != positive) & (labels == positive)))
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
    from scipy import stats  # imported here: scipy.stats alone adds ~1 s to every CLI start

    return float(stats.pearsonr(preds, labels)[0])


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    if np.std(preds) == 0 or np.std(labels) == 0:
        return 0.0
    from scipy import stats

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


def task_metric_fn(dataset_name: str, subset: str, name: str):
    """The function computing metric ``name`` on this task (F1 with the task's positive class)."""
    if name == "f1":
        positive = get_task(dataset_name, subset).f1_positive_label
        return lambda preds, labels: f1_binary(preds, labels, positive)
    return METRIC_FNS[name]


def compute_metrics(dataset_name: str, subset: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Task metrics for one split; ``preds`` are class ids (or scores for regression)."""
    task = get_task(dataset_name, subset)
    return {name: task_metric_fn(dataset_name, subset, name)(preds, labels) for name in task.metrics}


# GLUE's per-task score as the GLUE leaderboard and papers (e.g. AdaLoRA's Table 1) report it:
# the mean of the listed metrics on the validation split.
GLUE_SCORE_PARTS: dict[str, tuple[str, ...]] = {
    "cola": ("validation_matthews_correlation",),
    "sst2": ("validation_accuracy",),
    "mrpc": ("validation_f1", "validation_accuracy"),
    "qqp": ("validation_f1", "validation_accuracy"),
    "stsb": ("validation_pearson", "validation_spearmanr"),
    "mnli": ("validation_accuracy", "validation_mismatched_accuracy"),  # matched, mismatched
    "qnli": ("validation_accuracy",),
    "rte": ("validation_accuracy",),
}


def glue_score(subset: str, metrics: dict[str, float]) -> float | None:
    """The task's GLUE score from one run's (or seed's) metrics; ``None`` when not computable.

    MNLI averages matched and mismatched accuracy when both exist; with the mismatched split
    missing it is the matched accuracy alone (the run records the missing split).
    """
    parts = [metrics.get(k) for k in GLUE_SCORE_PARTS.get(subset, ())]
    if subset == "mnli" and parts and parts[0] is not None and parts[1] is None:
        parts = parts[:1]
    if not parts or any(not isinstance(v, (int, float)) for v in parts):
        return None
    return float(np.mean(parts))


def metric_names_for(dataset_name: str, subset: str) -> list[str]:
    """Every metric name a run on this task can report (for optuna.metric_name checks)."""
    task = get_task(dataset_name, subset)
    splits = ("validation",) + task.extra_validation
    names = [f"{s}_{m}" for s in splits for m in task.metrics] + [f"{s}_loss" for s in splits]
    names += ["glue_score"] if dataset_name == "glue" else []
    return names
