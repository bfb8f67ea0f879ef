"""LoRA (methods.md#lora) through ``peft`` — not re-implemented.

Δ_k = (lora_alpha / r) · B_k A_k with A_k ∈ R^{r×d_in} (Kaiming init) and B_k ∈ R^{d_out×r}
(zeros), so the step-0 model equals the backbone. The classification head (and pooler) is
trained in full, as PEFT's ``SEQ_CLS`` task type does via ``modules_to_save``.

LoRA's input dropout (one fresh Bernoulli(1 − p) mask per target and element, scaled by
1/(1 − p)) dominated a CPU LoRA step: peft's ``nn.Dropout`` draws one uniform number per
element of every target's B×T×d_in input (36 targets in MiniLM). :class:`GapDropout`, put in
place of peft's ``lora_dropout`` modules, draws the same distribution from the gaps between
dropped elements instead: i.i.d. Bernoulli(p) drops ⇔ i.i.d. Geometric(p) gaps between them,
so only about p·n random numbers are drawn (see docs/methods.md#lora). On CUDA (a fused Philox
kernel) and for p > 0.5 it calls ``F.dropout``. ``dropout_sampler: bernoulli`` keeps peft's
``nn.Dropout``.

In training on the CPU each peft ``lora.Linear`` target then runs as one fused autograd
function (:class:`_FusedLoRALinear`, installed by :func:`use_fused_lora`): base layer and
adapter together, with the same mask law and the same products, but without peft's separate
full-size passes (dropout scale, ``· scaling``, ``result + …``, their backwards, and the sum of
the two input gradients). Outside the cases it covers, peft's own forward runs.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.config.typed import join, require
from rankwise.methods.base import FineTuningMethod, classifier_head_names
from rankwise.methods.cost import PeftLayerCost
from rankwise.methods.targets import TARGETS_MOVED


@dataclass
class LoRAConfig:
    #: Selects LoRA (IW-LoRA with `model.importance_weighted_regularisation.enabled`).
    type: Literal["lora"] = "lora"
    #: r, the rank of B·A.
    rank: int = 8
    #: The update is scaled by lora_alpha / r.
    lora_alpha: float = 16.0
    #: Dropout on the adapter's input.
    dropout: float = 0.1
    #: Which biases train (peft's `bias`).
    bias: Literal["none", "all", "lora_only"] = "none"
    # geometric: GapDropout, and in CPU training _FusedLoRALinear (use_fused_lora)
    #: How the dropout mask is drawn (the same distribution): `geometric`, from the gaps between
    #: dropped elements (fast on CPU, and in CPU training each target runs as one fused base +
    #: LoRA function), or `bernoulli` (peft's `nn.Dropout` and its own forward: the unfused
    #: reference).
    dropout_sampler: Literal["geometric", "bernoulli"] = "geometric"
    REMOVED_KEYS: ClassVar[dict[str, str]] = TARGETS_MOVED

    def validate(self, path: str) -> None:
        require(self.rank >= 1, join(path, "rank"), f"must be >= 1, got {self.rank}")
        require(self.lora_alpha > 0, join(path, "lora_alpha"), f"must be > 0, got {self.lora_alpha}")
        require(0 <= self.dropout < 1, join(path, "dropout"), f"must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank

    @classmethod
    def from_adapter_settings(cls, settings) -> dict:
        """The ``model.adapter`` block of this type with a run's rank, alpha and dropout."""
        return {"type": cls.type, "rank": settings.rank, "lora_alpha": settings.lora_alpha,
                "dropout": settings.dropout}

    def adapter_settings(self):
        from rankwise.methods.settings import AdapterSettings

        return AdapterSettings(self.rank, self.lora_alpha, self.dropout)


def head_modules_to_save(model: nn.Module) -> list[str]:
    """Names of the classification head (and pooler) modules present in ``model``."""
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return [n for n in classifier_head_names() if n in names]


class LoRA(PeftLayerCost, FineTuningMethod):
    name = "lora"
    # peft lora_A / lora_B factors: the importance-weighted regulariser applies (iw_lora)
    importance_weightable: ClassVar[bool] = True

    def peft_config(self, backbone: nn.Module, target_modules: list[str]):
        from peft import LoraConfig, TaskType

        cfg: LoRAConfig = self.config
        return LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=cfg.rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.dropout,
            target_modules=target_modules,
            bias=cfg.bias,
            modules_to_save=head_modules_to_save(backbone),
        )

    def wrap(self, backbone: nn.Module, target_modules: list[str]) -> nn.Module:
        from peft import get_peft_model

        model = get_peft_model(backbone, self.peft_config(backbone, target_modules))
        if self.config.dropout_sampler == "geometric":
            use_gap_dropout(model)
            use_fused_lora(model)
        use_factor_matmul(model)
        return model


def drop_positions(n: int, p: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted flat indices of the dropped elements among ``n``, each dropped independently
    with probability ``p``: positions of a Bernoulli(p) process drawn as cumulative sums of
    i.i.d. Geometric(p) gaps, G = ⌊log V / log(1 − p)⌋ + 1 with V uniform on (0, 1] (float64),
    so P(G = g) = (1 − p)^(g−1) p. Draws about n·p + 6σ numbers (more only if needed)."""
    if not 0 < p < 1:
        raise ValueError(f"drop probability must be in (0, 1), got {p}")
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    log_keep = math.log1p(-p)
    chunk = int(n * p + 6 * math.sqrt(n * p * (1 - p)) + 64)
    parts, last = [], -1
    while last < n - 1:  # the gaps run past the end almost always after one chunk
        v = torch.rand(chunk, dtype=torch.float64, device=device, generator=generator)
        gaps = v.neg_().add_(1).log_().div_(log_keep).floor_().add_(1).to(torch.int64)
        pos = gaps.cumsum_(0).add_(last)
        parts.append(pos)
        last = int(pos[-1])
    pos = parts[0] if len(parts) == 1 else torch.cat(parts)
    return pos[: int(torch.searchsorted(pos, n))]


class _ScaleAndZero(torch.autograd.Function):
    """y = x·scale with y.flat[idx] = 0; backward zeroes the same places."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        torch.mul(x, scale, out=out)
        out.view(-1).index_fill_(0, idx, 0)
        ctx.save_for_backward(idx)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        torch.mul(grad, ctx.scale, out=out)
        out.view(-1).index_fill_(0, idx, 0)
        return out, None, None


class GapDropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask from geometric gaps (:func:`drop_positions`) on the CPU:
    the same distribution (an independent Bernoulli(1 − p) keep mask per element and call,
    kept values scaled by 1/(1 − p)) from about p·n instead of n random numbers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.p > 0.5 or self.inplace:
            return F.dropout(x, self.p, True, self.inplace)
        idx = drop_positions(x.numel(), self.p, x.device)
        return _ScaleAndZero.apply(x, idx, 1.0 / (1.0 - self.p))


def use_gap_dropout(model: nn.Module) -> int:
    """Put a :class:`GapDropout` of the same p in place of every peft ``lora_dropout``
    ``nn.Dropout`` in ``model``; returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for key, drop in list(drops.items()):
            if type(drop) is nn.Dropout:
                drops[key] = GapDropout(drop.p)
                replaced += 1
    return replaced



class _FactorMatmul(torch.autograd.Function):
    """y = x Wᵀ for a LoRA factor (one side of W is the rank r), with the backward's two
    matmuls laid out so the CPU kernel's output has the short side first: autograd's
    default ``gᵀx`` for lora_B (d_out×M times M×r) and ``g W`` (M×d_out times d_out×r) are
    3–6× slower on the CPU than the same products computed transposed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        n, k = w.shape
        g2 = grad.reshape(-1, n)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ w if k >= n else (w.t() @ g2.t()).t()).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, k)
            gw = g2.t() @ x2 if n <= k else (x2.t() @ g2).t().contiguous()
        return gx, gw


class LoRAFactor(nn.Linear):
    """peft's bias-free ``lora_A`` / ``lora_B`` ``nn.Linear`` with :class:`_FactorMatmul` on the
    CPU outside autocast (same parameters, same products; elsewhere plain ``F.linear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.bias is not None or x.device.type != "cpu" or not torch.is_grad_enabled()
                or torch.is_autocast_enabled("cpu")):
            return F.linear(x, self.weight, self.bias)
        return _FactorMatmul.apply(x, self.weight)


def use_factor_matmul(model: nn.Module) -> int:
    """Turn every bias-free ``nn.Linear`` in peft's ``lora_A`` / ``lora_B`` into a
    :class:`LoRAFactor` (in place: parameters and state-dict names unchanged)."""
    changed = 0
    for module in model.modules():
        for attr in ("lora_A", "lora_B"):
            factors = getattr(module, attr, None)
            if not isinstance(factors, nn.ModuleDict):
                continue
            for lin in factors.values():
                if type(lin) is nn.Linear and lin.bias is None:
                    lin.__class__ = LoRAFactor
                    changed += 1
    return changed


# --- fused base + LoRA target (CPU training) ---------------------------------------------------
class _FusedLoRALinear(torch.autograd.Function):
    """One peft ``lora.Linear`` target in training, base layer and adapter together.

    With x ∈ R^{M×d_in} (M = batch · tokens), frozen or trained W ∈ R^{d_out×d_in}, bias b,
    A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, σ = s·c where s = lora_alpha / r and c = 1/(1 − p), and the
    keep mask m (0 at the flat positions ``idx``, 1 elsewhere):

        forward   x_m = x ⊙ m,   h = x_m Aᵀ  (M×r),   out = x Wᵀ + b + σ · h Bᵀ
        backward  g_h = g B,   ∂B = σ gᵀ h,   ∂A = σ g_hᵀ x_m,
                  ∂x = g W + σ (g_h A) ⊙ m,   ∂W = gᵀ x,   ∂b = Σ_rows g

    which is peft's ``base(x) + B(A(dropout(x))) · s`` with dropout(x) = c · x_m. The scale c
    rides on σ (on the r-wide products), so no full-size tensor is ever multiplied by it; the
    adapter output is accumulated into the base output in place (``addmm_``), and the adapter's
    input gradient is masked once and accumulated into the base's (``addmm_`` with β = σ), so
    the step has no separate scale, add or dropout-backward pass over B×T×d tensors.

    x_m is one masked copy of x (``index_fill_`` of the ~p·n dropped positions). A sparse
    correction h = x Aᵀ − (x ⊙ (1 − m)) Aᵀ over the dropped positions instead would spare that
    copy, but ∂A then needs the same correction summed per input column, a scatter over the
    ~p·n positions into d_in×r that is several times slower on the CPU than the dense r×M by
    M×d_in product with x_m; with r = 8, p = 0.1 the correction also touches about as many
    numbers (p·n·r) as the copy. The skinny products are laid out with the short side first
    (``Bᵀgᵀ`` → r×M, ``hᵀg`` → r×d_out), as in :class:`_FactorMatmul`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, idx: torch.Tensor,
                sigma: float) -> torch.Tensor:
        if idx.numel():
            x_m = x.clone()
            x_m.view(-1).index_fill_(0, idx, 0)
        else:  # p = 0 (or nothing dropped): x_m is x
            x_m = x
        h = torch.mm(x_m, lora_a.t())
        out = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        out.addmm_(h, lora_b.t(), alpha=sigma)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, x_m, h, weight, lora_a, lora_b, idx)
        ctx.sigma = sigma
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, x_m, h, weight, lora_a, lora_b, idx = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        sigma = ctx.sigma
        g = grad.contiguous()
        gx = gw = gb = ga = gbb = None
        g_h_t = torch.mm(lora_b.t(), g.t()) if (need_x or need_a) else None  # (g B)ᵀ: r×M
        if need_bb:
            gbb = torch.mm(h.t(), g).mul_(sigma).t().contiguous()  # σ gᵀh, computed as (hᵀg)ᵀ
        if need_a:
            ga = torch.mm(g_h_t, x_m).mul_(sigma)  # σ g_hᵀ x_m: r×d_in
        if need_x:
            gx = torch.mm(g_h_t.t(), lora_a)  # g_h A
            if idx.numel():
                gx.view(-1).index_fill_(0, idx, 0)  # ⊙ m
            gx.addmm_(g, weight, beta=sigma)  # g W + σ (g_h A) ⊙ m
        if need_w:
            gw = torch.mm(g.t(), x)
        if need_b and ctx.has_bias:
            gb = g.sum(0)
        return gx, gw, gb, ga, gbb, None, None


def _no_hooks(*modules: nn.Module) -> bool:
    """No forward/backward hooks on ``modules`` nor global ones (the fused path would skip them)."""
    from torch.nn.modules import module as mod

    if (mod._global_forward_pre_hooks or mod._global_forward_hooks
            or mod._global_backward_pre_hooks or mod._global_backward_hooks):
        return False
    return not any(m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
                   for m in modules)


def fused_lora_forward(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The output of peft ``lora.Linear`` ``layer`` on ``x`` through :class:`_FusedLoRALinear`,
    or None where that path does not apply and peft's forward must run: outside training or
    with grad disabled, off the CPU, under autocast, with extra forward arguments (e.g.
    ``adapter_names``), adapters disabled or merged, not exactly one active adapter, a LoRA
    variant (DoRA, …) or ``lora_bias``, a base layer other than a plain ``nn.Linear``
    (``fan_in_fan_out``, quantised layers), a dropout other than :class:`GapDropout` with
    p ≤ 0.5 or peft's ``nn.Identity`` (p = 0), mixed dtypes, or hooks on the submodules."""
    if (not layer.training or not torch.is_grad_enabled() or args or kwargs
            or layer.disable_adapters or layer.merged or x.device.type != "cpu"
            or torch.is_autocast_enabled("cpu") or getattr(layer, "fan_in_fan_out", False)):
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if (name not in layer.lora_A or name in getattr(layer, "lora_variant", {})
            or getattr(layer, "lora_bias", {}).get(name, False)):
        return None
    base, lin_a, lin_b, drop = layer.base_layer, layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if type(base) is not nn.Linear or lin_a.bias is not None or lin_b.bias is not None:
        return None
    if type(drop) is nn.Identity:
        p = 0.0
    elif type(drop) is GapDropout and not drop.inplace and 0 <= drop.p <= 0.5:
        p = float(drop.p)
    else:
        return None
    weight, bias, a, b = base.weight, base.bias, lin_a.weight, lin_b.weight
    if (x.dim() < 2 or x.shape[-1] != weight.shape[1] or not x.dtype.is_floating_point
            or any(t.dtype != x.dtype or t.device != x.device for t in (weight, a, b))
            or (bias is not None and bias.dtype != x.dtype)
            or not _no_hooks(base, lin_a, lin_b, drop)):
        return None
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    n = x2.numel()
    if p > 0 and n:
        idx = drop_positions(n, p, x.device)
    else:
        idx = torch.empty(0, dtype=torch.int64, device=x.device)
    sigma = float(layer.scaling[name]) / (1.0 - p)
    out = _FusedLoRALinear.apply(x2, weight, bias, a, b, idx, sigma)
    return out.view(*x.shape[:-1], weight.shape[0])


_FUSED_CLASS: type | None = None


def _fused_lora_linear_class() -> type:
    """``FusedLoRALinear``: peft's ``lora.Linear`` whose forward takes :func:`fused_lora_forward`
    where it applies (made on first use, so importing this module does not import peft)."""
    global _FUSED_CLASS
    if _FUSED_CLASS is None:
        from peft.tuners.lora.layer import Linear

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = fused_lora_forward(self, x, args, kwargs)
            return Linear.forward(self, x, *args, **kwargs) if out is None else out

        _FUSED_CLASS = type("FusedLoRALinear", (Linear,), {
            "forward": forward, "__module__": __name__,
            "__doc__": "peft ``lora.Linear`` with the fused CPU training path (:func:`fused_lora_forward`)."})
    return _FUSED_CLASS


def __getattr__(name: str):  # ``FusedLoRALinear`` by name (pickling, isinstance checks)
    if name == "FusedLoRALinear":
        return _fused_lora_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_fused_lora(model: nn.Module) -> int:
    """Turn every peft ``lora.Linear`` in ``model`` into a ``FusedLoRALinear`` (in place, by
    ``__class__``: same modules, parameters and state-dict names; merge, unmerge and eval are
    peft's); returns how many were changed."""
    from peft.tuners.lora.layer import Linear

    cls = _fused_lora_linear_class()
    changed = 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = cls
            changed += 1
    return changed
