"""SpectralLinear against explicit dense matrices, FlopCounterMode, sort-based selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rankwise.methods.spectral.budget_projection import SequenceBudget, TopLogitBudgetProjection
from rankwise.methods.spectral.context import ForwardContext
from rankwise.methods.spectral.controllers import (
    SequenceController,
    StaticGateLogits,
    TokenController,
)
from rankwise.methods.spectral.flops import adapter_flops_per_pair, measured_matmul_flops
from rankwise.methods.spectral.gates import HardConcreteGate
from rankwise.methods.spectral.layer import SpectralLinear
from rankwise.methods.spectral.statistics import GateStatistics
from rankwise.methods.spectral.svd_cache import top_r_svd


def build_layer(source: str = "token", R: int = 4, d_in: int = 6, d_out: int = 5, hidden: int = 3,
                budget: SequenceBudget | None = None, projection: bool = False, seed: int = 0,
                perturb: bool = True, scale: float = 0.7) -> SpectralLinear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    gate_source = {
        "none": None,
        "static": StaticGateLogits(R, 0.0),
        "sequence": SequenceController(d_in, hidden, R),
        "token": TokenController(d_in, hidden, R),
    }[source]
    layer = SpectralLinear(
        base, top_r_svd(base.weight, R), ForwardContext(), scale=scale, gate_source=gate_source,
        gate=HardConcreteGate() if gate_source is not None else None, budget=budget,
        projection=TopLogitBudgetProjection() if projection else None,
    )
    if perturb:
        with torch.no_grad():
            layer.P_U.normal_(0, 0.5)
            layer.P_V.normal_(0, 0.5)
            if source == "static":
                layer.gate_source.log_alpha.normal_(0, 2)
    return layer


def explicit_output(layer: SpectralLinear, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """y_t = W x_t + b + scale Σ_i g_ti ΔW_i x_t, every ΔW_i built as a dense matrix (float64)."""
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    U, s, V = layer.U.double(), layer.s.double(), layer.V.double()
    P_U, P_V = layer.P_U.detach().double(), layer.P_V.detach().double()
    x = x.double()
    y = x @ W.T + b
    for i in range(layer.rank):
        perturbed = torch.outer(U[:, i] + P_U[:, i], V[:, i] + P_V[:, i])
        delta_i = s[i] * perturbed - s[i] * torch.outer(U[:, i], V[:, i])
        y = y + layer.scale * gates[..., i : i + 1].double() * (x @ delta_i.T)
    return y


def random_gates(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    gates = torch.rand(shape, generator=g)
    return gates * (torch.rand(shape, generator=g) < 0.5)  # half closed, the rest in (0, 1)


def test_ungated_layer_equals_explicit_dense_update():
    layer = build_layer("none")
    x = torch.randn(3, 7, 6)
    ones = torch.ones(3, 7, layer.rank)
    reference = explicit_output(layer, x, ones)
    torch.testing.assert_close(layer(x).double(), reference, atol=1e-5, rtol=1e-5)
    # delta_weight (used for merging) is the same sum of dense ΔW_i
    merged = (layer.base_layer.weight + layer.scale * layer.delta_weight()).double()
    merged_output = x.double() @ merged.T + layer.base_layer.bias.double()
    torch.testing.assert_close(merged_output, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_gated_update_equals_explicit_dense_update(path):
    layer = build_layer("token", R=4, d_in=7, d_out=5)
    x = torch.randn(2, 9, 7)
    gates = random_gates((2, 9, 4))
    update = layer.dense_update(x, gates) if path == "dense" else layer.sparse_update(x, gates)
    y = layer.base_layer(x) + layer.scale * update
    torch.testing.assert_close(y.double(), explicit_output(layer, x, gates), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["none", "static", "sequence", "token"])
@pytest.mark.parametrize("training", [False, True])
def test_zero_init_layer_is_the_frozen_linear_for_any_gates(source, training):
    budget = SequenceBudget(per_token=1.0) if source in ("sequence", "token") else None
    layer = build_layer(source, budget=budget, projection=budget is not None, perturb=False)
    layer.train(training)
    with torch.no_grad():
        if layer.gate_source is not None:
            for p in layer.gate_source.parameters():
                p.normal_(0, 3)
    layer.context.attention_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    x = torch.randn(2, 7, 6)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("source", ["static", "sequence", "token"])
@pytest.mark.parametrize("training", [False, True])
def test_sparse_and_dense_paths_agree(source, training):
    budget = SequenceBudget(per_token=1.5) if source != "static" else None
    layer = build_layer(source, R=5, d_in=8, d_out=6, budget=budget,
                        projection=budget is not None, seed=3)
    layer.train(training)
    layer.context.attention_mask = torch.tensor([[1] * 11, [1] * 6 + [0] * 5, [1] + [0] * 10])
    x = torch.randn(3, 11, 8)
    outputs = {}
    for path in ("dense", "sparse"):
        layer.execution = path
        torch.manual_seed(11)  # same HardConcrete samples for both paths
        outputs[path] = layer(x)
    torch.testing.assert_close(outputs["sparse"], outputs["dense"], atol=1e-5, rtol=1e-5)


def test_sparse_path_gradients_equal_the_dense_paths():
    """Forced in training, the sparse kernels give the same gradients for P_U, P_V, the
    controller and the input as autograd through the dense-masked path."""
    layer = build_layer("token", R=5, d_in=8, d_out=6, budget=SequenceBudget(per_token=2.0),
                        projection=True, seed=4).train()
    with torch.no_grad():
        layer.P_U.normal_(0, 0.3)
        layer.P_V.normal_(0, 0.3)
    layer.context.attention_mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    x0 = torch.randn(2, 9, 8)
    grads = {}
    for path in ("dense", "sparse"):
        layer.execution = path
        layer.zero_grad()
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(5)  # same HardConcrete samples for both paths
        (layer(x) * torch.linspace(-1, 1, 6)).sum().backward()
        grads[path] = [x.grad, layer.P_U.grad, layer.P_V.grad,
                       layer.gate_source.mlp.w1.weight.grad]
    assert grads["dense"][1].abs().sum() > 0
    for sparse, dense in zip(grads["sparse"], grads["dense"], strict=True):
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


def test_sparse_path_is_the_default_at_evaluation():
    layer = build_layer("token")
    assert layer.train().uses_sparse_path() is False
    assert layer.eval().uses_sparse_path() is True
    assert build_layer("none").eval().uses_sparse_path() is False  # g ≡ 1: nothing to skip


def test_analytic_flops_match_flop_counter():
    d_in, d_out, R, hidden, B, T = 12, 9, 5, 4, 2, 10
    layer = build_layer("token", R=R, d_in=d_in, d_out=d_out, hidden=hidden, seed=1).eval()
    x = torch.randn(B, T, d_in)
    n = B * T
    base = 2 * n * d_in * d_out
    controller = n * 2 * (d_in * hidden + hidden * R)
    assert adapter_flops_per_pair(d_in, d_out) == 4 * (d_in + d_out)

    layer.execution = "dense"
    dense = measured_matmul_flops(layer, x)
    assert dense == base + controller + n * R * layer.cost_per_pair

    # Sparse path: matmul FLOPs are exactly (open pairs) × cost_per_pair. Count the open pairs
    # from the evaluation rule 1[logit > 0] applied to an independent evaluation of the MLP.
    w1, w2 = layer.gate_source.mlp.w1.weight, layer.gate_source.mlp.w2.weight
    open_pairs = int(((torch.relu(x @ w1.T) @ w2.T) > 0).sum())
    assert 0 < open_pairs < n * R
    layer.execution = "sparse"
    sparse = measured_matmul_flops(layer, x)
    assert sparse == base + controller + open_pairs * layer.cost_per_pair

    # ... and the statistics report the same realised adapter FLOPs.
    layer.context.statistics = GateStatistics()
    with torch.no_grad():
        layer(x)
    stats = layer.context.statistics.summary()
    assert stats["spectral_adapter_flops_per_example"] * B == open_pairs * layer.cost_per_pair
    assert stats["spectral_controller_flops_per_example"] * B == controller


def test_sequence_controller_flops_match_flop_counter():
    layer = build_layer("sequence", R=4, d_in=10, d_out=6, hidden=5).eval()
    layer.execution = "dense"
    x = torch.randn(3, 8, 10)
    measured = measured_matmul_flops(layer, x)
    base_and_adapter = 2 * 24 * 10 * 6 + 24 * 4 * layer.cost_per_pair
    assert measured - base_and_adapter == 3 * layer.gate_source.flops(torch.tensor([8]))[0]


@pytest.mark.parametrize("training", [False, True])
def test_sequence_gates_are_shared_by_all_tokens(training):
    layer = build_layer("sequence", R=5, seed=2).train(training)
    valid = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    gates = layer.compute_gates(torch.randn(2, 9, 6), valid).gates
    for b, length in enumerate([9, 5]):
        assert torch.equal(gates[b, :length], gates[b, :1].expand(length, -1))
        assert (gates[b, length:] == 0).all()
    assert gates.sum() > 0


def test_sequence_controller_reads_only_real_tokens():
    layer = build_layer("sequence", R=4, seed=5).eval()
    x = torch.randn(1, 6, 6)
    valid = torch.tensor([[True] * 4 + [False] * 2])
    expected = layer.gate_source.mlp(x[0, :4].mean(0))
    torch.testing.assert_close(layer.compute_gates(x, valid).logits[0, 0], expected)
    x_changed = x.clone()
    x_changed[0, 4:] = 100.0  # padding content must not matter
    gates = layer.compute_gates(x, valid).gates
    assert torch.equal(layer.compute_gates(x_changed, valid).gates, gates)


def test_gradients_flow_through_kept_gates_only():
    budget = SequenceBudget(budget_tokens=6)
    layer = build_layer("token", R=4, d_in=6, d_out=5, budget=budget, projection=True, seed=4)
    layer.train()
    captured = []
    layer.gate_source.register_forward_hook(lambda module, args, out: captured.append(out))
    sampled = []
    original_sample = layer.gate.sample

    def recording_sample(logits, generator=None):
        sampled.append(original_sample(logits))
        return sampled[-1]

    layer.gate.sample = recording_sample
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    layer.context.attention_mask = mask
    x = torch.randn(2, 8, 6)
    y = layer(x)
    logits = captured[0]
    logits.retain_grad()
    y.pow(2).sum().backward()
    grad = logits.grad.detach()
    g = sampled[0].detach()

    # Independent kept set: open real-token pairs, sorted by logit, first 6 per sequence.
    open_pairs = (g > 0) & mask.bool().unsqueeze(-1)
    kept = torch.zeros_like(open_pairs)
    for b in range(2):
        flat_open = open_pairs[b].flatten().nonzero().flatten()
        order = flat_open[torch.argsort(-logits[b].detach().flatten()[flat_open])]
        kept[b].view(-1)[order[:6]] = True
    assert kept.sum() == 12  # the budget binds in both sequences
    interior = kept & (g > 0) & (g < 1)
    assert interior.any()
    assert (grad[~kept] == 0).all()  # dropped, closed and padding pairs get no gradient
    assert (grad[interior] != 0).all()  # kept gates pass it on


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 4096), min_size=1, max_size=3),
    per_token=st.one_of(st.none(), st.floats(0.0, 3.0)),
    budget_tokens=st.integers(1, 64),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_projection_never_exceeds_the_budget(lengths, per_token, budget_tokens, training, seed):
    if per_token is not None:
        budget = SequenceBudget(per_token=per_token)
    else:
        budget = SequenceBudget(budget_tokens=budget_tokens)
    layer = build_layer("token", R=3, d_in=4, d_out=3, hidden=2, budget=budget, projection=True,
                        seed=seed % 7)
    layer.train(training)
    with torch.no_grad():  # large logits: most gates want to open, so the projection binds
        layer.gate_source.mlp.w2.weight.normal_(0, 3)
    T = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths], dtype=torch.bool)
    torch.manual_seed(seed)
    x = torch.randn(len(lengths), T, 4)
    with torch.no_grad():
        decision = layer.compute_gates(x, mask)
    open_per_sequence = (decision.gates > 0).sum(dim=(1, 2))
    b_max = budget.max_open_pairs(torch.tensor(lengths))
    assert (open_per_sequence <= b_max).all()
    assert (decision.gates[~mask] == 0).all()  # padding never opens a gate
    if per_token is not None:
        assert b_max.tolist() == [int(np.floor(n * per_token)) for n in lengths]


def test_sequence_granularity_projection_keeps_whole_directions():
    budget = SequenceBudget(per_token=2.0)
    layer = build_layer("sequence", R=5, budget=budget, projection=True, seed=6).eval()
    with torch.no_grad():
        layer.gate_source.mlp.w2.weight.normal_(0, 5)
    valid = torch.tensor([[True] * 10, [True] * 3 + [False] * 7])
    decision = layer.compute_gates(torch.randn(2, 10, 6), valid)
    directions_open = (decision.gates[:, 0] > 0).sum(-1)
    assert (directions_open <= 2).all()
    assert ((decision.gates > 0).sum(dim=(1, 2)) <= decision.max_open_pairs).all()


def test_input_that_is_not_the_batch_raises_a_clear_error():
    layer = build_layer("token")
    layer.context.attention_mask = torch.ones(2, 5)
    with pytest.raises(RuntimeError, match="target_modules"):
        layer(torch.randn(1, 64, 6))
