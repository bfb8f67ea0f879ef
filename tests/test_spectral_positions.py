"""Equal treatment on DeBERTa: every method adapts the relative-position rows that query/key
project inside ``disentangled_attention_bias``, with its own gate rule, checked against an
explicit dense computation; BHSP uses one gate sample per forward on tokens and positions."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rankwise.config.schema import parse_run_config
from rankwise.methods import build_method, get_method
from rankwise.methods.spectral import (
    BHSPConfig,
    CBSPConfig,
    SpectralAdapterConfig,
    TABSConfig,
    spectral_layers,
)
from rankwise.methods.targets import resolve_target_modules

R = 4
CONFIGS = {
    "spectral": SpectralAdapterConfig(R=R, scale=0.7),
    # the sign rule, which expected_position_gates computes by hand
    "bhsp": BHSPConfig(R=R, budget=2.0, eval_gates="sign"),
    "cbsp": CBSPConfig(R=R, budget=2.0, eval_gates="sign"),
    "tabs": TABSConfig(R=R, budget=1.0, eval_gates="sign"),
}


def wrap(kind, backbone):
    method = get_method(kind).method_cls(CONFIGS[kind], None)
    return method, method.wrap(backbone, resolve_target_modules(backbone))


def perturb(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in spectral_layers(model).values():
            layer.P_U.normal_(0, 0.3)
            layer.P_V.normal_(0, 0.3)
            if layer.gate_source is not None:
                for p in layer.gate_source.parameters():
                    p.normal_(0, 1.5)


def record_calls(layer):
    """Wrap ``layer.compute_gates`` and hook its forward: one entry per call, tagged with
    whether the call was on position rows."""
    calls = []
    compute = layer.compute_gates

    def compute_gates(x, valid):
        decision = compute(x, valid)
        calls.append({"position": layer.context.in_non_token_call, "gates": decision.gates,
                      "valid": valid})
        return decision

    def hook(module, args, output):
        calls[-1].update(x=args[0].detach(), y=output.detach())

    layer.compute_gates = compute_gates
    layer.register_forward_hook(hook)
    return calls


def explicit_update(layer, x, gates):
    """scale · Σ_i g_{j,i} ((u_i + p_Ui) s_i (v_i + p_Vi)ᵀ − u_i s_i v_iᵀ) x_j, in float64."""
    U, s, V = layer.U.double(), layer.s.double(), layer.V.double()
    P_U, P_V = layer.P_U.detach().double(), layer.P_V.detach().double()
    deltas = [s[i] * (torch.outer(U[:, i] + P_U[:, i], V[:, i] + P_V[:, i])
                      - torch.outer(U[:, i], V[:, i])) for i in range(layer.rank)]
    rows = x.reshape(-1, layer.d_in).double()
    g = gates.reshape(-1, layer.rank).double()
    out = sum(g[:, i:i + 1] * (rows @ deltas[i].T) for i in range(layer.rank))
    return layer.scale * out


def expected_position_gates(kind, layer, rows):
    """The evaluation gates each rule gives the N position rows (N, R), computed from the
    parameters: 1, 1[log α > 0], CBSP's controller on the mean row, TABS's controller per row
    then the floor(b·N) highest open logits."""
    n = rows.shape[0]
    if kind == "spectral":
        return torch.ones(n, R)
    if kind == "bhsp":
        return (layer.gate_source.log_alpha.detach() > 0).float().expand(n, R)
    w1, w2 = layer.gate_source.mlp.w1.weight.detach(), layer.gate_source.mlp.w2.weight.detach()
    if kind == "cbsp":
        logits = torch.relu(rows.mean(0) @ w1.T) @ w2.T
        return (logits > 0).float().expand(n, R)
    logits = (torch.relu(rows @ w1.T) @ w2.T).flatten()
    capacity = math.floor(1.0 * n)
    open_idx = [i for i in sorted(range(logits.numel()), key=lambda i: -float(logits[i]))
                if logits[i] > 0][:capacity]
    gates = torch.zeros(logits.numel())
    gates[open_idx] = 1.0
    return gates.view(n, R)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_position_rows_get_each_methods_adapter_update(kind, tiny_deberta):
    model, tokenizer = tiny_deberta
    _, wrapped = wrap(kind, model)
    perturb(wrapped)
    layers = spectral_layers(wrapped)
    name = next(n for n in layers if n.endswith("query_proj"))
    calls = record_calls(layers[name])
    batch = dict(tokenizer(["the movie is good", "it was"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        wrapped.eval()(**batch)
    position = [c for c in calls if c["position"]]
    assert len(position) == 1 and len(calls) == 2  # one token call, one position call
    call = position[0]
    rows = call["x"].reshape(-1, layers[name].d_in)
    assert rows.shape[0] == 2 * model.config.position_buckets
    gates = expected_position_gates(kind, layers[name], rows)
    assert torch.equal(call["gates"].reshape(-1, R), gates)
    assert 0 < gates.sum() < gates.numel() or kind == "spectral"
    base = layers[name].base_layer(call["x"]).double()
    update = explicit_update(layers[name], call["x"], gates).reshape(base.shape)
    assert update.abs().max() > 1e-3  # the position path is adapted
    torch.testing.assert_close(call["y"].double(), base + update, atol=1e-5, rtol=1e-5)


def test_lora_adapts_the_position_rows_too(tiny_deberta):
    model, tokenizer = tiny_deberta
    cfg = parse_run_config({"run_id": "t", "method": "baseline",
                            "model": {"name": "tiny-deberta",
                                      "adapter": {"type": "lora", "rank": 2, "dropout": 0.0}}})
    method = build_method(cfg)
    wrapped = method.wrap(model, resolve_target_modules(model))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    seen = []
    for n, module in wrapped.named_modules():
        if n.endswith("attention.self.query_proj") and hasattr(module, "lora_A"):
            module.register_forward_hook(lambda m, a, o: seen.append((a[0].detach(), o.detach(), m)))
            break
    batch = dict(tokenizer(["the movie is good"], return_tensors="pt"))
    with torch.no_grad():
        wrapped.eval()(**batch)
    x, y, module = seen[1]  # the second call is the position rows
    assert x.shape[1] == 2 * model.config.position_buckets
    a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
    expected = module.base_layer(x).double() + module.scaling["default"] * (x.double() @ a.T @ b.T)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    assert (y - module.base_layer(x)).abs().max() > 1e-3


def test_bhsp_uses_one_gate_sample_per_forward_on_tokens_and_positions(tiny_deberta):
    model, tokenizer = tiny_deberta
    _, wrapped = wrap("bhsp", model)
    with torch.no_grad():
        for layer in spectral_layers(wrapped).values():
            layer.gate_source.log_alpha.fill_(-1.0)  # P(open) ≈ 0.65: samples vary
    recorded = {name: record_calls(layer) for name, layer in spectral_layers(wrapped).items()}
    batch = dict(tokenizer(["the movie is good", "a bad movie, not good", "it was"],
                           padding=True, return_tensors="pt"))
    wrapped.train()
    samples = []
    for _ in range(3):
        for calls in recorded.values():
            calls.clear()
        wrapped(**batch)
        for name, calls in recorded.items():
            token = [c for c in calls if not c["position"]]
            assert len(token) == 1
            valid = token[0]["valid"]
            gates = token[0]["gates"][valid]  # (real tokens, R): one row repeated
            assert torch.equal(gates, gates[:1].expand_as(gates))  # all sequences, all tokens
            for call in (c for c in calls if c["position"]):  # query/key only
                assert name.endswith(("query_proj", "key_proj"))
                position = call["gates"].reshape(-1, R)
                assert torch.equal(position, gates[:1].expand_as(position))
            samples.append(gates[0])
    # fresh samples per forward and per layer (not one frozen draw)
    assert len({tuple(s.tolist()) for s in samples}) > 1
    assert sum(1 for calls in recorded.values() for c in calls if c["position"]) == 4


def test_tabs_position_rows_keep_the_budget_in_training(tiny_deberta):
    model, tokenizer = tiny_deberta
    _, wrapped = wrap("tabs", model)
    perturb(wrapped, seed=3)
    recorded = [record_calls(layer) for layer in spectral_layers(wrapped).values()]
    wrapped.train()(**dict(tokenizer(["the movie is good"], return_tensors="pt")))
    positions = [c for calls in recorded for c in calls if c["position"]]
    assert len(positions) == 4
    for call in positions:
        n = call["gates"].shape[1]
        open_pairs = int((call["gates"] > 0).sum())
        assert 0 < open_pairs <= math.floor(1.0 * n)


def test_position_rows_are_counted_per_forward_and_match_the_flop_counter(tiny_deberta):
    """Whole-model FlopCounterMode of a TABS DeBERTa = frozen backbone + B · per-example extra
    + the position rows' FLOPs of that forward."""
    from rankwise.measure.adapter_flops import forward_cost, measured_flops

    model, _ = tiny_deberta
    reference = copy.deepcopy(model).eval()
    method, wrapped = wrap("tabs", model)
    perturb(wrapped, seed=1)
    ids = torch.randint(5, 60, (2, 10))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    wrapped.eval()
    counted = {}
    with torch.no_grad():
        cost = forward_cost(wrapped, method,
                            lambda: counted.update(n=measured_flops(wrapped, lambda: wrapped(**inputs))),
                            inputs["attention_mask"])
        base = measured_flops(reference, lambda: reference(**inputs))
    assert cost.position_adapter_flops > 0 and cost.position_controller_flops > 0
    # controller on every one of the 2·span rows, through query and key of both layers
    layer = next(iter(spectral_layers(wrapped).values()))
    mlp = layer.gate_source.mlp
    rows = 2 * model.config.position_buckets
    assert cost.position_controller_flops == 4 * rows * 2 * (32 * mlp.w1.out_features
                                                             + mlp.w1.out_features * R)
    assert counted["n"] - base == (sum(cost.adapter_flops) + sum(cost.controller_flops)
                                   + cost.position_adapter_flops + cost.position_controller_flops)
