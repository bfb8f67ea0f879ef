"""``python -m rankwise.main run=<run_id|path.yaml> results_dir=<dir> mode=trial|full [overrides]``

Validates the whole config before any heavy work (exit 2 naming the dotted key, nothing
written), then trains (one run per seed; an Optuna search first when ``mode=full`` and
``optuna.n_trials > 0``), evaluates and writes ``<results_dir>/<run_id>/``.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from rankwise.config.loader import Job, load_job
from rankwise.errors import RankwiseError
from rankwise.results import (atomic_write_json, read_json)

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
    resume = job.job.resume
    if resume is True and not has_ckpt:
        raise RankwiseError(f"resume=true but {run_dir} has no checkpoint to resume from")
    if resume in (True, "auto") and has_ckpt and status != "complete":
        log.info("resuming incomplete run in %s (status %s)", run_dir, status)
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    for entry in run_dir.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return False


def write_status(job: Job, status: str, extra: dict[str, Any] | None = None) -> None:
    path = job.run_dir / "metrics.json"
    data = read_json(path) if path.is_file() else {}
    data.update({"run_id": job.run.run_id, "method": job.run.method, "algorithm": job.run.algorithm,
                 "status": status, **(extra or {})})
    atomic_write_json(path, data)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    job: Job | None = None
    from rankwise import distributed

    reports = True  # False on torchrun's ranks > 0: rank 0 alone logs progress and writes files

    def writes_status() -> bool:
        return reports and job is not None and job.run_dir.is_dir()

    try:
        job = load_job(argv)  # exit 2 on any config error, before anything is written
        reports = distributed.init_from_env(job.job.device).is_main
        if not reports:
            logging.getLogger().setLevel(logging.WARNING)
        from rankwise.runner import execute

        summary = execute(job, prepare_run_dir)
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if writes_status() and exc.exit_code != 2:
            from rankwise.training.loop import RunInterrupted

            write_status(job, "interrupted" if isinstance(exc, RunInterrupted) else "failed",
                         {"error": str(exc)})
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        if writes_status():
            write_status(job, "interrupted", {"error": "KeyboardInterrupt"})
        return 130
    except Exception as exc:
        if writes_status():
            write_status(job, "failed", {"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        distributed.shutdown()
    if reports:
        print(f"run {job.run.run_id} complete: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
