"""Mechanism checks: did the run switch on what its method is meant to test?

A negative result is a finding only when the experiment could have shown a positive one. After
training, each method checks its own mechanism on the run's evidence (every seed's final
metrics and step log) and the run writes ``engagement`` to ``metrics.json``:
``{"engaged": bool, "checks": [{"name", "passed", "value", "threshold", "why"}]}``. The checks
are defined beside each method's maths (``FineTuningMethod.engagement_checks``); the generic
ones live here:

- ``above_chance`` (every run; computed by the runner from the predictions): the primary
  metric's 95 % interval clears the best constant predictor (a correlation: 0);
- ``regulariser_share`` (a method with a regulariser): the regulariser's share of the training
  loss, mean over logged steps, lies in [``regulariser_share_min``, ``regulariser_share_max``]
  — below, the term cannot change training (IW-LoRA's ~3e-4 at α = 1e-4); above, the
  regulariser rather than the task drives training (an unnormalised budget penalty);
- ``capacity_ratio``, ``budget_met``, ``gate_movement`` (gated spectral methods) and
  ``rank_budget_met`` (AdaLoRA): in their methods' modules.

Thresholds are the documented constants in :data:`THRESHOLDS`; a run overrides any of them
with ``training.engagement_thresholds.<name>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rankwise.errors import ConfigError

THRESHOLDS: dict[str, float] = {
    # regulariser's share of the training loss (mean over logged steps)
    "regulariser_share_min": 0.01,
    "regulariser_share_max": 0.5,
    # directions open per token at evaluation ÷ expected open per token in training
    "capacity_ratio_min": 0.67,
    "capacity_ratio_max": 1.5,
    # mean |Δ log α| of input-independent gates from their initialisation (logit units)
    "gate_movement_static_min": 0.1,
    # relative change ‖θ − θ₀‖ / ‖θ₀‖ of the gate controllers' parameters
    "gate_movement_controller_min": 0.01,
    # AdaLoRA: the final total rank may exceed its target by at most this fraction
    "rank_budget_tolerance": 0.05,
}


def resolve_thresholds(overrides: dict[str, float] | None) -> dict[str, float]:
    """The documented thresholds with a run's overrides; an unknown name is a config error."""
    from rankwise.config.typed import did_you_mean

    out = dict(THRESHOLDS)
    for name, value in (overrides or {}).items():
        key = f"training.engagement_thresholds.{name}"
        if name not in THRESHOLDS:
            raise ConfigError(key, f"unknown threshold{did_you_mean(name, THRESHOLDS)}; known: "
                                   f"{', '.join(THRESHOLDS)}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        out[name] = float(value)
    return out


@dataclass
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: float | list[float] | None
    why: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SeedEvidence:
    """What one seed's training left behind: its final metrics (evaluation splits, the
    method's training metrics) and its step log (``task_loss``, ``reg/<name>`` per record)."""
    seed: int
    final: dict[str, Any]
    history: list[dict[str, Any]]


def engagement_block(checks: Iterable[Check]) -> dict[str, Any]:
    checks = list(checks)
    return {"engaged": all(c.passed for c in checks), "checks": [c.to_json() for c in checks]}


def failing_seeds(values: dict[int, float | None], ok) -> list[int]:
    return [s for s, v in values.items() if v is None or not ok(v)]


def regulariser_share(evidence: list[SeedEvidence], name: str, thresholds: dict[str, float]) -> Check:
    """The regulariser ``name``'s share of the training loss, reg / (task + every reg), mean
    over each seed's logged steps; the check holds for every seed."""
    key = f"reg/{name}"
    shares: dict[int, float | None] = {}
    for ev in evidence:
        rows = [h for h in ev.history if key in h and "task_loss" in h]
        per_step = [h[key] / total for h in rows
                    if (total := h["task_loss"] + sum(v for k, v in h.items() if k.startswith("reg/"))) > 0]
        shares[ev.seed] = float(np.mean(per_step)) if per_step else None
    lo, hi = thresholds["regulariser_share_min"], thresholds["regulariser_share_max"]
    bad = failing_seeds(shares, lambda v: lo <= v <= hi)
    known = [v for v in shares.values() if v is not None]
    value = float(np.mean(known)) if known else None
    shown = ", ".join(f"seed {s}: {'no logged step' if v is None else f'{v:.2e}'}" for s, v in shares.items())
    if not bad:
        why = f"{name} is {value:.2%} of the training loss (within [{lo:g}, {hi:g}]; {shown})"
    elif known and max(known) < lo:
        why = (f"{name} is only {value:.2e} of the training loss (below {lo:g}: too weak to change "
               f"training; {shown})")
    elif known and min(known) > hi:
        why = (f"{name} is {value:.2%} of the training loss (above {hi:g}: the regulariser, not "
               f"the task, drives training; {shown})")
    else:
        why = f"{name}'s share of the training loss is outside [{lo:g}, {hi:g}] in some seed ({shown})"
    return Check("regulariser_share", not bad, value, [lo, hi], why)


def per_seed(evidence: list[SeedEvidence], key: str) -> dict[int, float | None]:
    out = {}
    for ev in evidence:
        v = ev.final.get(key)
        out[ev.seed] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return out


def mean_known(values: dict[int, float | None]) -> float | None:
    known = [v for v in values.values() if v is not None]
    return float(np.mean(known)) if known else None
