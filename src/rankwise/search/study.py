"""The study: sampler, pruner, exactly ``n_trials`` over several workers, failed trials.

Sampler. TPE (Bergstra et al., 2011) with ``constant_liar`` (running trials count as bad, so
parallel workers spread out). Each trial samples from a TPESampler seeded with
``SeedSequence([seed, trial.number])`` rather than from one sampler seeded once per process:
a restarted process, or a second worker, would otherwise replay the first trials' random
start-up draws and train the same parameters twice. In one worker the sequence of suggestions
is a function of the seed and the study's history alone. TPE's start-up trials (the first
``STARTUP_TRIALS``) take the points of one scrambled Sobol sequence seeded by the search seed
instead of independent uniform draws (:mod:`rankwise.search.start`): a search of 4 trials
covers each parameter's range in quarters, and every arm of an experiment searched with the
same seed gets the same points. A trial with a positive constraint (``budget_violations``,
``capacity_gap`` for gated spectral methods, ``regulariser_gap`` for methods with a regulariser;
see :func:`rankwise.runner.trial_value`) is infeasible to TPE, and the best trial is the best
feasible one.

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

Residual races (none changes the number of finished trials): a worker stalled longer than
``grace_period`` (suspended VM, swap storm) is declared dead; its trial is retried and the
stalled worker's own result is discarded with a warning. Two workers starting the last slot
together make one of them record a ``cancelled`` trial. A retry still queued when the study
reaches ``n_trials`` stays WAITING in storage (the dashboard shows it; it never runs).

:func:`run_search` puts the pieces together: :func:`_open_study` (storage, sampler, pruner,
the resume check), a :class:`_TrialObjective` that ``study.optimize`` calls for one trial, a
:class:`_Worker` that starts trials while slots are free, and :func:`_search_result`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from rankwise.config.schema import OptunaConfig
from rankwise.errors import ConfigError, NonFiniteLossError, RankwiseError
from rankwise.search.report import _format_params, _log_progress, _log_top_trials, _StudyOutputs
from rankwise.search.space import apply_params, suggest_params, validate_search_space
from rankwise.search.start import StratifiedStart
from rankwise.search.storage import _check_study_matches, _masked, _open_storage, _optuna_quiet
from rankwise.search.trials import (
    CANCELLED_NOTE,
    FINISHED_STATES,
    _best_trial,
    _count,
    _is_failure,
    _is_invalid,
)

# Every module of the package logs as ``rankwise.search``, so log lines keep the name they
# had when the search was one module.
logger = logging.getLogger("rankwise.search")


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
    best_user_attrs: dict[str, Any] = field(default_factory=dict)  # what the best trial recorded

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

    def set_constraint(self, key: str, value: float) -> None:
        """A constraint of the trial: feasible at ≤ 0 (TPE and the best trial honour it)."""
        self._trial.set_constraint(key, value)

    def report(self, value: float, epoch: int) -> None:
        """Record ``metric_name = value`` after ``epoch`` completed epochs (1, 2, ...)."""
        if epoch < 1:
            # The pruner warm-up is defined on completed epochs; a 0-based count would shift it.
            raise ValueError(f"epoch counts completed epochs and starts at 1, got {epoch}")
        self._trial.report(float(value), epoch)
        if self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} ({self.metric_name}={value:.4g})")


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
    max_trials: int | None = None,
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
    ``max_trials``: this process runs at most that many trials and never waits for other
    workers' running trials (the grid's search cells; 0 reads the study as it is).
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
        study = _open_study(run_id, url, optuna_cfg, sampler_seed)
        trial_objective = _TrialObjective(
            study, run_cfg_dict, optuna_cfg, seed, sampler_seed, objective
        )
        worker = _Worker(
            run_id,
            study,
            optuna_cfg,
            _StudyOutputs(study, optuna_cfg, url, study_dir),
            t_start,
            max_trials=max_trials,
        )
        timed_out = worker.run(trial_objective, catch, max_failed, study_dir)
        trials = study.get_trials(deepcopy=False)
    return _search_result(run_id, trials, optuna_cfg, url, t_start, timed_out)


def _open_study(
    run_id: str, url: str, optuna_cfg: OptunaConfig, sampler_seed: int
) -> optuna.Study:
    """Create the study or load it from ``url``, refuse another question's, log how far it is."""
    study = optuna.create_study(
        study_name=run_id,
        storage=_open_storage(url, optuna_cfg),
        sampler=_sampler_for_trial(sampler_seed, 0),
        pruner=build_pruner(optuna_cfg),
        direction=optuna_cfg.direction,
        load_if_exists=True,
    )
    _check_study_matches(study, optuna_cfg)
    done = _count(study.get_trials(deepcopy=False), FINISHED_STATES)
    logger.info(
        "search %s: %d/%d trials finished in %s; %s",
        run_id,
        done,
        optuna_cfg.n_trials,
        _masked(url),
        "nothing to do" if done >= optuna_cfg.n_trials else "running",
    )
    return study


@dataclass
class _TrialObjective:
    """What ``study.optimize`` calls for one trial: claim a slot, sample, train, say why it failed.

    A trial whose slot other workers' trials hold ends as ``cancelled`` before it samples
    anything (see module docstring); every other trial samples from its own seeded sampler,
    trains with ``training.seed = seed`` and records ``fail_reason`` when it fails.
    """

    study: optuna.Study
    run_cfg_dict: dict
    cfg: OptunaConfig
    seed: int
    sampler_seed: int
    objective: Callable[[dict, TrialReporter], float]

    def __call__(self, trial: optuna.Trial) -> float:
        n_trials = self.cfg.n_trials
        if not _holds_a_slot(self.study, trial.number, n_trials):
            trial.set_user_attr("cancelled", CANCELLED_NOTE)
            raise _NoSlotLeft(CANCELLED_NOTE)
        self.study.sampler = _sampler_for_trial(self.sampler_seed, trial.number)
        params = suggest_params(trial, self.cfg.search_space)
        logger.info(
            "trial #%d started (%d/%d finished so far): %s",
            trial.number,
            _count(self.study.get_trials(deepcopy=False), FINISHED_STATES),
            n_trials,
            _format_params(params),
        )
        trial.set_user_attr("seed", self.seed)
        trial.set_user_attr("selection_split", self.cfg.selection_label)
        trial_cfg = apply_params(self.run_cfg_dict, params)
        trial_cfg.setdefault("training", {})["seed"] = self.seed
        value = self._train(trial, trial_cfg)
        if value is None or not math.isfinite(value):
            trial.set_user_attr("fail_reason", f"objective returned {value!r}")
        return value

    def _train(self, trial: optuna.Trial, trial_cfg: dict) -> float:
        """The objective's value; a failure records ``fail_reason`` (and an invalid run key)."""
        try:
            return self.objective(trial_cfg, TrialReporter(trial, self.cfg.metric_name))
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


@dataclass
class _Worker:
    """This process's share of the study: start trials while ``n_trials`` has free slots.

    Each pass fails stale trials (dead workers' heartbeats), stops when ``n_trials`` trials
    finished, when failures pass the limits (:func:`_check_failures`) or at ``timeout_s``, and
    otherwise waits while running trials hold the remaining slots or runs one trial. The study
    files are rewritten after every trial and when the loop ends, however it ends.
    """

    run_id: str
    study: optuna.Study
    cfg: OptunaConfig
    outputs: _StudyOutputs
    t_start: float
    max_trials: int | None = None  # this process's share (None: until the study is done)
    waiting_logged: bool = False
    ran: int = 0

    def run(
        self,
        trial_objective: _TrialObjective,
        catch: tuple[type[Exception], ...],
        max_failed: int,
        study_dir: Path,
    ) -> bool:
        """Run trials until the study has ``n_trials`` finished; True when ``timeout_s`` ended it."""
        n_trials = self.cfg.n_trials
        poll_s = min(1.0, float(self.cfg.heartbeat_interval))
        t_loop = time.perf_counter()  # timeout_s counts from here, as Optuna's own timeout does
        try:
            while True:
                optuna.storages.fail_stale_trials(self.study)
                trials = self.study.get_trials(deepcopy=False)
                finished = _count(trials, FINISHED_STATES)
                if finished >= n_trials:
                    return False
                _check_failures(self.run_id, trials, finished, max_failed, n_trials, study_dir)
                if self._timeout_reached(time.perf_counter() - t_loop, finished):
                    return True
                if self.max_trials is not None and self.ran >= self.max_trials:
                    return False
                if finished + _count(trials, (TrialState.RUNNING,)) >= n_trials:
                    if self.max_trials is not None:  # the other cells hold the slots left
                        return False
                    # The remaining slots are held by running trials (other workers', or a dead
                    # one not yet past its grace period): wait; a failure frees its slot.
                    self._log_waiting_once()
                    time.sleep(poll_s)
                    continue
                self.waiting_logged = False
                self.ran += 1
                self._run_one_trial(trial_objective, catch)
        finally:
            self.outputs.write()

    def _timeout_reached(self, elapsed: float, finished: int) -> bool:
        if self.cfg.timeout_s is not None and elapsed >= self.cfg.timeout_s:
            logger.warning(
                "search %s: timeout_s=%g reached with %d/%d trials finished",
                self.run_id,
                self.cfg.timeout_s,
                finished,
                self.cfg.n_trials,
            )
            return True
        return False

    def _log_waiting_once(self) -> None:
        if not self.waiting_logged:
            logger.info("search %s: waiting for running trials of other workers", self.run_id)
            self.waiting_logged = True

    def _run_one_trial(
        self, trial_objective: _TrialObjective, catch: tuple[type[Exception], ...]
    ) -> None:
        try:
            self.study.optimize(
                trial_objective,
                n_trials=1,
                catch=(*catch, _NoSlotLeft, _InvalidTrialConfig),
                callbacks=[self._after_trial],
            )
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            logger.warning(
                "search %s: a trial of this worker was declared dead (no "
                "heartbeat for grace_period) and retried; its result is "
                "discarded (%s)",
                self.run_id,
                exc,
            )

    def _after_trial(self, _: optuna.Study, trial: FrozenTrial) -> None:
        self.outputs.write()
        _log_progress(self.study, trial, self.cfg, time.perf_counter() - self.t_start)


def _search_result(
    run_id: str,
    trials: Sequence[FrozenTrial],
    optuna_cfg: OptunaConfig,
    url: str,
    t_start: float,
    timed_out: bool,
) -> SearchResult:
    """Log the top trials and count the study's trials (all workers') into a SearchResult."""
    best = _best_trial(trials, optuna_cfg.direction)
    _log_top_trials(run_id, trials, optuna_cfg)
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
        best_user_attrs=dict(best.user_attrs) if best else {},
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


def _sampler_for_trial(seed: int, trial_number: int) -> optuna.samplers.BaseSampler:
    trial_seed = int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])
    tpe = optuna.samplers.TPESampler(seed=trial_seed, constant_liar=True)
    return StratifiedStart(tpe, seed, trial_number)

