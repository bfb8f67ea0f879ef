"""TPE's start-up trials from a scrambled Sobol sequence instead of independent uniform draws.

TPE (:class:`optuna.samplers.TPESampler`) samples its first ``n_startup_trials`` (10) trials at
random, each parameter an independent uniform draw. A search of a few trials is all start-up,
and independent draws can leave most of a range untried: four draws of one seed put every
learning rate of a log-uniform 1e-5…3e-3 range between 3e-5 and 1.4e-4. A scrambled Sobol
sequence (Owen scrambling, :class:`scipy.stats.qmc.Sobol`) is balanced instead: its first 2^m
points put exactly one point in each of the 2^m equal slices of every coordinate.

Trial ``n`` < ``STARTUP_TRIALS`` takes point ``n`` of the sequence seeded by the search seed; its
k-th suggested parameter reads coordinate k, mapped onto the distribution the way Optuna's
random sampler maps a uniform draw (log scale for ``log=True``, the step grid, one of the
categorical choices). The point depends on the seed and the trial number alone, so parallel
workers and a resumed search draw the same points, and runs searched with the same seed
(every arm of an experiment) get the same start. Later trials are TPE's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler, TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState
from scipy.stats import qmc

STARTUP_TRIALS = 10  # TPE's default n_startup_trials
DIMENSIONS = 32  # coordinates per point: at most this many parameters per trial from the sequence
POINTS = 16  # the first 2^4 points (balanced), of which the first STARTUP_TRIALS are used


def sobol_point(seed: int, index: int) -> list[float]:
    """Point ``index`` of the scrambled Sobol sequence seeded by ``seed``: DIMENSIONS in [0, 1)."""
    if not 0 <= index < POINTS:
        raise ValueError(f"index must be in [0, {POINTS}), got {index}")
    return qmc.Sobol(d=DIMENSIONS, scramble=True, seed=seed).random(POINTS)[index].tolist()


def from_unit(u: float, distribution: BaseDistribution) -> Any:
    """The value at ``u`` ∈ [0, 1) of a distribution's range, as Optuna's random sampler maps a
    uniform draw: a stepped or integer range widened by half a step each side (integers on a log
    scale: by 0.5), then rounded to the grid; categorical: choice ⌊u·n⌋."""
    if isinstance(distribution, CategoricalDistribution):
        choices = distribution.choices
        return choices[min(int(u * len(choices)), len(choices) - 1)]
    if not isinstance(distribution, (FloatDistribution, IntDistribution)):
        raise TypeError(f"no unit mapping for {type(distribution).__name__}")
    low, high, step = distribution.low, distribution.high, distribution.step
    is_int = isinstance(distribution, IntDistribution)
    if distribution.log:
        half = 0.5 if is_int else 0.0
        a, b = math.log(low - half), math.log(high + half)
        value = math.exp(a + u * (b - a))
        if is_int:
            value = round(value)
    else:
        half = 0.5 * step if step is not None else 0.0
        value = (low - half) + u * (high - low + 2 * half)
        if step is not None:
            value = low + round((value - low) / step) * step
    value = min(max(value, low), high)
    return int(value) if is_int else float(value)


class StratifiedStart(BaseSampler):
    """TPE whose start-up trials take Sobol points (see the module docstring)."""

    def __init__(self, tpe: TPESampler, seed: int, trial_number: int) -> None:
        self.tpe = tpe
        self.from_sequence = trial_number < STARTUP_TRIALS
        self.point = sobol_point(seed, trial_number) if self.from_sequence else None

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {} if self.from_sequence else self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {} if self.from_sequence else self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        coordinate = len(trial.params)  # the k-th parameter this trial suggests
        if not self.from_sequence or coordinate >= DIMENSIONS:
            return self.tpe.sample_independent(study, trial, param_name, param_distribution)
        return from_unit(self.point[coordinate], param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.tpe.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.tpe.reseed_rng()
