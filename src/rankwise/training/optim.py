"""AdamW (no decay on bias/LayerNorm) and the linear/cosine/constant warm-up schedules."""

from __future__ import annotations

import torch
from torch import nn

from rankwise.config.schema import TrainingConfig
from rankwise.methods.base import is_head_parameter

NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight", "LayerNorm.bias", "norm.weight")


def parameter_groups(model: nn.Module, cfg: TrainingConfig, method=None) -> list[dict]:
    """Trainable parameters split into decay / no-decay groups, and by learning rate: the
    head's (``head_learning_rate``, classifier and pooler) and any the method sets for its own
    parameters (``FineTuningMethod.parameter_learning_rate``, e.g. gates and controllers)."""
    groups: dict[tuple[bool, float | None, str | None], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or any(m in name for m in NO_DECAY_MARKERS)
        lr = cfg.head_learning_rate if is_head_parameter(name) else None
        clip = None
        if method is not None:
            lr = method.parameter_learning_rate(name) if lr is None else lr
            clip = method.clip_group(name)
        groups.setdefault((no_decay, lr, clip), []).append(p)
    out = []
    for (no_decay, lr, clip), params in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1.0, kv[0][2] or "")):
        group = {"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay}
        if lr is not None:
            group["lr"] = lr
        if clip is not None:
            group["clip_group"] = clip
        out.append(group)
    return out


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
    """Clip each clip group's gradient norm to ``max_norm`` on its own (groups without a
    ``clip_group`` share one norm; None: no clipping). Returns the norm over every gradient
    before clipping."""
    parts: dict[str | None, list[nn.Parameter]] = {}
    for group in optimizer.param_groups:
        parts.setdefault(group.get("clip_group"), []).extend(
            p for p in group["params"] if p.grad is not None)
    norms = []
    for params in parts.values():
        if not params:
            continue
        if max_norm is None:
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


def build_optimizer(model: nn.Module, cfg: TrainingConfig, method=None) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg, method)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.9)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
               eps=cfg.adam_epsilon, **adam_kernel(groups, cfg.optimizer_impl))


def adam_kernel(groups: list[dict], impl: str) -> dict[str, bool]:
    """``fused=True`` / ``foreach=True`` / neither for torch's Adam(W) (same update rule).

    ``auto``: fused when every trainable parameter is a floating tensor on a device torch's
    fused Adam supports (CUDA, CPU, ...), else foreach. ``fused`` on an unsupported device
    is a config error naming ``training.optimizer_impl``."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper; CUDA and CPU have had fused Adam since torch 2.4
        supported = {"cuda", "cpu"}
    params = [p for g in groups for p in g["params"]]
    fusable = all(p.is_floating_point() and p.device.type in supported for p in params)
    if impl == "fused" and not fusable:
        from rankwise.errors import ConfigError

        devices = sorted({p.device.type for p in params})
        raise ConfigError("training.optimizer_impl",
                          f"fused Adam is not available on {', '.join(devices)}; use auto or foreach")
    if impl == "fused" or (impl == "auto" and fusable):
        return {"fused": True}
    if impl == "for_loop":
        return {"foreach": False}
    return {"foreach": True}


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    """``warmup_ratio`` (if set) wins over ``warmup_steps``; capped at the total step count."""
    steps = round(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio is not None else cfg.warmup_steps
    return min(steps, total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)
