"""A search worker process for tests/test_search.py: ``python search_worker.py '<json spec>'``.

Runs ``run_search`` on a tiny full-fine-tuning run config with a toy objective (no training).
Spec keys: run_id, storage, study_dir, n_trials, heartbeat_interval, grace_period,
trial_seconds (sleep per trial), record (file: one "<pid> <trial number>" line per trial the
objective ran), and optionally hang_on_trial (sleep forever in that trial after touching
``<record>.hanging``) and ready/go (touch ``ready`` once imported, then wait for ``go`` so
that several workers start their search together) and partner_record (a file the other
worker writes when its first trial starts: this worker's first trial waits for it, so that
under load one worker cannot run every trial before the other has opened the study).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


def toy_run_config(run_id: str, optuna_block: dict) -> dict:
    return {
        "run_id": run_id,
        "method": "baseline",
        "dataset": {"name": "glue", "subset": "rte"},
        "training": {"seed": 7},
        "optuna": {
            "search_space": {
                "learning_rate": {"type": "loguniform", "low": "1e-5", "high": "1e-2"},
                "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},
            },
            **optuna_block,
        },
    }


def toy_metric(trial_cfg: dict) -> float:
    """A smooth function of the trial's config, best at learning_rate = 1e-3, weight_decay = 0."""
    training = trial_cfg["training"]
    return 1.0 - (math.log10(training["learning_rate"]) + 3.0) ** 2 / 10 - training["weight_decay"]


def wait_for_file(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.02)


def main(spec: dict) -> None:
    from rankwise.config.schema import parse_run_config
    from rankwise.search import run_search

    cfg = toy_run_config(
        spec["run_id"],
        {
            "n_trials": spec["n_trials"],
            "storage": spec["storage"],
            "heartbeat_interval": spec["heartbeat_interval"],
            "grace_period": spec["grace_period"],
        },
    )
    record = Path(spec["record"])
    if spec.get("ready"):
        Path(spec["ready"]).touch()
        while not Path(spec["go"]).exists():
            time.sleep(0.02)

    trials_run = []

    def objective(trial_cfg: dict, reporter) -> float:
        with record.open("a") as f:
            f.write(f"{os.getpid()} {reporter.trial_number}\n")
        trials_run.append(reporter.trial_number)
        if spec.get("partner_record") and len(trials_run) == 1:
            wait_for_file(Path(spec["partner_record"]), timeout_s=60.0)
        if reporter.trial_number == spec.get("hang_on_trial"):
            Path(f"{record}.hanging").touch()
            time.sleep(3600)
        time.sleep(spec["trial_seconds"])
        value = toy_metric(trial_cfg)
        reporter.report(value, 1)
        return value

    run_search(
        spec["run_id"],
        cfg,
        parse_run_config(cfg).optuna,
        seed=7,
        study_dir=Path(spec["study_dir"]),
        objective=objective,
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
