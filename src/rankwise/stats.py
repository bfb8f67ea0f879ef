"""Statistics for comparing runs: mean/std/95 % CI, McNemar, paired bootstrap."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import special

# scipy.stats is imported inside the functions that need it: it costs about a second at import,
# which every training run would pay for one t-quantile.


def mean_std_ci95(values) -> tuple[float, float, tuple[float, float]]:
    """Mean, sample std (ddof=1) and the 95 % t-interval; n = 1 gives std 0, CI = (mean, mean)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, 0.0, (m, m)
    s = float(v.std(ddof=1))
    if s == 0:
        return m, 0.0, (m, m)
    half = float(special.stdtrit(len(v) - 1, 0.975)) * s / np.sqrt(len(v))  # Student t quantile
    return m, s, (m - half, m + half)


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test: two-sided binomial test on the discordant pairs (b, c)."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    n = only_a + only_b
    from scipy import stats

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


# --- verdicts: A vs B on one task (methods.md#verdicts) ---------------------------------------------
#
# A metric is written as per-example sufficient statistics whose sums determine its value, so
# that a bootstrap replicate (a multiset of examples) is a weighted sum: weights = how often each
# example was drawn. This makes the two-level bootstrap one matrix product per chunk of
# replicates instead of R × seeds metric calls.

def _accuracy_parts(pred, label):
    return np.stack([(pred == label).astype(float)])


def _accuracy_value(s):
    return s[..., 0] / s[..., -1]


def _confusion_parts(positive):
    def parts(pred, label):
        p, y = pred == positive, label == positive
        return np.stack([(p & y), (p & ~y), (~p & y), (~p & ~y)]).astype(float)
    return parts


def _f1_value(s):
    tp, fp, fn = s[..., 0], s[..., 1], s[..., 2]
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def _mcc_value(s):
    tp, fp, fn, tn = s[..., 0], s[..., 1], s[..., 2], s[..., 3]
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.divide(tp * tn - fp * fn, denom, out=np.zeros_like(tp), where=denom > 0)


def _pearson_parts(pred, label):
    x, y = pred.astype(float), label.astype(float)
    return np.stack([x, y, x * x, y * y, x * y])


def _pearson_value(s):
    n = s[..., -1]
    sx, sy, sxx, syy, sxy = (s[..., k] for k in range(5))
    cov = sxy - sx * sy / n
    vx, vy = sxx - sx * sx / n, syy - sy * sy / n
    denom = np.sqrt(np.clip(vx, 0, None) * np.clip(vy, 0, None))
    return np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 1e-12)


def additive_metric(name: str, positive: int = 1):
    """(per-example parts, value from summed parts) for a verdict metric.

    The value function receives the summed parts with the example count appended as the last
    entry. Spearman is not additive (ranks depend on the draw) and is not a verdict metric.
    """
    table = {
        "accuracy": (_accuracy_parts, _accuracy_value),
        "f1": (_confusion_parts(positive), _f1_value),
        "matthews_correlation": (_confusion_parts(positive), _mcc_value),
        "pearson": (_pearson_parts, _pearson_value),
    }
    if name not in table:
        raise ValueError(f"no additive form for metric '{name}' (choose from {sorted(table)})")
    return table[name]


def _summed(parts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """parts (seeds, K, n), weights (R, n) → sums (R, seeds, K + 1), the count appended."""
    sums = np.einsum("rn,skn->rsk", weights, parts)
    counts = np.broadcast_to(weights.sum(1)[:, None, None], sums.shape[:2] + (1,))
    return np.concatenate([sums, counts], axis=-1)


def _replicate_means(pa: np.ndarray, pb: np.ndarray | None, value_fn, *, paired_seeds: bool,
                     n_resamples: int, seed: int, chunk: int):
    """Per replicate, the mean over drawn seeds of each run's metric on drawn examples.

    ``pa`` (S_A, K, n) and ``pb`` (S_B, K, n) or None hold per-example metric parts. Each
    replicate draws one set of n example indices (shared by A and B), then seeds with
    replacement (the same draw for both runs when ``paired_seeds``). Yields (r,) arrays
    (A's means, B's means or None) chunk by chunk.
    """
    n, s_a = pa.shape[-1], len(pa)
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(r, n)) + n * np.arange(r)[:, None]
        weights = np.bincount(idx.ravel(), minlength=r * n).reshape(r, n).astype(float)
        rows = np.arange(r)[:, None]
        ma = value_fn(_summed(pa, weights))  # (r, S_A): each seed's metric on the drawn examples
        seeds_a = rng.integers(0, s_a, size=(r, s_a))
        if pb is None:
            yield ma[rows, seeds_a].mean(1), None
            continue
        mb = value_fn(_summed(pb, weights))
        seeds_b = seeds_a if paired_seeds else rng.integers(0, len(pb), size=(r, len(pb)))
        yield ma[rows, seeds_a].mean(1), mb[rows, seeds_b].mean(1)


def _metric_parts(preds: np.ndarray, labels: np.ndarray, metric: str, positive: int):
    parts_fn, value_fn = additive_metric(metric, positive)
    return np.stack([parts_fn(p, labels) for p in preds]), value_fn  # (S, K, n)


VERDICT_RESAMPLES = 10_000  # R of the verdicts' two-level bootstrap (methods.md#verdicts)


def hierarchical_bootstrap(preds_a: np.ndarray, preds_b: np.ndarray, labels: np.ndarray,
                           metric: str, *, paired_seeds: bool, positive: int = 1,
                           n_resamples: int | None = None, seed: int = 0, chunk: int = 500) -> dict:
    """Two-level bootstrap of mean_s M_A(s) − mean_s M_B(s) (methods.md, verdicts).

    ``preds_a`` (S_A, n) and ``preds_b`` (S_B, n) are per-seed predictions on the same n
    examples (``labels`` (n,)). Each replicate draws seeds with replacement (the same draw for
    A and B when ``paired_seeds``, which needs S_A == S_B with row s the same seed in both),
    then one set of n example indices shared by A and B. Returns the observed difference, the
    95 % percentile CI, the two-sided p = min(1, 2·min((1+#{d_r≤0}), (1+#{d_r≥0}))/(1+R)) and
    the replicates' standard deviation ``se`` (the design's standard error, for the MDE).
    """
    n_resamples = n_resamples or VERDICT_RESAMPLES
    pa, value_fn = _metric_parts(preds_a, labels, metric, positive)
    pb, _ = _metric_parts(preds_b, labels, metric, positive)
    if paired_seeds and len(pa) != len(pb):
        raise ValueError("paired seeds need the same number of seeds in both runs")
    ones = np.ones((1, len(labels)))
    observed = float(value_fn(_summed(pa, ones))[0].mean() - value_fn(_summed(pb, ones))[0].mean())
    d = np.concatenate([ma - mb for ma, mb in _replicate_means(
        pa, pb, value_fn, paired_seeds=paired_seeds, n_resamples=n_resamples, seed=seed, chunk=chunk)])
    lo, hi = np.percentile(d, [2.5, 97.5])
    below, above = (1 + np.sum(d <= 0)) / (1 + n_resamples), (1 + np.sum(d >= 0)) / (1 + n_resamples)
    return {"test": "hierarchical_bootstrap", "difference": observed, "ci95": [float(lo), float(hi)],
            "p_value": float(min(1.0, 2 * min(below, above))), "se": float(d.std(ddof=1)),
            "n_resamples": n_resamples, "n_examples": int(len(labels)),
            "paired_seeds": bool(paired_seeds)}


def run_interval(preds: np.ndarray, labels: np.ndarray, metric: str, *, positive: int = 1,
                 n_resamples: int | None = None, seed: int = 0, chunk: int = 500) -> dict:
    """One run's mean metric over seeds with the 95 % percentile CI of the same two-level
    bootstrap as a verdict (seeds, then examples). With one seed only the examples are drawn:
    the interval is test-set sampling alone."""
    n_resamples = n_resamples or VERDICT_RESAMPLES
    pa, value_fn = _metric_parts(preds, labels, metric, positive)
    observed = float(value_fn(_summed(pa, np.ones((1, len(labels)))))[0].mean())
    m = np.concatenate([ma for ma, _ in _replicate_means(
        pa, None, value_fn, paired_seeds=False, n_resamples=n_resamples, seed=seed, chunk=chunk)])
    lo, hi = np.percentile(m, [2.5, 97.5])
    return {"mean": observed, "ci95": [float(lo), float(hi)], "n_seeds": int(len(pa)),
            "level": "seeds and examples" if len(pa) > 1 else "test-set sampling only"}


def seed_t_test(scores_a, scores_b, paired: bool) -> float | None:
    """Two-sided p of a t-test over seed scores: paired when the runs share seeds (row s the
    same seed), else Welch's. None when a run has one seed (no seed-level spread to test)."""
    a, b = np.asarray(scores_a, float), np.asarray(scores_b, float)
    if min(len(a), len(b)) < 2:
        return None
    if paired:
        d = a - b
        if np.all(d == d[0]):  # no spread: the t statistic is ±inf, or 0/0 for no difference
            return 1.0 if d[0] == 0 else 0.0
    elif np.var(a) + np.var(b) == 0:
        return 1.0 if a[0] == b[0] else 0.0
    from scipy import stats

    result = stats.ttest_rel(a, b) if paired else stats.ttest_ind(a, b, equal_var=False)
    return float(result.pvalue)


def minimum_detectable_effect(se: float, alpha: float, power: float = 0.8,
                              df: int | None = None) -> float:
    """The smallest true difference a two-sided test at level ``alpha`` detects with ``power``,
    for an estimate with standard error ``se``: (q_{1−α/2} + q_{power}) · se, with normal
    quantiles, or Student-t ones with ``df`` degrees of freedom (methods.md, verdicts)."""
    if df is None:
        q = special.ndtri(1 - alpha / 2) + special.ndtri(power)
    else:
        q = special.stdtrit(df, 1 - alpha / 2) + special.stdtrit(df, power)
    return float(q * se)


ASO_BOOTSTRAP_ITERATIONS = 1000  # deepsig's default; it loops in Python (several seconds a pair)


def aso_epsilon(scores_a, scores_b, num_comparisons: int = 1, seed: int = 0) -> float | None:
    """ε_min of A over B (almost stochastic order, deepsig); < 0.2 reads "A dominates B".

    None where deepsig's violation ratio divides 0 by 0 (the two score sets' quantile
    functions coincide): it then returns 0.5 or 1.0, which mean nothing.
    """
    import warnings

    from deepsig import aso

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eps = aso(list(map(float, scores_a)), list(map(float, scores_b)), confidence_level=0.95,
                  num_comparisons=num_comparisons, num_bootstrap_iterations=ASO_BOOTSTRAP_ITERATIONS,
                  show_progress=False, seed=seed)
    if any("Division by zero" in str(w.message) for w in caught):
        return None
    return float(eps)


def aso_epsilons(jobs: list[tuple[Any, Any, int]], seed: int = 0) -> list[float | None]:
    """:func:`aso_epsilon` of each (scores A, scores B, num_comparisons), several at once on this
    process's cores. deepsig seeds every bootstrap iteration, so each value is the one a lone
    call gives; forked workers share the imports already done (no fork: one after another)."""
    import multiprocessing
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = min(len(jobs), cores)
    if processes <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [aso_epsilon(a, b, n, seed) for a, b, n in jobs]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return pool.starmap(aso_epsilon, [(a, b, n, seed) for a, b, n in jobs])


def holm(p_values: list[float], alpha: float = 0.05) -> tuple[list[float], list[bool]]:
    """Holm-adjusted p-values and rejections at ``alpha`` (statsmodels)."""
    if not p_values:
        return [], []
    from statsmodels.stats.multitest import multipletests

    reject, adjusted, _, _ = multipletests(p_values, alpha=alpha, method="holm")
    return [float(p) for p in adjusted], [bool(r) for r in reject]
