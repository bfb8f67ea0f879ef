"""Statistics against independent computations."""

import numpy as np
import pytest
from scipy import stats

from rankwise.metrics import accuracy, pearson
from rankwise.stats import mcnemar_test, mean_std_ci95, paired_bootstrap


@pytest.mark.parametrize("v", [[0.61, 0.64, 0.66, 0.60], [0.5, 0.7], list(np.linspace(0.1, 0.9, 30))])
def test_mean_std_ci95_matches_scipy(v):
    m, s, (lo, hi) = mean_std_ci95(v)
    assert m == pytest.approx(np.mean(v)) and s == pytest.approx(np.std(v, ddof=1))
    elo, ehi = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert (lo, hi) == pytest.approx((elo, ehi), rel=1e-12)
    assert mean_std_ci95([0.5]) == (0.5, 0.0, (0.5, 0.5))


def test_mcnemar_hand_worked():
    # 10 pairs: a right & b wrong on 8, b right & a wrong on 1, agree on 1
    a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 1], bool)
    b = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    res = mcnemar_test(a, b)
    assert (res["only_a_correct"], res["only_b_correct"]) == (8, 1)
    # exact two-sided binomial: 2 * P(X <= 1 | n=9, p=.5) = 2 * 10/512
    assert res["p_value"] == pytest.approx(20 / 512)
    assert mcnemar_test(a, a)["p_value"] == 1.0


def test_paired_bootstrap_sanity():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    same = paired_bootstrap(y, y, y, accuracy, n_resamples=500)
    assert same["p_value"] == 1.0
    noisy = np.where(rng.random(300) < 0.5, y, 1 - y)
    far = paired_bootstrap(y, noisy, y, accuracy, n_resamples=500)
    assert far["p_value"] < 0.01 and far["observed_difference"] > 0.3
    r = rng.normal(size=200)
    res = paired_bootstrap(r + rng.normal(0, 0.1, 200), rng.normal(size=200), r, pearson, n_resamples=300)
    assert res["p_value"] < 0.01
