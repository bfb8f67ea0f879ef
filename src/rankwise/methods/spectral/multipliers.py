"""Learned budget multipliers (``budget_control: lagrangian | target``), one pair per constraint.

A constraint is what the budget bounds: for a per-sequence or average budget (CBSP, TABS) each
target matrix's directions per token, for BHSP's static budget the total over targets. Each
constraint k has c_k = use_k − share·budget_k (its mean over the step's training forwards) and

- ``lagrangian``: the term μ_k·c_k with μ_k ≥ 0, ascent μ_k ← max(0, μ_k + η·c_k);
- ``target``: μ_k·c_k + ν_k·c_k², ascent μ_k ← μ_k + η·c_k (free in sign), ν_k ← ν_k + η·c_k²,
  the structured-L0-pruning form that holds a target sparsity (Wang et al., 2020).

The term added to the loss is the mean over the constraints. One multiplier per target, not
one for their mean: with a shared multiplier only the mean use is held, and targets over their
own budget are balanced by targets under it (measured on CBSP: 18-20 of 36 targets over b at
evaluation with the mean at 0.95·b).
"""

from __future__ import annotations

from typing import Any

import torch


class BudgetMultipliers:
    def __init__(self, control: str, step_size: float):
        self.control = control
        self.step_size = step_size
        self.linear: dict[int, float] = {}  # μ_k
        self.quadratic: dict[int, float] = {}  # ν_k (target only)
        self._sums: dict[int, list[float]] = {}  # k → [Σ c_k, count] since the last step

    def term(self, gaps: dict[int, torch.Tensor]) -> torch.Tensor:
        """The mean over constraints of μ_k·c_k (+ ν_k·c_k² for ``target``); records each c_k
        for the next ascent step."""
        parts = []
        for k, gap in gaps.items():
            total = self._sums.setdefault(k, [0.0, 0])
            total[0] += float(gap.detach())
            total[1] += 1
            part = self.linear.get(k, 0.0) * gap
            if self.control == "target":
                part = part + self.quadratic.get(k, 0.0) * gap.square()
            parts.append(part)
        return torch.stack(parts).mean()

    def step(self) -> None:
        """One ascent step on each constraint recorded since the last, with its mean c_k."""
        eta = self.step_size
        for k, (total, count) in self._sums.items():
            gap = total / count
            if self.control == "target":
                self.linear[k] = self.linear.get(k, 0.0) + eta * gap
                self.quadratic[k] = self.quadratic.get(k, 0.0) + eta * gap * gap
            else:
                self.linear[k] = max(0.0, self.linear.get(k, 0.0) + eta * gap)
        self._sums = {}

    def summary(self) -> dict[str, float]:
        """Mean (and for μ the range) over the constraints: what the step log shows."""
        if not self.linear:
            values = {"budget_multiplier": 0.0}
        else:
            mus = list(self.linear.values())
            values = {"budget_multiplier": sum(mus) / len(mus)}
            if len(mus) > 1:
                values.update(budget_multiplier_min=min(mus), budget_multiplier_max=max(mus))
        if self.control == "target":
            nus = list(self.quadratic.values())
            values["budget_quadratic_multiplier"] = sum(nus) / len(nus) if nus else 0.0
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"linear": {str(k): v for k, v in self.linear.items()},
                "quadratic": {str(k): v for k, v in self.quadratic.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.linear = {int(k): float(v) for k, v in state.get("linear", {}).items()}
        self.quadratic = {int(k): float(v) for k, v in state.get("quadratic", {}).items()}
        self._sums = {}
