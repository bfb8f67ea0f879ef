"""Placeholder replaced by the statistics module."""

import numpy as np
from scipy import stats as _st


def mean_std_ci95(values):
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, 0.0, (m, m)
    s = float(v.std(ddof=1))
    lo, hi = _st.t.interval(0.95, len(v) - 1, loc=m, scale=s / np.sqrt(len(v)))
    return m, s, (float(lo), float(hi))
