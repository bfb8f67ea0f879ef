"""Importance weighting (docs/methods.md#iw-lora): a per-matrix weighted L2 that any peft
LoRA-family method (``importance_weightable = True``) can switch on. IW-LoRA is LoRA + IW; the
registry makes the ``iw_<name>`` twin of every such method with :func:`importance_weighted`
(IW-DoRA, IW-PiSSA: no code of their own).

1. Calibration (before training, nothing updated): for N_cal = ``sensitivity_warmup_steps``
   training batches record, for every target matrix k, the exact gradient of the task loss
   with respect to the frozen *base* weight W_k and keep

       s_k = mean over batches of ||∂L_task/∂W_k||_F        (``sensitivity: grad_norm``)
       s_k = mean over batches of ||∂L_task/∂W_k||_F²       (``sensitivity: grad_sq``)

   (∂L/∂A_k is identically 0 under LoRA's B = 0 init, so it cannot serve as a proxy.)
   The gradient is computed by temporarily enabling ``requires_grad`` on the base weights;
   per-batch values go into a ring buffer of ``sensitivity_buffer_size`` entries and s_k is
   the buffer mean. Calibration runs the model in eval mode (no dropout: the sensitivity of
   the deterministic network), inside a forked RNG, and restores every ``requires_grad`` flag
   and ``.grad``, so training afterwards is bit-identical to LoRA's when α = 0.
   ``freeze_lora_during_warmup: true`` keeps the LoRA factors out of the calibration graph;
   ``false`` lets their gradients be computed too (and discarded): nothing is updated either way.
2. Importance weights w_k = s_k / Σ_j s_j (``normalise: sum``) or s_k / max_j s_j (``max``),
   coefficient c_k = (1 − w_k)^β.
3. Objective L_task + α Σ_k c_k ||Δ_k||_F² with Δ_k = scale·B_k A_k, computed as
   scale² Σ((B_kᵀB_k) ⊙ (A_k A_kᵀ)) in O(r²(d_in + d_out)) — Δ_k is never materialised.
   ``penalty_on: factors`` uses ||A_k||_F² + ||B_k||_F² instead.

``coefficients: uniform`` is the control: every c_k = 1 (no calibration), the same α, so the
penalty is α Σ_k ||Δ_k||_F², plain L2 on the updates. When the calibrated coefficients barely
differ — spread (max_k c_k − min_k c_k) / mean_k c_k below 5 %, as with sum-normalised weights
over many matrices — IW-LoRA is that control in all but name; the run logs a warning and
reports ``iw_coefficient_spread`` and ``iw_coefficient_spread_warning: true``.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.methods.engagement import Check, SeedEvidence, regulariser_share
from rankwise.methods.lora import LoRA
from rankwise.results import run_figure_stem
from rankwise.methods.per_matrix_report import (
    backbone_module_name,
    layer_index,
    matrix_kind,
    write_layer_kind_heatmap,
)

log = logging.getLogger(__name__)

# Below this relative spread of the coefficients, IW-LoRA is uniform L2 in all but name.
SPREAD_WARNING_BELOW = 0.05


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers by module name (those with ``lora_A['default']``), in model order."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}) and hasattr(m, "base_layer")}


def delta_sq_norm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """||scale · B A||_F² = scale² Σ((BᵀB) ⊙ (AAᵀ)), A: (r, d_in), B: (d_out, r).

    In float32 even when called inside autocast (as a loss computed in the forward's autocast
    block would be): autocast runs the two Gram products in half precision, and under fp16
    those of a young B (entries ~1e-5 after the first steps from B = 0, products ~1e-10) fall
    below fp16's smallest subnormal (6e-8), so the penalty and its gradient vanish exactly when
    they should start to act (tests/test_cpu_autocast.py shows it)."""
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        return scale**2 * ((b.T @ b) * (a @ a.T)).sum()


def coefficient_spread(c: torch.Tensor) -> float:
    """(max − min) / mean of the coefficients: 0 for uniform L2 (0 when all are 0)."""
    mean = float(c.mean())
    return float(c.max() - c.min()) / mean if mean > 0 else 0.0


class ImportanceWeighted:
    """The importance-weighted regulariser, mixed in before a LoRA-family method class (its
    ``wrap`` makes the peft layers; this adds calibration, the penalty and the report)."""

    def __init__(self, config: Any, run_cfg: Any):
        super().__init__(config, run_cfg)
        self.iw = run_cfg.model.importance_weighted_regularisation
        self.names: list[str] = []
        self.sensitivity: torch.Tensor | None = None
        self.importance: torch.Tensor | None = None
        self.coefficients: torch.Tensor | None = None

    def wrap(self, backbone: nn.Module, target_modules: list[str]) -> nn.Module:
        model = super().wrap(backbone, target_modules)
        self.names = list(lora_layers(model))
        if self.uniform:
            self.coefficients = torch.ones(len(self.names), dtype=torch.float64)
        return model

    @property
    def uniform(self) -> bool:
        return self.iw.coefficients == "uniform"

    # --- 1. calibration -------------------------------------------------------------------
    def calibrate(self, model, batches, task_loss_fn) -> dict[str, Any]:
        if self.uniform:  # the control: every coefficient is 1, nothing to measure
            return {"iw_calibration_batches": 0}
        layers = lora_layers(model)
        weights = [layers[n].base_layer.weight for n in self.names]
        flags = {p: p.requires_grad for p in model.parameters()}
        grads = {p: p.grad for p in model.parameters()}
        was_training = model.training
        buffers = [deque(maxlen=self.iw.sensitivity_buffer_size) for _ in weights]
        n_batches = 0
        try:
            with torch.random.fork_rng(devices=[w.device for w in weights if w.is_cuda] or []):
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(False)
                    p.grad = None
                if not self.iw.freeze_lora_during_warmup:
                    for layer in layers.values():
                        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                            p.requires_grad_(True)
                for w in weights:
                    w.requires_grad_(True)
                for batch in batches:
                    if n_batches >= self.iw.sensitivity_warmup_steps:
                        break
                    loss = task_loss_fn(model, batch)
                    g = torch.autograd.grad(loss, weights)
                    for buf, gk in zip(buffers, g):
                        norm = gk.float().norm()
                        buf.append(float(norm**2 if self.iw.sensitivity == "grad_sq" else norm))
                    n_batches += 1
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = grads[p]
            model.train(was_training)
        if n_batches == 0:
            raise ValueError("IW-LoRA calibration received no batches")
        s = torch.tensor([sum(b) / len(b) for b in buffers], dtype=torch.float64)
        self.set_sensitivity(s)
        spread = coefficient_spread(self.coefficients)
        if spread < SPREAD_WARNING_BELOW:
            log.warning("IW-LoRA coefficients spread %.2f %% ((max - min) / mean, below %g %%): the "
                        "penalty is nearly uniform L2; compare with the uniform-coefficient control",
                        100 * spread, 100 * SPREAD_WARNING_BELOW)
        return {"iw_calibration_batches": n_batches}

    # --- 2. importance weights ------------------------------------------------------------
    def set_sensitivity(self, s: torch.Tensor) -> None:
        self.sensitivity = s
        denom = s.sum() if self.iw.normalise == "sum" else s.max()
        self.importance = s / denom if denom > 0 else torch.full_like(s, 1.0 / len(s))
        self.coefficients = (1.0 - self.importance).clamp_min(0.0) ** self.iw.beta

    # --- 3. weighted L2 -------------------------------------------------------------------
    def regularization_losses(self, model: nn.Module) -> dict[str, torch.Tensor]:
        layers = lora_layers(model)
        device = next(iter(layers.values())).lora_A["default"].weight.device
        if self.iw.reg_alpha == 0 or self.coefficients is None:
            return {"iw_reg": torch.zeros((), device=device)}
        total = torch.zeros((), device=device)
        for name, c in zip(self.names, self.coefficients.tolist()):
            layer = layers[name]
            a = layer.lora_A["default"].weight
            b = layer.lora_B["default"].weight
            if self.iw.penalty_on == "factors":
                term = a.pow(2).sum() + b.pow(2).sum()
            else:
                term = delta_sq_norm(a, b, layer.scaling["default"])
            total = total + c * term
        return {"iw_reg": self.iw.reg_alpha * total}

    # --- outputs and resume ---------------------------------------------------------------
    @property
    def engagement_check_names(self) -> tuple[str, ...]:
        return ("regulariser_share",)

    def engagement_checks(self, evidence: list[SeedEvidence],
                          thresholds: dict[str, float]) -> list[Check]:
        """The weighted L2 must be a visible part of the loss: at α = 1e-4 it was about 3e-4 of
        it and changed no prediction (the run was LoRA in all but name)."""
        return [regulariser_share(evidence, "iw_reg", thresholds)]

    def table(self) -> list[dict[str, Any]]:
        return [{"name": backbone_module_name(n), "layer": layer_index(n), "kind": matrix_kind(n), "s_k": float(s),
                 "w_k": float(w), "coefficient": float(c)}
                for n, s, w, c in zip(self.names, self.sensitivity, self.importance, self.coefficients)]

    def write_artifacts(self, model: nn.Module, run_dir: Path) -> dict[str, Any]:
        if self.coefficients is None:
            return {}
        if self.uniform:
            return {"iw_coefficients": "uniform", "iw_coef_min": 1.0, "iw_coef_max": 1.0,
                    "iw_coef_spread": 0.0, "iw_coefficient_spread": 0.0,
                    "iw_coefficient_spread_warning": False, "iw_n_matrices": len(self.names)}
        rows = self.table()
        (run_dir / "importance.json").write_text(json.dumps(
            {"sensitivity": self.iw.sensitivity, "normalise": self.iw.normalise, "beta": self.iw.beta,
             "reg_alpha": self.iw.reg_alpha, "matrices": rows}, indent=2))
        write_layer_kind_heatmap({r["name"]: r["w_k"] for r in rows},
                                 run_figure_stem(run_dir, "importance_heatmap"),
                                 "IW-LoRA importance weights $w_k$", "$w_k$")
        c = self.coefficients
        spread = coefficient_spread(c)
        return {"iw_coefficients": "importance",
                "iw_coefficient_spread": spread,
                "iw_coefficient_spread_warning": spread < SPREAD_WARNING_BELOW,
                "iw_coef_min": float(c.min()), "iw_coef_max": float(c.max()),
                "iw_coef_spread": float(c.max() - c.min()), "iw_w_min": float(self.importance.min()),
                "iw_w_max": float(self.importance.max()), "iw_n_matrices": len(rows)}

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, "sensitivity": self.sensitivity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("sensitivity") is not None:
            self.names = state["names"]
            self.set_sensitivity(state["sensitivity"])


_TWINS: dict[type, type] = {}


def importance_weighted(method_cls: type) -> type:
    """``method_cls`` with :class:`ImportanceWeighted` mixed in, named ``iw_<name>`` (one class
    per method, made on first use; LoRA's is :class:`IWLoRA`)."""
    if method_cls not in _TWINS:
        _TWINS[method_cls] = type(f"IW{method_cls.__name__}", (ImportanceWeighted, method_cls),
                                  {"name": f"iw_{method_cls.name}", "__module__": __name__})
    return _TWINS[method_cls]


class IWLoRA(ImportanceWeighted, LoRA):
    name = "iw_lora"


_TWINS[LoRA] = IWLoRA
