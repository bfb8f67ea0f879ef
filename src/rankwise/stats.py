"""Statistics for comparing runs: mean/std/95 % CI, McNemar, paired bootstrap."""

from __future__ import annotations

from collections.abc import Callable

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


# --- verdicts: A vs B on one task (methods.md §7) ---------------------------------------------
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


def hierarchical_bootstrap(preds_a: np.ndarray, preds_b: np.ndarray, labels: np.ndarray,
                           metric: str, *, paired_seeds: bool, positive: int = 1,
                           n_resamples: int = 10_000, seed: int = 0, chunk: int = 500) -> dict:
    """Two-level bootstrap of mean_s M_A(s) − mean_s M_B(s) (methods.md §7).

    ``preds_a`` (S_A, n) and ``preds_b`` (S_B, n) are per-seed predictions on the same n
    examples (``labels`` (n,)). Each replicate draws seeds with replacement (the same draw for
    A and B when ``paired_seeds``, which needs S_A == S_B with row s the same seed in both),
    then one set of n example indices shared by A and B. Returns the observed difference, the
    95 % percentile CI and the two-sided p = min(1, 2·min((1+#{d_r≤0}), (1+#{d_r≥0}))/(1+R)).
    """
    parts_fn, value_fn = additive_metric(metric, positive)
    pa = np.stack([parts_fn(p, labels) for p in preds_a])  # (S_A, K, n)
    pb = np.stack([parts_fn(p, labels) for p in preds_b])
    s_a, s_b, n = len(pa), len(pb), len(labels)
    if paired_seeds and s_a != s_b:
        raise ValueError("paired seeds need the same number of seeds in both runs")
    ones = np.ones((1, n))
    observed = float(value_fn(_summed(pa, ones))[0].mean() - value_fn(_summed(pb, ones))[0].mean())
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(r, n)) + n * np.arange(r)[:, None]
        weights = np.bincount(idx.ravel(), minlength=r * n).reshape(r, n).astype(float)
        ma = value_fn(_summed(pa, weights))  # (r, S_A): each seed's metric on the drawn examples
        mb = value_fn(_summed(pb, weights))
        seeds_a = rng.integers(0, s_a, size=(r, s_a))
        seeds_b = seeds_a if paired_seeds else rng.integers(0, s_b, size=(r, s_b))
        rows = np.arange(r)[:, None]
        diffs.append(ma[rows, seeds_a].mean(1) - mb[rows, seeds_b].mean(1))
    d = np.concatenate(diffs)
    lo, hi = np.percentile(d, [2.5, 97.5])
    below, above = (1 + np.sum(d <= 0)) / (1 + n_resamples), (1 + np.sum(d >= 0)) / (1 + n_resamples)
    return {"test": "hierarchical_bootstrap", "difference": observed, "ci95": [float(lo), float(hi)],
            "p_value": float(min(1.0, 2 * min(below, above))), "n_resamples": n_resamples,
            "n_examples": int(n), "paired_seeds": bool(paired_seeds)}


ASO_BOOTSTRAP_ITERATIONS = 1000  # deepsig's default; it loops in Python (several seconds a pair)


def aso_epsilon(scores_a, scores_b, num_comparisons: int = 1, seed: int = 0) -> float:
    """ε_min of A over B (almost stochastic order, deepsig); < 0.2 reads "A dominates B"."""
    from deepsig import aso

    return float(aso(list(map(float, scores_a)), list(map(float, scores_b)), confidence_level=0.95,
                     num_comparisons=num_comparisons, num_bootstrap_iterations=ASO_BOOTSTRAP_ITERATIONS,
                     show_progress=False, seed=seed))


def holm(p_values: list[float], alpha: float = 0.05) -> tuple[list[float], list[bool]]:
    """Holm-adjusted p-values and rejections at ``alpha`` (statsmodels)."""
    if not p_values:
        return [], []
    from statsmodels.stats.multitest import multipletests

    reject, adjusted, _, _ = multipletests(p_values, alpha=alpha, method="holm")
    return [float(p) for p in adjusted], [bool(r) for r in reject]
