"""IW-LoRA against independent computations: dense Δ, autograd ∂L/∂W, closed-form weights."""

import copy

import pytest
import torch
import torch.nn.functional as F

from rankwise.config.loader import load_job
from rankwise.methods.iw_lora import IWLoRA, lora_layers
from rankwise.methods.lora import LoRAConfig
from rankwise.methods.targets import resolve_target_modules
from rankwise.models import load_backbone

RUN = "proposed-DeBERTaV3-base-86-M--GLUE-MNLI"


def make(alias="tiny-bert", *overrides):
    torch.manual_seed(0)
    run = load_job([f"run={RUN}", *overrides]).run
    backbone, tok = load_backbone(alias, num_labels=3)
    method = IWLoRA(LoRAConfig(rank=4, lora_alpha=8), run)
    model = method.wrap(backbone, resolve_target_modules(backbone))
    return method, model, tok


def make_batches(tok, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["the movie is good", "bad", "it was not good of the movie", "a movie", "good and bad"]
    out = []
    for i in range(n):
        idx = torch.randint(len(words), (4,), generator=g).tolist()
        b = tok([words[j] for j in idx], padding=True, return_tensors="pt")
        b["labels"] = torch.randint(3, (4,), generator=g)
        out.append(dict(b))
    return out


def loss_fn(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits, batch["labels"])


def test_regulariser_equals_dense_sum():
    method, model, _ = make()
    torch.manual_seed(1)
    for layer in lora_layers(model).values():  # non-zero A and B
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    s = torch.rand(len(method.names), dtype=torch.float64) + 0.1
    method.set_sensitivity(s)
    expected = 0.0
    factors = 0.0
    for name, c in zip(method.names, method.coefficients.tolist()):
        layer = lora_layers(model)[name]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = layer.scaling["default"] * (b @ a)  # explicit d_out x d_in
        expected += c * float((delta**2).sum())
        factors += c * float((a**2).sum() + (b**2).sum())
    alpha = method.iw.reg_alpha
    got = method.regularization_losses(model)["iw_reg"]
    assert float(got) == pytest.approx(alpha * expected, rel=1e-5)
    method.iw.penalty_on = "factors"
    assert float(method.regularization_losses(model)["iw_reg"]) == pytest.approx(alpha * factors, rel=1e-5)


@pytest.mark.parametrize("sensitivity", ["grad_norm", "grad_sq"])
def test_calibration_matches_autograd_on_base_weights(sensitivity):
    method, model, tok = make("tiny-bert", f"model.importance_weighted_regularisation.sensitivity={sensitivity}",
                              "model.importance_weighted_regularisation.sensitivity_warmup_steps=3")
    batches = make_batches(tok)
    # independent reference: a plain copy of the backbone with grad on every target weight
    reference = copy.deepcopy(model.base_model.model)
    reference.eval()
    layers = {"base_model.model." + k: v for k, v in lora_layers(reference).items()}
    expected = torch.zeros(len(method.names), dtype=torch.float64)
    for batch in batches:
        reference.zero_grad()
        for n in method.names:
            layers[n].base_layer.weight.requires_grad_(True)
        loss_fn(reference, batch).backward()
        for i, n in enumerate(method.names):
            g = layers[n].base_layer.weight.grad.double()
            expected[i] += (g.norm() ** 2 if sensitivity == "grad_sq" else g.norm()) / len(batches)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    method.calibrate(model, iter(batches), loss_fn)
    torch.testing.assert_close(method.sensitivity, expected, rtol=1e-5, atol=0)
    assert float(method.sensitivity.min()) > 0
    # calibration updated nothing and changed no state
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None
    assert torch.equal(torch.get_rng_state(), rng)


def test_importance_weights_normalisation():
    method, _, _ = make()
    s = torch.tensor([1.0, 3.0, 6.0], dtype=torch.float64)
    method.set_sensitivity(s)
    assert float(method.importance.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(method.coefficients, (1 - s / 10.0) ** method.iw.beta)
    method.iw.normalise = "max"
    method.set_sensitivity(s)
    assert float(method.importance.max()) == 1.0 and float(method.coefficients.min()) == 0.0


def test_alpha_zero_trains_bit_identically_to_lora(fake_glue, tmp_path):
    from rankwise.training.loop import Trainer

    common = [f"dataset.data_dir={fake_glue}", "dataset.subset=rte", "dataset.splits.validation=validation",
              "model.name=tiny-bert", "training.batch_size=8", "training.fp16=false", "training.max_steps=4",
              "model.importance_weighted_regularisation.sensitivity_warmup_steps=2", "optuna.n_trials=0"]
    iw = load_job([f"run={RUN}", *common, "model.importance_weighted_regularisation.reg_alpha=0"])
    lora = load_job(["run=comparative-1-DeBERTaV3-base-86-M--GLUE-MNLI", *common])
    assert iw.run.algorithm == "iw_lora" and lora.run.algorithm == "lora"
    results = []
    for job, name in ((iw, "iw"), (lora, "lora")):
        trainer = Trainer(job, 42, tmp_path / name)
        trainer.run(resume=False)
        results.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert results[0].keys() == results[1].keys()
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n


def test_artifacts(tmp_path):
    method, model, _ = make()
    method.set_sensitivity(torch.rand(len(method.names), dtype=torch.float64) + 0.1)
    summary = method.write_artifacts(model, tmp_path)
    assert (tmp_path / "importance.json").is_file() and (tmp_path / "importance_heatmap.png").stat().st_size > 0
    assert summary["iw_n_matrices"] == len(method.names) == 12
    assert summary["iw_coef_spread"] == pytest.approx(summary["iw_coef_max"] - summary["iw_coef_min"])


def test_uniform_coefficients_give_plain_l2_closed_form(tmp_path):
    """``coefficients: uniform``: no calibration, every c_k = 1, penalty α Σ_k ||scale·B_k A_k||_F²
    from explicit dense products, whatever sensitivities a calibration would have found."""
    method, model, tok = make("tiny-bert", "model.importance_weighted_regularisation.coefficients=uniform",
                              "model.importance_weighted_regularisation.reg_alpha=0.3")
    assert method.run_cfg.algorithm == "iw_lora"
    torch.manual_seed(2)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    calls = []

    def counting_batches():
        for b in make_batches(tok):
            calls.append(1)
            yield b

    assert method.calibrate(model, counting_batches(), loss_fn) == {"iw_calibration_batches": 0}
    assert not calls  # nothing measured
    expected = 0.0
    for layer in lora_layers(model).values():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected += float(((layer.scaling["default"] * (b @ a)) ** 2).sum())
    got = float(method.regularization_losses(model)["iw_reg"])
    assert got == pytest.approx(0.3 * expected, rel=1e-5)
    summary = method.write_artifacts(model, tmp_path)
    assert summary["iw_coefficients"] == "uniform" and summary["iw_coefficient_spread"] == 0.0
    assert summary["iw_coefficient_spread_warning"] is False


def test_spread_warning_below_five_percent(tmp_path, caplog):
    import logging

    method, model, tok = make("tiny-bert", "model.importance_weighted_regularisation.sensitivity_warmup_steps=2")
    caplog.set_level(logging.WARNING, logger="rankwise.methods.iw_lora")
    method.calibrate(model, iter(make_batches(tok)), loss_fn)
    c = method.coefficients
    spread = float((c.max() - c.min()) / c.mean())
    summary = method.write_artifacts(model, tmp_path)
    assert summary["iw_coefficient_spread"] == pytest.approx(spread)
    assert summary["iw_coefficient_spread_warning"] is (spread < 0.05)
    assert ("nearly uniform L2" in caplog.text) is (spread < 0.05)
    # Hand-made sensitivities on both sides of the 5 % line (12 matrices, sum-normalised, β = 1).
    # s = (1.2, 1, ..., 1): Σ = 12.2, c = 1 - s/Σ: (0.9016, 0.9180 × 11), mean 0.9167,
    # spread 0.0164 / 0.9167 = 1.8 % -> warning.
    n = len(method.names)
    assert n == 12
    method.set_sensitivity(torch.tensor([1.2] + [1.0] * 11, dtype=torch.float64))
    summary = method.write_artifacts(model, tmp_path)
    assert summary["iw_coefficient_spread"] == pytest.approx((0.2 / 12.2) / (1 - 1 / 12), rel=1e-9)
    assert summary["iw_coefficient_spread_warning"] is True
    # s = (12, 1, ..., 1): Σ = 23, c = (11/23, 22/23 × 11), mean 253/276, spread 0.478 / 0.917 = 52 %.
    method.set_sensitivity(torch.tensor([12.0] + [1.0] * 11, dtype=torch.float64))
    summary = method.write_artifacts(model, tmp_path)
    assert summary["iw_coefficient_spread"] == pytest.approx((11 / 23) / ((11 / 23 + 11 * 22 / 23) / 12))
    assert summary["iw_coefficient_spread_warning"] is False
