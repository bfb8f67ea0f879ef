"""The search space: Optuna distributions, a trial's run config, and the checks before a study.

Search space (:func:`suggest_params`)::

    loguniform               -> suggest_float(low, high, log=True)
    uniform | float          -> suggest_float(low, high, step=step, log=log)
    discrete_uniform         -> suggest_float(low, high, step=step)   (step required)
    int                      -> suggest_int(low, high, step=step or 1, log=log)
    categorical              -> suggest_categorical(choices)

Keys are aliases or dotted paths (:mod:`rankwise.config.search_aliases`); a trial's config is
the run config with each sampled value written at its path and ``training.seed = seed`` (the
same for every trial, so trials differ only in their hyper-parameters).

:func:`validate_search_space` refuses, before the first trial, a space whose trials could not
all be run: every boundary and choice is written into the run config and parsed by the
schema, and each entry's type is compared with the annotation of the field it sets.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import optuna

from rankwise.config.schema import OptunaConfig, RunConfig, SearchSpaceEntry, parse_run_config
from rankwise.config.search_aliases import resolve_search_key
from rankwise.config.typed import with_dotted_values
from rankwise.errors import ConfigError

# Values Optuna's CategoricalDistribution can store.
CATEGORICAL_CHOICE_TYPES = (type(None), bool, int, float, str)


def suggest_params(
    trial: optuna.trial.BaseTrial, search_space: Mapping[str, SearchSpaceEntry]
) -> dict[str, Any]:
    """Sample one value per search-space entry (see the table in the module docstring)."""
    params: dict[str, Any] = {}
    for name, entry in search_space.items():
        if entry.type == "categorical":
            params[name] = trial.suggest_categorical(name, list(entry.choices))
        elif entry.type == "int":
            step = 1 if entry.step is None else int(entry.step)
            params[name] = trial.suggest_int(
                name, int(entry.low), int(entry.high), step=step, log=entry.log
            )
        elif entry.type == "loguniform":
            params[name] = trial.suggest_float(name, entry.low, entry.high, log=True)
        elif entry.type == "discrete_uniform":
            if entry.step is None:
                raise ConfigError(
                    f"optuna.search_space.{name}.step", "required for discrete_uniform"
                )
            params[name] = trial.suggest_float(name, entry.low, entry.high, step=entry.step)
        else:  # uniform | float
            params[name] = trial.suggest_float(
                name, entry.low, entry.high, step=entry.step, log=entry.log
            )
    return params


def apply_params(run_cfg_dict: dict, params: Mapping[str, Any]) -> dict:
    """A copy of the plain run-config dict with each parameter written at its dotted path."""
    return with_dotted_values(
        run_cfg_dict, {resolve_search_key(name, run_cfg_dict): value for name, value in params.items()})


def validate_search_space(run_cfg_dict: dict, optuna_cfg: OptunaConfig) -> None:
    """Check the ``optuna`` block against the run before the first trial.

    Every key resolves (:func:`resolve_search_key`); each entry's type fits the field it sets
    (an integer field needs ``type: int`` or categorical; a string/bool/literal field needs
    categorical); each boundary and choice, written into the run config, passes the schema's
    own checks (a ConfigError there names the schema key, e.g. ``training.batch_size``). Also
    refuses an empty space, two keys setting one path, tuning IW-LoRA keys of a run with IW
    regularisation disabled, and a direction that contradicts the metric.
    """
    from rankwise.metrics import is_lower_better

    space = optuna_cfg.search_space
    if optuna_cfg.n_trials > 0 and not space:
        raise ConfigError("optuna.search_space", f"empty, but n_trials = {optuna_cfg.n_trials}")
    run_cfg = parse_run_config(dict(run_cfg_dict))
    paths: dict[str, str] = {}
    for name, entry in space.items():
        path = resolve_search_key(name, run_cfg_dict)
        if path in paths.values():
            other = next(k for k, p in paths.items() if p == path)
            raise ConfigError(f"optuna.search_space.{name}", f"sets {path}, as {other!r} does")
        paths[name] = path
        _check_entry_fits_field(name, entry, path, run_cfg)
        for role, value in _boundary_values(entry):
            try:
                parse_run_config(apply_params(run_cfg_dict, {name: value}))
            except ConfigError as exc:
                raise ConfigError(
                    exc.key,
                    f"{exc.message} (value {value!r}: {role} of optuna.search_space.{name})",
                ) from None
    iw_prefix = "model.importance_weighted_regularisation."
    iw_enabled_tuned = f"{iw_prefix}enabled" in paths.values()
    if not run_cfg.model.importance_weighted_regularisation.enabled and not iw_enabled_tuned:
        for name, path in paths.items():
            if path.startswith(iw_prefix):
                raise ConfigError(
                    f"optuna.search_space.{name}",
                    f"sets {path}, but IW regularisation is disabled in this run "
                    f"({iw_prefix}enabled: false), so the trials would not differ",
                )
    lower_better = is_lower_better(optuna_cfg.metric_name)
    if lower_better != (optuna_cfg.direction == "minimize"):
        raise ConfigError(
            "optuna.direction",
            f"{optuna_cfg.metric_name} is {'lower' if lower_better else 'higher'}-is-better, "
            f"so direction must be {'minimize' if lower_better else 'maximize'}",
        )


def _boundary_values(entry: SearchSpaceEntry) -> Iterator[tuple[str, Any]]:
    if entry.type == "categorical":
        for i, choice in enumerate(entry.choices):
            yield f"choice #{i}", choice
    elif entry.type == "int":
        yield "low", int(entry.low)
        yield "high", int(entry.high)
    else:
        yield "low", entry.low
        yield "high", entry.high


def _check_entry_fits_field(
    name: str, entry: SearchSpaceEntry, path: str, run_cfg: RunConfig
) -> None:
    key = f"optuna.search_space.{name}"
    if entry.type == "discrete_uniform" and entry.step is None:
        raise ConfigError(f"{key}.step", "required for discrete_uniform")
    if entry.type == "int" and entry.step is not None and not float(entry.step).is_integer():
        raise ConfigError(f"{key}.step", f"must be an integer for type int, got {entry.step}")
    if entry.type == "categorical":
        for i, choice in enumerate(entry.choices):
            if not isinstance(choice, CATEGORICAL_CHOICE_TYPES):
                raise ConfigError(
                    f"{key}.choices.{i}",
                    f"must be a number, string, bool or null "
                    f"(what Optuna can store), got {type(choice).__name__}",
                )
        return
    # Boundary values alone cannot catch a float search over an integer field (4.0 and 16.0
    # parse as integers, 9.37 does not), so compare the entry with the field's annotation.
    kinds = _field_kinds(run_cfg, path)
    if kinds == {int} and entry.type != "int":
        raise ConfigError(f"{key}.type", f"{path} is an integer; use type: int or categorical")
    if not kinds & {int, float}:
        raise ConfigError(f"{key}.type", f"{path} is not numeric; use type: categorical")


def _field_kinds(run_cfg: RunConfig, path: str) -> set[Any]:
    """The non-None types the schema annotates field ``path`` with (Literal counts as one)."""
    *parents, leaf = path.split(".")
    owner: Any = run_cfg
    for part in parents:
        owner = getattr(owner, part)
    annotation = typing.get_type_hints(type(owner))[leaf]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {a for a in typing.get_args(annotation) if a is not type(None)}
    return {annotation}
