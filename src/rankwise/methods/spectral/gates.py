"""HardConcrete gates (Louizos, Welling & Kingma 2018, "Learning sparse neural networks
through L0 regularization").

For a location parameter ``log α`` (here: a controller's logit), temperature β and stretch
interval (γ, ζ) with γ < 0 < 1 < ζ:

    u ~ U(0, 1)
    s = σ((log u − log(1 − u) + log α) / β)          (binary Concrete sample in (0, 1))
    g = clamp(s · (ζ − γ) + γ, 0, 1)                  (stretched and hard-clipped)

so g is exactly 0 or exactly 1 with non-zero probability and differentiable in log α in
between. The probability that a gate is open has the closed form

    P(g ≠ 0) = P(s > −γ / (ζ − γ)) = σ(log α − β · log(−γ / ζ)),

which the expected-budget penalties use (it is differentiable, unlike the sample count).

What the budget counts (``budget_on``):

- ``prob_open``: the expected number of open gates, Σ P(g ≠ 0) (closed form above);
- ``gate_value``: the expected gate values, Σ E[g], with
  E[g] = ∫₀¹ P(g > t) dt = ∫₀¹ σ(log α − β · logit((t − γ)/(ζ − γ))) dt, integrated by
  16-point Gauss–Legendre quadrature (differentiable in log α; exact to ~1e-6);
- ``louizos``: the seed's r_seq = Σ ĝ with Louizos et al.'s test-time estimator
  ĝ = clamp(σ(log α)(ζ − γ) + γ, 0, 1) (which is neither E[g] nor the median: at log α = −1,
  ĝ = 0.22 while E[g] = 0.29 and P(g ≠ 0) = 0.65).

The evaluation gate (``eval_rule``), binary except for ``louizos``, so that a closed direction
is skipped entirely and costs nothing:

- ``sign``: 1[log α > 0] (the seed's code). With γ + ζ = 1 (the default stretch, symmetric
  about ½) E[g] is ½ exactly at log α = 0, so this is 1[E[g] > ½]: the rule consistent with a
  budget on gate values;
- ``prob_open``: 1[P(g ≠ 0) > ½], i.e. log α > β · log(−γ/ζ) ≈ −1.60: the rule consistent with
  a budget on P(g ≠ 0);
- ``louizos``: ĝ itself (0 below log α = log(−γ/ζ) ≈ −2.40, fractional above);
- ``expected_count``: along the last axis (a target's R directions for static gates, a
  sequence's for sequence gates, a token's for token gates) open the k = round(Σ_i q_i)
  directions with the largest logits, q being what the budget counts (``budget_on``): the open
  count at evaluation is the expected count of training by construction. A budget on Σ P can be
  met by many gates near P ≈ 0.3, which ``prob_open`` then shuts (BHSP, measured: 3 of 576
  directions open at evaluation against 5.1 per target expected in training).

A rule that does not match the budget's quantity changes the capacity between training and
evaluation: with the budget on P(g ≠ 0) at half the directions, log α settles near −1.6, where
``sign`` closes almost every gate that training kept open about half the time (measured on the
SST-2 twin: 8.7 expected open per token in training, 0.9 at evaluation).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from numpy.polynomial.legendre import leggauss
from torch import nn

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1

EvalRule = Literal["sign", "prob_open", "louizos", "expected_count"]
BudgetOn = Literal["prob_open", "gate_value", "louizos"]
EVAL_RULES: tuple[str, ...] = ("sign", "prob_open", "louizos", "expected_count")
BUDGET_ON: tuple[str, ...] = ("prob_open", "gate_value", "louizos")

# 16-point Gauss–Legendre nodes and weights on [0, 1], for E[g] = ∫₀¹ P(g > t) dt.
_GL_NODES, _GL_WEIGHTS = (torch.tensor(v, dtype=torch.float64) for v in leggauss(16))
_GL_NODES, _GL_WEIGHTS = (_GL_NODES + 1) / 2, _GL_WEIGHTS / 2

# Keeps log(u) and log(1 − u) finite; the induced bias on P(g ≠ 0) is below 1e-6.
_UNIFORM_EPS = 1e-6


class HardConcreteGate(nn.Module):
    """Stateless gate distribution: ``sample`` (training), ``decide`` (evaluation),
    ``prob_open`` (closed-form P(g ≠ 0)). All three act elementwise on logits of any shape."""

    def __init__(self, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA,
                 eval_rule: EvalRule = "sign", budget_on: BudgetOn = "prob_open"):
        super().__init__()
        if eval_rule not in EVAL_RULES:
            raise ValueError(f"eval_rule must be one of {EVAL_RULES}, got {eval_rule!r}")
        if budget_on not in BUDGET_ON:
            raise ValueError(f"budget_on must be one of {BUDGET_ON}, got {budget_on!r}")
        if not (beta > 0 and gamma < 0 and zeta > 1):
            raise ValueError(
                f"HardConcrete needs beta > 0, gamma < 0, zeta > 1; got {beta}, {gamma}, {zeta}"
            )
        self.beta = beta
        self.gamma = gamma
        self.zeta = zeta
        self.eval_rule = eval_rule
        self.budget_on = budget_on
        # β · log(−γ/ζ): the shift between log α and the logit of P(g ≠ 0).
        self.open_logit_shift = beta * math.log(-gamma / zeta)
        # logit((t − γ)/(ζ − γ)) at the quadrature nodes t (constant: a buffer would enter the
        # state dict; it is recomputed instead)
        q = (_GL_NODES - gamma) / (zeta - gamma)
        self._node_shift = (beta * torch.log(q / (1 - q))).float()
        self._node_weights = _GL_WEIGHTS.float()

    def sample(
        self, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One reparameterised sample g ∈ [0, 1] per logit (gradients flow into ``logits``).

        In float32 whatever the logits' dtype or autocast: drawn in bf16 (8 significant bits)
        or fp16 (11), u stops below 1 − 2^-8 or 1 − 2^-11, the logistic noise cannot exceed
        about 5.5 or 7.6, and a gate at log α = −10 never opens where the closed form below
        (which the budget penalty and the open-rate statistics use) gives P = 2.2e-4; in
        float32 the same generator also draws the same gates at every precision
        (tests/test_cpu_autocast.py, and the gate-law check of tests/test_mixed_precision.py).
        """
        u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32, generator=generator)
        u = u.clamp(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
        noise = torch.log(u) - torch.log1p(-u)  # standard logistic
        s = torch.sigmoid((noise + logits.float()) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Evaluation gate as float32, without gradient: ``1[logit > 0]`` (``sign``),
        ``1[P(g ≠ 0) > ½]`` (``prob_open``), ĝ (``louizos``) or the round(Σ q) largest logits
        along the last axis (``expected_count``)."""
        logits = logits.detach().float()  # float32: a half-precision threshold test flips gates
        if self.eval_rule == "sign":
            return (logits > 0).float()
        if self.eval_rule == "prob_open":
            return (logits > self.open_logit_shift).float()
        if self.eval_rule == "expected_count":
            k = self.budget_quantity(logits).sum(dim=-1, keepdim=True).round()
            rank = logits.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = largest logit
            return (rank < k).float()
        return self.louizos(logits)

    @property
    def eval_threshold(self) -> float:
        """The logit at which the evaluation rule starts to open a gate."""
        if self.eval_rule == "sign":
            return 0.0
        if self.eval_rule in ("prob_open", "expected_count"):  # expected_count: about there
            return self.open_logit_shift
        return math.log(-self.gamma / self.zeta)  # ĝ > 0

    def louizos(self, logits: torch.Tensor) -> torch.Tensor:
        """ĝ = clamp(σ(log α)(ζ − γ) + γ, 0, 1), differentiable in ``logits`` where in (0, 1)."""
        return (torch.sigmoid(logits.float()) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def prob_open(self, logits: torch.Tensor) -> torch.Tensor:
        """Closed form P(g ≠ 0) = σ(log α − β log(−γ/ζ)), differentiable in ``logits``."""
        return torch.sigmoid(logits.float() - self.open_logit_shift)

    def expected_value(self, logits: torch.Tensor) -> torch.Tensor:
        """E[g] = ∫₀¹ σ(log α − β logit((t − γ)/(ζ − γ))) dt (quadrature), differentiable."""
        shift = self._node_shift.to(logits.device)
        weights = self._node_weights.to(logits.device)
        return torch.sigmoid(logits.float().unsqueeze(-1) - shift) @ weights

    def budget_quantity(self, logits: torch.Tensor) -> torch.Tensor:
        """What the budget counts per gate (``budget_on``): P(g ≠ 0), E[g] or ĝ."""
        if self.budget_on == "prob_open":
            return self.prob_open(logits)
        if self.budget_on == "gate_value":
            return self.expected_value(logits)
        return self.louizos(logits)

    def extra_repr(self) -> str:
        return (f"beta={self.beta:.4g}, gamma={self.gamma}, zeta={self.zeta}, "
                f"eval_rule={self.eval_rule}, budget_on={self.budget_on}")
