"""What an adapter costs per forward pass: the types and counters the methods build their
``forward_cost`` / ``evaluation_cost`` from (the table of every method's formula is in
``rankwise.measure.adapter_flops``).

Costs have three shapes (docs/methods.md#cost-shapes), each counted where it arises:

- **per token**: work on each real token (a LoRA target: 2·r·(d_in + d_out); the spectral
  family's open pairs and token-level controllers), in ``adapter_flops`` / ``controller_flops``
  per example;
- **per sequence**: work done once per example (a sequence-level gate controller), also in
  those per-example lists and split out in ``sequence_flops``;
- **per forward**: work shared by the whole batch, done once per forward pass whatever its
  size: DeBERTa's relative-position rows (``position_*``) and anything else in
  ``forward_flops`` by name (DoRA's weight-norm rebuild, a per-layer controller). Per example
  it is ``per_forward_flops / batch size``, so a per-example figure names its batch size
  (:meth:`ForwardCost.flops_per_example_at`).

``sources`` says, per shape, what was counted in the pass and what is a formula of the live
modules; the contract matrix checks every shape against ``torch.utils.flop_counter``.

Convention of ``torch.utils.flop_counter``: 2 FLOPs per multiply-add of a matmul; elementwise
work is not counted; padding is not counted. peft LoRA-family layers are costed analytically
from the live layers (rank = rows of ``lora_A``), the spectral family from the gates of the
very pass (``methods/spectral/statistics.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

REALISED, ANALYTIC, NONE = "realised", "analytic", "none"


def trainable_param_counts(model: nn.Module) -> tuple[int, int]:
    """(every trainable parameter, of which in spectral gate controllers / log α)."""
    trainable = controller = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
            if ".gate_source." in name:
                controller += p.numel()
    return trainable, controller


def lora_flops_per_token(rank: int, d_in: int, d_out: int) -> int:
    """Matmul FLOPs of one token through one unmerged LoRA/AdaLoRA target: 2·r·(d_in + d_out)."""
    return 2 * rank * (d_in + d_out)


@dataclass(frozen=True)
class LoraTargetCost:
    rank: int
    d_in: int
    d_out: int

    @property
    def flops_per_token(self) -> int:
        return lora_flops_per_token(self.rank, self.d_in, self.d_out)


def lora_target_costs(model: nn.Module) -> dict[str, LoraTargetCost]:
    """Unmerged, active peft LoRA/AdaLoRA adapters of ``model`` by module name."""
    try:
        from peft.tuners.lora import LoraLayer  # AdaLoraLayer subclasses it
    except ImportError:  # peft is a core dependency; keep the measurement usable without it
        return {}
    costs: dict[str, LoraTargetCost] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        merged = set(getattr(module, "merged_adapters", []))
        for adapter in module.active_adapters:
            if adapter in merged or adapter not in module.lora_A:
                continue
            a = module.lora_A[adapter]
            weight = a.weight if isinstance(a, nn.Linear) else a  # AdaLoRA: a Parameter (r, d_in)
            rank = int(weight.shape[0])
            if rank == 0:
                continue
            key = name if len(module.active_adapters) == 1 else f"{name}[{adapter}]"
            costs[key] = LoraTargetCost(rank, module.in_features, module.out_features)
    return costs


@dataclass
class ForwardCost:
    """Extra FLOPs of one forward pass over a batch, per example (see the module table)."""

    source: str  # "realised" | "analytic" | "none"
    valid_tokens: list[int]
    adapter_flops: list[int]
    controller_flops: list[int]
    budget_violations: int | None = None  # None: the method has no budget
    histogram: list[int] | None = None  # tokens with j open directions (gated methods)
    open_gates_per_token: float | None = None
    per_token_flops: int | None = None  # analytic methods: Σ_k 2·r·(d_in + d_out)
    # Batch-shared position rows (DeBERTa), per forward: adapter FLOPs of the open pairs, of
    # the dense-masked path (all R directions), and the gate controllers'.
    position_adapter_flops: int = 0
    position_dense_adapter_flops: int = 0
    position_controller_flops: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    # per-sequence part of adapter_flops + controller_flops, per example (None: none)
    sequence_flops: list[int] | None = None
    # further batch-shared FLOPs per forward pass, by what they are (e.g. "weight_rebuild")
    forward_flops: dict[str, int] = field(default_factory=dict)
    # per shape ("per_token", "per_sequence", "per_forward"): what was counted, what measured
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def examples(self) -> int:
        return len(self.valid_tokens)

    @staticmethod
    def _mean(values: list[int]) -> float:
        return sum(values) / len(values) if values else 0.0

    @property
    def adapter_flops_per_example(self) -> float:
        return self._mean(self.adapter_flops)

    @property
    def controller_flops_per_example(self) -> float:
        return self._mean(self.controller_flops)

    @property
    def extra_flops_per_example(self) -> float:
        return self.adapter_flops_per_example + self.controller_flops_per_example

    @property
    def per_forward_flops(self) -> int:
        """Every batch-shared FLOP of one forward pass (position rows + ``forward_flops``)."""
        return self.position_adapter_flops + self.position_controller_flops + sum(self.forward_flops.values())

    def flops_per_example_at(self, batch_size: int) -> float:
        """Extra FLOPs per example when examples run ``batch_size`` to a forward pass."""
        return self.extra_flops_per_example + self.per_forward_flops / batch_size

    def shape_split(self, batch_size: int | None = None) -> dict[str, float]:
        """Extra FLOPs per example by shape at ``batch_size`` (default: this pass's)."""
        per_sequence = self._mean(self.sequence_flops or [])
        return {"per_token": self.extra_flops_per_example - per_sequence,
                "per_sequence": per_sequence,
                "per_forward": self.per_forward_flops / (batch_size or max(self.examples, 1))}

    def summary(self) -> dict[str, Any]:
        return {
            "per_forward_flops": self.per_forward_flops,
            "forward_flops": dict(self.forward_flops), "sources": dict(self.sources),
            "source": self.source, "examples": self.examples,
            "adapter_flops_per_example": self.adapter_flops_per_example,
            "controller_flops_per_example": self.controller_flops_per_example,
            "extra_flops_per_example": self.extra_flops_per_example,
            "budget_violations": self.budget_violations,
            "open_gates_per_token": self.open_gates_per_token,
            "position_flops_per_forward": self.position_adapter_flops + self.position_controller_flops,
        }


def analytic_cost(model: nn.Module, valid_tokens: list[int]) -> ForwardCost:
    """Cost of the LoRA family (or of no adapter) for examples with these T_valid."""
    costs = lora_target_costs(model)
    per_token = sum(c.flops_per_token for c in costs.values())
    return ForwardCost(
        source=ANALYTIC if costs else NONE, valid_tokens=list(valid_tokens),
        adapter_flops=[per_token * t for t in valid_tokens],
        controller_flops=[0] * len(valid_tokens), per_token_flops=per_token,
        detail={"targets": len(costs), "ranks": sorted({c.rank for c in costs.values()})},
        sources={"per_token": "analytic: 2·r·(d_in + d_out) per real token, from the live layers"}
        if costs else {},
    )


@contextlib.contextmanager
def count_position_rows(model: nn.Module, costs: dict[str, LoraTargetCost]) -> Iterator[dict[str, int]]:
    """Count the LoRA-family FLOPs of rows that pass through adapted layers inside DeBERTa's
    ``disentangled_attention_bias`` (the relative-position rows) while the block runs.

    Yields ``{"flops": n}``, filled as forwards run: rows × 2·r·(d_in + d_out) per layer.
    """
    state = {"inside": 0, "flops": 0}
    patched: list[tuple[nn.Module, Any]] = []
    for module in model.modules():
        original = getattr(module, "disentangled_attention_bias", None)
        if not callable(original):
            continue

        def marked(*args: Any, _fn: Any = original, **kwargs: Any) -> Any:
            state["inside"] += 1
            try:
                return _fn(*args, **kwargs)
            finally:
                state["inside"] -= 1

        patched.append((module, module.__dict__.get("disentangled_attention_bias")))
        module.disentangled_attention_bias = marked
    modules = dict(model.named_modules())
    handles = []
    for key, cost in costs.items():

        def count(module: nn.Module, args: tuple, output: Any, cost: LoraTargetCost = cost) -> None:
            if state["inside"]:
                x = args[0]
                state["flops"] += (x.numel() // x.shape[-1]) * cost.flops_per_token

        handles.append(modules[key.split("[")[0]].register_forward_hook(count))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
        for module, own in patched:
            if own is None:
                del module.disentangled_attention_bias
            else:
                module.disentangled_attention_bias = own


def peft_forward_cost(model: nn.Module, forward: Callable[[], Any],
                      attention_mask: torch.Tensor) -> ForwardCost:
    """Run ``forward()`` once; the analytic cost of the peft LoRA/AdaLoRA layers it went
    through (none for full fine-tuning or a merged model), position rows included."""
    costs = lora_target_costs(model)
    with count_position_rows(model, costs) as position:
        forward()
    cost = analytic_cost(model, attention_mask.bool().sum(dim=1).tolist())
    cost.position_adapter_flops = cost.position_dense_adapter_flops = position["flops"]
    if position["flops"]:
        cost.sources["per_forward"] = ("counted: the position rows that went through adapted "
                                       "layers in the pass × 2·r·(d_in + d_out)")
    return cost


@contextlib.contextmanager
def count_calls(modules: dict[nn.Module, int], counts: Callable[[nn.Module], bool] | None = None
                ) -> Iterator[dict[str, int]]:
    """Count the FLOPs of work done once per call of each module (``modules``: module -> its
    FLOPs per call) while the block runs: yields ``{"flops": n, "calls": k}``. ``counts(m)``
    says whether this call does the work (default: always), e.g. not on a cache hit."""
    state = {"flops": 0, "calls": 0}

    def pre_hook(module: nn.Module, args: Any, kwargs: Any = None) -> None:
        if counts is None or counts(module):
            state["flops"] += modules[module]
            state["calls"] += 1

    handles = [m.register_forward_pre_hook(pre_hook) for m in modules]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


class PeftLayerCost:
    """Cost hooks of a method whose adapters are peft LoRA-family layers, or none at all
    (``FineTuningMethod.forward_cost`` / ``evaluation_cost``)."""

    def forward_cost(self, model: nn.Module, forward: Callable[[], Any],
                     attention_mask: torch.Tensor) -> ForwardCost:
        return peft_forward_cost(model, forward, attention_mask)

    def evaluation_cost(self, model: nn.Module, valid_tokens: list[int],
                        split: str | None = None) -> ForwardCost | None:
        return analytic_cost(model, valid_tokens)  # the same for every split
