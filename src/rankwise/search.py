"""Hyper-parameter search on Optuna, driven by the run config's ``optuna`` block.

The training code supplies ``objective(trial_cfg_dict, reporter) -> float``: it trains one
trial from a plain run-config dict and returns the final ``optuna.metric_name``, calling
``reporter.report(value, epoch)`` after each evaluation. Everything about the study lives
here: search space → Optuna distributions, storage, sampler, pruner, crash-resume, several
workers, and the files a search leaves behind.

Search space (:func:`suggest_params`)::

    loguniform               -> suggest_float(low, high, log=True)
    uniform | float          -> suggest_float(low, high, step=step, log=log)
    discrete_uniform         -> suggest_float(low, high, step=step)   (step required)
    int                      -> suggest_int(low, high, step=step or 1, log=log)
    categorical              -> suggest_categorical(choices)

Keys are aliases or dotted paths (:mod:`rankwise.config.search_aliases`); a trial's config is
the run config with each sampled value written at its path and ``training.seed = seed`` (the
same for every trial, so trials differ only in their hyper-parameters).

Study. Name = ``run_id``; storage = ``optuna.storage`` or ``sqlite:///<study_dir>/study.db``
(``study_dir`` is ``<results>/<run_id>/optuna``); ``load_if_exists=True``, so re-running the
same command resumes the study. The search space, metric and direction are stored with the
study; resuming with a different one is refused (ConfigError) instead of mixing trials that
answer different questions. ``optuna.n_trials`` may be raised to extend a finished study.

Sampler. TPE (Bergstra et al., 2011) with ``constant_liar`` (running trials count as bad, so
parallel workers spread out). Each trial samples from a TPESampler seeded with
``SeedSequence([seed, trial.number])`` rather than from one sampler seeded once per process:
a restarted process, or a second worker, would otherwise replay the first trials' random
start-up draws and train the same parameters twice. In one worker the sequence of suggestions
is a function of the seed and the study's history alone.

Pruner. ``median`` = MedianPruner(n_startup_trials, warm-up), ``percentile`` =
PercentilePruner(pruner_percentile, ...), ``hyperband`` = HyperbandPruner(min_resource =
warm-up), ``none`` = NopPruner. Reported steps count completed epochs (1 after the first), so
``pruner_warmup_epochs = W`` lets a trial be pruned at epoch W + 1 at the earliest.

Exactly ``n_trials``. Every worker loops ``study.optimize(..., n_trials=1)`` while fewer than
``n_trials`` trials are COMPLETE or PRUNED in storage (counted there, over all workers).
Before asking, a worker waits while COMPLETE + PRUNED + RUNNING already fills ``n_trials``
(if one of those running trials fails, its slot frees up). That check and the ask are not
atomic, so two workers can both start a trial for the last slot; hence a started trial,
before it samples anything, checks that COMPLETE + PRUNED + (RUNNING or WAITING trials with a
smaller number) < ``n_trials``, and otherwise ends at once as FAIL with the user attribute
``cancelled`` (no training done; listed separately in the results). With storage reads that
see committed writes this never exceeds ``n_trials``: the highest-numbered trial allowed to
run counted every other allowed trial still able to finish.

Crash-resume. The storage is an RDBStorage with ``heartbeat_interval`` / ``grace_period``: a
running trial writes a heartbeat; one whose process died (SIGKILL, preemption, host OOM)
stops, and the next worker that looks (``fail_stale_trials``) marks it FAIL and queues a
retry with the same parameters (``RetryHeartbeatStaleTrialCallback(max_retry=1)``: a trial
whose process dies twice is left FAIL rather than retried forever). Restarting the command
therefore finishes the study with exactly ``n_trials`` COMPLETE/PRUNED trials.

Failed trials. A diverged run (``NonFiniteLossError``) or a trial whose sampled parameters
make an invalid run config (a ``ConfigError`` naming a run key: ``model.``, ``dataset.``,
``training.``) is FAIL and the search goes on; an invalid one records the key in the trial's
``invalid_config_key`` attribute and its note. More than ``max_failed_trials`` diverged or
crashed trials abort the search; invalid-config trials count towards that limit only while no
trial has finished (so a space where every trial fails stops) and abort it beyond
``INVALID_TRIALS_PER_TRIAL × n_trials`` (a space almost all invalid would never fill it).

Selection. Every trial records ``selection_split`` (``train_holdout_<fraction>`` or
``validation``, from ``optuna.selection_split``): the data its value was measured on, which the
objective (:func:`rankwise.runner.trial_objective`) prepares; a study refuses to resume with
another one.

Several workers. Start the same command in several processes (or on several machines) with
the same ``run_id`` and storage URL. SQLite suits workers on one machine with a local disk
(writers wait up to 60 s for its lock); use PostgreSQL across machines::

    optuna:
      storage: postgresql+psycopg2://user:pw@host/db

SQLAlchemy imports psycopg2 only for such a URL (``pip install rankwise[postgres]``).

Residual races (none changes the number of finished trials): a worker stalled longer than
``grace_period`` (suspended VM, swap storm) is declared dead; its trial is retried and the
stalled worker's own result is discarded with a warning. Two workers starting the last slot
together make one of them record a ``cancelled`` trial. A retry still queued when the study
reaches ``n_trials`` stays WAITING in storage (the dashboard shows it; it never runs).

Outputs in ``study_dir`` (rewritten after every trial and at the end, atomically):
``best_params.json`` (best value, parameters, overrides by dotted path, trial number),
``trials.csv`` (number, state, value, duration_s, seed, selection_split, params_<name>...,
note; ``selection_split`` is the data that scored the trial: ``train_holdout_<fraction>``, a
held-out slice of the training split, or ``validation``; the value keeps the metric's name,
e.g. ``validation_accuracy``, whichever split measured it) and
``top_trials.md`` (the best completed trials, as in the table logged at the end). A line is
logged as each trial starts and as it ends (n/N finished, value, best so far, ETA). The
runner (:mod:`rankwise.runner`) supplies the objective and trains the final configuration.
Watch a study live with::

    optuna-dashboard sqlite:///<results>/<run_id>/optuna/study.db
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from rankwise.config.schema import OptunaConfig, RunConfig, SearchSpaceEntry, parse_run_config
from rankwise.config.search_aliases import SEARCH_ALIASES, resolve_search_key
from rankwise.config.typed import to_plain
from rankwise.errors import ConfigError, NonFiniteLossError, RankwiseError
from rankwise.results import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# Values Optuna's CategoricalDistribution can store.
CATEGORICAL_CHOICE_TYPES = (type(None), bool, int, float, str)
CANCELLED_NOTE = "cancelled: n_trials already taken by other workers' trials"
TOP_TRIALS_SHOWN = 5
# A trial whose worker process dies twice is not retried again (see module docstring).
MAX_RETRIES_OF_DEAD_TRIAL = 1
STORAGE_OPEN_ATTEMPTS = 5


# A trial whose sampled parameters make an invalid run config (a ConfigError naming a key of
# the run) is FAIL with ``invalid_config_key``; such trials do not count towards
# ``max_failed_trials`` unless no trial has finished. This many per ``n_trials`` stop the search
# anyway (a space that is almost all invalid would otherwise never fill ``n_trials``).
INVALID_TRIALS_PER_TRIAL = 10
RUN_CONFIG_SECTIONS = ("model.", "dataset.", "training.", "method")


class _InvalidTrialConfig(RankwiseError):
    """A trial's parameters made an invalid run config; the trial is FAIL, the search goes on."""


def _names_run_key(key: str) -> bool:
    return key.startswith(RUN_CONFIG_SECTIONS)


class SearchAborted(RankwiseError):
    """The search stopped before ``n_trials`` finished (too many failed trials)."""

    exit_code = 6


@dataclass
class SearchResult:
    best_params: dict[str, Any]  # search-space names -> values; {} when no trial completed
    best_value: float | None
    n_complete: int
    n_pruned: int
    n_failed: int  # objective errors, invalid configs and dead workers; not cancelled trials
    wall_time_s: float  # this worker's
    best_trial_number: int | None = None
    n_cancelled: int = 0
    storage: str = ""  # the study's storage URL, password masked
    timed_out: bool = False  # optuna.timeout_s ended this worker's search before n_trials
    n_invalid: int = 0  # of n_failed: trials whose parameters made an invalid run config

    @property
    def n_finished(self) -> int:
        return self.n_complete + self.n_pruned


class TrialReporter:
    """What the objective sees of its Optuna trial: report per-epoch values, get pruned.

    ``report(value, epoch)`` forwards to ``trial.report`` and raises ``optuna.TrialPruned``
    when the pruner says so; let it propagate out of the objective (clean up and re-raise).
    """

    def __init__(self, trial: optuna.Trial, metric_name: str):
        self._trial = trial
        self.metric_name = metric_name

    @property
    def trial_number(self) -> int:
        return self._trial.number

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._trial.params)

    def set_user_attr(self, key: str, value: Any) -> None:
        """Store a fact about the trial (e.g. its training rows) with it in the study."""
        self._trial.set_user_attr(key, value)

    def report(self, value: float, epoch: int) -> None:
        """Record ``metric_name = value`` after ``epoch`` completed epochs (1, 2, ...)."""
        if epoch < 1:
            # The pruner warm-up is defined on completed epochs; a 0-based count would shift it.
            raise ValueError(f"epoch counts completed epochs and starts at 1, got {epoch}")
        self._trial.report(float(value), epoch)
        if self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} ({self.metric_name}={value:.4g})")


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
    trial_cfg = copy.deepcopy(dict(run_cfg_dict))
    for name, value in params.items():
        path = resolve_search_key(name, run_cfg_dict)
        *parents, leaf = path.split(".")
        node = trial_cfg
        for part in parents:
            # Sections the run file leaves at their defaults are absent from its dict.
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return trial_cfg


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


def build_pruner(optuna_cfg: OptunaConfig) -> optuna.pruners.BasePruner:
    """The configured pruner; steps are completed epochs (see :class:`TrialReporter`)."""
    # Earliest prunable step: with W warm-up epochs, epoch W + 1.
    first_prunable_epoch = optuna_cfg.pruner_warmup_epochs + 1
    if optuna_cfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=optuna_cfg.n_startup_trials, n_warmup_steps=first_prunable_epoch
        )
    if optuna_cfg.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            optuna_cfg.pruner_percentile,
            n_startup_trials=optuna_cfg.n_startup_trials,
            n_warmup_steps=first_prunable_epoch,
        )
    if optuna_cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=first_prunable_epoch, max_resource="auto"
        )
    return optuna.pruners.NopPruner()


def run_search(
    run_id: str,
    run_cfg_dict: dict,
    optuna_cfg: OptunaConfig,
    seed: int,
    study_dir: Path,
    objective: Callable[[dict, TrialReporter], float],
    *,
    catch: tuple[type[Exception], ...] = (NonFiniteLossError,),
    max_failed_trials: int | None = None,
) -> SearchResult:
    """Run (or resume, or join) the study until ``n_trials`` trials are COMPLETE or PRUNED.

    ``objective(trial_cfg_dict, reporter)`` trains one trial. Exceptions in ``catch`` (by
    default a diverged run) mark the trial FAIL and the search goes on; so does a
    :class:`ConfigError` naming a key of the run (``model.``/``dataset.``/``training.``...):
    the sampled parameters made an invalid configuration (e.g. an AdaLoRA schedule that does
    not fit the step count of a large batch); the trial records ``invalid_config_key`` and its
    note names the key. Any other exception marks the trial FAIL and stops the search. More
    than ``max_failed_trials`` (default ``n_trials``) failed trials other than invalid-config
    ones stop it with :class:`SearchAborted`; invalid-config trials count towards that limit
    only while no trial has finished (so a space where every trial fails still stops), and
    more than ``INVALID_TRIALS_PER_TRIAL × n_trials`` of them stop it too. ``seed`` is every
    trial's ``training.seed`` and, unless ``optuna.sampler_seed`` is set, the sampler's seed.
    """
    t_start = time.perf_counter()
    n_trials = optuna_cfg.n_trials
    if n_trials < 1:
        raise ConfigError("optuna.n_trials", f"a search needs at least 1 trial, got {n_trials}")
    validate_search_space(run_cfg_dict, optuna_cfg)
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    url = optuna_cfg.storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    sampler_seed = seed if optuna_cfg.sampler_seed is None else optuna_cfg.sampler_seed
    max_failed = n_trials if max_failed_trials is None else max_failed_trials

    with _optuna_quiet():
        study = optuna.create_study(
            study_name=run_id,
            storage=_open_storage(url, optuna_cfg),
            sampler=_sampler_for_trial(sampler_seed, 0),
            pruner=build_pruner(optuna_cfg),
            direction=optuna_cfg.direction,
            load_if_exists=True,
        )
        _check_study_matches(study, optuna_cfg)
        outputs = _StudyOutputs(study, optuna_cfg, url, study_dir)
        done = _count(study.get_trials(deepcopy=False), FINISHED_STATES)
        logger.info(
            "search %s: %d/%d trials finished in %s; %s",
            run_id,
            done,
            n_trials,
            _masked(url),
            "nothing to do" if done >= n_trials else "running",
        )

        def optuna_objective(trial: optuna.Trial) -> float:
            if not _holds_a_slot(study, trial.number, n_trials):
                trial.set_user_attr("cancelled", CANCELLED_NOTE)
                raise _NoSlotLeft(CANCELLED_NOTE)
            study.sampler = _sampler_for_trial(sampler_seed, trial.number)
            params = suggest_params(trial, optuna_cfg.search_space)
            logger.info(
                "trial #%d started (%d/%d finished so far): %s",
                trial.number,
                _count(study.get_trials(deepcopy=False), FINISHED_STATES),
                n_trials,
                _format_params(params),
            )
            trial.set_user_attr("seed", seed)
            trial.set_user_attr("selection_split", optuna_cfg.selection_label)
            trial_cfg = apply_params(run_cfg_dict, params)
            trial_cfg.setdefault("training", {})["seed"] = seed
            try:
                value = objective(trial_cfg, TrialReporter(trial, optuna_cfg.metric_name))
            except optuna.TrialPruned:
                raise
            except ConfigError as exc:
                if not _names_run_key(exc.key):
                    trial.set_user_attr("fail_reason", f"ConfigError: {exc}"[:500])
                    raise
                trial.set_user_attr("invalid_config_key", exc.key)
                trial.set_user_attr(
                    "fail_reason", f"invalid configuration ({exc.key}): {exc.message}"[:500]
                )
                logger.warning("trial #%d: invalid configuration, %s: %s; the search goes on",
                               trial.number, exc.key, exc.message)
                raise _InvalidTrialConfig(str(exc)) from exc
            except BaseException as exc:
                trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:500])
                raise
            if value is None or not math.isfinite(value):
                trial.set_user_attr("fail_reason", f"objective returned {value!r}")
            return value

        def after_trial(_: optuna.Study, trial: FrozenTrial) -> None:
            outputs.write()
            _log_progress(study, trial, optuna_cfg, time.perf_counter() - t_start)

        poll_s = min(1.0, float(optuna_cfg.heartbeat_interval))
        waiting_logged = False
        timed_out = False
        t_loop = time.perf_counter()  # timeout_s counts from here, as Optuna's own timeout does
        try:
            while True:
                optuna.storages.fail_stale_trials(study)
                trials = study.get_trials(deepcopy=False)
                finished = _count(trials, FINISHED_STATES)
                if finished >= n_trials:
                    break
                _check_failures(run_id, trials, finished, max_failed, n_trials, study_dir)
                elapsed = time.perf_counter() - t_loop
                if optuna_cfg.timeout_s is not None and elapsed >= optuna_cfg.timeout_s:
                    logger.warning(
                        "search %s: timeout_s=%g reached with %d/%d trials finished",
                        run_id,
                        optuna_cfg.timeout_s,
                        finished,
                        n_trials,
                    )
                    timed_out = True
                    break
                if finished + _count(trials, (TrialState.RUNNING,)) >= n_trials:
                    # The remaining slots are held by running trials (other workers', or a dead
                    # one not yet past its grace period): wait; a failure frees its slot.
                    if not waiting_logged:
                        logger.info(
                            "search %s: waiting for running trials of other workers", run_id
                        )
                        waiting_logged = True
                    time.sleep(poll_s)
                    continue
                waiting_logged = False
                try:
                    study.optimize(
                        optuna_objective,
                        n_trials=1,
                        catch=(*catch, _NoSlotLeft, _InvalidTrialConfig),
                        callbacks=[after_trial],
                    )
                except optuna.exceptions.UpdateFinishedTrialError as exc:
                    logger.warning(
                        "search %s: a trial of this worker was declared dead (no "
                        "heartbeat for grace_period) and retried; its result is "
                        "discarded (%s)",
                        run_id,
                        exc,
                    )
        finally:
            outputs.write()
        trials = study.get_trials(deepcopy=False)

    best = _best_trial(trials, optuna_cfg.direction)
    logger.info(
        "search %s: top trials by %s\n%s",
        run_id,
        optuna_cfg.metric_name,
        _top_trials_table(trials, optuna_cfg),
    )
    return SearchResult(
        best_params=dict(best.params) if best else {},
        best_value=best.value if best else None,
        n_complete=_count(trials, (TrialState.COMPLETE,)),
        n_pruned=_count(trials, (TrialState.PRUNED,)),
        n_failed=sum(_is_failure(t) for t in trials),
        wall_time_s=time.perf_counter() - t_start,
        best_trial_number=best.number if best else None,
        n_cancelled=sum("cancelled" in t.user_attrs for t in trials),
        storage=_masked(url),
        timed_out=timed_out,
        n_invalid=sum(_is_invalid(t) for t in trials),
    )


def _check_failures(run_id: str, trials: Sequence[FrozenTrial], finished: int, max_failed: int,
                    n_trials: int, study_dir: Path) -> None:
    """Raise SearchAborted when failed trials exceed the limits of :func:`run_search`."""
    n_invalid = sum(_is_invalid(t) for t in trials)
    n_crashed = sum(_is_failure(t) for t in trials) - n_invalid
    where = f"see {study_dir / 'trials.csv'}"
    if n_crashed > max_failed:
        raise SearchAborted(f"search {run_id}: {n_crashed} failed trials (limit {max_failed}); {where}")
    if finished == 0 and n_crashed + n_invalid > max_failed:
        keys = sorted({t.user_attrs["invalid_config_key"] for t in trials if _is_invalid(t)})
        raise SearchAborted(
            f"search {run_id}: all {n_crashed + n_invalid} trials failed (limit {max_failed}), "
            f"{n_invalid} with an invalid configuration ({', '.join(keys) or '-'}); {where}")
    if n_invalid > INVALID_TRIALS_PER_TRIAL * n_trials:
        raise SearchAborted(
            f"search {run_id}: {n_invalid} trials had an invalid configuration (limit "
            f"{INVALID_TRIALS_PER_TRIAL} x n_trials); narrow optuna.search_space; {where}")


# --- validation ---------------------------------------------------------------------------


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


# --- study -------------------------------------------------------------------------------


class _NoSlotLeft(Exception):
    """Ends a just-started trial whose slot other workers' trials already hold."""


def _holds_a_slot(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Whether trial ``number`` (just started) may run without exceeding ``n_trials``.

    Trials ahead of it are the RUNNING or WAITING ones with a smaller number: WAITING counts
    because a queued retry may be started after a newer trial checked (see module docstring).
    """
    trials = study.get_trials(deepcopy=False)
    finished = _count(trials, FINISHED_STATES)
    ahead = sum(
        t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < number for t in trials
    )
    return finished + ahead < n_trials


def _sampler_for_trial(seed: int, trial_number: int) -> optuna.samplers.TPESampler:
    trial_seed = int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=trial_seed, constant_liar=True)


def _open_storage(url: str, optuna_cfg: OptunaConfig) -> optuna.storages.RDBStorage:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError as exc:
        raise ConfigError("optuna.storage", f"not an SQLAlchemy database URL: {exc}") from None
    engine_kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        # Several worker processes share one file: wait for its lock instead of failing after
        # SQLite's 5 s default.
        engine_kwargs["connect_args"] = {"timeout": 60}
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
        retry = {
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=MAX_RETRIES_OF_DEAD_TRIAL
            )
        }
    else:
        retry = {
            "failed_trial_callback": optuna.storages.RetryFailedTrialCallback(
                max_retry=MAX_RETRIES_OF_DEAD_TRIAL
            )
        }
    for attempt in range(STORAGE_OPEN_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=optuna_cfg.heartbeat_interval,
                grace_period=optuna_cfg.grace_period,
                **retry,
            )
        except ImportError as exc:
            raise ConfigError(
                "optuna.storage",
                f"no database driver for {backend!r} URLs ({exc}); "
                "for PostgreSQL: pip install rankwise[postgres]",
            ) from None
        except (OperationalError, IntegrityError):
            # Workers started together on a new database race to create Optuna's tables and
            # stamp its schema version ("table trials already exists", "UNIQUE constraint
            # failed: alembic_version"); the loser finds them created when it tries again.
            if attempt == STORAGE_OPEN_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _check_study_matches(study: optuna.Study, optuna_cfg: OptunaConfig) -> None:
    """Refuse to resume a study that was started for another question."""
    where = f"study {study.study_name!r}"
    if study.direction.name.lower() != optuna_cfg.direction:
        raise ConfigError(
            "optuna.direction",
            f"{where} was created to {study.direction.name.lower()}; use a new run_id or storage",
        )
    space = json.loads(
        json.dumps({name: to_plain(entry) for name, entry in optuna_cfg.search_space.items()})
    )
    stored = study.user_attrs
    if "search_space" not in stored:
        # Workers started together race here: another may read the attributes between these
        # writes. ``search_space`` is written last, so a reader that finds it finds the rest.
        study.set_user_attr("metric_name", optuna_cfg.metric_name)
        study.set_user_attr("selection_split", optuna_cfg.selection_label)
        study.set_metric_names([optuna_cfg.metric_name])
        study.set_user_attr("search_space", space)
        return
    if stored["search_space"] != space:
        raise ConfigError(
            "optuna.search_space",
            f"differs from the one {where} was started with "
            f"({stored['search_space']}); use a new run_id or storage",
        )
    if stored.get("metric_name") != optuna_cfg.metric_name:
        raise ConfigError(
            "optuna.metric_name",
            f"{where} optimises {stored.get('metric_name')!r}; use a new run_id or storage",
        )
    if stored.get("selection_split", optuna_cfg.selection_label) != optuna_cfg.selection_label:
        raise ConfigError(
            "optuna.selection_split",
            f"{where} scored its trials on {stored['selection_split']!r}, not "
            f"{optuna_cfg.selection_label!r}; use a new run_id or storage",
        )


@contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Silence Optuna's per-trial log lines (this module logs its own) and its warnings about
    the experimental heartbeat API, restoring both afterwards."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _masked(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --- reading trials ----------------------------------------------------------------------


def _count(trials: Sequence[FrozenTrial], states: Sequence[TrialState]) -> int:
    return sum(t.state in states for t in trials)


def _is_failure(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and "cancelled" not in trial.user_attrs


def _is_invalid(trial: FrozenTrial) -> bool:
    return _is_failure(trial) and "invalid_config_key" in trial.user_attrs


def _best_trial(trials: Sequence[FrozenTrial], direction: str) -> FrozenTrial | None:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(complete, key=lambda t: (sign * t.value, t.number))


def _duration_s(trial: FrozenTrial) -> float | None:
    return None if trial.duration is None else trial.duration.total_seconds()


def _trial_notes(trials: Sequence[FrozenTrial], metric_name: str) -> dict[int, str]:
    """A short human-readable line per trial: retries, dead workers, failures, pruning."""
    retried_as = {}
    for t in trials:
        history = t.system_attrs.get("retry_history")
        if history:
            retried_as[history[-1]] = t.number
    notes = {}
    for t in trials:
        parts = []
        if "cancelled" in t.user_attrs:
            parts.append(t.user_attrs["cancelled"])
        if t.system_attrs.get("failed_trial") is not None:
            parts.append(f"retry of trial {t.system_attrs['retry_history'][-1]}")
        if t.state == TrialState.FAIL and "cancelled" not in t.user_attrs:
            parts.append(t.user_attrs.get("fail_reason", "worker stopped (no heartbeat)"))
            if t.number in retried_as:
                parts.append(f"retried as trial {retried_as[t.number]}")
        if t.state == TrialState.PRUNED and t.intermediate_values:
            epoch = max(t.intermediate_values)
            parts.append(
                f"pruned after epoch {epoch} ({metric_name}={t.intermediate_values[epoch]:.4g})"
            )
        notes[t.number] = "; ".join(parts)
    return notes


class _StudyOutputs:
    """``best_params.json``, ``trials.csv`` and ``top_trials.md`` for the whole study (all
    workers' trials)."""

    def __init__(self, study: optuna.Study, optuna_cfg: OptunaConfig, url: str, study_dir: Path):
        self.study = study
        self.cfg = optuna_cfg
        self.url = url
        self.study_dir = study_dir

    def write(self) -> None:
        # Workers sharing a study directory each replace whole files; readers never see half of one.
        trials = sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number)
        best = _best_trial(trials, self.cfg.direction)
        names = list(self.cfg.search_space)
        notes = _trial_notes(trials, self.cfg.metric_name)
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerow(
            [
                "number",
                "state",
                "value",
                "duration_s",
                "seed",
                "selection_split",
                *[f"params_{n}" for n in names],
                "note",
            ]
        )
        for t in trials:
            duration = _duration_s(t)
            writer.writerow(
                [
                    t.number,
                    t.state.name,
                    "" if t.value is None else repr(t.value),
                    "" if duration is None else f"{duration:.3f}",
                    t.user_attrs.get("seed", ""),
                    t.user_attrs.get("selection_split", ""),
                    *[repr(t.params[n]) if n in t.params else "" for n in names],
                    notes[t.number],
                ]
            )
        atomic_write_bytes(self.study_dir / "trials.csv", rows.getvalue().encode())
        summary = {
            "study_name": self.study.study_name,
            "storage": _masked(self.url),
            "metric_name": self.cfg.metric_name,
            "direction": self.cfg.direction,
            "best_value": best.value if best else None,
            "best_params": dict(best.params) if best else {},
            # The same values by dotted run-config path, for the final runs' config.
            "best_overrides": (
                {SEARCH_ALIASES.get(n, n): v for n, v in best.params.items()} if best else {}
            ),
            "best_trial_number": best.number if best else None,
            "n_trials": self.cfg.n_trials,
            "n_complete": _count(trials, (TrialState.COMPLETE,)),
            "n_pruned": _count(trials, (TrialState.PRUNED,)),
            "n_failed": sum(_is_failure(t) for t in trials),
            "n_invalid_config": sum(_is_invalid(t) for t in trials),
            "selection_split": self.cfg.selection_label,
        }
        atomic_write_json(self.study_dir / "best_params.json", summary)
        atomic_write_bytes(self.study_dir / "top_trials.md",
                           _top_trials_markdown(trials, self.cfg).encode())


# --- progress ----------------------------------------------------------------------------


def _format_params(params: Mapping[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _log_progress(
    study: optuna.Study, trial: FrozenTrial, optuna_cfg: OptunaConfig, elapsed_s: float
) -> None:
    if "cancelled" in trial.user_attrs:
        logger.debug("trial #%d not run: %s", trial.number, CANCELLED_NOTE)
        return
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED_STATES]
    durations = [d for d in map(_duration_s, finished) if d is not None]
    remaining = max(0, optuna_cfg.n_trials - len(finished))
    # As if this worker ran the rest alone; with k busy workers divide by k.
    eta = _format_seconds(float(np.mean(durations)) * remaining) if durations else "?"
    if trial.state == TrialState.COMPLETE:
        outcome = f"{optuna_cfg.metric_name}={trial.value:.4g}"
    else:
        outcome = (
            f"{trial.state.name} ({_trial_notes([trial], optuna_cfg.metric_name)[trial.number]})"
        )
    best = _best_trial(trials, optuna_cfg.direction)
    best_text = f"{best.value:.4g} (#{best.number})" if best else "-"
    duration = _duration_s(trial)
    logger.info(
        "trial %d/%d (#%d) %s | %s | best %s | took %s | elapsed %s, ETA %s",
        len(finished),
        optuna_cfg.n_trials,
        trial.number,
        outcome,
        _format_params(trial.params),
        best_text,
        _format_seconds(duration or 0.0),
        _format_seconds(elapsed_s),
        eta,
    )


def _format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _top_trial_rows(
    trials: Sequence[FrozenTrial], optuna_cfg: OptunaConfig
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the best completed trials, best first (ties: lower number)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    sign = -1.0 if optuna_cfg.direction == "maximize" else 1.0
    top = sorted(complete, key=lambda t: (sign * t.value, t.number))[:TOP_TRIALS_SHOWN]
    names = list(optuna_cfg.search_space)
    header = ["rank", "trial", optuna_cfg.metric_name, "duration_s", *names]
    rows = [
        [
            str(rank),
            str(t.number),
            f"{t.value:.4g}",
            f"{_duration_s(t) or 0.0:.1f}",
            *[
                f"{t.params[n]:.4g}"
                if isinstance(t.params.get(n), float)
                else str(t.params.get(n, ""))
                for n in names
            ],
        ]
        for rank, t in enumerate(top, start=1)
    ]
    return header, rows


def _top_trials_table(trials: Sequence[FrozenTrial], optuna_cfg: OptunaConfig) -> str:
    """The best completed trials as a table (rich when installed, plain text otherwise)."""
    header, rows = _top_trial_rows(trials, optuna_cfg)
    n_complete = _count(trials, (TrialState.COMPLETE,))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows]
        )
    table = Table(title=f"top {len(rows)} of {n_complete} completed trials")
    for column in header:
        table.add_column(column, justify="right" if column != "trial" else "left")
    for row in rows:
        table.add_row(*row)
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(table)
    return console.file.getvalue().rstrip()


def _top_trials_markdown(trials: Sequence[FrozenTrial], optuna_cfg: OptunaConfig) -> str:
    """``top_trials.md``: the same table as the log's, with the study's trial counts."""
    header, rows = _top_trial_rows(trials, optuna_cfg)
    counts = ", ".join(
        f"{_count(trials, (state,))} {state.name.lower()}"
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    )
    lines = [
        f"# Top trials by {optuna_cfg.metric_name} ({optuna_cfg.direction})",
        "",
        f"n_trials = {optuna_cfg.n_trials}; in storage: {counts}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"
