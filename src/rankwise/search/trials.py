"""Facts read from a study's trials in storage: counts, failures, the best trial, notes.

Shared by the scheduling (:mod:`rankwise.search.study`), which counts finished and failed
trials over all workers, and the reports (:mod:`rankwise.search.report`), which list them.
A ``cancelled`` trial (started for a slot other workers' trials already held, see
:mod:`rankwise.search.study`) is FAIL in storage but is neither a failure nor a finished
trial here.
"""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial, TrialState

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
CANCELLED_NOTE = "cancelled: n_trials already taken by other workers' trials"


def _count(trials: Sequence[FrozenTrial], states: Sequence[TrialState]) -> int:
    return sum(t.state in states for t in trials)


def _is_failure(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and "cancelled" not in trial.user_attrs


def _is_invalid(trial: FrozenTrial) -> bool:
    return _is_failure(trial) and "invalid_config_key" in trial.user_attrs


def _best_trial(trials: Sequence[FrozenTrial], direction: str) -> FrozenTrial | None:
    """The best COMPLETE trial among the feasible ones (every constraint ≤ 0); when none is, the
    one with the smallest sum of its violated constraints. Ties go to the earliest trial."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(complete, key=lambda t: (_violations(t), sign * t.value, t.number))


def _violations(trial: FrozenTrial) -> float:
    """How far the trial is from feasible: the sum of its violated constraints (0 without any).

    The objective sets them (Optuna's convention: a value > 0 violates): the budget violations
    and the capacity gap of the evaluation the trial's value stands for, and the regulariser
    gap of its training (:func:`rankwise.runner.trial_value`)."""
    return sum(v for v in trial.constraints.values() if v > 0)


def _duration_s(trial: FrozenTrial) -> float | None:
    return None if trial.duration is None else trial.duration.total_seconds()


def _trial_notes(trials: Sequence[FrozenTrial], metric_name: str) -> dict[int, str]:
    """A short human-readable line per trial: retries, dead workers, failures, pruning."""
    retried_as = {}
    for t in trials:
        history = t.system_attrs.get("retry_history")
        if history:
            retried_as[history[-1]] = t.number
    notes = {}
    for t in trials:
        parts = []
        if "cancelled" in t.user_attrs:
            parts.append(t.user_attrs["cancelled"])
        if t.system_attrs.get("failed_trial") is not None:
            parts.append(f"retry of trial {t.system_attrs['retry_history'][-1]}")
        if t.state == TrialState.FAIL and "cancelled" not in t.user_attrs:
            parts.append(t.user_attrs.get("fail_reason", "worker stopped (no heartbeat)"))
            if t.number in retried_as:
                parts.append(f"retried as trial {retried_as[t.number]}")
        if t.state == TrialState.PRUNED and t.intermediate_values:
            epoch = max(t.intermediate_values)
            parts.append(
                f"pruned after epoch {epoch} ({metric_name}={t.intermediate_values[epoch]:.4g})"
            )
        notes[t.number] = "; ".join(parts)
    return notes
