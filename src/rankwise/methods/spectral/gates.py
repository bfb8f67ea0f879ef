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

At evaluation the gate is the binary decision ``g = 1[log α > 0]`` (methods.md §5): a closed
direction is then skipped entirely, so it costs nothing. ``eval_rule="louizos"`` uses Louizos
et al.'s test-time estimator instead, ĝ = clamp(σ(log α)(ζ − γ) + γ, 0, 1): deterministic, 0
below log α = log(−γ / ζ) ≈ −2.40 (so closed directions still cost nothing), fractional above.
It matters because training and the budget see the stretched distribution, whose P(g ≠ 0)
is σ(log α + 1.60): a budget of half the directions settles log α near −1.6, where the sign
rule closes almost every gate that training had open about half the time.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1

EvalRule = Literal["sign", "louizos"]

# Keeps log(u) and log(1 − u) finite; the induced bias on P(g ≠ 0) is below 1e-6.
_UNIFORM_EPS = 1e-6


class HardConcreteGate(nn.Module):
    """Stateless gate distribution: ``sample`` (training), ``decide`` (evaluation),
    ``prob_open`` (closed-form P(g ≠ 0)). All three act elementwise on logits of any shape."""

    def __init__(self, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA,
                 eval_rule: EvalRule = "sign"):
        super().__init__()
        if eval_rule not in ("sign", "louizos"):
            raise ValueError(f"eval_rule must be 'sign' or 'louizos', got {eval_rule!r}")
        if not (beta > 0 and gamma < 0 and zeta > 1):
            raise ValueError(
                f"HardConcrete needs beta > 0, gamma < 0, zeta > 1; got {beta}, {gamma}, {zeta}"
            )
        self.beta = beta
        self.gamma = gamma
        self.zeta = zeta
        self.eval_rule = eval_rule
        # β · log(−γ/ζ): the shift between log α and the logit of P(g ≠ 0).
        self.open_logit_shift = beta * math.log(-gamma / zeta)

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
        """Evaluation gate as float32, without gradient: ``1[logit > 0]`` (``sign``) or
        clamp(σ(logit)(ζ − γ) + γ, 0, 1) (``louizos``)."""
        logits = logits.detach()
        if self.eval_rule == "sign":
            return (logits > 0).float()
        return (torch.sigmoid(logits.float()) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def prob_open(self, logits: torch.Tensor) -> torch.Tensor:
        """Closed form P(g ≠ 0) = σ(log α − β log(−γ/ζ)), differentiable in ``logits``."""
        return torch.sigmoid(logits.float() - self.open_logit_shift)

    def extra_repr(self) -> str:
        return (f"beta={self.beta:.4g}, gamma={self.gamma}, zeta={self.zeta}, "
                f"eval_rule={self.eval_rule}")
