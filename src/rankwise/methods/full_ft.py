"""Full fine-tuning (methods.md#full-fine-tuning): every parameter trainable, no adapter (no extra FLOPs)."""

from __future__ import annotations

from torch import nn

from rankwise.methods.base import FineTuningMethod
from rankwise.methods.cost import PeftLayerCost


class FullFineTuning(PeftLayerCost, FineTuningMethod):
    name = "full_ft"

    def wrap(self, backbone: nn.Module, target_modules: list[str]) -> nn.Module:
        for p in backbone.parameters():
            p.requires_grad_(True)
        return backbone
