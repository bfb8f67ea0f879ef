"""The fused CPU training path of a peft LoRA target (methods/lora.py, ``FusedLoRALinear``):
its output and gradients must equal the dense reference x Wᵀ + b + s·((x ⊙ m · c) Aᵀ) Bᵀ
with the mask it drew, its mask must be an independent Bernoulli(1 − p) keep mask per target,
element and call, and wherever it does not apply peft's own forward must run."""

from __future__ import annotations

import pytest
import torch
from mask_stats import assert_binomial, assert_independent_masks
from torch import nn

import rankwise.methods.lora as lora_mod
from rankwise.methods.lora import use_factor_matmul, use_fused_lora, use_gap_dropout


class Record:
    """Wraps ``drop_positions`` in the lora module and keeps every index tensor it returns."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, torch.Tensor]] = []
        real = lora_mod.drop_positions

        def recorded(n, p, *args, **kwargs):
            idx = real(n, p, *args, **kwargs)
            self.calls.append((n, idx.clone()))
            return idx

        monkeypatch.setattr(lora_mod, "drop_positions", recorded)

    def mask(self, i: int, shape, dtype=torch.float64) -> torch.Tensor:
        n, idx = self.calls[i]
        m = torch.ones(n, dtype=dtype)
        m[idx] = 0
        return m.view(shape)


def peft_model(p: float = 0.25, r: int = 4, alpha: float = 8, d_in: int = 24, d_out: int = 12,
               bias: str = "none", targets=("proj",), seed: int = 0, dtype=torch.float64):
    """A peft LoRA model on parallel ``nn.Linear`` targets (all read the same input), with
    non-zero B so the adapter contributes."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            for t in targets:
                self.add_module(t, nn.Linear(d_in, d_out))

        def forward(self, x):
            return torch.stack([getattr(self, t)(x) for t in targets])

    model = get_peft_model(Net().to(dtype), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p,
                                                       target_modules=list(targets), bias=bias))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    return model


def rankwise_swaps(model) -> nn.Module:
    use_gap_dropout(model)
    assert use_fused_lora(model) == sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    use_factor_matmul(model)
    return model


def layer_tensors(layer):
    return (layer.base_layer.weight.detach(), layer.base_layer.bias.detach(),
            layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach())


@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fused_output_and_grads_equal_dense_reference_with_its_mask(monkeypatch, p, bias):
    rec = Record(monkeypatch)
    model = rankwise_swaps(peft_model(p=p, bias=bias)).train()
    layer = model.base_model.model.proj
    assert type(layer).__name__ == "FusedLoRALinear"
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    y = model(x)[0]
    g = torch.randn_like(y)
    y.backward(g)
    assert len(rec.calls) == 1  # the fused path drew one mask for the target
    mask = rec.mask(0, x.shape)
    assert 0 < mask.mean() < 1
    w, b, a, bb = layer_tensors(layer)
    w, b, a, bb = (t.clone().requires_grad_(True) for t in (w, b, a, bb))
    xr = x.detach().clone().requires_grad_(True)
    s, c = 8 / 4, 1 / (1 - p)
    ref = xr @ w.T + b + s * ((xr * mask * c) @ a.T) @ bb.T
    tight = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, ref, **tight)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **tight)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, **tight)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, bb.grad, **tight)
    if bias == "all":
        torch.testing.assert_close(layer.base_layer.bias.grad, b.grad, **tight)
    else:
        assert layer.base_layer.bias.grad is None and layer.base_layer.weight.grad is None


def test_trained_base_weight_and_input_without_grad(monkeypatch):
    """An unfrozen base weight gets gᵀx; an input without grad gets no input gradient."""
    rec = Record(monkeypatch)
    model = rankwise_swaps(peft_model(p=0.3)).train()
    layer = model.base_model.model.proj
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(4, 24, dtype=torch.float64)
    y = model(x)[0]
    g = torch.randn_like(y)
    y.backward(g)
    w, b, a, bb = (t.clone().requires_grad_(True) for t in layer_tensors(layer))
    ref = x @ w.T + b + 2.0 * ((x * rec.mask(0, x.shape) / 0.7) @ a.T) @ bb.T
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    ref.backward(g)
    torch.testing.assert_close(layer.base_layer.weight.grad, w.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck_of_the_fused_function():
    from rankwise.methods.lora import _FusedLoRALinear

    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 4, 7, 13, 29])
    assert torch.autograd.gradcheck(lambda *t: _FusedLoRALinear.apply(*t, idx, 1.7), (x, w, b, a, bb))


def test_same_loss_and_grads_as_unfused_peft_path_with_same_masks():
    """Fused and peft's unfused forward (GapDropout + LoRAFactor) draw the same masks from the
    same seed: the same loss and gradients on a two-layer peft model."""
    from peft import LoraConfig, get_peft_model

    def build(fused: bool):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3))
        model = get_peft_model(net.double(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2,
                                                        target_modules=["0", "2"]))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param)
        use_gap_dropout(model)
        if fused:
            assert use_fused_lora(model) == 2
        use_factor_matmul(model)
        return model.train()

    x = torch.randn(2, 9, 16, dtype=torch.float64)
    results = []
    for fused in (False, True):
        model = build(fused)
        torch.manual_seed(7)
        loss = model(x).pow(2).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys() and len(g0) == 4
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-12, atol=1e-12)


def test_state_dict_and_modules_unchanged_and_merge_works():
    plain = peft_model()
    model = peft_model()
    before = model.state_dict()
    rankwise_swaps(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k])
    assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]
    # eval output of the merged model equals the unmerged one (peft's merge on the swapped class)
    x = torch.randn(4, 24, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        y = model(x)
        model.base_model.model.proj.merge()
        torch.testing.assert_close(model(x), y)
        model.base_model.model.proj.unmerge()
        torch.testing.assert_close(model(x), y)


@pytest.mark.parametrize("case", ["eval", "no_grad", "p_zero", "merged", "two_adapters",
                                  "p_above_half", "bernoulli"])
def test_fallbacks_and_p_zero_equal_peft_forward(monkeypatch, case):
    """Where the fused path does not apply, peft's own forward runs; for p = 0 the fused path
    runs (it draws nothing). Either way output and input gradient equal peft's forward of the
    same parameters and dropout modules (the same seed gives both the same dropout draws)."""
    from peft import LoraConfig

    p = {"p_zero": 0.0, "p_above_half": 0.7}.get(case, 0.25)
    ref_model, model = peft_model(p=p), peft_model(p=p)
    for m in (ref_model, model):
        if case != "bernoulli":  # bernoulli: peft's nn.Dropout stays
            use_gap_dropout(m)
        if m is model:
            use_fused_lora(m)
        use_factor_matmul(m)
        if case == "two_adapters":
            torch.manual_seed(9)  # the same init of the second adapter in both models
            m.add_adapter("other", LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["proj"]))
            for name, param in m.named_parameters():
                if "lora_B.other" in name:
                    nn.init.constant_(param, 0.5)
            m.base_model.set_adapter(["default", "other"])
        m.train(case != "eval")
        if case == "merged":
            m.base_model.model.proj.merge()
    fused_calls = []
    real = lora_mod._FusedLoRALinear.apply
    monkeypatch.setattr(lora_mod._FusedLoRALinear, "apply", lambda *a: fused_calls.append(1) or real(*a))
    grad = case not in ("eval", "no_grad")
    outs = []
    for m in (ref_model, model):
        x = torch.randn(3, 5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                        requires_grad=True)
        torch.manual_seed(3)
        with torch.set_grad_enabled(grad):
            y = m(x)
        if grad:
            y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad))
    (y0, gx0), (y1, gx1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    if grad:
        torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-12)
    assert bool(fused_calls) == (case == "p_zero")


def test_iw_lora_and_lora_wrap_install_it_and_bernoulli_keeps_peft(tmp_path):
    from rankwise.config.loader import load_job
    from rankwise.data.tasks import get_task
    from rankwise.training.build import load_run_backbone, wrap_for_run

    def layer_types(extra):
        job = load_job(["run=minilm-sst2-lora", "model.name=tiny-bert", f"results_dir={tmp_path}", *extra])
        backbone, _ = load_run_backbone(job.run, get_task("glue", "sst2"))
        _, model = wrap_for_run(job.run, backbone)
        return [type(m).__name__ for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]

    lora = layer_types([])
    assert lora and set(lora) == {"FusedLoRALinear"}
    plain = layer_types(["model.adapter.dropout_sampler=bernoulli"])
    assert set(plain) == {"Linear"} and len(plain) == len(lora)
    # IW-LoRA wraps through LoRA.wrap
    from rankwise.methods.iw_lora import IWLoRA, lora_layers
    from rankwise.methods.lora import LoRAConfig
    from rankwise.methods.targets import resolve_target_modules
    from rankwise.models import load_backbone

    run = load_job(["run=proposed-DeBERTaV3-base-86-M--GLUE-MNLI", f"results_dir={tmp_path}"]).run
    backbone, _ = load_backbone("tiny-bert", num_labels=3)
    iw = IWLoRA(LoRAConfig(rank=4, lora_alpha=8), run).wrap(backbone, resolve_target_modules(backbone))
    layers = lora_layers(iw)
    assert layers and {type(m).__name__ for m in layers.values()} == {"FusedLoRALinear"}


# --- the mask law through the fused path -------------------------------------------------------
def identity_targets(p: float, d: int = 32, targets=("q", "k")):
    """Targets with W = 0, b = 0, A = B = I (r = d) and s = 1: out = c · (x ⊙ m), so the
    mask is read off the output; ∂x = c · (g ⊙ m) reads it off the gradient."""
    model = rankwise_swaps(peft_model(p=p, r=d, alpha=d, d_in=d, d_out=d, targets=targets,
                                      dtype=torch.float32)).train()
    with torch.no_grad():
        for t in targets:
            layer = getattr(model.base_model.model, t)
            layer.base_layer.weight.zero_()
            layer.base_layer.bias.zero_()
            layer.lora_A["default"].weight.copy_(torch.eye(d))
            layer.lora_B["default"].weight.copy_(torch.eye(d))
    return model


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fused_keep_rate_scale_and_backward_uses_the_same_mask(p):
    torch.manual_seed(4)
    model = identity_targets(p, targets=("q",))
    x = torch.ones(64, 40, 32, requires_grad=True)
    y = model(x)[0]
    keep = y != 0
    assert_binomial(int(keep.sum()), y.numel(), 1 - p)
    c = 1 / (1 - p)
    torch.testing.assert_close(y[keep], torch.full_like(y[keep], c), rtol=1e-6, atol=0)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, keep)  # ∂x = c · (g ⊙ m): the same mask
    torch.testing.assert_close(x.grad[keep], torch.full_like(y[keep], c), rtol=1e-6, atol=0)


def test_fused_masks_independent_across_targets_elements_and_calls():
    """Two targets reading the same input, two calls of one target, and neighbouring elements
    are kept together with probability (1 − p)², as independent draws must be."""
    torch.manual_seed(5)
    p = 0.2
    model = identity_targets(p)
    x = torch.ones(64, 50, 32, requires_grad=True)
    q, k = (t != 0 for t in model(x))
    q2 = model(x)[0] != 0
    assert_binomial(int((q & q2).sum()), q.numel(), (1 - p) ** 2)  # two calls of one target
    assert_independent_masks(q, k, p)  # two targets, and neighbouring elements
