"""Method registry: ``model.adapter.type`` (plus flags) -> one FineTuningMethod class.

Adding a method = one module with a config dataclass and a FineTuningMethod subclass (which
says what it costs: ``forward_cost`` / ``evaluation_cost``), one ``register_method`` line in
``_register_builtin_methods``, its row in ``tests/test_method_contract.py`` and its section
in docs/methods.md. Every list of method or adapter-type names elsewhere is read from here:
the config's choices, the benches' method lists, the cost reference (:func:`cost_reference`),
the tests that loop over methods.

Capabilities, not names:

- **Importance weighting** (docs/methods.md#iw-lora): a method whose class sets
  ``importance_weightable = True`` (the peft LoRA family: ``lora_A`` / ``lora_B`` factors)
  gets an importance-weighted twin ``iw_<name>`` with no code of its own, selected by
  ``model.importance_weighted_regularisation.enabled``. IW-LoRA is LoRA + IW.
- **The run's adapter settings** (:class:`AdapterSettings`: rank, alpha, dropout): a config
  class with ``from_adapter_settings`` / ``adapter_settings`` takes them, so a bench that
  turns one run into several methods keeps them; other methods run on their defaults.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from rankwise.methods.base import FineTuningMethod
from rankwise.methods.settings import AdapterSettings

FULL = "full"  # ``model.adapter.type`` of full fine-tuning (or no adapter block at all)
IW_PREFIX = "iw_"  # the importance-weighted twin of method ``m`` is ``iw_<m>``


@dataclass(frozen=True)
class MethodEntry:
    name: str
    method_cls: type[FineTuningMethod]
    config_cls: type | None  # dataclass of the ``model.adapter`` block
    # the ``model.adapter.type`` that selects it; None when a flag does (an importance-weighted
    # twin: its base's type + importance_weighted_regularisation.enabled)
    adapter_type: str | None
    # the adapter keys (beyond ``type``) a run of this method must have to be the cost
    # reference that costs are quoted against (LoRA r=8); None: not the reference
    cost_reference: dict[str, Any] | None = None
    importance_weighted_of: str | None = None  # the base method of an ``iw_`` twin

    @property
    def importance_weightable(self) -> bool:
        return bool(getattr(self.method_cls, "importance_weightable", False)) and not self.importance_weighted_of

    @property
    def takes_adapter_settings(self) -> bool:
        return hasattr(self.config_cls, "from_adapter_settings")


_REGISTRY: dict[str, MethodEntry] = {}


def register_method(name: str, method_cls: type[FineTuningMethod], config_cls: type | None,
                    adapter_type: str | None = "", cost_reference: dict[str, Any] | None = None) -> None:
    """Register ``name``; ``adapter_type`` defaults to ``name`` (pass None for a method that a
    flag selects rather than its own ``type``)."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} registered twice")
    _REGISTRY[name] = MethodEntry(name, method_cls, config_cls,
                                  name if adapter_type == "" else adapter_type, cost_reference)


def unregister_method(name: str) -> None:
    """Remove a registered method (tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def adapter_types() -> tuple[str, ...]:
    """Every accepted ``model.adapter.type``, in registration order."""
    return tuple(e.adapter_type for e in registered_methods().values() if e.adapter_type)


def registered_methods() -> dict[str, MethodEntry]:
    """Every method by name, registration order, each importance-weightable method followed
    by its ``iw_`` twin."""
    _register_builtin_methods()
    out: dict[str, MethodEntry] = {}
    for name, entry in _REGISTRY.items():
        out[name] = entry
        if entry.importance_weightable:
            twin = importance_weighted_entry(entry)
            out[twin.name] = twin
    return out


def importance_weighted_entry(entry: MethodEntry) -> MethodEntry:
    """The ``iw_<name>`` twin of an importance-weightable method: its class with the
    importance-weighted regulariser mixed in (``methods.iw_lora.importance_weighted``)."""
    from rankwise.methods.iw_lora import importance_weighted

    return MethodEntry(IW_PREFIX + entry.name, importance_weighted(entry.method_cls), entry.config_cls,
                       None, None, importance_weighted_of=entry.name)


def method_for_adapter_type(adapter_type: str, importance_weighted: bool = False) -> str:
    """Registry name of the method that ``model.adapter.type: <adapter_type>`` selects (its
    ``iw_`` twin with ``importance_weighted``; KeyError when the type has none)."""
    for entry in registered_methods().values():
        if entry.adapter_type == adapter_type:
            if not importance_weighted:
                return entry.name
            if entry.importance_weightable:
                return IW_PREFIX + entry.name
            raise KeyError(f"{IW_PREFIX}{entry.name}")
    raise KeyError(adapter_type)


def importance_weightable_types() -> tuple[str, ...]:
    """The adapter types that importance weighting can be switched on for."""
    return tuple(e.adapter_type for e in registered_methods().values()
                 if e.importance_weightable and e.adapter_type)


def get_method(name: str) -> MethodEntry:
    methods = registered_methods()
    if name not in methods:
        raise KeyError(name)
    return methods[name]


def build_method(run_cfg: Any) -> FineTuningMethod:
    """Instantiate the method that ``run_cfg.algorithm`` names (resolved by the schema)."""
    entry = get_method(run_cfg.algorithm)
    return entry.method_cls(run_cfg.model.adapter, run_cfg)


# --- the cost reference and the run's adapter settings --------------------------------------------
def cost_reference() -> tuple[str, dict[str, Any]]:
    """(method name, adapter keys) of the run that extra costs are quoted against."""
    for entry in registered_methods().values():
        if entry.cost_reference is not None:
            return entry.name, dict(entry.cost_reference)
    raise LookupError("no registered method is the cost reference")


def is_cost_reference(algorithm: str | None, adapter: dict[str, Any] | None) -> bool:
    """Whether a run of ``algorithm`` with this ``model.adapter`` block is the cost reference."""
    name, keys = cost_reference()
    return algorithm == name and all((adapter or {}).get(k) == v for k, v in keys.items())


def cost_reference_label() -> str:
    """The reference in words, e.g. ``lora rank=8``."""
    name, keys = cost_reference()
    return " ".join([name, *(f"{k}={v}" for k, v in keys.items())])


def adapter_settings_of(adapter: Any) -> AdapterSettings:
    """The rank, alpha and dropout of a validated ``model.adapter`` block (defaults where the
    block has none of its own, e.g. full fine-tuning or the spectral family)."""
    read = getattr(adapter, "adapter_settings", None)
    return read() if callable(read) else AdapterSettings()


def model_section(name: str, settings: AdapterSettings, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """``model`` (a run's raw ``model`` section, kept otherwise) turned into method ``name``:
    its adapter block built from ``settings`` where the method takes them (else its type at
    its defaults), importance weighting on for an ``iw_`` twin and off otherwise."""
    entry = get_method(name)
    base = get_method(entry.importance_weighted_of) if entry.importance_weighted_of else entry
    out = copy.deepcopy(model or {})
    if base.adapter_type == FULL:
        out["adapter"] = None
    elif base.takes_adapter_settings:
        out["adapter"] = base.config_cls.from_adapter_settings(settings)
    else:
        out["adapter"] = {"type": base.adapter_type}
    iw = out.get("importance_weighted_regularisation") or {}
    out["importance_weighted_regularisation"] = {**iw, "enabled": entry.importance_weighted_of is not None}
    return out


_BUILTINS_DONE = False


def _register_builtin_methods() -> None:
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    from rankwise.methods import adalora, dora, full_ft, lora, pissa, spectral

    register_method("full_ft", full_ft.FullFineTuning, None, adapter_type=FULL)
    register_method("lora", lora.LoRA, lora.LoRAConfig, cost_reference={"rank": 8})
    register_method("adalora", adalora.AdaLoRA, adalora.AdaLoRAConfig)
    register_method("spectral", spectral.SpectralAdapter, spectral.SpectralAdapterConfig)
    register_method("bhsp", spectral.BHSP, spectral.BHSPConfig)
    register_method("cbsp", spectral.CBSP, spectral.CBSPConfig)
    register_method("tabs", spectral.TABS, spectral.TABSConfig)
    register_method("dora", dora.DoRA, dora.DoRAConfig)
    register_method("pissa", pissa.PiSSA, pissa.PiSSAConfig)
