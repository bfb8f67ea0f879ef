"""``controller: per_layer`` (the seed's controller): one controller per transformer layer,
reading the layer's input hidden state, whose logits gate every target of that layer. Checked
against explicit computations from the layer inputs, torch's FLOP counter and autograd."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from rankwise.methods import get_method
from rankwise.methods.cost import trainable_param_counts
from rankwise.methods.spectral import CBSPConfig, TABSConfig, spectral_layers
from rankwise.methods.spectral.flops import measured_matmul_flops
from rankwise.methods.targets import resolve_target_modules

SENTENCES = ["the movie is good", "a bad movie, not good", "it was"]


def wrap(backbone, config):
    method = get_method(config.type).method_cls(config, None)
    return method, method.wrap(backbone, resolve_target_modules(backbone))


def encoder_layers(model) -> dict[str, torch.nn.Module]:
    """The transformer layers by name (``bert.encoder.layer.<i>``)."""
    return {name: m for name, m in model.named_modules() if re.search(r"encoder\.layer\.\d+$", name)}


def layer_of(target: str) -> str:
    return re.match(r".*encoder\.layer\.\d+", target).group(0)


def layer_controllers(model):
    return {name: layer.gate_source for name, layer in encoder_layers(model).items()}


def randomise(model, std=1.0):
    torch.manual_seed(0)
    with torch.no_grad():
        for controller in layer_controllers(model).values():
            for p in controller.parameters():
                p.normal_(0, std)


def encode(tokenizer, sentences=SENTENCES):
    return dict(tokenizer(sentences, padding=True, return_tensors="pt"))


def record_logits(model) -> list[tuple[str, torch.Tensor]]:
    """(target name, logits) of every gate decision of the next forwards."""
    seen = []
    for name, layer in spectral_layers(model).items():
        original = layer.compute_gates

        def recording(x, valid, original=original, name=name):
            decision = original(x, valid)
            seen.append((name, decision.logits.detach().clone()))
            return decision

        layer.compute_gates = recording
    return seen


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_every_target_of_a_layer_gates_with_the_controller_of_the_layer_input(granularity, tiny_bert):
    model, tokenizer = tiny_bert
    config = TABSConfig(R=4, budget=2.0, controller="per_layer", gate_granularity=granularity)
    _, wrapped = wrap(model, config)
    randomise(wrapped)
    inputs = {}
    for name, layer in encoder_layers(wrapped).items():  # the reference reads the inputs itself
        layer.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
    seen = record_logits(wrapped)
    batch = encode(tokenizer)
    with torch.no_grad():
        wrapped.eval()(**batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    assert len(seen) == len(spectral_layers(wrapped)) == 12
    for target, logits in seen:
        layer_name = layer_of(target)
        w1, w2 = (m.weight for m in (layer_controllers(wrapped)[layer_name].mlp.w1,
                                      layer_controllers(wrapped)[layer_name].mlp.w2))
        x = inputs[layer_name]
        if granularity == "sequence":
            x = ((x * mask).sum(1) / mask.sum(1)).unsqueeze(1)
        expected = torch.relu(x @ w1.T) @ w2.T
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_one_controller_per_layer_with_the_seed_s_width_and_the_gate_learning_rate(tiny_bert):
    model, _ = tiny_bert
    d, rank = model.config.hidden_size, 4
    fresh = copy.deepcopy(model)
    method, wrapped = wrap(model, TABSConfig(R=rank, budget=2.0, controller="per_layer", gate_learning_rate=0.1))
    controllers = layer_controllers(wrapped)
    assert len(controllers) == model.config.num_hidden_layers
    for controller in controllers.values():
        assert controller.mlp.w1.weight.shape == (d // 4, d)  # hidden d/4 by default
        assert controller.mlp.w2.weight.shape == (rank, d // 4)
    # registered once each: named parameters, the controller count and the optimizer's groups
    names = [n for n, _ in wrapped.named_parameters() if ".gate_source." in f".{n}."]
    assert sorted(names) == sorted(f"{layer}.gate_source.mlp.{w}.weight" for layer in controllers
                                   for w in ("w1", "w2"))
    assert trainable_param_counts(wrapped)[1] == len(controllers) * (d * (d // 4) + (d // 4) * rank)
    assert all(method.parameter_learning_rate(n) == 0.1 for n in names)
    per_target = wrap(fresh, TABSConfig(R=rank, budget=2.0))[1]
    assert trainable_param_counts(per_target)[1] > trainable_param_counts(wrapped)[1]


def test_realised_flops_count_each_layer_controller_once(tiny_bert):
    model, tokenizer = tiny_bert
    reference = copy.deepcopy(model).eval()
    method, wrapped = wrap(model, TABSConfig(R=4, budget=1.0, controller="per_layer"))
    randomise(wrapped)
    with torch.no_grad():
        for layer in spectral_layers(wrapped).values():
            layer.P_U.normal_(0, 0.1)
    batch = encode(tokenizer, ["the movie is good and it was not bad"])
    wrapped.eval()
    method.begin_evaluation(wrapped)
    adapted = measured_matmul_flops(wrapped, **batch)
    stats = method.end_evaluation(wrapped)
    frozen = measured_matmul_flops(reference, **batch)
    assert adapted - frozen == stats["spectral_adapter_flops_per_example"] + stats["spectral_controller_flops_per_example"]
    d, tokens = model.config.hidden_size, batch["input_ids"].shape[1]
    per_layer = 2 * (d * (d // 4) + (d // 4) * 4) * tokens
    assert stats["spectral_controller_flops_per_example"] == model.config.num_hidden_layers * per_layer


def test_the_budget_penalty_and_its_gradient_equal_an_explicit_reference(tiny_bert):
    """CBSP per layer: λ · Σ_k mean_seq(max(0, T_valid · Σ_i P(g ≠ 0) − b · T_valid))², every
    target k of a layer with its layer's logits, recomputed from the layer inputs by hand."""
    from rankwise.methods.spectral.gates import BETA, GAMMA, ZETA

    model, tokenizer = tiny_bert
    method, wrapped = wrap(model, CBSPConfig(R=4, budget=0.5, controller="per_layer", penalty_weight=1.0))
    randomise(wrapped, std=0.5)
    inputs = {}
    for name, layer in encoder_layers(wrapped).items():
        layer.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
    batch = encode(tokenizer)
    wrapped.train()
    wrapped(**batch)
    penalty = sum(method.regularization_losses(wrapped).values())
    controllers = layer_controllers(wrapped)
    params = [p for c in controllers.values() for p in c.parameters()]
    grads = torch.autograd.grad(penalty, params)

    mask = batch["attention_mask"].unsqueeze(-1).float()
    tokens = mask.sum(dim=(1, 2))
    targets_per_layer = len(spectral_layers(wrapped)) // len(controllers)
    reference = 0.0
    for name, controller in controllers.items():
        pooled = (inputs[name] * mask).sum(1) / mask.sum(1)
        logits = torch.relu(pooled @ controller.mlp.w1.weight.T) @ controller.mlp.w2.weight.T
        p_open = torch.sigmoid(logits - BETA * torch.log(torch.tensor(-GAMMA / ZETA)))
        excess = torch.relu(tokens * p_open.sum(-1) - 0.5 * tokens)
        reference = reference + targets_per_layer * excess.square().mean()
    assert penalty > 0
    torch.testing.assert_close(penalty, reference)
    for got, expected in zip(grads, torch.autograd.grad(reference, params)):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected)


def test_a_copied_model_gates_with_its_own_controllers(tiny_bert):
    model, tokenizer = tiny_bert
    _, wrapped = wrap(model, TABSConfig(R=4, budget=2.0, controller="per_layer"))
    randomise(wrapped)
    with torch.no_grad():
        for layer in spectral_layers(wrapped).values():
            layer.P_U.normal_(0, 0.1)
    batch = encode(tokenizer)
    wrapped.eval()
    twin = copy.deepcopy(wrapped)
    with torch.no_grad():
        before = wrapped(**batch).logits
        torch.testing.assert_close(twin(**batch).logits, before)
        for controller in layer_controllers(twin).values():
            controller.mlp.w2.weight.mul_(-1.0)
        assert not torch.allclose(twin(**batch).logits, before)
        torch.testing.assert_close(wrapped(**batch).logits, before)


def test_deberta_step_zero_equals_the_backbone_with_layer_controllers(tiny_deberta):
    model, tokenizer = tiny_deberta
    reference = copy.deepcopy(model).eval()
    _, wrapped = wrap(model, TABSConfig(R=4, budget=2.0, controller="per_layer"))
    randomise(wrapped)
    batch = encode(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(**batch).logits,
                                   reference(**batch).logits)
