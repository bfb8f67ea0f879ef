"""Extra FLOPs an adapter adds to a forward pass, per example, for every method.

Each method counts its own cost (``FineTuningMethod.forward_cost`` / ``evaluation_cost``, built
from ``rankwise.methods.cost``); nothing here asks which method it holds. A method that does
not implement them raises instead of reporting 0 FLOPs. What the built-in methods count:

Convention of ``torch.utils.flop_counter``: 2 FLOPs per multiply-add of a matmul; elementwise
work (LoRA's scaling, AdaLoRA's E, gate products) is not counted. Per target k with frozen
W_k ∈ R^{d_out×d_in} and T_valid real tokens of an example:

=======================  ===========================================================  ==========
method                   extra FLOPs per example                                       source
=======================  ===========================================================  ==========
Full FT, merged LoRA     0 (the adapter is folded into W)                              none
LoRA / IW-LoRA           T_valid · Σ_k 2 · r · (d_in + d_out)   (x·Aᵀ, then ·Bᵀ)         analytic
AdaLoRA                  as LoRA with r = the compute rank init_r: pruning zeroes E_i   analytic
                         but P, Q keep init_r columns/rows, so compute does not shrink
Spectral family          open (token, direction) pairs × 4 · (d_in + d_out), plus the   realised
                         controller: counted from the gates of this very pass
                         (``methods/spectral/statistics.py``)
=======================  ===========================================================  ==========

The LoRA-family rank is read from the live peft layers (rows of ``lora_A``), not from the
config, so it is the rank the forward pass actually multiplies with. Padding is not counted
for any method (an unmerged LoRA layer does multiply padded rows; that cost depends on how a
batch is padded, not on the method).

Inputs that are not tokens — DeBERTa's relative-position embeddings, 2·span rows projected by
query/key once per forward and shared by the whole batch — are adapted by every method (LoRA,
AdaLoRA and the whole spectral family alike) but are not per example: their FLOPs are counted
per forward (``ForwardCost.position_*``), realised from the gates for the spectral family and
from the rows that actually pass through each peft layer for the LoRA family
(``rankwise.methods.cost.count_position_rows``). A ``FlopCounterMode`` run of the whole model
over B examples counts B · extra per example + the position FLOPs of that forward
(:func:`measured_flops`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from rankwise.methods.cost import (  # noqa: F401  (names the measurement and benches use)
    NONE,
    REALISED,
    ForwardCost,
    lora_target_costs,
    peft_forward_cost,
    trainable_param_counts,
)


def forward_cost(model: nn.Module, method: Any, forward: Callable[[], Any],
                 attention_mask: torch.Tensor) -> ForwardCost:
    """Run ``forward()`` once and return its extra FLOPs per example (and per forward for
    batch-shared position rows), as the method counts them (``FineTuningMethod.forward_cost``).

    ``method=None`` (a model without its method, e.g. merged LoRA): the peft layers it holds.
    """
    if method is None:
        return peft_forward_cost(model, forward, attention_mask)
    return method.forward_cost(model, forward, attention_mask)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a Hugging Face model to eager attention inside the block.

    ``FlopCounterMode`` has no formula for the CPU fused attention kernel, so under SDPA the
    attention scores would go uncounted on the CPU; eager attention runs them as counted
    matmuls (the same FLOPs). Models without the switch are left as they are.
    """
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    current = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    switched = False
    if hf is not None and current not in (None, "eager"):
        try:
            hf.set_attn_implementation("eager")
            switched = True
        except (ValueError, NotImplementedError, AttributeError):
            switched = False
    try:
        yield
    finally:
        if switched:
            hf.set_attn_implementation(current)


def measured_flops(model: nn.Module, forward: Callable[[], Any]) -> int:
    """FLOPs ``torch.utils.flop_counter`` counts in ``forward()`` (eager attention)."""
    from rankwise.methods.spectral.flops import measured_matmul_flops

    with eager_attention(model):
        return measured_matmul_flops(forward)
