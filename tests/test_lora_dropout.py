"""GapDropout (methods/lora.py): the LoRA input dropout drawn from geometric gaps must be the
same distribution as torch's dropout — an independent Bernoulli(1 − p) keep mask per element
and per call, kept values scaled by 1/(1 − p) — and the peft layer's forward/backward must
equal the reference computation base(x) + s·B A (m ⊙ x)/(1 − p) with the same mask."""

from __future__ import annotations

import pytest
import torch
from mask_stats import assert_binomial, assert_independent_masks
from scipy import stats
from torch import nn

from rankwise.methods.lora import GapDropout, drop_positions, use_gap_dropout


def keep_mask(drop: nn.Module, shape) -> torch.Tensor:
    """The keep mask a dropout module applies (its output on ones, times 1 − p)."""
    return drop(torch.ones(shape)) * (1 - drop.p)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_keep_rate_and_scale(p):
    torch.manual_seed(0)
    drop = GapDropout(p).train()
    x = torch.randn(16, 40, 96)
    y = drop(x)
    kept = y != 0
    assert_binomial(int(kept.sum()), x.numel(), 1 - p)
    # kept values are exactly x / (1 - p); dropped are exactly zero
    torch.testing.assert_close(y[kept], x[kept] * (1.0 / (1 - p)), rtol=0, atol=0)


def test_positions_match_a_bernoulli_process():
    """Gaps between drops are Geometric(p): chi-square of the gap histogram against the
    closed form (1 − p)^(g − 1) p, and the drop count per block is Binomial."""
    torch.manual_seed(1)
    p, n = 0.1, 400_000
    pos = drop_positions(n, p)
    assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all())
    assert int(pos.min()) >= 0 and int(pos.max()) < n
    assert_binomial(len(pos), n, p)
    gaps = torch.diff(pos).numpy()
    edges = list(range(1, 30))
    observed = [int((gaps == g).sum()) for g in edges] + [int((gaps >= 30).sum())]
    expected_p = [(1 - p) ** (g - 1) * p for g in edges] + [(1 - p) ** 29]
    expected = [q * len(gaps) for q in expected_p]
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_independent_across_elements_and_calls():
    """Neighbouring elements, and the same element in two calls (two targets reading the same
    input), are kept together with probability (1 − p)², as independent draws must be."""
    torch.manual_seed(2)
    p = 0.2
    drop = GapDropout(p).train()
    shape = (64, 50, 128)
    a, b = keep_mask(drop, shape).bool(), keep_mask(drop, shape).bool()
    assert_independent_masks(a, b, p)  # the two calls, and neighbouring elements


def test_more_than_one_chunk_of_gaps():
    """A tiny n draws from its chunk until the gaps run past the end: still a Bernoulli process."""
    torch.manual_seed(3)
    total = sum(len(drop_positions(5, 0.5)) for _ in range(4000))
    assert_binomial(total, 5 * 4000, 0.5)


def test_eval_mode_and_p_above_half_and_zero_size():
    drop = GapDropout(0.3).eval()
    x = torch.randn(3, 4)
    assert drop(x) is x
    torch.manual_seed(4)
    heavy = GapDropout(0.8).train()(torch.ones(200_000))  # falls back to F.dropout
    assert_binomial(int((heavy != 0).sum()), 200_000, 0.2)
    assert GapDropout(0.1).train()(torch.ones(0, 5)).shape == (0, 5)


def _peft_linear(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(24, 12))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so the adapter path contributes
            nn.init.normal_(param)
    return model


def test_peft_layer_forward_and_grads_equal_reference_with_same_mask():
    model = _peft_linear()
    assert use_gap_dropout(model) == 1
    layer = model.base_model.model.proj
    assert isinstance(layer.lora_dropout["default"], GapDropout)
    model.train()
    x = torch.randn(5, 7, 24, requires_grad=True)
    torch.manual_seed(11)
    y = model(x)
    (y ** 2).sum().backward()
    torch.manual_seed(11)  # the same draws give the same mask
    mask = keep_mask(GapDropout(0.25).train(), x.shape)
    assert 0 < mask.mean() < 1
    w, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    bb = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    ref = xr @ w.T + b + (xr * mask / 0.75) @ a.T @ bb.T * (8 / 4)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    (ref ** 2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, bb.grad, rtol=1e-5, atol=1e-5)


def test_gradcheck_of_the_masked_scale():
    from rankwise.methods.lora import _ScaleAndZero

    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 4, 7, 14])
    assert torch.autograd.gradcheck(lambda t: _ScaleAndZero.apply(t, idx, 1.25), (x,))


def test_lora_method_installs_it_and_bernoulli_keeps_peft(tmp_path):
    from rankwise.config.loader import load_job
    from rankwise.data.tasks import get_task
    from rankwise.training.build import load_run_backbone, wrap_for_run

    def drops(sampler):
        job = load_job(["run=minilm-sst2-lora", "model.name=tiny-bert",
                        f"model.adapter.dropout_sampler={sampler}", f"results_dir={tmp_path}"])
        backbone, _ = load_run_backbone(job.run, get_task("glue", "sst2"))
        _, model = wrap_for_run(job.run, backbone)
        return [type(d) for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
                for d in m.lora_dropout.values()]

    fast, plain = drops("geometric"), drops("bernoulli")
    assert fast and set(fast) == {GapDropout}
    assert len(plain) == len(fast) and set(plain) == {nn.Dropout}


@pytest.mark.parametrize("shape,n,k", [((2, 3, 12), 3, 12), ((2, 3, 3), 12, 3), ((7, 5), 2, 5)])
def test_factor_matmul_matches_autograd_of_linear(shape, n, k):
    """LoRAFactor's hand-laid-out backward against autograd of F.linear (float64)."""
    from rankwise.methods.lora import LoRAFactor, _FactorMatmul

    torch.manual_seed(5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_FactorMatmul.apply, (x, w))
    lin = nn.Linear(k, n, bias=False).double()
    lin.weight.data.copy_(w.detach())
    ref = lin(x)
    g = torch.randn_like(ref)
    ref_gx, ref_gw = torch.autograd.grad(ref, (x, lin.weight), g)
    lin.__class__ = LoRAFactor
    out = lin(x)
    gx, gw = torch.autograd.grad(out, (x, lin.weight), g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gw, ref_gw)


def test_wrap_turns_peft_factors_into_lora_factor(tmp_path):
    from rankwise.methods.lora import LoRAFactor, use_factor_matmul

    model = _peft_linear()
    assert use_factor_matmul(model) == 2
    layer = model.base_model.model.proj
    assert type(layer.lora_A["default"]) is LoRAFactor and type(layer.lora_B["default"]) is LoRAFactor
    assert sorted(model.state_dict()) == sorted(_peft_linear().state_dict())
