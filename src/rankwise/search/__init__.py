"""Hyper-parameter search on Optuna, driven by the run config's ``optuna`` block.

The training code supplies ``objective(trial_cfg_dict, reporter) -> float``: it trains one
trial from a plain run-config dict and returns the final ``optuna.metric_name``, calling
``reporter.report(value, epoch)`` after each evaluation. Everything about the study lives in
this package, one module per job:

- :mod:`~rankwise.search.space`: search space → Optuna distributions, a trial's run config,
  and the checks of the ``optuna`` block against the run before the first trial.
- :mod:`~rankwise.search.storage`: the study's storage (SQLite or PostgreSQL, heartbeats and
  retries of dead workers' trials) and the refusal to resume a study started for another
  question.
- :mod:`~rankwise.search.study`: :func:`run_search`, the sampler and pruner, exactly
  ``n_trials`` over several workers, and the failed trials that stop a search.
- :mod:`~rankwise.search.trials`: counts, failures, the best trial and notes, read from the
  trials in storage.
- :mod:`~rankwise.search.report`: the files a search leaves in ``study_dir``
  (``best_params.json``, ``trials.csv``, ``top_trials.md``) and the lines it logs.

Dependencies run one way: ``space``, ``trials`` and ``storage`` import none of the others,
``report`` reads ``trials`` and ``storage``, ``study`` uses them all. Every module logs as
``rankwise.search``.

Several workers. Start the same command in several processes (or on several machines) with
the same ``run_id`` and storage URL (:mod:`~rankwise.search.storage` says which database
suits which). The runner (:mod:`rankwise.runner`) supplies the objective and trains the final
configuration. Watch a study live with::

    optuna-dashboard sqlite:///<results>/<run_id>/optuna/study.db
"""

from rankwise.search.space import (
    CATEGORICAL_CHOICE_TYPES,
    apply_params,
    suggest_params,
    validate_search_space,
)
from rankwise.search.storage import (  # noqa: F401  (private names the tests check directly)
    MAX_RETRIES_OF_DEAD_TRIAL,
    STORAGE_OPEN_ATTEMPTS,
    _check_study_matches,
)
from rankwise.search.study import (  # noqa: F401  (private names the tests check directly)
    INVALID_TRIALS_PER_TRIAL,
    SearchAborted,
    SearchResult,
    TrialReporter,
    _holds_a_slot,
    build_pruner,
    run_search,
)
from rankwise.search.trials import CANCELLED_NOTE, FINISHED_STATES

__all__ = [
    "CANCELLED_NOTE",
    "CATEGORICAL_CHOICE_TYPES",
    "FINISHED_STATES",
    "INVALID_TRIALS_PER_TRIAL",
    "MAX_RETRIES_OF_DEAD_TRIAL",
    "STORAGE_OPEN_ATTEMPTS",
    "SearchAborted",
    "SearchResult",
    "TrialReporter",
    "apply_params",
    "build_pruner",
    "run_search",
    "suggest_params",
    "validate_search_space",
]
