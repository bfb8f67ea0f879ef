"""What every rank-r adapter shares, so one run can be turned into any such method."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterSettings:
    """A run's rank, alpha and dropout. A config class that takes them has the classmethod
    ``from_adapter_settings(settings) -> model.adapter block`` and ``adapter_settings()``."""

    rank: int = 8
    lora_alpha: float = 16.0
    dropout: float = 0.1
