"""Optimiser parameter groups: weight decay off for biases and norms, the head's learning rate
on the classification head and pooler (one list of head names, ``methods.base``)."""

from __future__ import annotations

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
