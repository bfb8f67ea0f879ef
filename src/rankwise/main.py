"""``python -m rankwise.main run=<run_id|path.yaml> results_dir=<dir> mode=trial|full [overrides]``

Validates the whole config before any heavy work (exit 2 naming the dotted key, nothing
written), the same in ``mode=trial`` as in ``mode=full`` (search space, storage URL and W&B
included: :func:`preflight`), then trains (one run per seed; an Optuna search first when ``mode=full`` and
``optuna.n_trials > 0``), evaluates and writes ``<results_dir>/<run_id>/``.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from rankwise.cli_help import CommandHelp, answer_flags, flag_name, key_argument
from rankwise.config.loader import Job, load_job
from rankwise.errors import ConfigError, RankwiseError
from rankwise.results import atomic_write_json, empty_folder, read_json

log = logging.getLogger("rankwise")


def setup_logging() -> None:
    import warnings

    # peft asks transformers a deprecated question on every wrap; not actionable here
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("datasets", "transformers", "peft", "urllib3", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_status(run_dir: Path) -> str | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        return read_json(path).get("status")
    except (OSError, ValueError):
        return "corrupt"


def prepare_run_dir(job: Job, keep: tuple[str, ...] = ()) -> bool:
    """Create the run folder; return whether to resume from its checkpoints.

    ``resume=auto`` continues a folder whose run did not complete and has a checkpoint;
    ``resume=true`` requires one; ``resume=false`` (or a complete run) starts over. Entries
    named in ``keep`` (a search's ``optuna/``) survive a start-over.
    """
    from rankwise.training.checkpoint import list_checkpoints

    run_dir = job.run_dir
    status = run_status(run_dir)
    has_ckpt = any(list_checkpoints(p / "checkpoints") for p in run_dir.glob("seed*")) if run_dir.exists() else False
    resume = job.command.resume
    if resume is True and not has_ckpt:
        raise RankwiseError(f"resume=true but {run_dir} has no checkpoint to resume from")
    if resume in (True, "auto") and has_ckpt and status != "complete":
        log.info("resuming incomplete run in %s (status %s)", run_dir, status)
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    empty_folder(run_dir, keep)
    return False


def write_status(job: Job, status: str, extra: dict[str, Any] | None = None) -> None:
    path = job.run_dir / "metrics.json"
    data = read_json(path) if path.is_file() else {}
    data.update({"run_id": job.run.run_id, "method": job.run.method, "algorithm": job.run.algorithm,
                 "status": status, **(extra or {})})
    atomic_write_json(path, data)


def preflight(job: Job) -> None:
    """Everything ``mode=full`` checks before its first step, checked in every mode on the full
    run's config before trial mode trims anything: the search (space, torchrun, storage URL),
    the W&B package. Raises ConfigError (exit 2)."""
    from rankwise.errors import ConfigError

    optuna_cfg = job.as_configured.optuna
    if optuna_cfg.n_trials > 0:
        from rankwise.runner import check_search_is_runnable

        check_search_is_runnable(job)
        if optuna_cfg.storage:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                make_url(optuna_cfg.storage)
            except ArgumentError as exc:
                raise ConfigError("optuna.storage", f"not an SQLAlchemy database URL: {exc}") from None
    if job.command.wandb.mode != "disabled":
        from rankwise.tracking import require_wandb

        require_wandb(job.command.wandb.mode)


def remove_unstarted_run_dir(job: Job | None, made: bool) -> bool:
    """Remove the run folder this process made if training had not started; return whether it did."""
    if job is None or not made or job.training_started or not job.run_dir.exists():
        return False
    shutil.rmtree(job.run_dir, ignore_errors=True)
    return True


# --- the command's flags: --help, --list, --cfg job ------------------------------------------------

RUN_FLAGS = ("--list", "--cfg")


def run_help() -> CommandHelp:
    """``rankwise run --help``: the job keys (defaults and meanings from the schema), the flags."""
    from rankwise.config.loader import JobConfig
    from rankwise.config.reference import sections

    job_keys = [key_argument(row) for section in sections(JobConfig, "") for row in section.rows]
    return CommandHelp(
        command="rankwise run",
        usage=("run=<id|path.yaml> [results_dir=DIR] [mode=trial|full] [key.path=VALUE ...]",
               "--list [FILTER] [runs_dir=DIR]",
               "run=<id|path.yaml> [key.path=VALUE ...] --cfg job"),
        summary="Train and evaluate one run config (every seed) into <results_dir>/<run_id>/; the "
                "whole config is validated first (exit 2 naming the key, nothing written). "
                "python -m rankwise.main takes the same arguments.",
        arguments=(*job_keys,
                   ("key.path=VALUE", ("any run-config key, in Hydra's override grammar "
                                      "(training.epochs=1, 'training.seeds=[1,2,3]'); every key "
                                      "is in docs/config.md")),
                   ("--list [FILTER]", ("list the packaged and runs_dir run configs (run id, "
                                       "algorithm, task, model, role), those matching FILTER")),
                   ("--cfg job", ("print the config the run would use (defaults, file, overrides, "
                                 "mode resolved) as YAML, write nothing"))),
        examples=("rankwise run run=minilm-sst2-lora mode=trial",
                  "rankwise run run=minilm-sst2-lora results_dir=R 'training.seeds=[1,2,3]'",
                  "rankwise run --list tabs",
                  "rankwise run run=minilm-sst2-lora mode=trial training.epochs=1 --cfg job"),
        more="docs/usage.md (runs, modes, overrides), docs/config.md (every key), "
             "docs/outputs.md (what a run writes)",
    )


def flag_value(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """(the value given to ``flag`` as ``flag=V`` or ``flag V``, the other arguments); the value is
    None when the flag has none (``--list`` alone)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == flag and i + 1 < len(argv) and "=" not in argv[i + 1] and not argv[i + 1].startswith("-"):
            value, i = argv[i + 1], i + 2
            continue
        if arg == flag or arg.startswith(f"{flag}="):
            value = arg.partition("=")[2] or None
        else:
            rest.append(arg)
        i += 1
    return value, rest


def list_runs(argv: list[str]) -> int:
    """``--list [FILTER] [runs_dir=DIR]``: the run configs as a table."""
    from rankwise.config.catalog import run_entries, table
    from rankwise.config.loader import JobConfig, parse_overrides

    pattern, rest = flag_value(argv, "--list")
    runs_dir = JobConfig.runs_dir
    for key, value, _ in parse_overrides(rest):
        if key != "runs_dir":
            raise ConfigError(key, "--list takes [FILTER] and runs_dir=DIR only")
        runs_dir = str(value)
    entries = run_entries(runs_dir, pattern)
    print(table(entries))
    print(f"{len(entries)} run config(s)" + (f" matching {pattern!r}" if pattern else ""))
    return 0


def show_config(argv: list[str]) -> int:
    """``--cfg job``: the run config a run would use, as YAML; the same checks, nothing written."""
    import yaml

    from rankwise.config.typed import to_plain

    which, rest = flag_value(argv, "--cfg")
    if which != "job":
        raise ConfigError("--cfg", f"takes 'job' (the config a run uses), got {which!r}")
    job = load_job(rest)
    preflight(job)
    c, limits = job.command, job.limits
    print(f"# rankwise run {' '.join(rest)}\n# job keys: runs_dir={c.runs_dir} "
          f"results_dir={c.results_dir} mode={c.mode} resume={c.resume} device={c.device} "
          f"wandb.mode={c.wandb.mode}")
    if c.mode == "trial":
        print(f"# mode=trial also caps: max_batches={limits.max_batches} "
              f"calibration_batches={limits.calibration_batches} max_seeds={limits.max_seeds}")
    print(yaml.safe_dump({**to_plain(job.run), **job.ignored_sections}, sort_keys=False), end="")
    return 0


def front_door(argv: list[str]) -> int | None:
    """Answer ``--help`` / ``-h``, ``--list`` and ``--cfg job`` (exit code), refuse any other flag
    with one line (2); None when ``argv`` asks for a run."""
    if not any(flag_name(a) for a in argv):
        return None
    if (answered := answer_flags(argv, run_help, takes=RUN_FLAGS)) is not None:
        return answered
    try:
        return list_runs(argv) if any(flag_name(a) == "--list" for a in argv) else show_config(argv)
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if (answered := front_door(argv)) is not None:  # --help, --list, --cfg job: nothing trains
        return answered
    setup_logging()
    job: Job | None = None
    from rankwise import distributed

    reports = True  # False on torchrun's ranks > 0: rank 0 alone logs progress and writes files
    made = False  # whether this process creates the run folder

    def writes_status() -> bool:
        # an earlier run's folder that this process has not started on is left as it was
        return (reports and job is not None and job.run_dir.is_dir()
                and (job.training_started or run_status(job.run_dir) == "running"))

    def cleaned_up() -> bool:
        return reports and remove_unstarted_run_dir(job, made)

    try:
        job = load_job(argv)  # exit 2 on any config error, before anything is written
        reports = distributed.init_from_env(job.command.device).is_main
        if not reports:
            logging.getLogger().setLevel(logging.WARNING)
        if job.ignored_sections and reports:
            log.warning("run config sections not used by rankwise, kept in metrics.json "
                        "(ignored_sections): %s", ", ".join(job.ignored_sections))
        preflight(job)
        # a process that runs one part of a run (a grid cell) shares the folder: never removes it
        c = job.command
        made = not job.run_dir.exists() and c.seed_only is None and c.max_trials is None and not c.merge_seeds
        from rankwise.runner import execute

        summary = execute(job, prepare_run_dir)
    except RankwiseError as exc:
        if cleaned_up():
            log.info("training had not started; removed %s", job.run_dir)
        elif writes_status() and exc.exit_code != 2:
            from rankwise.training.loop import RunInterrupted

            write_status(job, "interrupted" if isinstance(exc, RunInterrupted) else "failed",
                         {"error": str(exc)})
        print(f"error: {exc}", file=sys.stderr)  # the last line: one line naming the problem
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        if writes_status():
            write_status(job, "interrupted", {"error": "KeyboardInterrupt"})
        return 130
    except Exception as exc:
        if cleaned_up():
            log.info("training had not started; removed %s", job.run_dir)
        elif writes_status():
            write_status(job, "failed", {"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        distributed.shutdown()
    if reports:
        print(f"run {job.run.run_id} complete: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
