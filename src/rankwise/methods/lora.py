"""LoRA (methods.md §2) through ``peft`` — not re-implemented.

Δ_k = (lora_alpha / r) · B_k A_k with A_k ∈ R^{r×d_in} (Kaiming init) and B_k ∈ R^{d_out×r}
(zeros), so the step-0 model equals the backbone. The classification head (and pooler) is
trained in full, as PEFT's ``SEQ_CLS`` task type does via ``modules_to_save``.

LoRA's input dropout (one fresh Bernoulli(1 − p) mask per target and element, scaled by
1/(1 − p)) dominated a CPU LoRA step: peft's ``nn.Dropout`` draws one uniform number per
element of every target's B×T×d_in input (36 targets in MiniLM). :class:`GapDropout`, put in
place of peft's ``lora_dropout`` modules, draws the same distribution from the gaps between
dropped elements instead: i.i.d. Bernoulli(p) drops ⇔ i.i.d. Geometric(p) gaps between them,
so only about p·n random numbers are drawn (see docs/methods.md §2). On CUDA (a fused Philox
kernel) and for p > 0.5 it calls ``F.dropout``. ``dropout_sampler: bernoulli`` keeps peft's
``nn.Dropout``.
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
    type: Literal["lora"] = "lora"
    rank: int = 8
    lora_alpha: float = 16.0
    dropout: float = 0.1
    bias: Literal["none", "all", "lora_only"] = "none"
    # how the dropout mask is drawn (same distribution): "geometric" gaps between dropped
    # elements (GapDropout, fast on CPU), or "bernoulli" (peft's nn.Dropout, one draw per element)
    dropout_sampler: Literal["geometric", "bernoulli"] = "geometric"
    REMOVED_KEYS: ClassVar[dict[str, str]] = TARGETS_MOVED

    def validate(self, path: str) -> None:
        require(self.rank >= 1, join(path, "rank"), f"must be >= 1, got {self.rank}")
        require(self.lora_alpha > 0, join(path, "lora_alpha"), f"must be > 0, got {self.lora_alpha}")
        require(0 <= self.dropout < 1, join(path, "dropout"), f"must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank


def head_modules_to_save(model: nn.Module) -> list[str]:
    """Names of the classification head (and pooler) modules present in ``model``."""
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return [n for n in classifier_head_names() if n in names]


class LoRA(PeftLayerCost, FineTuningMethod):
    name = "lora"

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
