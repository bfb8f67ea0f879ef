"""Statistics for comparing runs: mean/std/95 % CI, McNemar, paired bootstrap."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats


def mean_std_ci95(values) -> tuple[float, float, tuple[float, float]]:
    """Mean, sample std (ddof=1) and the 95 % t-interval; n = 1 gives std 0, CI = (mean, mean)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, 0.0, (m, m)
    s = float(v.std(ddof=1))
    if s == 0:
        return m, 0.0, (m, m)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=m, scale=s / np.sqrt(len(v)))
    return m, s, (float(lo), float(hi))


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test: two-sided binomial test on the discordant pairs (b, c)."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(stats.binomtest(only_a, n, 0.5).pvalue)
    return {"test": "mcnemar_exact", "only_a_correct": only_a, "only_b_correct": only_b,
            "n_pairs": int(len(a)), "p_value": p}


def paired_bootstrap(values_a, values_b, labels, metric_fn: Callable, n_resamples: int = 10_000,
                     seed: int = 0) -> dict:
    """Paired bootstrap of metric(a) − metric(b) over examples; two-sided p-value."""
    a, b, y = map(np.asarray, (values_a, values_b, labels))
    rng = np.random.default_rng(seed)
    observed = metric_fn(a, y) - metric_fn(b, y)
    idx = rng.integers(0, len(y), size=(n_resamples, len(y)))
    diffs = np.array([metric_fn(a[i], y[i]) - metric_fn(b[i], y[i]) for i in idx])
    p = 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))
    return {"test": "paired_bootstrap", "observed_difference": float(observed),
            "n_resamples": n_resamples, "n_pairs": int(len(y)), "p_value": float(min(1.0, p))}
