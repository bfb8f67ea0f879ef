"""Method registry: ``model.adapter.type`` (plus flags) -> one FineTuningMethod class.

Adding a method = one module with a config dataclass and a FineTuningMethod subclass, and
one ``register_method`` line in ``_register_builtin_methods``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rankwise.methods.base import FineTuningMethod


@dataclass(frozen=True)
class MethodEntry:
    name: str
    method_cls: type[FineTuningMethod]
    config_cls: type | None  # dataclass of the ``model.adapter`` block


_REGISTRY: dict[str, MethodEntry] = {}


def register_method(name: str, method_cls: type[FineTuningMethod], config_cls: type | None) -> None:
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} registered twice")
    _REGISTRY[name] = MethodEntry(name, method_cls, config_cls)


def registered_methods() -> dict[str, MethodEntry]:
    _register_builtin_methods()
    return dict(_REGISTRY)


def get_method(name: str) -> MethodEntry:
    methods = registered_methods()
    if name not in methods:
        raise KeyError(name)
    return methods[name]


def build_method(run_cfg: Any) -> FineTuningMethod:
    """Instantiate the method that ``run_cfg.algorithm`` names (resolved by the schema)."""
    entry = get_method(run_cfg.algorithm)
    return entry.method_cls(run_cfg.model.adapter, run_cfg)


_BUILTINS_DONE = False


def _register_builtin_methods() -> None:
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    from rankwise.methods import adalora, full_ft, iw_lora, lora, spectral

    register_method("full_ft", full_ft.FullFineTuning, None)
    register_method("lora", lora.LoRA, lora.LoRAConfig)
    register_method("iw_lora", iw_lora.IWLoRA, lora.LoRAConfig)
    register_method("adalora", adalora.AdaLoRA, adalora.AdaLoRAConfig)
    register_method("spectral", spectral.SpectralAdapter, spectral.SpectralAdapterConfig)
    register_method("bhsp", spectral.BHSP, spectral.BHSPConfig)
    register_method("cbsp", spectral.CBSP, spectral.CBSPConfig)
    register_method("tabs", spectral.TABS, spectral.TABSConfig)
