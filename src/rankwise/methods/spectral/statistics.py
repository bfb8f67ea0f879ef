"""Gate statistics gathered during an evaluation pass (methods.md#metrics, spectral family).

Per target layer: a histogram of how many directions each real token opened (its adapter
rank), open pairs, tokens, budget violations. Per example: T_valid and the realised adapter
and controller FLOPs summed over all targets, for the FLOPs-vs-length figure.

Realised adapter FLOPs of one (target, sequence) = open pairs × cost_per_pair (``flops.py``);
the dense-masked reference cost T_valid · R · cost_per_pair is reported beside it. Padding
tokens never count (they open no gate). DeBERTa's relative-position rows (projected once per
forward through query/key and shared by the whole batch, not by one example) are recorded
apart, per forward: ``spectral_position_adapter_flops_per_forward``,
``spectral_position_controller_flops_per_forward`` and ``spectral_position_open_gates_per_row``
(present only when such rows passed through a spectral layer).

:class:`TrainingOpenTally` counts, during training forwards, the expected open gates
Σ_i P(g_i ≠ 0) (HardConcrete closed form) and the sampled open gates of every real token, per
target; the method turns them into ``train_expected_open_gates_per_token`` and
``train_sampled_open_gates_per_token`` (the training-time counterparts of the evaluation
``open_gates_per_token``: totals over targets and tokens / tokens summed over targets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

PREFIX = "spectral_"


@dataclass
class TargetGateCounts:
    rank: int
    histogram: list[int]  # histogram[j] = real tokens with exactly j open directions
    open_pairs: int = 0
    tokens: int = 0
    sequences: int = 0
    budget_violations: int = 0  # sequences with more than B_max open pairs
    budget_pairs: int = 0  # Σ B_max over the recorded sequences
    adapter_flops: int = 0
    controller_flops: int = 0

    @property
    def mean_open_per_token(self) -> float:
        return self.open_pairs / self.tokens if self.tokens else 0.0

    @property
    def over_average_budget(self) -> bool:
        """More open pairs than Σ B_max over the recorded sequences (an average budget)."""
        return self.open_pairs > self.budget_pairs


@dataclass
class PositionRowCounts:
    """Batch-shared, non-token rows (DeBERTa relative positions) through one target."""

    rows: int = 0
    open_pairs: int = 0
    adapter_flops: int = 0  # open pairs × cost_per_pair (what the sparse path executes)
    dense_adapter_flops: int = 0  # rows × R × cost_per_pair (what the dense path executes)
    controller_flops: int = 0


class TrainingOpenTally:
    """Training-time gate counts of one layer (device tensors: no sync per forward)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.expected: torch.Tensor | float = 0.0  # Σ over real tokens of Σ_i P(g_i ≠ 0)
        self.sampled: torch.Tensor | float = 0.0  # Σ over real tokens of #{i: g_i > 0}
        self.tokens: torch.Tensor | float = 0.0

    @torch.no_grad()
    def add(self, prob_open: torch.Tensor, gates: torch.Tensor, valid: torch.Tensor) -> None:
        """prob_open (B, T|1, R) before projection; gates (B, T, R) as used; valid (B, T)."""
        valid_f = valid.to(torch.float64)
        per_token = prob_open.to(torch.float64).sum(dim=-1)  # (B, T) or (B, 1): broadcasts
        self.expected = self.expected + (per_token * valid_f).sum()
        self.sampled = self.sampled + ((gates > 0) & valid.unsqueeze(-1)).sum().to(torch.float64)
        self.tokens = self.tokens + valid_f.sum()

    def drain(self) -> tuple[float, float, float]:
        """(expected, sampled, tokens) since the last drain, as Python floats; then reset."""
        out = tuple(float(v) for v in (self.expected, self.sampled, self.tokens))
        self.reset()
        return out  # type: ignore[return-value]


@dataclass
class ExampleCost:
    valid_tokens: int
    adapter_flops: int
    controller_flops: int
    dense_adapter_flops: int


@dataclass
class _BatchAccumulator:
    valid_tokens: torch.Tensor  # (B,)
    adapter: list[int]
    controller: list[int]
    dense: list[int]


@dataclass
class GateStatistics:
    """Accumulates :meth:`record` calls of the spectral layers between begin/end_batch."""

    targets: dict[str, TargetGateCounts] = field(default_factory=dict)
    examples: list[ExampleCost] = field(default_factory=list)
    positions: dict[str, PositionRowCounts] = field(default_factory=dict)
    forwards: int = 0  # hooked model forwards recorded
    _batch: _BatchAccumulator | None = None

    # --- called by the model-level hooks ------------------------------------------------------
    def begin_batch(self, attention_mask: torch.Tensor | None) -> None:
        self.end_batch()
        self.forwards += 1
        if attention_mask is not None:
            self._start(attention_mask.bool().sum(dim=1))

    def end_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        for b, t in enumerate(batch.valid_tokens.tolist()):
            self.examples.append(
                ExampleCost(int(t), batch.adapter[b], batch.controller[b], batch.dense[b])
            )

    def _start(self, valid_tokens: torch.Tensor) -> None:
        n = valid_tokens.shape[0]
        self._batch = _BatchAccumulator(valid_tokens.cpu(), [0] * n, [0] * n, [0] * n)

    # --- called by every spectral layer on token inputs ---------------------------------------
    @torch.no_grad()
    def record(
        self,
        target: str,
        gates: torch.Tensor,
        valid: torch.Tensor,
        max_open_pairs: torch.Tensor | None,
        cost_per_pair: int,
        controller_flops: torch.Tensor,
    ) -> None:
        """gates (B, T, R) final (after projection); valid (B, T) bool; max_open_pairs (B,)."""
        rank = gates.shape[-1]
        open_per_token = ((gates > 0) & valid.unsqueeze(-1)).sum(dim=-1)  # (B, T)
        open_pairs = open_per_token.sum(dim=1).cpu()  # (B,)
        valid_tokens = valid.sum(dim=1).cpu()  # (B,)
        histogram = torch.bincount(open_per_token[valid].flatten().cpu(), minlength=rank + 1)
        counts = self.targets.setdefault(target, TargetGateCounts(rank, [0] * (rank + 1)))
        counts.histogram = [a + int(b) for a, b in zip(counts.histogram, histogram.tolist())]
        counts.open_pairs += int(open_pairs.sum())
        counts.tokens += int(valid_tokens.sum())
        counts.sequences += int(valid.shape[0])
        if max_open_pairs is not None:
            counts.budget_violations += int((open_pairs > max_open_pairs.cpu()).sum())
            counts.budget_pairs += int(max_open_pairs.sum())
        adapter = (open_pairs * cost_per_pair).tolist()
        controller = controller_flops.cpu().tolist()
        dense = (valid_tokens * rank * cost_per_pair).tolist()
        counts.adapter_flops += sum(adapter)
        counts.controller_flops += sum(controller)
        if self._batch is None or self._batch.valid_tokens.shape[0] != valid.shape[0]:
            self.end_batch()  # layer called outside a hooked model forward: one batch per call
            self._start(valid_tokens)
        for b in range(valid.shape[0]):
            self._batch.adapter[b] += adapter[b]
            self._batch.controller[b] += controller[b]
            self._batch.dense[b] += dense[b]

    @torch.no_grad()
    def record_position(self, target: str, gates: torch.Tensor, cost_per_pair: int,
                        controller_flops: int) -> None:
        """Position rows of one forward through one target: gates (1, N, R) as used."""
        rows, rank = gates.shape[1], gates.shape[-1]
        open_pairs = int((gates > 0).sum())
        counts = self.positions.setdefault(target, PositionRowCounts())
        counts.rows += rows
        counts.open_pairs += open_pairs
        counts.adapter_flops += open_pairs * cost_per_pair
        counts.dense_adapter_flops += rows * rank * cost_per_pair
        counts.controller_flops += int(controller_flops)

    def position_totals(self) -> PositionRowCounts:
        """Position-row counts summed over targets (all recorded forwards)."""
        total = PositionRowCounts()
        for c in self.positions.values():
            for f in dataclasses.fields(total):
                setattr(total, f.name, getattr(total, f.name) + getattr(c, f.name))
        return total

    # --- results ------------------------------------------------------------------------------
    def histogram(self) -> list[int]:
        """Tokens with j open directions (j = 0..R), summed over targets."""
        ranks = {c.rank for c in self.targets.values()}
        if not ranks:
            return []
        total = [0] * (max(ranks) + 1)
        for c in self.targets.values():
            for j, n in enumerate(c.histogram):
                total[j] += n
        return total

    def budget_violations(self) -> int:
        """(target, sequence) pairs over B_max: a per-sequence budget (TABS)."""
        return sum(c.budget_violations for c in self.targets.values())

    def average_budget_violations(self) -> int:
        """Targets whose open pairs exceed Σ B_max over all sequences: an average budget (CBSP)."""
        return sum(c.over_average_budget for c in self.targets.values())

    def summary(self) -> dict[str, float]:
        """Flat numbers merged into the evaluation metrics (keys prefixed ``spectral_``)."""
        self.end_batch()
        n = len(self.examples)
        tokens = sum(c.tokens for c in self.targets.values())
        open_pairs = sum(c.open_pairs for c in self.targets.values())
        out: dict[str, float] = {
            f"{PREFIX}examples": n,
            f"{PREFIX}open_gates_per_token": open_pairs / tokens if tokens else 0.0,
            f"{PREFIX}budget_violations": self.budget_violations(),
        }
        if n:
            for key in ("adapter_flops", "controller_flops", "dense_adapter_flops"):
                out[f"{PREFIX}{key}_per_example"] = sum(getattr(e, key) for e in self.examples) / n
        for j, count in enumerate(self.histogram()):
            out[f"{PREFIX}rank_hist_{j}"] = count
        for (lo, hi), flops in self.flops_by_length_bin().items():
            out[f"{PREFIX}adapter_flops_len_{lo}_{hi}"] = flops
        if self.positions:
            pos, forwards = self.position_totals(), max(self.forwards, 1)
            out[f"{PREFIX}position_adapter_flops_per_forward"] = pos.adapter_flops / forwards
            out[f"{PREFIX}position_controller_flops_per_forward"] = pos.controller_flops / forwards
            out[f"{PREFIX}position_open_gates_per_row"] = pos.open_pairs / pos.rows if pos.rows else 0.0
        return out

    def flops_by_length_bin(self) -> dict[tuple[int, int], float]:
        """Mean realised adapter FLOPs per example in length bins [1,16], [17,32], [33,64], ..."""
        bins: dict[tuple[int, int], list[int]] = {}
        for e in self.examples:
            hi = 16
            while hi < e.valid_tokens:
                hi *= 2
            lo = 1 if hi == 16 else hi // 2 + 1
            bins.setdefault((lo, hi), []).append(e.adapter_flops)
        return {k: sum(v) / len(v) for k, v in sorted(bins.items())}

    def to_json(self) -> dict[str, Any]:
        """Per-target detail and per-example costs for ``gates.json`` / ``flops_by_length.json``."""
        self.end_batch()
        return {
            "histogram": self.histogram(),
            "budget_violations": self.budget_violations(),
            "targets": {
                name: {
                    "rank": c.rank,
                    "mean_open_gates_per_token": c.mean_open_per_token,
                    "histogram": c.histogram,
                    "open_pairs": c.open_pairs,
                    "tokens": c.tokens,
                    "sequences": c.sequences,
                    "budget_violations": c.budget_violations,
                    "budget_pairs": c.budget_pairs,
                    "adapter_flops": c.adapter_flops,
                    "controller_flops": c.controller_flops,
                }
                for name, c in self.targets.items()
            },
            "position_rows": {name: dataclasses.asdict(c) for name, c in self.positions.items()},
            "forwards": self.forwards,
            "examples": [dataclasses.asdict(e) for e in self.examples],
        }
