"""The contract every registered method keeps, on tiny BERT and tiny DeBERTa.

One row per method in ``ROWS`` (the smallest ``model`` section that selects it); the matrix
runs over the registry, so a registered method without a row fails. An importance-weighted
twin (``iw_<name>``) needs no row of its own: its base's row plus ``IW`` (:func:`row`). Each check compares
with an independent reference: the frozen backbone's own output, the parameters it had before
wrapping, ``torch.utils.flop_counter`` for the FLOPs.

A toy method, LoRA with frozen A (``FrozenALoRA`` below), shows what adding a method takes:
one class, one config dataclass and one ``register_method`` call; the matrix runs over it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from conftest import draw_gate_parameters

from rankwise.config.schema import parse_run_config
from rankwise.measure.adapter_flops import measured_flops
from rankwise.methods import build_method, register_method, registered_methods, unregister_method
from rankwise.methods.base import is_head_parameter
from rankwise.methods.lora import LoRA, LoRAConfig
from rankwise.methods.targets import resolve_target_modules
from rankwise.training.checkpoint import load_trainable_state, trainable_state


# --- the toy method: one class, one config, one registration -----------------------------------
@dataclass
class FrozenALoRAConfig(LoRAConfig):
    type: Literal["frozen_a_lora"] = "frozen_a_lora"


class FrozenALoRA(LoRA):
    """LoRA whose A stays at its random init: only B (and the head) train. A is not in the
    checkpoint (only trainable parameters are), so it is drawn from a fixed seed: a resumed
    or re-loaded model must multiply with the same A."""

    name = "frozen_a_lora"

    def wrap(self, backbone, target_modules):
        model = super().wrap(backbone, target_modules)
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                with torch.no_grad():
                    torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=g)
                p.requires_grad_(False)
        return model


TOY = "frozen_a_lora"

ROWS = {
    "full_ft": {},
    "lora": {"adapter": {"type": "lora", "rank": 4, "dropout": 0.0}},
    "adalora": {"adapter": {"type": "adalora", "target_r": 2, "init_r": 4, "dropout": 0.0}},
    "spectral": {"adapter": {"type": "spectral", "R": 4}},
    "bhsp": {"adapter": {"type": "bhsp", "R": 4, "budget": 2}},
    "cbsp": {"adapter": {"type": "cbsp", "R": 4, "budget": 2}},
    "tabs": {"adapter": {"type": "tabs", "R": 4, "budget": 2}},
    "dora": {"adapter": {"type": "dora", "rank": 4, "dropout": 0.0}},
    "pissa": {"adapter": {"type": "pissa", "rank": 4, "dropout": 0.0}},
    TOY: {"adapter": {"type": TOY, "rank": 4, "dropout": 0.0}},
}
# importance weighting switched on, with a penalty large enough to see and one calibration batch
IW = {"importance_weighted_regularisation": {"enabled": True, "reg_alpha": 0.5,
                                             "sensitivity_warmup_steps": 1}}


def row(name: str) -> dict:
    """The ``model`` section of method ``name`` (an ``iw_`` twin: its base's row + ``IW``)."""
    entry = registered_methods().get(name)
    if entry is not None and entry.importance_weighted_of:
        return copy.deepcopy(ROWS[entry.importance_weighted_of]) | copy.deepcopy(IW)
    return copy.deepcopy(ROWS[name])


@pytest.fixture
def method_name(request):
    """The method under test; the toy one is registered for the test only."""
    name = request.param
    if name == TOY:
        register_method(TOY, FrozenALoRA, FrozenALoRAConfig)
    try:
        yield name
    finally:
        if name == TOY:
            unregister_method(TOY)


def build(name: str, backbone_alias: str, backbone):
    cfg = parse_run_config({"run_id": "contract", "method": "baseline",
                            "model": {"name": backbone_alias, **row(name)}})
    assert cfg.algorithm == name
    method = build_method(cfg)
    model = method.wrap(backbone, resolve_target_modules(backbone))
    return method, model


def batch(seed: int = 0, size: int = 3, length: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 3:] = 0  # one padded example: costs count real tokens only
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 2, (size,), generator=g)


def task_loss(model, b):
    inputs, labels = b
    return F.cross_entropy(model(**inputs).logits, labels)


BACKBONES = ["tiny-bert", "tiny-deberta"]
MATRIX = pytest.mark.parametrize("method_name", [*registered_methods(), TOY], indirect=True)


def test_every_registered_method_has_a_row():
    for name, entry in registered_methods().items():
        assert (entry.importance_weighted_of or name) in ROWS, f"add {name}'s row to ROWS"


@MATRIX
@pytest.mark.parametrize("alias", BACKBONES)
def test_contract(method_name, alias, request):
    backbone, _ = request.getfixturevalue(alias.replace("-", "_"))
    reference = copy.deepcopy(backbone).eval()
    before = {id(p): n for n, p in backbone.named_parameters()}
    method, model = build(method_name, alias, backbone)
    inputs, labels = batch()

    # step 0: the wrapped model computes the backbone's function
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits,
                                   rtol=0, atol=1e-6)

    # only adapters, controllers and the head train
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    backbone_trainable = [before[id(p)] for p in trainable.values() if id(p) in before]
    if method_name == "full_ft":
        assert len(backbone_trainable) == len(before)
    else:
        assert all(is_head_parameter(n) for n in backbone_trainable), backbone_trainable
        assert any(id(p) not in before and not is_head_parameter(n) for n, p in trainable.items())

    # one training step: named, finite regularisers; gradients reach the adapter
    model.train()
    calibration = method.calibrate(model, [(inputs, labels)], task_loss)
    assert isinstance(calibration, dict)
    method.prepare_training(model, total_steps=10)
    loss = task_loss(model, (inputs, labels))
    regs = method.regularization_losses(model)
    assert all(isinstance(k, str) and k for k in regs)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in regs.values()), regs
    (loss + sum(regs.values())).backward()
    grads = {n: p.grad for n, p in trainable.items()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert any(g is not None and g.abs().sum() > 0 and not is_head_parameter(n) for n, g in grads.items())

    # state round trip: a fresh wrap of the same backbone + the saved state = the same model
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.01 * torch.randn_like(p))
    draw_gate_parameters(model, seed=1, std=1.5)  # some gates open, some shut
    saved, method_state = trainable_state(model), method.state_dict()
    fresh_method, fresh = build(method_name, alias, copy.deepcopy(reference))
    load_trainable_state(fresh, saved)
    fresh_method.load_state_dict(method_state)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)

    # FLOPs: what the method counts is what the flop counter sees beyond the frozen backbone
    # (unpadded rows: an unmerged LoRA layer also multiplies padding, which costs count out)
    with torch.no_grad():
        padded = method.forward_cost(model, lambda: model(**inputs), inputs["attention_mask"])
    assert padded.valid_tokens == inputs["attention_mask"].sum(dim=1).tolist()
    for size in (2, 5):  # every shape: per-forward work shows as a change with the batch size
        check_flops_against_the_counter(method_name, alias, method, model, reference, size)


def check_flops_against_the_counter(method_name, alias, method, model, reference, size):
    """What the method counts, per token, per sequence and per forward, is what the flop
    counter sees beyond the frozen backbone on one batch of ``size`` (unpadded rows: an
    unmerged LoRA layer also multiplies padding, which costs count out)."""
    inputs, _ = batch(seed=size, size=size)
    inputs = dict(inputs) | {"attention_mask": torch.ones_like(inputs["input_ids"])}
    counted = {}
    with torch.no_grad():
        cost = method.forward_cost(
            model, lambda: counted.update(n=measured_flops(model, lambda: model(**inputs))),
            inputs["attention_mask"])
        base = measured_flops(reference, lambda: reference(**inputs))
    extra = sum(cost.adapter_flops) + sum(cost.controller_flops) + cost.per_forward_flops
    assert counted["n"] - base == extra, (size, cost.summary())
    assert cost.flops_per_example_at(size) * size == pytest.approx(extra)
    split = cost.shape_split()
    assert sum(split.values()) * size == pytest.approx(extra)
    if cost.sequence_flops:  # the per-sequence shape alone, against the counter's per-module count
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(**inputs)
        per_module = counter.get_flop_counts()
        controllers = sum(sum(ops.values()) for name, ops in per_module.items()
                          if name.endswith(".gate_source"))
        # (on DeBERTa the controllers also gate the batch-shared position rows, per forward)
        assert sum(cost.sequence_flops) + cost.position_controller_flops == controllers > 0
    if method_name == "full_ft":
        assert extra == 0 and cost.source == "none"
    else:
        assert cost.adapter_flops_per_example > 0
        assert alias != "tiny-deberta" or cost.position_adapter_flops > 0
        assert "per_token" in cost.sources or cost.source != "analytic", cost.sources
    for value in (cost.adapter_flops_per_example, cost.controller_flops_per_example):
        assert math.isfinite(value)


def test_a_method_that_does_not_count_its_cost_fails_loudly(tiny_bert):
    """No silent zero: a method without forward_cost raises rather than report full FT's 0."""
    from rankwise.methods.base import FineTuningMethod

    class Uncounted(FineTuningMethod):
        name = "uncounted"

        def wrap(self, backbone, target_modules):
            return backbone

    model, _ = tiny_bert
    with pytest.raises(NotImplementedError, match="uncounted.*forward_cost"):
        Uncounted(None, None).forward_cost(model, lambda: None, torch.ones(1, 3))


@pytest.mark.parametrize("method_name", [TOY], indirect=True)
def test_a_registered_method_is_a_valid_adapter_type_everywhere(method_name):
    """The config's "choose from" list and the bench's adapter list come from the registry."""
    from rankwise.bench.inference import InferenceBenchOptions
    from rankwise.errors import ConfigError
    from rankwise.methods import adapter_types

    assert TOY in adapter_types()
    InferenceBenchOptions(adapters=[TOY]).validate("bench")
    with pytest.raises(ConfigError, match=f"choose from .*{TOY}"):
        parse_run_config({"run_id": "t", "method": "baseline",
                          "model": {"name": "tiny-bert", "adapter": {"type": "nope"}}})


@MATRIX
@pytest.mark.parametrize("alias", BACKBONES)
def test_trial_mode_runs_end_to_end(method_name, alias, tmp_path, fake_glue):
    """``mode=trial`` through ``rankwise.main`` for every method: the caps resolved at load
    (one seed, one epoch of two batches, no checkpoints, a short measurement) and a complete
    run folder with the method's cost."""
    import json

    import yaml

    from rankwise.main import main

    run = {"run_id": f"trial-{method_name}", "method": "baseline",
           "model": {"name": alias, **row(method_name)},
           "dataset": {"name": "glue", "subset": "sst2", "max_seq_length": 32,
                       "data_dir": str(fake_glue)},
           "training": {"epochs": 3, "batch_size": 8, "seeds": [5, 6],
                        "save_strategy": "steps", "save_every_n_steps": 1,
                        # the figures are test_measure's; here they would only cost time
                        "inference_measurement": {"figures": False}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    assert main([f"run={path}", f"results_dir={tmp_path / 'results'}", "mode=trial"]) == 0
    run_dir = tmp_path / "results" / run["run_id"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["mode"] == "trial"
    assert metrics["seeds"] == [5]  # the first seed only
    assert metrics["config"]["training"]["epochs"] == 3  # the config as written is recorded
    steps = [h["step"] for h in metrics["history"]]
    assert steps == [2]  # one epoch of two batches, evaluated at its end
    assert not (run_dir / "seed5" / "checkpoints").exists()  # trial mode saves nothing
    final = metrics["final"]
    assert 0 <= final["validation_accuracy"] <= 1
    if method_name == "full_ft":
        assert final["adapter_mflops_per_example"] == 0
    else:
        assert final["adapter_mflops_per_example"] > 0
    report = json.loads((run_dir / "seed5" / "inference.json").read_text())
    assert [s["length"] for s in report["shapes"]] == [16]  # the shortest default length
    assert report["latency"]["n_timed"] == 10 and report["repeats"] == 3
