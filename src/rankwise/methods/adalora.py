"""AdaLoRA (Zhang et al., ICLR 2023; methods.md#adalora) through ``peft.AdaLoraConfig`` — not re-implemented.

Each target gets an SVD-shaped update Δ_k = (lora_alpha / init_r) · P_k diag(E_k) Q_k with
P_k ∈ R^{d_out×init_r} (``lora_B``), E_k ∈ R^{init_r} (``lora_E``, zero init, so the step-0
model equals the backbone) and Q_k ∈ R^{init_r×d_in} (``lora_A``). peft's ``RankAllocator``
scores every triplet (P_{·i}, E_i, Q_{i·}) with smoothed sensitivity |θ ∂L/∂θ| × uncertainty
(EMAs with beta1, beta2) and, every ``deltaT`` steps, zeroes the E_i of the least important
triplets so that the total number of kept triplets follows a cubic schedule from
init_r · |K| (until step ``tinit``) down to target_r · |K| (at step total_step − tfinal),
after which the final pattern is held fixed.

Pruning *masks* rather than shrinks: masked E_i are zero but P, Q keep init_r columns/rows,
so training and inference compute stay at rank init_r (the overhead benchmark must say so).

What the training loop cannot get from a plain peft model, and this class supplies:

- ``total_step`` from the real optimizer-step count (:meth:`AdaLoRA.prepare_training`); peft
  needs it in the config, so :meth:`AdaLoRA.wrap` builds the model with a placeholder schedule
  and ``prepare_training`` writes the resolved ``total_step`` / ``tinit`` / ``tfinal`` into
  the live ``AdaLoraConfig`` that the ``RankAllocator`` reads.
- ``update_and_allocate(global_step)`` after every optimizer step
  (:meth:`AdaLoRA.on_optimizer_step`). ``global_step`` is 0-based (the number of optimizer
  steps completed before this one), as in peft's examples; the final allocation happens at
  step total_step − tfinal, which a 0-based counter reaches only if tfinal ≥ 1 (enforced).
- The orthogonal regulariser, which peft adds only inside ``forward`` when labels are
  passed: returned as ``{"orth_reg": ...}`` by :meth:`AdaLoRA.regularization_losses`,
  computed exactly as peft does (see :func:`orthogonality_penalty`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from rankwise.config.typed import join, require
from rankwise.methods.base import FineTuningMethod, zero_loss
from rankwise.methods.cost import PeftLayerCost
from rankwise.methods.engagement import Check, SeedEvidence, per_seed
from rankwise.methods.lora import head_modules_to_save, use_gap_dropout
from rankwise.methods.targets import TARGETS_MOVED
from rankwise.results import run_figure_stem
from rankwise.methods.per_matrix_report import (
    layer_index,
    matrix_kind,
    write_layer_kind_heatmap,
)

ADAPTER_NAME = "default"
CONFIG_PATH = "model.adapter"


@dataclass
class AdaLoRAConfig:
    """``model.adapter`` for ``type: adalora``.

    - ``target_r = 8``, ``init_r = 12``: rank budget equivalent to LoRA r = 8, starting at
      1.5× as in the paper.
    - ``lora_alpha = 16``: the same hyperparameter value as the LoRA baseline. peft scales by
      lora_alpha / init_r (not / target_r), so the effective scale is 16/12 ≈ 1.33.
    - ``tinit``, ``tfinal``: an integer is a step count; a float in [0, 1) is a fraction of
      the real number of optimizer steps (resolved in ``prepare_training``). Defaults: 10 %
      warm-up at full rank, the budget shrinks over the next 60 %, the last 30 % train the
      final pattern. Resolved values must satisfy tinit < total_step − tfinal, tfinal ≥ 1.
    - ``deltaT = 10``: steps between two re-allocations (peft's default is 1).
    - ``beta1 = beta2 = 0.85``: EMA factors of sensitivity and uncertainty (paper).
    - ``orth_reg_weight = 0.1``: paper range 0.1–0.5.
    """

    #: Selects AdaLoRA (peft).
    type: Literal["adalora"] = "adalora"
    #: Average rank per target matrix after pruning.
    target_r: int = 8
    #: Rank per target matrix at the start (≥ `target_r`).
    init_r: int = 12
    #: The update is scaled by lora_alpha / init_r (as peft does).
    lora_alpha: float = 16.0
    #: Dropout on the adapter's input.
    dropout: float = 0.1
    #: Warm-up at full rank: steps (an integer) or a fraction of the optimizer steps (a float in
    #: [0, 1)).
    tinit: int | float = 0.1
    #: Final phase at the final rank pattern: steps or a fraction of the optimizer steps.
    tfinal: int | float = 0.3
    #: Optimizer steps between two re-allocations.
    deltaT: int = 10
    #: EMA factor of the sensitivity.
    beta1: float = 0.85
    #: EMA factor of the uncertainty.
    beta2: float = 0.85
    #: Weight of the orthogonality regulariser (`reg/orth_reg`).
    orth_reg_weight: float = 0.1
    REMOVED_KEYS: ClassVar[dict[str, str]] = TARGETS_MOVED

    @classmethod
    def from_adapter_settings(cls, settings) -> dict:
        """A run's rank r as the target rank, starting at ⌈1.5 r⌉ (12 for r = 8), its alpha
        and dropout."""
        return {"type": "adalora", "target_r": settings.rank, "init_r": math.ceil(1.5 * settings.rank),
                "lora_alpha": settings.lora_alpha, "dropout": settings.dropout}

    def adapter_settings(self):
        from rankwise.methods.settings import AdapterSettings

        return AdapterSettings(self.target_r, self.lora_alpha, self.dropout)

    def validate(self, path: str) -> None:
        require(self.target_r >= 1, join(path, "target_r"), f"must be >= 1, got {self.target_r}")
        require(self.init_r >= self.target_r, join(path, "init_r"),
                f"must be >= target_r ({self.target_r}), got {self.init_r}")
        require(self.lora_alpha > 0, join(path, "lora_alpha"), f"must be > 0, got {self.lora_alpha}")
        require(0 <= self.dropout < 1, join(path, "dropout"), f"must be in [0, 1), got {self.dropout}")
        for key, smallest in (("tinit", 0), ("tfinal", 1)):
            value = getattr(self, key)
            if isinstance(value, float):
                require(0 <= value < 1, join(path, key),
                        f"a fraction of the training steps must be in [0, 1), got {value}")
            else:
                require(value >= smallest, join(path, key), f"must be >= {smallest} steps, got {value}")
        if isinstance(self.tinit, float) and isinstance(self.tfinal, float):
            require(self.tinit + self.tfinal < 1, join(path, "tinit"),
                    f"tinit + tfinal = {self.tinit + self.tfinal} leaves no budgeting phase")
        require(self.deltaT >= 1, join(path, "deltaT"), f"must be >= 1, got {self.deltaT}")
        for key in ("beta1", "beta2"):
            require(0 < getattr(self, key) < 1, join(path, key), f"must be in (0, 1), got {getattr(self, key)}")
        require(self.orth_reg_weight >= 0, join(path, "orth_reg_weight"),
                f"must be >= 0, got {self.orth_reg_weight}")

    def resolve_schedule(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in steps for ``total_steps`` optimizer steps; ConfigError if invalid."""
        def steps(value: float) -> int:
            return round(value * total_steps) if isinstance(value, float) else value

        tinit, tfinal = steps(self.tinit), max(1, steps(self.tfinal))
        require(
            tinit < total_steps - tfinal,
            join(CONFIG_PATH, "tinit"),
            f"AdaLoRA needs tinit < total_step - tfinal, got tinit={tinit}, tfinal={tfinal}, "
            f"total_step={total_steps} (no budgeting phase); lower tinit/tfinal or train longer",
        )
        return tinit, tfinal


def orthogonality_penalty(model: nn.Module, adapter_name: str = ADAPTER_NAME) -> torch.Tensor:
    """peft's AdaLoRA orthogonal regulariser, before its ``orth_reg_weight``.

        R = (1 / 2|K|) Σ_k ( ||Q_k Q_kᵀ − I||_F + ||P_kᵀ P_k − I||_F )

    with Q_k = ``lora_A`` (init_r × d_in) and P_k = ``lora_B`` (d_out × init_r); both Gram
    matrices are init_r × init_r. As in peft (``AdaLoraModel.forward``) the norms are not
    squared (the paper writes squared norms) and the sum is averaged over the 2|K| factors.
    ``model`` is the module whose parameter names carry ``lora_A.<adapter>`` (the peft model).

    In float32 even when called inside autocast: there the Gram products would run in half
    precision, and a Gram matrix near I in bf16 holds its diagonal to steps of 2^-8 to 2^-7 (0.004-0.008),
    coarser than the deviation from orthogonality the penalty measures once the factors are
    nearly orthogonal (tests/test_cpu_autocast.py shows it).
    """
    penalties = []
    for name, param in model.named_parameters():
        if adapter_name not in name or not ("lora_A" in name or "lora_B" in name):
            continue
        with torch.autocast(param.device.type, enabled=False):
            p = param.float()
            gram = p @ p.T if "lora_A" in name else p.T @ p  # (init_r, init_r)
            identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            penalties.append(torch.linalg.matrix_norm(gram - identity, ord="fro"))
    if not penalties:
        return zero_loss(model)
    return torch.stack(penalties).mean()


class AdaLoRA(PeftLayerCost, FineTuningMethod):
    """peft AdaLoRA with the loop hooks it needs (see the module docstring)."""

    name = "adalora"

    def __init__(self, config: AdaLoRAConfig, run_cfg: Any):
        super().__init__(config, run_cfg)
        self._model: nn.Module | None = None
        self.total_steps: int | None = None

    # --- building -----------------------------------------------------------------------------
    def peft_config(self, backbone: nn.Module, target_modules: list[str]):
        from peft import AdaLoraConfig, TaskType

        cfg: AdaLoRAConfig = self.config
        # peft refuses a config without total_step; this placeholder schedule (no warm-up, no
        # final phase, one step) is replaced by prepare_training before any allocation runs.
        return AdaLoraConfig(
            task_type=TaskType.SEQ_CLS,
            init_r=cfg.init_r,
            target_r=cfg.target_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.dropout,
            target_modules=target_modules,
            modules_to_save=head_modules_to_save(backbone),
            tinit=0,
            tfinal=0,
            total_step=1,
            deltaT=cfg.deltaT,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            orth_reg_weight=cfg.orth_reg_weight,
        )

    def wrap(self, backbone: nn.Module, target_modules: list[str]) -> nn.Module:
        from peft import get_peft_model

        self._model = get_peft_model(backbone, self.peft_config(backbone, target_modules))
        use_gap_dropout(self._model)  # same dropout distribution, fewer random draws (lora.py)
        return self._model

    @staticmethod
    def live_config(model: nn.Module):
        """The ``AdaLoraConfig`` object peft's RankAllocator reads during training."""
        return model.base_model.rankallocator.peft_config

    # --- training hooks -----------------------------------------------------------------------
    def prepare_training(self, model: nn.Module, total_steps: int) -> None:
        """Write the real schedule (total_step, tinit, tfinal in steps) into peft's config."""
        tinit, tfinal = self.config.resolve_schedule(total_steps)
        live = self.live_config(model)
        live.total_step, live.tinit, live.tfinal = total_steps, tinit, tfinal
        self.total_steps = total_steps

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        """Update importance EMAs and mask to the scheduled budget (reads ``.grad``)."""
        if self.total_steps is None:
            raise RuntimeError("AdaLoRA: prepare_training(model, total_steps) must run before training")
        model.base_model.update_and_allocate(global_step)

    def regularization_losses(self, model: nn.Module) -> dict[str, torch.Tensor]:
        weight = self.config.orth_reg_weight
        if weight == 0:
            return {"orth_reg": zero_loss(model)}
        return {"orth_reg": weight * orthogonality_penalty(model)}

    # --- outputs and resume -------------------------------------------------------------------
    def rank_pattern(self, model: nn.Module) -> dict[str, list[bool]]:
        """Backbone module name -> kept flag per triplet (all kept before any allocation)."""
        pattern = self.live_config(model).rank_pattern
        suffix = f".lora_E.{ADAPTER_NAME}"
        names = [
            name.removesuffix(suffix)
            for name, _ in model.base_model.model.named_parameters()
            if name.endswith(suffix)
        ]
        if not pattern:
            return {name: [True] * self.config.init_r for name in names}
        return {name: [bool(k) for k in pattern[name + suffix]] for name in names}

    @property
    def engagement_check_names(self) -> tuple[str, ...]:
        return ("rank_budget_met",)

    def engagement_checks(self, evidence: list[SeedEvidence],
                          thresholds: dict[str, float]) -> list[Check]:
        """``rank_budget_met``: the allocation reached its target, the final total rank at most
        target_r × matrices (plus the tolerance). A schedule too short for t_init + t_final
        leaves the initial ranks: an AdaLoRA run that never allocated."""
        total, budget = per_seed(evidence, "adalora_rank_total"), per_seed(evidence, "adalora_rank_budget")
        tol = thresholds["rank_budget_tolerance"]
        bad = [s for s in total if total[s] is None or budget[s] is None
               or total[s] > budget[s] * (1 + tol)]
        shown = ", ".join(f"seed {s}: {total[s]:g} of {budget[s]:g}" for s in total
                          if total[s] is not None and budget[s] is not None)
        why = (f"final total rank against its target ({shown or 'not recorded'}; at most "
               f"{1 + tol:g} × target)")
        ratios = [total[s] / budget[s] for s in total if total[s] is not None and budget[s]]
        value = max(ratios) if ratios else None  # the worst seed's total ÷ target
        return [Check("rank_budget_met", not bad, value, 1 + tol, why)]

    def write_artifacts(self, model: nn.Module, run_dir: Path) -> dict[str, Any]:
        """``rank_pattern.json`` (final rank per matrix) and ``rank_pattern_heatmap.{png,pdf}``."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        pattern = self.rank_pattern(model)
        ranks = {name: sum(kept) for name, kept in pattern.items()}
        values = list(ranks.values())
        summary = {
            "adalora_rank_mean": sum(values) / len(values),
            "adalora_rank_min": min(values),
            "adalora_rank_max": max(values),
            "adalora_rank_total": sum(values),
            "adalora_rank_budget": self.config.target_r * len(values),
            "adalora_compute_rank": self.config.init_r,  # masked, not shrunk
        }
        live = self.live_config(model)
        report = {
            "init_r": self.config.init_r,
            "target_r": self.config.target_r,
            "total_step": live.total_step if self.total_steps is not None else None,
            "tinit": live.tinit,
            "tfinal": live.tfinal,
            "allocated": bool(live.rank_pattern),
            "summary": summary,
            "matrices": [
                {"name": name, "layer": layer_index(name), "kind": matrix_kind(name),
                 "rank": ranks[name], "kept": pattern[name]}
                for name in pattern
            ],
        }
        (run_dir / "rank_pattern.json").write_text(json.dumps(report, indent=2) + "\n")
        write_layer_kind_heatmap(
            ranks, run_figure_stem(run_dir, "rank_pattern_heatmap"),
            title=f"AdaLoRA final ranks (init_r {self.config.init_r}, target_r {self.config.target_r})",
            colorbar_label="rank",
        )
        return summary

    def state_dict(self) -> dict[str, Any]:
        """RankAllocator EMAs (ipt, exp_avg_ipt, exp_avg_unc) and the current rank pattern."""
        if self._model is None:
            return {}
        allocator = self._model.base_model.rankallocator
        state: dict[str, Any] = {
            key: {n: t.detach().clone() for n, t in getattr(allocator, key).items()}
            for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")
        }
        state["rank_pattern"] = self.live_config(self._model).rank_pattern
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self._model is None:
            raise RuntimeError("AdaLoRA.load_state_dict needs the wrapped model (call wrap first)")
        allocator = self._model.base_model.rankallocator
        devices = {n: p.device for n, p in self._model.base_model.model.named_parameters()}
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {n: t.to(devices.get(n, t.device)).clone() for n, t in state[key].items()})
        self.live_config(self._model).rank_pattern = state["rank_pattern"]
