"""SpectralLinear: one layer type for the whole spectral family (methods.md#spectral-gates).

A frozen ``nn.Linear`` W (d_out × d_in) with frozen top-R factors U_R (d_out×R), s (R),
V_R (d_in×R) and trainable additive perturbations P_U (d_out×R), P_V (d_in×R), zero-initialised
(Spectral Adapter^A, Zhang & Pilanci 2024). Direction i carries

    ΔW_i = (u_i + p_{U,i}) s_i (v_i + p_{V,i})ᵀ − u_i s_i v_iᵀ
         = s_i [ u_i p_{V,i}ᵀ + p_{U,i} (v_i + p_{V,i})ᵀ ]                        (*)

and a token t with gates g_t ∈ [0, 1]^R gets

    y_t = W x_t + scale · Σ_i g_{t,i} ΔW_i x_t .

ΔW is never materialised. We evaluate (*) as
ΔW_i x = s_i [u_i (p_{V,i}·x) + p_{U,i} ((v_i + p_{V,i})·x)]. Why this form rather than the
difference of the two rank-one terms: with P_U = P_V = 0 it is exactly 0 in floating point
(so the step-0 model equals the backbone bit for bit), and it never subtracts two large,
nearly equal numbers. The cost is the same: two input projections and two output
expansions per (token, direction) pair, i.e. 4 · (d_in + d_out) FLOPs (``flops.py``).

Variants are strategies plugged into this one layer, not subclasses:

- ``gate_source``: ``None`` (g ≡ 1, Spectral Adapter), ``StaticGateLogits`` (BHSP),
  ``SequenceController`` (CBSP), ``TokenController`` (TABS) — see ``controllers.py``;
- ``gate``: the HardConcrete distribution (sample in training, ``1[logit > 0]`` in eval);
- ``budget`` (B_max per sequence) and ``projection`` (keep the B_max highest-logit open pairs).

Padding tokens (from the model-level mask hook, ``context.py``) never open a gate and never
count toward a budget. Two execution paths compute the same update: the dense-masked path
(all R directions for all tokens, then gates multiply) and the sparse path (only open
(token, direction) pairs, a sampled matmul and a sparse × dense matmul on their CSR pattern),
used by default at evaluation so that realised compute falls with the gates.

DeBERTa's relative-position rows, which query/key also project, are adapted by every variant
with the same gates rule as tokens (``_forward_position_rows``), so all methods adapt the same
computations.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rankwise.methods.spectral.budget_projection import SequenceBudget, TopLogitBudgetProjection
from rankwise.methods.spectral.context import ForwardContext
from rankwise.methods.spectral.controllers import GateSource
from rankwise.methods.spectral.flops import adapter_flops_per_pair
from rankwise.methods.spectral.gates import HardConcreteGate
from rankwise.methods.spectral.statistics import TrainingOpenTally
from rankwise.methods.spectral.svd_cache import SpectralFactors

Execution = Literal["auto", "dense", "sparse"]


@dataclass
class GateDecision:
    """The gates one forward pass uses, and what the budget penalty needs from it."""

    gates: torch.Tensor  # (B, T, R), final (after projection), 0 at padding
    logits: torch.Tensor | None  # (B, T, R) or (B, 1, R); None when g ≡ 1
    valid: torch.Tensor  # (B, T) bool, real tokens
    max_open_pairs: torch.Tensor | None  # (B,) B_max, None without a per-sequence budget
    expected_open_pairs: torch.Tensor | None  # (B,) E[r_seq] (the gate's budget_on), training only


@dataclass
class BudgetTerms:
    """Stored by a training forward for ``regularization_losses`` (then cleared)."""

    expected_open_pairs: torch.Tensor  # (B,), differentiable
    max_open_pairs: torch.Tensor  # (B,)
    valid_tokens: torch.Tensor  # (B,)


class SpectralLinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Linear,
        factors: SpectralFactors,
        context: ForwardContext,
        scale: float = 1.0,
        gate_source: GateSource | None = None,
        gate: HardConcreteGate | None = None,
        budget: SequenceBudget | None = None,
        projection: TopLogitBudgetProjection | None = None,
        target_name: str = "",
    ):
        super().__init__()
        d_out, d_in = base_layer.weight.shape
        if factors.U.shape != (d_out, factors.rank) or factors.V.shape != (d_in, factors.rank):
            raise ValueError(
                f"factors U {tuple(factors.U.shape)}, V {tuple(factors.V.shape)} do not fit "
                f"W {(d_out, d_in)}"
            )
        if (gate_source is None) != (gate is None):
            raise ValueError("a gate source needs a gate distribution and vice versa")
        if projection is not None and budget is None:
            raise ValueError("a budget projection needs a budget")
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        device = base_layer.weight.device
        # The SVD factors and P_U, P_V stay float32 under autocast (its matmuls cast them per
        # call): the bases u + p_U, v + p_V are summed in float32 before that cast, so small
        # perturbations are not rounded away against the factors' entries in half precision.
        self.register_buffer("U", factors.U.to(device=device, dtype=torch.float32).clone())
        self.register_buffer("s", factors.s.to(device=device, dtype=torch.float32).clone())
        self.register_buffer("V", factors.V.to(device=device, dtype=torch.float32).clone())
        self.P_U = nn.Parameter(torch.zeros(d_out, factors.rank, device=device))
        self.P_V = nn.Parameter(torch.zeros(d_in, factors.rank, device=device))
        self.scale = float(scale)
        self.gate_source = gate_source
        self.gate = gate
        self.budget = budget
        self.projection = projection
        self.target_name = target_name
        self.context = context
        self.execution: Execution = "auto"
        self.pending_budget_terms: BudgetTerms | None = None
        self._static_cache: tuple[int, torch.Tensor] | None = None
        self.training_tally = TrainingOpenTally()

    # --- shapes and costs ------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.base_layer.in_features

    @property
    def d_out(self) -> int:
        return self.base_layer.out_features

    @property
    def rank(self) -> int:
        return self.s.shape[0]

    @property
    def cost_per_pair(self) -> int:
        return adapter_flops_per_pair(self.d_in, self.d_out)

    def delta_weight(self, gates: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_i g_i ΔW_i as a dense (d_out, d_in) matrix (inspection, merging; default g ≡ 1)."""
        gs = self.s if gates is None else self.s * gates.to(self.s)
        return ((self.U + self.P_U) * gs) @ (self.V + self.P_V).T - (self.U * gs) @ self.V.T

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self.context.in_non_token_call:
            return self._forward_position_rows(x, base)
        tokens = x.unsqueeze(0) if x.dim() == 2 else x  # (B, T, d_in)
        if tokens.dim() != 3:
            raise RuntimeError(
                f"SpectralLinear expects (batch, tokens, {self.d_in}) inputs, got {tuple(x.shape)}"
            )
        valid = self.context.valid_tokens(tokens)
        decision = self.compute_gates(tokens, valid)
        if decision.logits is not None and self.training:
            self.training_tally.add(self.gate.prob_open(decision.logits.detach()), decision.gates,
                                    valid)
        if decision.expected_open_pairs is not None and self.training and torch.is_grad_enabled():
            self.pending_budget_terms = BudgetTerms(
                decision.expected_open_pairs, decision.max_open_pairs, valid.sum(dim=1)
            )
        if self.context.statistics is not None:
            self.context.statistics.record(
                self.target_name, decision.gates, valid, decision.max_open_pairs,
                self.cost_per_pair, self._controller_flops(valid.sum(dim=1)),
            )
        return base + self.scale * self._update(tokens, decision.gates).reshape(base.shape).to(base.dtype)

    def _controller_flops(self, rows: torch.Tensor) -> torch.Tensor:
        """Controller FLOPs per sequence with ``rows`` (B,) real rows each."""
        if self.gate_source is None:
            return torch.zeros(rows.shape[0], dtype=torch.long)
        return self.gate_source.flops(rows)

    def _update(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        if self.uses_sparse_path():
            return self.sparse_update(x, gates)
        return self.dense_update(x, gates)

    def uses_sparse_path(self) -> bool:
        if self.execution == "auto":
            # Dense while training (autograd through all gates is cheaper batched); sparse at
            # evaluation, where gates are binary and closed directions should cost nothing.
            return not self.training and self.gate_source is not None
        return self.execution == "sparse"

    def compute_gates(self, x: torch.Tensor, valid: torch.Tensor) -> GateDecision:
        """Gates for token inputs x (B, T, d_in) with non-padding mask ``valid`` (B, T)."""
        valid_f = valid.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
        if self.gate_source is None:  # Spectral Adapter: g ≡ 1 on real tokens
            gates = valid_f.expand(*valid.shape, self.rank)
            return GateDecision(gates, None, valid, None, None)

        logits = self.gate_source(x, valid)  # (B, T, R) or (B, 1, R)
        shared = self.gate_source.shares_gates_across_tokens
        if not self.training:
            raw = self.gate.decide(logits)
        elif self.gate_source.input_independent:  # BHSP: one sample per forward, every row
            raw = self._static_sample(logits[:1]).expand_as(logits)
        else:
            raw = self.gate.sample(logits)
        valid_tokens = valid.sum(dim=1)  # (B,)
        max_open = self.budget.max_open_pairs(valid_tokens) if self.budget is not None else None

        if shared:
            # One gate per (sequence, direction); an open direction costs T_valid pairs, so the
            # projection keeps the floor(B_max / T_valid) best directions.
            if self.projection is not None:
                capacity = torch.div(max_open, valid_tokens.clamp(min=1), rounding_mode="floor")
                keep = self.projection(raw[:, 0] > 0, logits[:, 0], capacity)  # (B, R)
                raw = raw * keep.unsqueeze(1)
            gates = raw * valid_f  # (B, 1, R) * (B, T, 1) -> (B, T, R)
        else:
            gates = raw * valid_f  # padding never opens a gate
            if self.projection is not None:
                B, T, R = gates.shape
                keep = self.projection(
                    (gates > 0).reshape(B, T * R), logits.reshape(B, T * R), max_open
                ).reshape(B, T, R)
                gates = gates * keep  # a constant mask: kept gates keep their gradient

        expected = None
        if self.training and max_open is not None:
            counted = self.gate.budget_quantity(logits)  # (B, T|1, R): P(g ≠ 0), E[g] or ĝ
            if shared:
                expected = counted[:, 0].sum(dim=-1) * valid_tokens
            else:
                expected = (counted * valid_f).sum(dim=(1, 2))
        return GateDecision(gates, logits, valid, max_open, expected)

    def dense_update(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Σ_i g_i ΔW_i x for every row of x (..., d_in); gates broadcast to (..., R)."""
        in_basis = torch.cat([self.P_V, self.V + self.P_V], dim=1)  # (d_in, 2R): [p_V | v + p_V]
        out_basis = torch.cat([self.U, self.P_U], dim=1)  # (d_out, 2R): [u | p_U]
        projections = x @ in_basis.to(x.dtype)  # (..., 2R)
        gs = gates * self.s  # (..., R)
        coef = projections * torch.cat([gs, gs], dim=-1).to(projections.dtype)  # (..., 2R)
        return coef @ out_basis.T.to(coef.dtype)  # (..., d_out)

    def sparse_update(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Same as ``dense_update`` but computing only pairs with g ≠ 0. x (B, T, d_in).

        The open pairs form a sparsity pattern over the (token, 2R) coefficient matrix of
        ``dense_update`` (two columns per direction). A sampled matmul (SDDMM) computes the
        projections x_t·[p_V,i | v_i + p_V,i] only at those entries, and a sparse × dense
        matmul (SpMM) expands them onto [u_i | p_U,i]: 4·(d_in + d_out) FLOPs per open pair,
        as ``flops.py`` counts, both in library CSR kernels and differentiable. Computed in
        float32 (the sparse kernels' common dtype; autocast is paused) and cast back.
        """
        B, T, _ = x.shape
        rows_x = x.reshape(B * T, self.d_in).float()
        rows_g = gates.reshape(B * T, self.rank).float()
        pattern = torch.cat([rows_g, rows_g], dim=-1) != 0  # (N, 2R)
        open_rows, columns = pattern.nonzero(as_tuple=True)  # row-major: CSR order
        if columns.numel() == 0:
            return x.new_zeros(B, T, self.d_out)
        row_starts = torch.zeros(B * T + 1, dtype=torch.long, device=x.device)
        row_starts[1:] = torch.cumsum(pattern.sum(dim=1), dim=0)
        in_basis = torch.cat([self.P_V, self.V + self.P_V], dim=1)  # (d_in, 2R)
        out_basis = torch.cat([self.U, self.P_U], dim=1)  # (d_out, 2R)
        gs = rows_g * self.s
        coefficients = torch.cat([gs, gs], dim=-1)[open_rows, columns]  # g_i s_i per entry
        with warnings.catch_warnings(), torch.autocast(x.device.type, enabled=False):
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            sampled = torch.sparse_csr_tensor(
                row_starts, columns, torch.ones_like(coefficients), size=pattern.shape,
                check_invariants=False,
            )
            projections = torch.sparse.sampled_addmm(sampled, rows_x, in_basis, beta=0.0)
            weighted = torch.sparse_csr_tensor(
                row_starts, columns, projections.values() * coefficients, size=pattern.shape,
                check_invariants=False,
            )
            out = torch.sparse.mm(weighted, out_basis.T)  # (N, d_out)
        return out.reshape(B, T, self.d_out).to(x.dtype)

    def _static_sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The training sample of input-independent gates (BHSP) for the current forward.

        Drawn once per hooked model forward (``context.forward_id``) and reused by every call
        of this layer in that forward: all sequences of the batch and DeBERTa's position rows
        see the same gates, as the merged weight W + Σ_i g_i ΔW_i of that sample would give
        (Louizos et al. likewise draw one gate sample per minibatch). Outside a hooked forward
        every call draws its own.
        """
        forward_id = self.context.forward_id
        cached = self._static_cache
        if forward_id is not None and cached is not None and cached[0] == forward_id:
            return cached[1]
        sample = self.gate.sample(logits)
        self._static_cache = (forward_id, sample) if forward_id is not None else None
        return sample

    def _forward_position_rows(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Rows that are not tokens of an example: DeBERTa's relative-position embeddings,
        projected once per forward by query/key and shared by the whole batch (context.py).

        Every method adapts them exactly as it adapts tokens, treating the rows as one extra
        sequence of N = 2·span real rows (design choice, docs/methods.md#spectral-gates):

        - Spectral Adapter: g ≡ 1 (the merged weight).
        - BHSP: the same gate sample as the token rows of this forward (``_static_sample``).
        - CBSP: its controller on the mean of the rows, one gate vector for all of them.
        - TABS: its controller on every row, then the top-B_max projection with the budget
          rule at T = N (floor(b·N), or ``budget_tokens``), so the hard cap holds on every
          call of the layer; the controller is shared with the token path, so without the
          projection its rows could open gates that no budget limits.

        They add no budget-penalty term and no training open-rate count (both are defined
        per example) and are recorded apart from the per-example FLOPs (``record_position``):
        their cost is per forward, whatever the batch size.
        """
        rows = x.reshape(1, -1, self.d_in)
        valid = torch.ones(rows.shape[:2], dtype=torch.bool, device=x.device)
        decision = self.compute_gates(rows, valid)
        if self.context.statistics is not None:
            n_rows = valid.sum(dim=1)
            self.context.statistics.record_position(
                self.target_name, decision.gates, self.cost_per_pair,
                int(self._controller_flops(n_rows)[0]),
            )
        update = self._update(rows, decision.gates)
        return base + self.scale * update.reshape(base.shape).to(base.dtype)

    def extra_repr(self) -> str:
        parts = [f"d_in={self.d_in}, d_out={self.d_out}, R={self.rank}, scale={self.scale:g}"]
        if self.budget is not None:
            parts.append(f"budget={self.budget.describe()}")
        parts.append(f"projection={'top-logit' if self.projection is not None else 'off'}")
        return ", ".join(parts)
