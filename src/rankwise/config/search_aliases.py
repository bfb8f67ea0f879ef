"""Names of the hyper-parameters an Optuna search tunes, resolved to dotted run-config paths.

A key of ``optuna.search_space`` is either a short alias from :data:`SEARCH_ALIASES`
(``learning_rate``, ``iw_reg_alpha``, ...) or a dotted path into the ``model``, ``dataset``
or ``training`` section of the run config (``training.adam_beta2``). A path exists when the
*resolved* config has it: keys the run file leaves at their schema default count (so
``model.adapter.dropout`` can be tuned without writing ``dropout:`` in the YAML), keys the
schema does not know do not.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from rankwise.config.typed import did_you_mean, to_plain
from rankwise.errors import ConfigError

SEARCH_ALIASES: dict[str, str] = {
    "learning_rate": "training.learning_rate",
    "batch_size": "training.batch_size",
    "weight_decay": "training.weight_decay",
    "warmup_steps": "training.warmup_steps",
    "iw_reg_alpha": "model.importance_weighted_regularisation.reg_alpha",
    "lora_rank": "model.adapter.rank",
    "lora_alpha": "model.adapter.lora_alpha",
    "lora_dropout": "model.adapter.dropout",
}

# Sections a trial may change. ``run_id``/``method`` name the run and ``optuna`` drives the
# search itself; tuning them would make trials of one study incomparable.
TUNABLE_SECTIONS = ("model", "dataset", "training")


def resolve_search_key(name: str, run_cfg_dict: dict) -> str:
    """Dotted run-config path that search-space key ``name`` sets.

    Raises ConfigError at ``optuna.search_space.<name>`` (with a "did you mean" hint) when
    ``name`` is neither an alias nor a dotted path to a value of this run's resolved config,
    e.g. ``lora_rank`` for a full fine-tuning run (no ``model.adapter``).
    """
    key = f"optuna.search_space.{name}"
    leaves = dict(_leaf_paths(_resolved_tree(run_cfg_dict)))
    if name in SEARCH_ALIASES:
        path = SEARCH_ALIASES[name]
        if path not in leaves:
            raise ConfigError(
                key,
                f"alias {name!r} sets {path}, which this run's config does not have "
                f"(adapter: {_adapter_type(run_cfg_dict)})",
            )
        return path
    if "." not in name:
        raise ConfigError(
            key,
            f"unknown search parameter{did_you_mean(name, list(SEARCH_ALIASES) + list(leaves))} "
            f"(use an alias: {', '.join(SEARCH_ALIASES)}; or a dotted path such as "
            "training.adam_beta2)",
        )
    section = name.split(".", 1)[0]
    if section not in TUNABLE_SECTIONS:
        raise ConfigError(
            key, f"only {', '.join(TUNABLE_SECTIONS)} keys can be tuned, not {section!r} ones"
        )
    if name not in leaves:
        raise ConfigError(
            key,
            f"{name} is not a value of this run's config{did_you_mean(name, leaves)}",
        )
    return name


def _resolved_tree(run_cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The run config with every schema default filled in, as plain dicts."""
    from rankwise.config.schema import parse_run_config

    tree = to_plain(parse_run_config(dict(run_cfg_dict)))
    return {section: tree[section] for section in TUNABLE_SECTIONS}


def _leaf_paths(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, path)
        else:
            yield path, value


def _adapter_type(run_cfg_dict: Mapping[str, Any]) -> str:
    adapter = (run_cfg_dict.get("model") or {}).get("adapter")
    return adapter.get("type", "?") if isinstance(adapter, Mapping) else "none (full fine-tuning)"
