"""AdaLoRA through peft (methods.md#adalora): each silent pitfall has a test — total_step from the
real step count, the tinit/tfinal schedule, update_and_allocate every step (the budget follows
the cubic schedule computed here independently), the orthogonal regulariser equal to peft's
in-forward value, the written rank pattern, and exact resume of the RankAllocator state."""

import json

import pytest
import torch
import torch.nn.functional as F

from rankwise.config.schema import parse_run_config
from rankwise.errors import ConfigError
from rankwise.methods import build_method
from rankwise.methods.adalora import AdaLoRA
from rankwise.methods.targets import resolve_target_modules
from rankwise.models import load_backbone

SENTENCES = [
    ("the movie was good", "it is a good movie"),
    ("bad", "the movie is not good and it was bad"),
    ("a movie of the", "it"),
    ("good good good", "not bad"),
    ("the bad movie", "was it good"),
    ("it is not a movie", "the movie"),
]

SMALL = {"init_r": 4, "target_r": 2, "deltaT": 1, "orth_reg_weight": 0.3}


def make_batches(tokenizer, batch_size, n_batches):
    batches = []
    for b in range(n_batches):
        pairs = [SENTENCES[(b * batch_size + i) % len(SENTENCES)] for i in range(batch_size)]
        enc = dict(tokenizer([p[0] for p in pairs], [p[1] for p in pairs], padding=True,
                             return_tensors="pt"))
        enc["labels"] = torch.tensor([(b + i) % 2 for i in range(batch_size)])
        batches.append(enc)
    return batches


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def run_config(**adapter):
    return parse_run_config({
        "run_id": "adalora-test",
        "method": "baseline",
        "model": {"name": "tiny-bert", "adapter": {"type": "adalora", **adapter}},
    })


def make_adalora(backbone, **adapter):
    method = build_method(run_config(**adapter))
    targets = resolve_target_modules(backbone)
    torch.manual_seed(1)
    return method, method.wrap(backbone, targets), targets


def train(method, model, batches, total_steps, start=0, optimizer=None, record=None):
    """The loop contract: task loss + regularisers, step, on_optimizer_step, zero_grad."""
    optimizer = optimizer or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for step in range(start, total_steps):
        batch = batches[step % len(batches)]
        loss = F.cross_entropy(model(**model_inputs(batch)).logits, batch["labels"])
        (loss + sum(method.regularization_losses(model).values())).backward()
        optimizer.step()
        method.on_optimizer_step(model, step)
        optimizer.zero_grad()
        if record is not None:
            record.append(method.rank_pattern(model))
    return optimizer


def singular_values(model, target):
    return model.get_submodule("base_model.model." + target).lora_E["default"].detach().view(-1)


def test_config_defaults_and_validation():
    cfg = run_config().model.adapter
    assert (cfg.target_r, cfg.init_r, cfg.beta1, cfg.beta2) == (8, 12, 0.85, 0.85)
    assert run_config().algorithm == "adalora"
    assert run_config(tinit=100, tfinal=50).model.adapter.tinit == 100  # integers are steps
    for bad, key in [({"tinit": -1}, "tinit"), ({"tfinal": 0}, "tfinal"),
                     ({"tinit": 0.6, "tfinal": 0.5}, "tinit"), ({"init_r": 4, "target_r": 6}, "init_r"),
                     ({"beta1": 1.0}, "beta1"), ({"orth_reg_weight": -0.1}, "orth_reg_weight"),
                     ({"rank": 8}, "rank")]:
        with pytest.raises(ConfigError) as err:
            run_config(**bad)
        assert err.value.key == f"model.adapter.{key}"


def test_prepare_training_sets_total_step_and_resolves_fractions(tiny_bert):
    backbone, _ = tiny_bert
    method, model, _ = make_adalora(backbone, tinit=0.1, tfinal=0.25)
    with pytest.raises(RuntimeError, match="prepare_training"):
        method.on_optimizer_step(model, 0)
    method.prepare_training(model, total_steps=200)
    live = model.peft_config["default"]
    assert live is model.base_model.rankallocator.peft_config  # what the allocator reads
    assert (live.total_step, live.tinit, live.tfinal) == (200, 20, 50)


def test_schedule_without_budgeting_phase_is_a_config_error_naming_tinit(tiny_bert):
    backbone, _ = tiny_bert
    method, model, _ = make_adalora(backbone, tinit=20, tfinal=10)
    with pytest.raises(ConfigError) as err:
        method.prepare_training(model, total_steps=30)
    assert err.value.key == "model.adapter.tinit"
    assert "total_step" in err.value.message
    method.prepare_training(model, total_steps=31)  # 20 < 31 - 10


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_deberta"])
def test_step_zero_output_equals_backbone(fixture, request):
    backbone, tok = request.getfixturevalue(fixture)
    inputs = model_inputs(make_batches(tok, 3, 1)[0])
    backbone.eval()
    with torch.no_grad():
        reference = backbone(**inputs).logits.clone()
    _, model, _ = make_adalora(backbone)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


def test_rank_budget_follows_cubic_schedule_and_final_pattern_is_written(tiny_bert, tmp_path):
    backbone, tok = tiny_bert
    total, tinit, tfinal = 30, 5, 10
    method, model, targets = make_adalora(backbone, tinit=tinit, tfinal=tfinal, **SMALL)
    method.prepare_training(model, total)
    patterns = []
    train(method, model, make_batches(tok, 3, 4), total, record=patterns)

    init_budget, target_budget = 4 * len(targets), 2 * len(targets)
    kept = [sum(sum(flags) for flags in p.values()) for p in patterns]
    for step, n_kept in enumerate(kept):
        if step <= tinit:  # warm-up: nothing masked yet
            expected = init_budget
        elif step < total - tfinal:  # reference: AdaLoRA's cubic budget schedule
            progress = (step - tinit) / (total - tfinal - tinit)
            expected = int((init_budget - target_budget) * (1 - progress) ** 3 + target_budget)
        else:
            expected = target_budget
        assert n_kept == expected, step
    assert kept[tinit + 1] < init_budget and kept[total - tfinal] == target_budget
    final = patterns[-1]
    assert final == patterns[total - tfinal]  # held fixed in the final phase
    for t in targets:  # masked triplets have E_i = 0 in the model itself
        e = singular_values(model, t)
        assert all(e[i] == 0 for i, keep in enumerate(final[t]) if not keep)
        assert int((e != 0).sum()) == sum(final[t])

    summary = method.write_artifacts(model, tmp_path)
    report = json.loads((tmp_path / "rank_pattern.json").read_text())
    ranks = {m["name"]: m["rank"] for m in report["matrices"]}
    assert list(ranks) == targets
    assert ranks == {t: sum(final[t]) for t in targets}
    assert report["allocated"] and report["total_step"] == total
    assert summary["adalora_rank_total"] == target_budget == summary["adalora_rank_budget"]
    assert summary["adalora_rank_min"] == min(ranks.values())
    assert summary["adalora_rank_max"] == max(ranks.values())
    assert summary["adalora_rank_mean"] == pytest.approx(target_budget / len(targets))
    assert summary["adalora_compute_rank"] == 4
    assert (tmp_path / "rank_pattern_heatmap.png").stat().st_size > 1000


def test_orth_reg_equals_peft_in_forward_value(tiny_bert):
    backbone, tok = tiny_bert
    method, model, _ = make_adalora(backbone, **SMALL)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    batch = make_batches(tok, 4, 1)[0]
    model.eval()
    with torch.no_grad():
        peft_loss = model(**model_inputs(batch), labels=batch["labels"]).loss  # CE + peft's term
        ce = F.cross_entropy(model(**model_inputs(batch)).logits, batch["labels"])
    reg = method.regularization_losses(model)
    assert set(reg) == {"orth_reg"}
    assert float(peft_loss - ce) > 0.1
    assert float(reg["orth_reg"].detach()) == pytest.approx(float(peft_loss - ce), rel=1e-5)
    assert reg["orth_reg"].requires_grad

    off = build_method(run_config(**{**SMALL, "orth_reg_weight": 0.0}))
    assert float(off.regularization_losses(model)["orth_reg"]) == 0.0


def test_allocator_state_gives_exact_resume(tiny_bert):
    _, tok = tiny_bert
    batches = make_batches(tok, 3, 4)
    cfg = {**SMALL, "dropout": 0.0, "tinit": 2, "tfinal": 4}
    total, cut, end = 16, 6, 12  # end < total - tfinal: the EMAs are still live (not reset)

    def fresh():
        torch.manual_seed(0)
        bb, _ = load_backbone("tiny-bert", num_labels=2)
        method, model, _ = make_adalora(bb, **cfg)
        method.prepare_training(model, total)
        return method, model

    m_full, full = fresh()
    train(m_full, full, batches, end)

    m_first, first = fresh()
    opt_first = train(m_first, first, batches, cut)
    snapshot = {"model": {k: v.clone() for k, v in first.state_dict().items()},
                "optimizer": opt_first.state_dict(), "method": m_first.state_dict()}

    def resumed(with_method_state):
        method, model = fresh()
        model.load_state_dict(snapshot["model"])
        if with_method_state:
            method.load_state_dict(snapshot["method"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        optimizer.load_state_dict(snapshot["optimizer"])
        train(method, model, batches, end, start=cut, optimizer=optimizer)
        return method, model

    m_res, res = resumed(True)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), res.state_dict().values()))
    a_full, a_res = full.base_model.rankallocator, res.base_model.rankallocator
    for key in ("exp_avg_ipt", "exp_avg_unc"):
        full_state, res_state = getattr(a_full, key), getattr(a_res, key)
        assert full_state.keys() == res_state.keys()
        assert all(torch.equal(full_state[n], res_state[n]) for n in full_state)
    assert m_res.rank_pattern(res) == m_full.rank_pattern(full)

    # Control: without the allocator state the EMAs restart from zero and differ.
    _, blind = resumed(False)
    blind_ema = blind.base_model.rankallocator.exp_avg_ipt
    assert not all(torch.equal(a_full.exp_avg_ipt[n], blind_ema[n]) for n in blind_ema)


def test_build_method_returns_adalora():
    assert isinstance(build_method(run_config()), AdaLoRA)
