"""The spectral family as methods on tiny BERT / DeBERTa: step-0 identity, SVD cache, config
validation, penalties, evaluation statistics, artefacts and a short TABS training run."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy.special import expit

from rankwise.config.schema import parse_run_config
from rankwise.errors import ConfigError
from rankwise.methods import build_method, get_method
from rankwise.methods.spectral import (
    BHSPConfig,
    CBSPConfig,
    SpectralAdapterConfig,
    SpectralFamily,
    TABSConfig,
    spectral_layers,
)
from rankwise.methods.spectral import svd_cache
from rankwise.methods.spectral.flops import measured_matmul_flops
from rankwise.methods.spectral.gates import BETA, GAMMA, ZETA
from rankwise.methods.targets import resolve_target_modules

CONFIGS = {
    "spectral": SpectralAdapterConfig(R=4),
    "bhsp": BHSPConfig(R=4, budget=2.0),
    "cbsp": CBSPConfig(R=4, budget=2.0),
    "tabs": TABSConfig(R=4, budget=2.0),
}
SENTENCES = ["the movie is good", "a bad movie, not good", "it was"]


def wrap(kind: str, backbone, config=None):
    entry = get_method(kind)
    method = entry.method_cls(config or CONFIGS[kind], None)
    model = method.wrap(backbone, resolve_target_modules(backbone))
    return method, model


def encode(tokenizer, sentences=SENTENCES):
    return dict(tokenizer(sentences, padding=True, return_tensors="pt"))


def randomise_gate_sources(model, std=2.0):
    with torch.no_grad():
        for layer in spectral_layers(model).values():
            if layer.gate_source is not None:
                for p in layer.gate_source.parameters():
                    p.normal_(0, std)


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_deberta"])
def test_step_zero_model_equals_backbone_for_any_gates(kind, backbone, request):
    model, tokenizer = request.getfixturevalue(backbone)
    reference = copy.deepcopy(model).eval()
    _, wrapped = wrap(kind, model)
    randomise_gate_sources(wrapped)  # whatever the gates, P_U = P_V = 0 leaves W unchanged
    batch = encode(tokenizer)
    assert batch["attention_mask"].min() == 0  # padding present
    with torch.no_grad():
        expected = reference(**batch).logits
        for training in (True, False):
            assert torch.equal(wrapped.train(training)(**batch).logits, expected)


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_deberta"])
def test_ungated_model_equals_backbone_with_explicitly_merged_weights(backbone, request):
    model, tokenizer = request.getfixturevalue(backbone)
    reference = copy.deepcopy(model).eval()
    _, wrapped = wrap("spectral", model, SpectralAdapterConfig(R=4, scale=0.5))
    modules = dict(reference.named_modules())
    torch.manual_seed(1)
    with torch.no_grad():
        for name, layer in spectral_layers(wrapped).items():
            layer.P_U.normal_(0, 0.3)
            layer.P_V.normal_(0, 0.3)
            U, s, V = layer.U.double(), layer.s.double(), layer.V.double()
            P_U, P_V = layer.P_U.double(), layer.P_V.double()
            delta = sum(
                s[i] * torch.outer(U[:, i] + P_U[:, i], V[:, i] + P_V[:, i])
                - s[i] * torch.outer(U[:, i], V[:, i])
                for i in range(layer.rank)
            )
            modules[name].weight += (0.5 * delta).float()
    batch = encode(tokenizer)
    with torch.no_grad():
        # DeBERTa's relative-position projections use the merged weight too (g ≡ 1 everywhere)
        torch.testing.assert_close(wrapped.eval()(**batch).logits, reference(**batch).logits,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("eval_gates", ["sign", "louizos"])
@pytest.mark.parametrize("kind", ["bhsp", "cbsp", "tabs"])
def test_sparse_and_dense_inference_paths_give_the_same_model(kind, eval_gates, tiny_deberta):
    model, tokenizer = tiny_deberta
    outputs = []
    for path in ("sparse", "dense"):
        config = dataclasses.replace(CONFIGS[kind], inference_path=path, eval_gates=eval_gates)
        method, wrapped = wrap(kind, copy.deepcopy(model), config)
        torch.manual_seed(3)
        randomise_gate_sources(wrapped)
        with torch.no_grad():
            for layer in spectral_layers(wrapped).values():
                layer.P_U.normal_(0, 0.2)
                layer.P_V.normal_(0, 0.2)
            assert all(layer.eval().uses_sparse_path() == (path == "sparse")
                       for layer in spectral_layers(wrapped).values())
            outputs.append(wrapped.eval()(**encode(tokenizer)).logits)
    assert not torch.equal(outputs[0], model.eval()(**encode(tokenizer)).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_only_adapter_gates_and_head_are_trainable(kind, tiny_bert):
    model, _ = tiny_bert
    n_targets = len(resolve_target_modules(model))
    method, wrapped = wrap(kind, model)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    for name in trainable:
        assert (".P_U" in name or ".P_V" in name or ".gate_source." in name
                or name.startswith(("classifier.", "bert.pooler."))), name
    head = [n for n in trainable if n.startswith(("classifier.", "bert.pooler."))]
    assert len(head) == 4
    layers = spectral_layers(wrapped)
    assert len(layers) == n_targets == 12
    expected = sum((layer.d_in + layer.d_out) * 4 for layer in layers.values())
    if kind == "bhsp":
        expected += 4 * n_targets
    elif kind in ("cbsp", "tabs"):  # h = R = 4: W1 (4 × d_in) + W2 (4 × 4)
        expected += sum(4 * layer.d_in + 16 for layer in layers.values())
    adapter = sum(p.numel() for n, p in wrapped.named_parameters()
                  if p.requires_grad and n not in head)
    assert adapter == expected
    assert method.adapter_params(wrapped) == [p for p in wrapped.parameters() if p.requires_grad]


def test_svd_factors_are_the_top_r_triplets_and_cached(tiny_bert, monkeypatch, tmp_path):
    monkeypatch.setenv("RANKWISE_CACHE_DIR", str(tmp_path))
    model, _ = tiny_bert
    spare, other = copy.deepcopy(model), copy.deepcopy(model)
    method, wrapped = wrap("tabs", model)
    assert method.svd_info["cache_hit"] is False
    name, layer = next(iter(spectral_layers(wrapped).items()))
    W = layer.base_layer.weight.detach().double().numpy()
    u, s, vt = np.linalg.svd(W)
    np.testing.assert_allclose(layer.s.numpy(), s[:4], rtol=1e-5)
    top4 = (u[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose((layer.U * layer.s) @ layer.V.T, top4, atol=1e-5)

    def no_svd(*args, **kwargs):
        raise AssertionError("SVD recomputed although the cache holds it")

    monkeypatch.setattr(svd_cache, "top_r_svd", no_svd)
    method2, wrapped2 = wrap("tabs", spare)
    assert method2.svd_info["cache_hit"] is True
    assert method2.svd_info["file"] == method.svd_info["file"]
    assert torch.equal(spectral_layers(wrapped2)[name].U, layer.U)

    # same architecture and name, one weight changed -> a different cache entry
    with torch.no_grad():
        dict(other.named_modules())[name].weight.add_(1e-3)
    with pytest.raises(AssertionError, match="SVD recomputed"):
        wrap("tabs", other)


@pytest.mark.parametrize("width", ["R", "d_in/4", 5])
def test_controller_width_options(width, tiny_bert):
    model, _ = tiny_bert
    _, wrapped = wrap("tabs", model, TABSConfig(R=4, budget=1.0, controller_hidden=width))
    for layer in spectral_layers(wrapped).values():  # d_in is 32 or 64 in the tiny model
        hidden = {"R": 4, "d_in/4": layer.d_in // 4, 5: 5}[width]
        assert layer.gate_source.mlp.w1.weight.shape == (hidden, layer.d_in)
        assert layer.gate_source.mlp.w2.weight.shape == (4, hidden)


@pytest.mark.parametrize(("kind", "config"), [
    ("cbsp", CBSPConfig(R=4, budget=2.0)),
    ("tabs", TABSConfig(R=4, budget=2.0, gate_granularity="sequence")),
])
@pytest.mark.parametrize("training", [True, False])
def test_sequence_gates_are_shared_across_tokens_in_the_model(kind, config, training, tiny_bert):
    model, tokenizer = tiny_bert
    _, wrapped = wrap(kind, model, config)
    randomise_gate_sources(wrapped)
    decisions = []
    for layer in spectral_layers(wrapped).values():
        original = layer.compute_gates

        def recording(x, valid, original=original):
            decisions.append(original(x, valid))
            return decisions[-1]

        layer.compute_gates = recording
    batch = encode(tokenizer)
    with torch.no_grad():
        wrapped.train(training)(**batch)
    mask = batch["attention_mask"].bool()
    assert len(decisions) == 12
    for decision in decisions:
        for b in range(mask.shape[0]):
            real = decision.gates[b, mask[b]]  # (T_valid, R)
            assert torch.equal(real, real[:1].expand_as(real))
            assert (decision.gates[b, ~mask[b]] == 0).all()
    assert any(decision.gates.sum() > 0 for decision in decisions)


def test_bfloat16_autocast_matches_float32(tiny_deberta):
    model, tokenizer = tiny_deberta
    _, wrapped = wrap("tabs", model, TABSConfig(R=4, budget=1.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in spectral_layers(wrapped).values():
            layer.P_U.normal_(0, 0.2)
            layer.P_V.normal_(0, 0.2)
    batch = encode(tokenizer)
    with torch.no_grad():
        reference = wrapped.eval()(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = wrapped(**batch).logits
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=2e-2, rtol=2e-2)


def run_config(adapter: dict) -> dict:
    return {"run_id": "t", "method": "proposed", "model": {"name": "tiny-bert", "adapter": adapter}}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_default_configs_parse_and_build(kind):
    cfg = parse_run_config(run_config({"type": kind}))
    method = build_method(cfg)
    assert isinstance(method, SpectralFamily) and method.name == kind
    assert cfg.algorithm == kind


@pytest.mark.parametrize(
    ("adapter", "key"),
    [
        ({"type": "tabs", "R": 0}, "model.adapter.R"),
        ({"type": "spectral", "R": -2}, "model.adapter.R"),
        ({"type": "tabs", "R": 8, "budget": 9}, "model.adapter.budget"),
        ({"type": "cbsp", "budget": -1}, "model.adapter.budget"),
        ({"type": "bhsp", "R": 4, "budget": 5}, "model.adapter.budget"),
        ({"type": "tabs", "budget_tokens": 0}, "model.adapter.budget_tokens"),
        ({"type": "tabs", "penalty_weight": -0.1}, "model.adapter.penalty_weight"),
        ({"type": "bhsp", "penalty_weight": -1}, "model.adapter.penalty_weight"),
        ({"type": "tabs", "controller_hidden": 0}, "model.adapter.controller_hidden"),
        ({"type": "cbsp", "controller_hidden": "d_in/2"}, "model.adapter.controller_hidden"),
        ({"type": "tabs", "gate_granularity": "word"}, "model.adapter.gate_granularity"),
        ({"type": "cbsp", "controller_input": "frozen"}, "model.adapter.controller_input"),
        ({"type": "tabs", "eval_gates": "median"}, "model.adapter.eval_gates"),
        ({"type": "tabs", "projection": "maybe"}, "model.adapter.projection"),
        ({"type": "tabs", "scale": 0}, "model.adapter.scale"),
        ({"type": "tabs", "lambda": 0.1}, "model.adapter.lambda"),
    ],
)
def test_config_errors_name_the_dotted_key(adapter, key):
    with pytest.raises(ConfigError) as info:
        parse_run_config(run_config(adapter))
    assert info.value.key == key


def test_rank_above_the_smallest_target_is_a_config_error(tiny_bert):
    model, _ = tiny_bert  # hidden 32
    with pytest.raises(ConfigError) as info:
        wrap("tabs", model, TABSConfig(R=33, budget=1.0))
    assert info.value.key == "model.adapter.R"


def capture_gate_logits(model) -> dict[str, list[torch.Tensor]]:
    captured: dict[str, list[torch.Tensor]] = {}
    for name, layer in spectral_layers(model).items():
        layer.gate_source.register_forward_hook(
            lambda module, args, out, name=name: captured.setdefault(name, []).append(out.detach()))
    return captured


def reference_prob_open(logits: np.ndarray) -> np.ndarray:
    return expit(logits - BETA * math.log(-GAMMA / ZETA))


@pytest.mark.parametrize(("kind", "units"), [("tabs", "pairs"), ("tabs", "per_token"),
                                             ("cbsp", "pairs"), ("cbsp", "per_token")])
def test_sequence_budget_penalty_matches_independent_computation(kind, units, tiny_bert):
    model, tokenizer = tiny_bert
    config_cls = TABSConfig if kind == "tabs" else CBSPConfig
    config = config_cls(R=4, budget=0.5, penalty_weight=0.3, penalty_units=units)
    method, wrapped = wrap(kind, model, config)
    randomise_gate_sources(wrapped, std=1.0)
    captured = capture_gate_logits(wrapped)
    batch = encode(tokenizer)
    wrapped.train()(**batch)
    penalty = method.regularization_losses(wrapped)["budget_penalty"]

    mask = batch["attention_mask"].numpy().astype(bool)
    t_valid = mask.sum(1)
    b_max = np.floor(0.5 * t_valid)
    total = 0.0
    for name, (logits,) in captured.items():
        p = reference_prob_open(logits.double().numpy())  # (B, T, R) or (B, 1, R)
        if kind == "tabs":
            expected_open = (p * mask[:, :, None]).sum(axis=(1, 2))
        else:
            expected_open = p[:, 0].sum(-1) * t_valid
        excess = np.maximum(0.0, expected_open - b_max)
        if units == "per_token":
            excess = excess / t_valid
        total += np.mean(excess**2)
    assert total > 0
    np.testing.assert_allclose(penalty.item(), 0.3 * total, rtol=1e-5)
    # consumed: a second call without a new forward adds nothing
    assert method.regularization_losses(wrapped)["budget_penalty"].item() == 0.0
    penalty.backward()  # and it is differentiable into the controllers
    layers = spectral_layers(wrapped).values()
    assert any(layer.gate_source.mlp.w2.weight.grad is not None for layer in layers)


@pytest.mark.parametrize("kind", ["tabs", "cbsp"])
def test_learned_multipliers_hold_each_targets_budget_against_an_independent_computation(kind, tiny_bert):
    """``budget_control: target``: one multiplier pair per target. The term is the mean over
    targets of μ_k·c_k + ν_k·c_k², c_k = mean over sequences of (expected open pairs −
    target_use·B_max) / T_valid, recomputed from the controllers' logits; one ascent step moves
    each target's pair by its own c_k (η·c_k, η·c_k²), and the inequality ``lagrangian`` clips
    each μ_k at 0 on its own."""
    model, tokenizer = tiny_bert
    config_cls = TABSConfig if kind == "tabs" else CBSPConfig
    batch = encode(tokenizer)
    mask = batch["attention_mask"].numpy().astype(bool)
    t_valid = mask.sum(1)
    b_max = np.floor(0.5 * t_valid)
    for control in ("target", "lagrangian"):
        config = config_cls(R=4, budget=0.5, budget_control=control, multiplier_lr=0.1, target_use=0.8)
        method, wrapped = wrap(kind, copy.deepcopy(model), config)
        randomise_gate_sources(wrapped, std=1.0)
        captured = capture_gate_logits(wrapped)
        share = 0.8 if control == "target" else 1.0
        names = list(spectral_layers(wrapped))
        mu = {k: 0.5 * k - 1.0 for k in range(len(names))}  # of both signs, one per target
        nu = {k: 0.1 * k for k in range(len(names))}
        method.multipliers.linear, method.multipliers.quadratic = dict(mu), dict(nu)
        wrapped.train()(**batch)
        term = method.regularization_losses(wrapped)[f"budget_{control}"]
        gaps = {}
        for k, name in enumerate(names):
            p = reference_prob_open(captured[name][0].double().numpy())
            expected_open = (p * mask[:, :, None]).sum(axis=(1, 2)) if kind == "tabs" else p[:, 0].sum(-1) * t_valid
            gaps[k] = float(np.mean((expected_open - share * b_max) / t_valid))
        quadratic = control == "target"
        reference = np.mean([mu[k] * c + (nu[k] * c * c if quadratic else 0.0) for k, c in gaps.items()])
        np.testing.assert_allclose(term.item(), reference, rtol=1e-5)
        method.on_optimizer_step(wrapped, 0)
        for k, c in gaps.items():
            moved = mu[k] + 0.1 * c
            assert method.multipliers.linear[k] == pytest.approx(moved if quadratic else max(0.0, moved), rel=1e-5)
            if quadratic:
                assert method.multipliers.quadratic[k] == pytest.approx(nu[k] + 0.1 * c * c, rel=1e-5)
        assert len({round(c, 6) for c in gaps.values()}) > 1  # the targets' uses differ


@pytest.mark.parametrize("kind", ["tabs", "cbsp"])
def test_controller_input_mode_decides_where_the_penalty_gradient_goes(kind, tiny_bert):
    """Detached (default): the penalty trains the controllers only. Attached: it also reaches
    the adapters of earlier layers through later controllers' inputs. Same penalty value."""
    config_cls = TABSConfig if kind == "tabs" else CBSPConfig
    penalties, adapter_grads = {}, {}
    for mode in ("detached", "attached"):
        model, tokenizer = copy.deepcopy(tiny_bert)
        config = config_cls(R=4, budget=0.5, penalty_weight=0.3, controller_input=mode)
        torch.manual_seed(0)
        method, wrapped = wrap(kind, model, config)
        randomise_gate_sources(wrapped, std=1.0)
        wrapped.train()(**encode(tokenizer))
        penalty = method.regularization_losses(wrapped)["budget_penalty"]
        penalty.backward()
        layers = list(spectral_layers(wrapped).values())
        assert all(layer.gate_source.mlp.w1.weight.grad is not None for layer in layers)
        penalties[mode] = penalty.item()
        adapter_grads[mode] = sum(
            float(p.grad.abs().sum()) for layer in layers for p in (layer.P_U, layer.P_V)
            if p.grad is not None)
    assert penalties["detached"] > 0
    assert penalties["detached"] == pytest.approx(penalties["attached"], rel=1e-6)
    assert adapter_grads["detached"] == 0.0
    assert adapter_grads["attached"] > 0.0


@pytest.mark.parametrize("units", ["gates", "per_target"])
def test_static_budget_penalty_matches_independent_computation(units, tiny_bert):
    model, _ = tiny_bert
    config = BHSPConfig(R=4, budget=1.5, penalty_weight=0.2, penalty_units=units)
    method, wrapped = wrap("bhsp", model, config)
    randomise_gate_sources(wrapped, std=1.5)
    log_alpha = np.stack([layer.gate_source.log_alpha.detach().double().numpy()
                          for layer in spectral_layers(wrapped).values()])
    excess = max(0.0, reference_prob_open(log_alpha).sum() - 1.5 * log_alpha.shape[0])
    if units == "per_target":
        excess /= log_alpha.shape[0]
    assert excess > 0
    penalty = method.regularization_losses(wrapped)["budget_penalty"]
    np.testing.assert_allclose(penalty.item(), 0.2 * excess**2, rtol=1e-5)


def test_ungated_adapter_has_no_regulariser(tiny_bert):
    model, tokenizer = tiny_bert
    method, wrapped = wrap("spectral", model)
    wrapped.train()(**encode(tokenizer))
    assert method.regularization_losses(wrapped) == {}


def test_evaluation_flops_match_flop_counter_on_the_whole_model(tiny_bert):
    model, tokenizer = tiny_bert
    reference = copy.deepcopy(model).eval()
    method, wrapped = wrap("tabs", model, TABSConfig(R=4, budget=1.0))
    randomise_gate_sources(wrapped, std=1.0)
    with torch.no_grad():
        for layer in spectral_layers(wrapped).values():
            layer.P_U.normal_(0, 0.1)
    batch = encode(tokenizer, ["the movie is good and it was not bad"])  # one example, no padding
    wrapped.eval()
    method.begin_evaluation(wrapped)
    adapted = measured_matmul_flops(wrapped, **batch)
    stats = method.end_evaluation(wrapped)
    frozen = measured_matmul_flops(reference, **batch)
    assert stats["spectral_examples"] == 1
    assert stats["spectral_budget_violations"] == 0
    adapter = stats["spectral_adapter_flops_per_example"]
    reported = adapter + stats["spectral_controller_flops_per_example"]
    assert adapted - frozen == reported
    assert 0 < adapter < stats["spectral_dense_adapter_flops_per_example"]


def test_evaluation_statistics_count_real_tokens_only(tiny_bert):
    model, tokenizer = tiny_bert
    method, wrapped = wrap("tabs", model, TABSConfig(R=4, budget=1.0, eval_gates="sign"))
    randomise_gate_sources(wrapped)
    batch = encode(tokenizer)
    captured = capture_gate_logits(wrapped)
    wrapped.eval()
    method.begin_evaluation(wrapped)
    with torch.no_grad():
        wrapped(**batch)
        wrapped(**encode(tokenizer, ["good"]))
    stats = method.end_evaluation(wrapped)
    n_targets = len(spectral_layers(wrapped))
    real_tokens = int(batch["attention_mask"].sum()) + len(tokenizer("good")["input_ids"])
    hist = [stats[f"spectral_rank_hist_{j}"] for j in range(5)]
    assert sum(hist) == real_tokens * n_targets
    assert stats["spectral_examples"] == 4
    assert stats["spectral_open_gates_per_token"] == pytest.approx(
        sum(j * h for j, h in enumerate(hist)) / sum(hist))
    # budget 1·T_valid: each target's open pairs per sequence ≤ T_valid, hence mean ≤ 1
    assert stats["spectral_budget_violations"] == 0
    assert stats["spectral_open_gates_per_token"] <= 1.0
    # logits say how many gates wanted to open: more than the budget, so the projection acted
    mask = batch["attention_mask"].bool()
    wanted = sum(int(((logits[0] > 0) & mask[:, :, None]).sum()) for logits in captured.values())
    assert wanted > int(mask.sum()) * n_targets
    assert any(k.startswith("spectral_adapter_flops_len_1_16") for k in stats)


def evaluate_randomised(kind, model, config, tokenizer):
    """One evaluation pass of ``kind`` with random gate sources: its statistics, the gate
    sources' logits it produced and the batch."""
    method, wrapped = wrap(kind, model, config)
    randomise_gate_sources(wrapped)
    captured = capture_gate_logits(wrapped)
    batch = encode(tokenizer)
    method.begin_evaluation(wrapped)
    with torch.no_grad():
        wrapped.eval()(**batch)
    return method.end_evaluation(wrapped), captured, batch


def test_projection_off_can_violate_and_is_counted(tiny_bert):
    model, tokenizer = tiny_bert
    stats, captured, batch = evaluate_randomised(
        "tabs", model, TABSConfig(R=4, budget=0.25, projection=False, eval_gates="sign"), tokenizer)
    mask = batch["attention_mask"].bool()
    b_max = torch.floor(0.25 * mask.sum(1))
    expected = sum(int((((logits[0] > 0) & mask[:, :, None]).sum(dim=(1, 2)) > b_max).sum())
                   for logits in captured.values())
    assert expected > 0
    assert stats["spectral_budget_violations"] == expected


@pytest.mark.parametrize("shift", [-1.0, 1.0])
def test_bhsp_evaluation_reports_static_gates_and_the_global_budget(shift, tiny_bert, tmp_path):
    model, tokenizer = tiny_bert
    method, wrapped = wrap("bhsp", model, BHSPConfig(R=4, budget=2.0, eval_gates="sign"))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in spectral_layers(wrapped).values():
            layer.gate_source.log_alpha.copy_(torch.randn(4) + shift)
    log_alpha = torch.stack([layer.gate_source.log_alpha.detach()
                             for layer in spectral_layers(wrapped).values()])
    open_gates = int((log_alpha > 0).sum())
    batch = encode(tokenizer)
    method.begin_evaluation(wrapped)
    with torch.no_grad():
        wrapped.eval()(**batch)
    stats = method.end_evaluation(wrapped)
    assert stats["spectral_static_open_gates"] == open_gates
    assert stats["spectral_budget_violations"] == int(open_gates > 2.0 * 12)
    real_tokens = int(batch["attention_mask"].sum())
    assert stats["spectral_open_gates_per_token"] == pytest.approx(open_gates / 12)
    assert sum(stats[f"spectral_rank_hist_{j}"] for j in range(5)) == real_tokens * 12
    summary = method.write_artifacts(wrapped, tmp_path)
    assert summary["spectral_budget_violations"] == stats["spectral_budget_violations"]
    static = json.loads((tmp_path / "gates.json").read_text())["static_gates"]
    assert sum(sum(v["open_at_evaluation"]) for v in static.values()) == open_gates


def test_deberta_position_projections_are_not_counted_as_tokens(tiny_deberta):
    model, _ = tiny_deberta
    method, wrapped = wrap("tabs", model)
    span = 2 * model.config.position_buckets  # rel-embedding rows: same shape as this batch
    input_ids = torch.randint(5, 60, (1, span))
    method.begin_evaluation(wrapped)
    with torch.no_grad():
        wrapped.eval()(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    stats = method.end_evaluation(wrapped)
    n_targets = len(spectral_layers(wrapped))
    assert stats["spectral_examples"] == 1
    assert sum(stats[f"spectral_rank_hist_{j}"] for j in range(5)) == span * n_targets


@pytest.mark.parametrize("units", ["pairs", "per_token"])
def test_tabs_training_reduces_a_toy_loss_and_keeps_the_budget(units, tiny_bert, tmp_path):
    """Toy loss: move every real token's final hidden state by one fixed random vector. Only
    the adapters can do that (the head is not involved), so the loss falls only if gradients
    reach P_U / P_V through the kept gates."""
    model, tokenizer = tiny_bert
    torch.manual_seed(0)
    config = TABSConfig(R=4, budget=1.0, penalty_weight=0.05, penalty_units=units)
    method, wrapped = wrap("tabs", model, config)
    batch = encode(tokenizer, ["the movie is good", "a bad movie", "it was not good", "good"])
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        start = wrapped.eval()(**batch, output_hidden_states=True).hidden_states[-1]
    target = start + torch.randn(start.shape[-1])
    optimizer = torch.optim.AdamW(method.adapter_params(wrapped), lr=5e-2)
    task_losses, penalties = [], []
    wrapped.train()
    for step in range(20):
        hidden = wrapped(**batch, output_hidden_states=True).hidden_states[-1]
        loss = (hidden - target)[mask].pow(2).mean()
        regs = method.regularization_losses(wrapped)
        (loss + sum(regs.values())).backward()
        optimizer.step()
        method.on_optimizer_step(wrapped, step)
        optimizer.zero_grad()
        task_losses.append(loss.item())
        penalties.append(regs["budget_penalty"].item())
    total = np.add(task_losses, penalties)
    assert np.mean(total[-3:]) < 0.5 * np.mean(total[:3])
    if units == "per_token":
        assert np.mean(task_losses[-3:]) < 0.6 * task_losses[0]
    # With the penalty in pairs (methods.md as written) the excess is ~T_valid times larger: it
    # dominates and the toy task barely moves in 20 steps (reported, not asserted).

    method.begin_evaluation(wrapped)
    with torch.no_grad():
        wrapped.eval()(**batch)
    stats = method.end_evaluation(wrapped)
    assert stats["spectral_budget_violations"] == 0
    assert stats["spectral_examples"] == 4

    summary = method.write_artifacts(wrapped, tmp_path)
    gates = json.loads((tmp_path / "gates.json").read_text())
    per_length = json.loads((tmp_path / "flops_by_length.json").read_text())
    assert len(gates["last_evaluation"]["targets"]) == 12
    assert gates["last_evaluation"]["budget_violations"] == 0
    assert [e["valid_tokens"] for e in per_length["examples"]] == mask.sum(1).tolist()
    assert summary["spectral_budget_violations"] == 0
    key = "spectral_adapter_flops_per_example"
    assert summary[key] == stats[key]


def test_method_state_guards_resume_against_other_factors(tiny_bert):
    model, _ = tiny_bert
    method, _ = wrap("tabs", model)
    state = method.state_dict()
    method.load_state_dict(state)
    with pytest.raises(ValueError, match="R="):
        method.load_state_dict({**state, "R": 8})


def test_cbsp_budget_is_an_average_over_sequences(tiny_bert):
    """CBSP's budget holds on average (methods.md): a target violates it when its open pairs over
    the split exceed Σ floor(b·T_valid), whatever single sequences do. Recomputed from the
    controllers' logits under the sign rule."""
    model, tokenizer = tiny_bert
    per_sequence_only = 0
    for budget in (1.0, 2.0, 3.0):
        stats, captured, batch = evaluate_randomised(
            "cbsp", copy.deepcopy(model), CBSPConfig(R=4, budget=budget, eval_gates="sign"), tokenizer)
        valid = batch["attention_mask"].sum(1)  # (B,)
        b_max = torch.floor(budget * valid)
        over_average = over_each = 0
        for logits in captured.values():
            open_pairs = (logits[0] > 0).reshape(len(valid), -1).sum(1) * valid  # shared by tokens
            over_average += int(open_pairs.sum() > b_max.sum())
            over_each += int((open_pairs > b_max).any())
        assert stats["spectral_budget_violations"] == over_average
        per_sequence_only += over_each > over_average
    assert per_sequence_only  # some target broke single sequences' B_max but not the average
