"""DoRA — weight-decomposed low-rank adaptation (Liu et al., ICML 2024; docs/methods.md#dora)
through peft ``LoraConfig(use_dora=True)``: not re-implemented.

Each target's weight is split into a magnitude and a direction, and LoRA adapts the direction:

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row,     s = lora_alpha / r,

with m ∈ R^{d_out} initialised to the row norms ‖W‖_row (peft's "column-wise" norm of the
d_in-long rows of its (d_out, d_in) weight), B = 0, so the step-0 model equals the backbone.
m, A, B and the head train; the norm is detached (the paper's §4.3), as peft does.

Cost shapes (docs/methods.md#cost-shapes):

- **per token**: LoRA's 2·r·(d_in + d_out) (peft runs the input through A and B);
- **per forward**: every call of a target rebuilds B·A as ``lora_B(lora_A(I_{d_in}))``,
  2·r·d_in·(d_in + d_out) FLOPs whatever the batch size (the norm and the scaling are
  elementwise: uncounted). A BERT target is called once per forward; DeBERTa's query and key
  projections are called again on the relative-position rows, so they rebuild twice. The
  calls are counted in the pass (:func:`~rankwise.methods.cost.count_calls` on each target's
  magnitude module), not assumed; a cached rebuild (peft's ``ENABLE_DORA_CACHING``, eval only)
  counts nothing.

Training with dropout > 0 also recomputes the base product x Wᵀ for the DoRA term (peft:
``base_result = None``), 2·d_in·d_out per token: a training cost, not an inference one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from rankwise.methods.cost import ForwardCost, analytic_cost, count_calls, peft_forward_cost
from rankwise.methods.lora import LoRA, LoRAConfig

REBUILD = "weight_rebuild"
REBUILD_SOURCE = ("counted: calls of each target's magnitude module in the pass × "
                  "2·r·d_in·(d_in + d_out) (B·A rebuilt from the identity)")


@dataclass
class DoRAConfig(LoRAConfig):
    #: Selects DoRA (LoRA's keys; its importance-weighted twin with
    #: `model.importance_weighted_regularisation.enabled`).
    type: Literal["dora"] = "dora"


def rebuild_flops(model: nn.Module) -> dict[nn.Module, int]:
    """Each active DoRA magnitude module -> the FLOPs of one rebuild of its target's B·A."""
    out = {}
    for module in model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if not magnitudes or getattr(module, "merged", False):
            continue
        for adapter in module.active_adapters:
            if adapter in magnitudes and adapter in module.lora_A:
                rank = module.lora_A[adapter].weight.shape[0]
                out[magnitudes[adapter]] = 2 * rank * module.in_features * (module.in_features + module.out_features)
    return out


def rebuilds(magnitude: nn.Module) -> bool:
    """Whether this call rebuilds B·A (not a hit in peft's DoRA cache)."""
    from peft.tuners.lora import dora

    return not (dora.ENABLE_DORA_CACHING and not magnitude.training and magnitude._dora_cache)


class DoRA(LoRA):
    name = "dora"

    def __init__(self, config: Any, run_cfg: Any):
        super().__init__(config, run_cfg)
        self._counting: tuple | None = None  # (split, counter state, forwards, counter, hook)
        self._passes: dict[str | None, tuple[int, int]] = {}  # split -> (rebuild FLOPs, forwards)

    def peft_config(self, backbone: nn.Module, target_modules: list[str]):
        return dataclasses.replace(super().peft_config(backbone, target_modules), use_dora=True)

    # --- cost: LoRA's per token, the rebuild per forward ---------------------------------------
    def forward_cost(self, model: nn.Module, forward, attention_mask) -> ForwardCost:
        with count_calls(rebuild_flops(model), rebuilds) as rebuilt:
            cost = peft_forward_cost(model, forward, attention_mask)
        return with_rebuilds(cost, rebuilt["flops"])

    def begin_evaluation(self, model: nn.Module, split: str | None = None) -> None:
        self.end_evaluation(model)
        counter = count_calls(rebuild_flops(model), rebuilds)
        forwards = [0]
        handle = model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        self._counting = (split, counter.__enter__(), forwards, counter, handle)

    def end_evaluation(self, model: nn.Module) -> dict[str, Any]:
        if self._counting is not None:
            split, rebuilt, forwards, counter, handle = self._counting
            counter.__exit__(None, None, None)
            handle.remove()
            self._passes[split] = self._passes[None] = (rebuilt["flops"], forwards[0])
            self._counting = None
        return {}

    def evaluation_cost(self, model: nn.Module, valid_tokens: list[int],
                        split: str | None = None) -> ForwardCost | None:
        flops, forwards = self._passes.get(split, (0, 0))
        if not forwards:
            return None  # no record of that pass
        return with_rebuilds(analytic_cost(model, valid_tokens), round(flops / forwards))


def with_rebuilds(cost: ForwardCost, flops: int) -> ForwardCost:
    """``cost`` with DoRA's per-forward rebuild FLOPs."""
    cost.forward_flops[REBUILD] = flops
    cost.sources["per_forward"] = "; ".join(filter(None, [cost.sources.get("per_forward"), REBUILD_SOURCE]))
    return cost
