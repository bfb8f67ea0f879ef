"""HardConcrete gates and the budget projection, each against an independent reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import expit

from rankwise.methods.spectral.budget_projection import SequenceBudget, keep_top_logits
from rankwise.methods.spectral.gates import BETA, GAMMA, ZETA, HardConcreteGate


@pytest.mark.parametrize("log_alpha", [-3.0, -1.0, 0.0, 0.7, 2.5])
def test_prob_open_matches_monte_carlo(log_alpha):
    gate = HardConcreteGate()
    generator = torch.Generator().manual_seed(1234)
    samples = gate.sample(torch.full((200_000,), log_alpha), generator=generator)
    monte_carlo = (samples > 0).double().mean().item()
    closed_form = gate.prob_open(torch.tensor(log_alpha)).item()
    # standard error ≤ 0.0012 at n = 2e5, so a 1% tolerance is ~8 sigma
    assert abs(monte_carlo - closed_form) < 0.01


def test_samples_follow_the_stretched_clipped_concrete_law():
    """Empirical P(g = 1) and P(g ≤ 0.5) against the Concrete CDF (Louizos et al. 2018, eq. 9)."""
    log_alpha = 0.4
    gate = HardConcreteGate()
    generator = torch.Generator().manual_seed(7)
    samples = gate.sample(torch.full((200_000,), log_alpha), generator=generator)
    assert samples.min() >= 0 and samples.max() <= 1

    def concrete_cdf(s: float) -> float:  # P(S ≤ s) for S = σ((L + log α)/β), L logistic
        return 1 / (1 + math.exp(-(BETA * (math.log(s) - math.log(1 - s)) - log_alpha)))

    def stretched_cdf(g: float) -> float:  # P(G ≤ g) for g in (0, 1)
        return concrete_cdf((g - GAMMA) / (ZETA - GAMMA))

    assert abs((samples == 1).double().mean().item() - (1 - stretched_cdf(1.0))) < 0.01
    assert abs((samples <= 0.5).double().mean().item() - stretched_cdf(0.5)) < 0.01


def test_sample_is_differentiable_and_decision_is_binary():
    gate = HardConcreteGate()
    logits = torch.randn(1000, requires_grad=True)
    g = gate.sample(logits, generator=torch.Generator().manual_seed(0))
    g.sum().backward()
    interior = (g > 0) & (g < 1)
    assert interior.any()
    assert (logits.grad[interior] > 0).all()  # dg/dlogα > 0 inside (0, 1)
    assert (logits.grad[~interior] == 0).all()  # clipped samples carry no gradient
    decided = gate.decide(torch.tensor([-1.0, 0.0, 1e-6, 3.0]))
    assert decided.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_louizos_evaluation_gate_matches_its_closed_form():
    gate = HardConcreteGate(eval_rule="louizos")
    logits = np.linspace(-6, 6, 241)
    reference = np.clip(expit(logits) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    decided = gate.decide(torch.tensor(logits, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(decided, reference, atol=1e-6)
    threshold = math.log(-GAMMA / ZETA)  # σ(t)(ζ − γ) + γ = 0
    assert (decided[logits < threshold - 1e-9] == 0).all()
    assert (decided[logits > threshold + 1e-3] > 0).all()
    with pytest.raises(ValueError, match="eval_rule"):
        HardConcreteGate(eval_rule="mean")


def _reference_keep(open_units: np.ndarray, logits: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Independent selection: sort each row's open units by logit, keep the first ``capacity``."""
    keep = np.zeros_like(open_units)
    for b in range(open_units.shape[0]):
        candidates = np.flatnonzero(open_units[b])
        order = candidates[np.argsort(-logits[b, candidates], kind="stable")]
        keep[b, order[: max(int(capacity[b]), 0)]] = True
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_projection_keeps_exactly_the_top_logits(seed):
    rng = np.random.default_rng(seed)
    batch, units = 5, int(rng.integers(1, 300))
    logits = rng.normal(size=(batch, units)).astype(np.float32)
    open_units = rng.random((batch, units)) < rng.uniform(0.05, 1.0)
    capacity = rng.integers(0, units + 3, size=batch)
    capacity[0] = 0
    kept = keep_top_logits(
        torch.from_numpy(open_units), torch.from_numpy(logits), torch.from_numpy(capacity)
    )
    expected = _reference_keep(open_units, logits, capacity)
    np.testing.assert_array_equal(kept.numpy(), expected)
    assert (kept.sum(1).numpy() == np.minimum(open_units.sum(1), capacity)).all()


def test_projection_passes_gradient_only_through_kept_gates():
    torch.manual_seed(0)
    gates = torch.rand(3, 40).clamp(min=0.05).requires_grad_(True)  # all open, values in (0, 1)
    logits = torch.randn(3, 40)
    capacity = torch.tensor([0, 7, 40])
    keep = keep_top_logits(gates > 0, logits, capacity)
    weights = torch.randn(3, 40)
    (gates * keep * weights).sum().backward()
    assert torch.equal(gates.grad != 0, keep)
    torch.testing.assert_close(gates.grad[keep], weights[keep])
    assert keep.sum(1).tolist() == [0, 7, 40]


def test_sequence_budget():
    valid = torch.tensor([0, 1, 7, 128])
    assert SequenceBudget(per_token=8.0).max_open_pairs(valid).tolist() == [0, 8, 56, 1024]
    assert SequenceBudget(per_token=0.5).max_open_pairs(valid).tolist() == [0, 0, 3, 64]
    assert SequenceBudget(budget_tokens=100).max_open_pairs(valid).tolist() == [100] * 4
    with pytest.raises(ValueError):
        SequenceBudget()
    with pytest.raises(ValueError):
        SequenceBudget(per_token=1.0, budget_tokens=3)
