"""Per-sequence rank budgets and the hard budget projection of TABS (methods.md#spectral-gates).

Budget. For one target layer and one sequence with T_valid non-padding tokens the budget is

    B_max = floor(b · T_valid)      (``per_token = b``; default b = 8, "8·T"), or
    B_max = budget_tokens           (absolute cap, independent of the length),

counted in open (token, direction) pairs.

Projection. If more than B_max pairs are open, keep the B_max open pairs with the largest
controller logits and close the rest. The projection returns a 0/1 *keep mask* that
multiplies the gates, so gradients flow through the kept gates unchanged and are exactly zero
for the dropped ones (the mask itself is a constant, as in top-k routing).

The projection works on generic *units* with one logit each: (token, direction) pairs when
every token has its own gates, or whole directions when the tokens of a sequence share their
gates (``gate_granularity: sequence``), where one open direction costs T_valid pairs and the
capacity in units is therefore floor(B_max / T_valid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceBudget:
    """B_max per sequence: ``floor(per_token · T_valid)`` or the absolute ``budget_tokens``."""

    per_token: float | None = None
    budget_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.per_token is None) == (self.budget_tokens is None):
            raise ValueError("give exactly one of per_token and budget_tokens")

    def max_open_pairs(self, valid_tokens: torch.Tensor) -> torch.Tensor:
        """``valid_tokens``: (B,) int -> B_max: (B,) int64."""
        if self.budget_tokens is not None:
            return torch.full_like(valid_tokens, self.budget_tokens, dtype=torch.long)
        # Exact floor for float b: multiply in float64 (T_valid ≤ 2^31 is exact there).
        return torch.floor(valid_tokens.double() * self.per_token).long()

    def describe(self) -> str:
        if self.budget_tokens is not None:
            return f"{self.budget_tokens} pairs per sequence"
        return f"floor({self.per_token:g} * T_valid) pairs per sequence"


def keep_top_logits(
    open_units: torch.Tensor, logits: torch.Tensor, capacity: torch.Tensor
) -> torch.Tensor:
    """Keep, per row, the ``capacity`` open units with the largest logits.

    open_units: (B, N) bool — units whose gate is open before projection
    logits:     (B, N)      — ranking score of each unit (the controller's logit)
    capacity:   (B,) int    — how many units row b may keep
    returns     (B, N) bool — ``open_units`` with all but the top-``capacity`` open units closed

    Rows with at most ``capacity`` open units are returned unchanged. Ties between equal
    logits are broken by ``torch.topk`` (any choice keeps exactly ``capacity`` units).
    """
    if open_units.shape != logits.shape or open_units.dim() != 2:
        raise ValueError(
            f"open_units {tuple(open_units.shape)} and logits {tuple(logits.shape)} "
            "must both be (B, N)"
        )
    n_units = open_units.shape[1]
    k = int(capacity.clamp(min=0, max=n_units).max().item()) if capacity.numel() else 0
    if k == 0:
        return torch.zeros_like(open_units)
    scores = logits.detach().float().masked_fill(~open_units, -math.inf)
    top = scores.topk(k, dim=1).indices  # (B, k), largest first
    within_capacity = torch.arange(k, device=logits.device)[None, :] < capacity[:, None]  # (B, k)
    keep = torch.zeros_like(open_units).scatter(1, top, within_capacity)
    # Closed units that were picked only to fill a row's k slots stay closed.
    return keep & open_units


class TopLogitBudgetProjection:
    """Budget projection strategy: close all but the B_max highest-logit open pairs."""

    def __call__(
        self, open_units: torch.Tensor, logits: torch.Tensor, capacity: torch.Tensor
    ) -> torch.Tensor:
        return keep_top_logits(open_units, logits, capacity)

    def __repr__(self) -> str:
        return "TopLogitBudgetProjection()"
