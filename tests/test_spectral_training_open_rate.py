"""The training-time open rate of gated spectral methods against the HardConcrete closed form
P(g ≠ 0) = σ(log α − β log(−γ/ζ)), computed here from known logits with scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import expit

from rankwise.methods import get_method
from rankwise.methods.spectral import BHSPConfig, SpectralAdapterConfig, TABSConfig, spectral_layers
from rankwise.methods.spectral.gates import BETA, GAMMA, ZETA
from rankwise.methods.targets import resolve_target_modules

SHIFT = BETA * math.log(-GAMMA / ZETA)  # ≈ −1.60
SENTENCES = ["the movie is good", "a bad movie, not good at all", "it was"]


def wrap(kind, config, backbone):
    method = get_method(kind).method_cls(config, None)
    return method, method.wrap(backbone, resolve_target_modules(backbone))


def test_bhsp_expected_open_rate_is_the_closed_form_mean_over_targets(tiny_bert):
    model, tokenizer = tiny_bert
    method, wrapped = wrap("bhsp", BHSPConfig(R=4, budget=2.0), model)
    layers = spectral_layers(wrapped)
    rng = np.random.default_rng(0)
    log_alpha = {name: rng.normal(0, 2, size=4) for name in layers}
    with torch.no_grad():
        for name, layer in layers.items():
            layer.gate_source.log_alpha.copy_(torch.tensor(log_alpha[name]))
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    assert batch["attention_mask"].min() == 0  # padding must not count
    wrapped.train()
    method.begin_epoch(wrapped, fresh=True)
    wrapped(**batch)
    wrapped(**batch)
    rates = method.step_log_metrics(wrapped)
    # every real token of target k expects Σ_i σ(log α_ki − shift) open gates; averaged per
    # target over the same tokens, the mean over tokens is the mean over targets
    expected = np.mean([expit(a - SHIFT).sum() for a in log_alpha.values()])
    assert rates["train_expected_open_gates_per_token"] == pytest.approx(expected, rel=1e-6)
    assert 0 <= rates["train_sampled_open_gates_per_token"] <= 4
    assert method.step_log_metrics(wrapped) == {}  # nothing since the last log
    assert method.training_metrics(wrapped)["train_expected_open_gates_per_token"] == pytest.approx(
        expected, rel=1e-6)  # the epoch so far
    with torch.no_grad():
        wrapped.eval()(**batch)  # evaluation forwards do not count
    assert method.step_log_metrics(wrapped) == {}


def test_tabs_expected_open_rate_from_explicit_controller_logits(tiny_bert):
    model, tokenizer = tiny_bert
    method, wrapped = wrap("tabs", TABSConfig(R=4, budget=1.0), model)
    layers = spectral_layers(wrapped)
    torch.manual_seed(0)
    inputs = {}
    with torch.no_grad():
        for name, layer in layers.items():
            for p in layer.gate_source.parameters():
                p.normal_(0, 1.0)
            layer.register_forward_hook(lambda m, a, o, name=name: inputs.__setitem__(name, a[0].detach()))
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    mask = batch["attention_mask"].bool().numpy()
    wrapped.train()
    method.begin_epoch(wrapped, fresh=True)
    wrapped(**batch)
    rates = method.step_log_metrics(wrapped)
    per_target = []
    for name, layer in layers.items():
        x = inputs[name].double().numpy()
        w1 = layer.gate_source.mlp.w1.weight.detach().double().numpy()
        w2 = layer.gate_source.mlp.w2.weight.detach().double().numpy()
        logits = np.maximum(x @ w1.T, 0) @ w2.T  # (B, T, R)
        per_target.append(expit(logits - SHIFT).sum(-1)[mask].mean())
    assert rates["train_expected_open_gates_per_token"] == pytest.approx(np.mean(per_target), rel=1e-5)
    # the sampled gates pass the budget projection: at most b = 1 open pair per token on average
    assert rates["train_sampled_open_gates_per_token"] <= 1.0


def test_final_value_covers_the_last_epoch_and_survives_a_checkpoint(tiny_bert):
    model, tokenizer = tiny_bert
    config = BHSPConfig(R=4, budget=2.0)
    method, wrapped = wrap("bhsp", config, model)
    layers = list(spectral_layers(wrapped).values())
    batch = dict(tokenizer(SENTENCES[:1], return_tensors="pt"))
    wrapped.train()
    method.begin_epoch(wrapped, fresh=True)
    with torch.no_grad():
        for layer in layers:
            layer.gate_source.log_alpha.fill_(3.0)
    wrapped(**batch)  # epoch 1: log α = 3
    method.begin_epoch(wrapped, fresh=True)
    with torch.no_grad():
        for layer in layers:
            layer.gate_source.log_alpha.fill_(-2.0)
    wrapped(**batch)  # epoch 2: log α = −2
    state = method.state_dict()
    resumed = get_method("bhsp").method_cls(config, None)
    resumed.svd_info = method.svd_info
    resumed.load_state_dict(state)
    resumed.begin_epoch(wrapped, fresh=False)  # resuming inside epoch 2 keeps its tally
    expected = 4 * expit(-2.0 - SHIFT)
    for m in (method, resumed):
        assert m.training_metrics(wrapped)["train_expected_open_gates_per_token"] == pytest.approx(expected)


def test_ungated_adapter_reports_no_open_rate(tiny_bert):
    model, tokenizer = tiny_bert
    method, wrapped = wrap("spectral", SpectralAdapterConfig(R=4), model)
    wrapped.train()(**dict(tokenizer(SENTENCES, padding=True, return_tensors="pt")))
    assert method.step_log_metrics(wrapped) == {} and method.training_metrics(wrapped) == {}
