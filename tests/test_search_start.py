"""TPE's start-up trials from a scrambled Sobol sequence (rankwise.search.start): balanced
coverage of every parameter's range, the same points for the same seed and trial number, and
the unit-to-value mapping of Optuna's own random sampler."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna._transform import _SearchSpaceTransform
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from rankwise.search.start import STARTUP_TRIALS, from_unit
from rankwise.search.study import _sampler_for_trial

LR = FloatDistribution(1e-5, 3e-3, log=True)
WD = FloatDistribution(0.0, 0.1)


def start_trials(seed: int, n: int, space: dict) -> list[dict]:
    study = optuna.create_study(direction="maximize")
    params = []
    for number in range(n):
        study.sampler = _sampler_for_trial(seed, number)
        trial = study.ask()
        params.append({name: trial._suggest(name, dist) for name, dist in space.items()})
        study.tell(trial, 0.0)
    return params


@pytest.mark.parametrize("seed", [0, 11, 42, 1234])
def test_four_trials_put_one_value_in_each_quarter_of_every_range(seed):
    trials = start_trials(seed, 4, {"lr": LR, "wd": WD})
    lr_units = [(math.log(t["lr"]) - math.log(1e-5)) / (math.log(3e-3) - math.log(1e-5)) for t in trials]
    wd_units = [t["wd"] / 0.1 for t in trials]
    for units in (lr_units, wd_units):
        assert sorted(int(u * 4) for u in units) == [0, 1, 2, 3]


def test_independent_uniform_draws_are_what_it_replaces():
    """The motivating case: TPE's own start-up (independent draws) for trials seeded as rankwise
    seeds them leaves three quarters of the learning-rate range untried with seed 42."""
    units = []
    for number in range(4):
        trial_seed = int(np.random.SeedSequence([42, number]).generate_state(1)[0])
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=trial_seed))
        lr = study.ask().suggest_float("lr", 1e-5, 3e-3, log=True)
        units.append((math.log(lr) - math.log(1e-5)) / (math.log(3e-3) - math.log(1e-5)))
    assert len({int(u * 4) for u in units}) < 4


def test_the_same_seed_and_trial_number_give_the_same_start_whatever_else_is_searched():
    """Every arm of an experiment shares the learning-rate and batch-size points of its search seed."""
    lora = start_trials(7, 4, {"lr": LR, "bs": CategoricalDistribution([16, 32, 64])})
    iw = start_trials(7, 4, {"lr": LR, "bs": CategoricalDistribution([16, 32, 64]),
                             "alpha": FloatDistribution(1e-5, 1e-3, log=True)})
    assert [(t["lr"], t["bs"]) for t in lora] == [(t["lr"], t["bs"]) for t in iw]
    assert start_trials(8, 4, {"lr": LR}) != start_trials(7, 4, {"lr": LR})


def test_trials_after_the_start_are_tpe_s():
    trials = start_trials(3, STARTUP_TRIALS + 2, {"lr": LR})
    assert len({t["lr"] for t in trials}) == len(trials)
    assert all(1e-5 <= t["lr"] <= 3e-3 for t in trials)


@pytest.mark.parametrize("distribution", [
    FloatDistribution(1e-5, 1e-3, log=True), FloatDistribution(-2.0, 2.0),
    FloatDistribution(0.0, 1.0, step=0.25), IntDistribution(1, 9), IntDistribution(2, 64, log=True),
    IntDistribution(0, 12, step=3),
])
def test_a_unit_value_maps_as_optunas_random_sampler_maps_it(distribution):
    transform = _SearchSpaceTransform({"p": distribution})
    low, high = transform.bounds[0]
    for u in np.linspace(0.0, 0.999, 37):
        expected = transform.untransform(np.array([low + u * (high - low)]))["p"]
        assert from_unit(float(u), distribution) == pytest.approx(expected)


def test_categorical_choices_split_the_unit_interval_evenly():
    choices = CategoricalDistribution(["penalty", "lagrangian", "none"])
    picked = [from_unit(u, choices) for u in (0.0, 0.33, 0.34, 0.66, 0.67, 0.999)]
    assert picked == ["penalty", "penalty", "lagrangian", "lagrangian", "none", "none"]
