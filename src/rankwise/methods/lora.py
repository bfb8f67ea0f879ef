"""LoRA (methods.md §2) through ``peft`` — not re-implemented.

Δ_k = (lora_alpha / r) · B_k A_k with A_k ∈ R^{r×d_in} (Kaiming init) and B_k ∈ R^{d_out×r}
(zeros), so the step-0 model equals the backbone. The classification head (and pooler) is
trained in full, as PEFT's ``SEQ_CLS`` task type does via ``modules_to_save``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from rankwise.config.typed import join, require
from rankwise.methods.base import FineTuningMethod


@dataclass
class LoRAConfig:
    type: Literal["lora"] = "lora"
    rank: int = 8
    lora_alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"

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
    return [n for n in ("classifier", "pooler", "score") if n in names]


class LoRA(FineTuningMethod):
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

        return get_peft_model(backbone, self.peft_config(backbone, target_modules))
