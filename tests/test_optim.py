"""Optimiser parameter groups: weight decay off for biases and norms, the head's learning rate
on the classification head and pooler (one list of head names, ``methods.base``)."""

from __future__ import annotations

import pytest

from rankwise.config.schema import TrainingConfig
from rankwise.training.optim import parameter_groups


def test_groups_split_decay_and_the_head(tiny_bert):
    model, _ = tiny_bert
    cfg = TrainingConfig(weight_decay=0.01, head_learning_rate=3e-3)
    groups = parameter_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(names.values())  # every trainable parameter, once
    head = {names[id(p)] for g in groups if "lr" in g for p in g["params"]}
    expected = {n for n in names.values() if n.startswith(("classifier.", "bert.pooler."))}
    assert head == expected and any(n.startswith("bert.pooler.") for n in head)
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            no_decay = n.endswith("bias") or "LayerNorm" in n
            assert g["weight_decay"] == (0.0 if no_decay else 0.01), n


def test_no_head_group_without_a_head_learning_rate(tiny_bert):
    model, _ = tiny_bert
    groups = parameter_groups(model, TrainingConfig(weight_decay=0.01))
    assert all("lr" not in g for g in groups) and len(groups) == 2


def test_a_gated_methods_gates_are_clipped_apart_from_the_adapter(tiny_bert):
    """A budget term's large gradient on the gates must not shrink the adapter's step: with
    ``gate_clipping: apart`` each of the two norms is clipped to max_grad_norm on its own; with
    ``joint`` one norm over every parameter scales both (HF Trainer's clipping). Reference:
    the norms and the scale factors computed by hand from the gradients before clipping."""
    import copy

    import torch

    from rankwise.methods.spectral.config import BHSPConfig
    from rankwise.methods.spectral.method import BHSP
    from rankwise.methods.targets import resolve_target_modules
    from rankwise.training.optim import build_optimizer, clip_gradients

    for clipping in ("apart", "joint"):
        method = BHSP(BHSPConfig(R=4, budget=1.0, gate_clipping=clipping), None)
        backbone = copy.deepcopy(tiny_bert[0])
        model = method.wrap(backbone, resolve_target_modules(backbone))
        optimizer = build_optimizer(model, TrainingConfig(), method)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for n, p in named:  # gates: large gradients, like a budget term's; adapter: small
            p.grad = torch.full_like(p, 50.0 if ".gate_source." in n else 1e-3)
        gates = [p.grad.clone() for n, p in named if ".gate_source." in n]
        rest = [p.grad.clone() for n, p in named if ".gate_source." not in n]
        gate_norm = float(torch.cat([g.flatten() for g in gates]).norm())
        rest_norm = float(torch.cat([g.flatten() for g in rest]).norm())
        assert gate_norm > 1.0 > rest_norm
        total = clip_gradients(optimizer, 1.0)
        assert float(total) == pytest.approx((gate_norm ** 2 + rest_norm ** 2) ** 0.5, rel=1e-5)
        gates_after = [p.grad for n, p in named if ".gate_source." in n]
        rest_after = [p.grad for n, p in named if ".gate_source." not in n]
        gate_scale = 1.0 / (gate_norm + 1e-6)
        rest_scale = 1.0 if clipping == "apart" else 1.0 / (float(total) + 1e-6)
        if clipping == "joint":
            gate_scale = rest_scale
        for before, after in zip(gates, gates_after):
            torch.testing.assert_close(after, before * gate_scale)
        for before, after in zip(rest, rest_after):
            torch.testing.assert_close(after, before * rest_scale)
