"""What a search leaves behind and logs: study files, a line per trial, the top trials.

Outputs in ``study_dir`` (rewritten after every trial and at the end, atomically, so workers
sharing the directory each replace whole files and readers never see half of one):
``best_params.json`` (best value, parameters, overrides by dotted path, trial number),
``trials.csv`` (number, state, value, duration_s, seed, selection_split, params_<name>...,
note; ``selection_split`` is the data that scored the trial: ``train_holdout_<fraction>``, a
held-out slice of the training split, or ``validation``; the value keeps the metric's name,
e.g. ``validation_accuracy``, whichever split measured it) and
``top_trials.md`` (the best completed trials, as in the table logged at the end). A line is
logged as each trial starts and as it ends (n/N finished, value, best so far, ETA). All of it
covers the whole study (every worker's trials), read from storage.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from rankwise.config.schema import OptunaConfig
from rankwise.config.search_aliases import SEARCH_ALIASES
from rankwise.results import atomic_write_bytes, atomic_write_json
from rankwise.search.storage import _masked
from rankwise.search.trials import (
    CANCELLED_NOTE,
    FINISHED_STATES,
    _best_trial,
    _count,
    _duration_s,
    _is_failure,
    _is_invalid,
    _trial_notes,
)

# Every module of the package logs as ``rankwise.search``, so log lines keep the name they
# had when the search was one module.
logger = logging.getLogger("rankwise.search")

TOP_TRIALS_SHOWN = 5


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


def _log_top_trials(
    run_id: str, trials: Sequence[FrozenTrial], optuna_cfg: OptunaConfig
) -> None:
    """The table of the best completed trials, logged when a worker's search ends."""
    logger.info(
        "search %s: top trials by %s\n%s",
        run_id,
        optuna_cfg.metric_name,
        _top_trials_table(trials, optuna_cfg),
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
