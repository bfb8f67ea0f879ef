"""Method registry: ``model.adapter.type`` (plus flags) -> one FineTuningMethod class.

Adding a method = one module with a config dataclass and a FineTuningMethod subclass (which
says what it costs: ``forward_cost`` / ``evaluation_cost``), one ``register_method`` line in
``_register_builtin_methods``, its rows in ``tests/test_method_contract.py`` and its section
in docs/methods.md. Every list of method or adapter-type names elsewhere is read from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rankwise.methods.base import FineTuningMethod

FULL = "full"  # ``model.adapter.type`` of full fine-tuning (or no adapter block at all)


@dataclass(frozen=True)
class MethodEntry:
    name: str
    method_cls: type[FineTuningMethod]
    config_cls: type | None  # dataclass of the ``model.adapter`` block
    # the ``model.adapter.type`` that selects it; None when a flag does (IW-LoRA: type lora +
    # importance_weighted_regularisation.enabled)
    adapter_type: str | None


_REGISTRY: dict[str, MethodEntry] = {}


def register_method(name: str, method_cls: type[FineTuningMethod], config_cls: type | None,
                    adapter_type: str | None = "") -> None:
    """Register ``name``; ``adapter_type`` defaults to ``name`` (pass None for a method that a
    flag selects rather than its own ``type``)."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} registered twice")
    _REGISTRY[name] = MethodEntry(name, method_cls, config_cls,
                                  name if adapter_type == "" else adapter_type)


def unregister_method(name: str) -> None:
    """Remove a registered method (tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def adapter_types() -> tuple[str, ...]:
    """Every accepted ``model.adapter.type``, in registration order."""
    return tuple(e.adapter_type for e in registered_methods().values() if e.adapter_type)


def registered_methods() -> dict[str, MethodEntry]:
    _register_builtin_methods()
    return dict(_REGISTRY)


def method_for_adapter_type(adapter_type: str) -> str:
    """Registry name of the method that ``model.adapter.type: <adapter_type>`` selects."""
    for entry in registered_methods().values():
        if entry.adapter_type == adapter_type:
            return entry.name
    raise KeyError(adapter_type)


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

    register_method("full_ft", full_ft.FullFineTuning, None, adapter_type=FULL)
    register_method("lora", lora.LoRA, lora.LoRAConfig)
    register_method("iw_lora", iw_lora.IWLoRA, lora.LoRAConfig, adapter_type=None)
    register_method("adalora", adalora.AdaLoRA, adalora.AdaLoRAConfig)
    register_method("spectral", spectral.SpectralAdapter, spectral.SpectralAdapterConfig)
    register_method("bhsp", spectral.BHSP, spectral.BHSPConfig)
    register_method("cbsp", spectral.CBSP, spectral.CBSPConfig)
    register_method("tabs", spectral.TABS, spectral.TABSConfig)
