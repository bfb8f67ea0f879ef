"""The search's selection slice: a seeded, stratified held-out part of the training split.

With ``optuna.selection_split = f`` (default 0.1) every trial trains on the training split
minus a held-out fraction f and is scored on that slice; the final run trains on the whole
training split and reports on validation, which no trial has seen. The slice is drawn by
scikit-learn's ``train_test_split`` stratified by label (regression targets: by quintile of
the target), seeded by the search seed, so every trial and every worker uses the same rows.
A class too small to appear on both sides (fewer than two rows) falls back to an
unstratified split, said in the log.
"""

from __future__ import annotations

import logging

import numpy as np

from rankwise.data.loading import EvalSplit, TaskData
from rankwise.errors import ConfigError

log = logging.getLogger(__name__)

REGRESSION_STRATA = 5  # quantile bins of a regression target used as strata


def strata_of(labels: np.ndarray, regression: bool) -> np.ndarray:
    """Class labels, or the quantile bin (0..REGRESSION_STRATA-1) of each regression target."""
    if not regression:
        return labels
    edges = np.quantile(labels, np.linspace(0, 1, REGRESSION_STRATA + 1)[1:-1])
    return np.searchsorted(edges, labels, side="right")


def selection_indices(labels, fraction: float, seed: int, regression: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows), sorted, disjoint, together every row."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    n_held = int(np.ceil(fraction * len(rows)))  # scikit-learn's own rounding of test_size
    if n_held < 1 or n_held >= len(rows):
        raise ConfigError("optuna.selection_split",
                          f"{fraction:g} of {len(rows)} training rows leaves no selection slice or "
                          "no training rows; use a larger training set or 'validation'")
    try:
        train, held = train_test_split(rows, test_size=fraction, random_state=seed,
                                       stratify=strata_of(labels, regression))
    except ValueError as exc:  # a class with a single row, or fewer rows than classes
        log.warning("selection slice not stratified (%s); drawing it at random", exc)
        train, held = train_test_split(rows, test_size=fraction, random_state=seed)
    return np.sort(train), np.sort(held)


def selection_data(data: TaskData, fraction: float, seed: int) -> TaskData:
    """The trials' data: the training split minus the slice, scored on the slice.

    The slice is evaluated under the name ``validation``, so metrics keep their names (the
    objective ``validation_accuracy`` is the accuracy on the slice); other evaluation splits
    (e.g. MNLI mismatched) are not used by trials.
    """
    train, held = selection_indices(data.train["labels"], fraction, seed, data.task.is_regression)
    log.info("selection slice: %d of %d training rows held out (seed %d); trials train on %d",
             len(held), len(data.train), seed, len(train))
    return TaskData(data.task, data.train.select(train), [EvalSplit("validation", data.train.select(held))])
