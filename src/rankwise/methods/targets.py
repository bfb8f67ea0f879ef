"""Default adapter target modules per architecture (methods.md: q, k, v, attention-output,
intermediate and output dense of every layer)."""

from __future__ import annotations

import re

from torch import nn

# Leaf-module name patterns (regex on the full module name), per ``config.model_type``.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
             r"layer\.\d+\.output\.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                r"layer\.\d+\.output\.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense",
                   "intermediate.dense", r"layer\.\d+\.output\.dense"],
    "deberta": ["in_proj", "attention.output.dense", "intermediate.dense",
                r"layer\.\d+\.output\.dense"],
}

# The adapter blocks' old ``target_modules`` key: one home for every method now.
TARGETS_MOVED = {"target_modules": "set model.target_modules (one home for every method's "
                                   "target modules)"}


def resolve_target_modules(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Full names of the ``nn.Linear`` modules to adapt, in model order.

    ``patterns`` (config override) are matched as suffixes or regexes of module names.
    Raises ValueError naming the patterns when nothing matches.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if patterns is None:
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"no default target modules for model_type {model_type!r}; "
                "set model.target_modules"
            )
        patterns = DEFAULT_TARGETS[model_type]
    compiled = [re.compile(rf"(^|\.){p}$") for p in patterns]
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(c.search(name) for c in compiled)
    ]
    if not names:
        raise ValueError(f"target modules {patterns} match no nn.Linear in {model_type!r}")
    return names
