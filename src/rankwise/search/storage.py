"""The study's storage: opening it, resuming only the same question, quieting Optuna.

Study. Name = ``run_id``; storage = ``optuna.storage`` or ``sqlite:///<study_dir>/study.db``
(``study_dir`` is ``<results>/<run_id>/optuna``); ``load_if_exists=True``, so re-running the
same command resumes the study. The search space, metric and direction are stored with the
study; resuming with a different one is refused (ConfigError) instead of mixing trials that
answer different questions (:func:`_check_study_matches`). ``optuna.n_trials`` may be raised
to extend a finished study.

Crash-resume. The storage is an RDBStorage with ``heartbeat_interval`` / ``grace_period``: a
running trial writes a heartbeat; one whose process died (SIGKILL, preemption, host OOM)
stops, and the next worker that looks (``fail_stale_trials``) marks it FAIL and queues a
retry with the same parameters (``RetryHeartbeatStaleTrialCallback(max_retry=1)``: a trial
whose process dies twice is left FAIL rather than retried forever). Restarting the command
therefore finishes the study with exactly ``n_trials`` COMPLETE/PRUNED trials.

Several workers share one storage URL. SQLite suits workers on one machine with a local disk
(writers wait up to 60 s for its lock); use PostgreSQL across machines::

    optuna:
      storage: postgresql+psycopg2://user:pw@host/db

SQLAlchemy imports psycopg2 only for such a URL (``pip install rankwise[postgres]``).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna

from rankwise.config.schema import OptunaConfig
from rankwise.config.typed import to_plain
from rankwise.errors import ConfigError

# A trial whose worker process dies twice is not retried again (see module docstring).
MAX_RETRIES_OF_DEAD_TRIAL = 1
STORAGE_OPEN_ATTEMPTS = 5


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
