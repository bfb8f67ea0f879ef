"""The comparisons a grid ends in: ``rankwise.evaluate`` per task as soon as the task's cells
are done (``<results_dir>/comparison/<task>/``, a first look), then once over every run
(``<results_dir>/comparison/``: the methods × tasks table), which is the experiment's one Holm
family; then each task again with ``holm_family=`` that comparison, so every output of the
experiment carries the same adjusted p-values and family size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# The comparison command; a list so that a different evaluator can stand in (tests use a stub).
# The default one runs forked from the grid's preloaded server (no imports to pay).
EVALUATE_MODULE = "rankwise.evaluate"
EVALUATE_COMMAND = [sys.executable, "-m", EVALUATE_MODULE]


def evaluate_command(results_dir: Path, run_ids: list[str], out_dir: Path, trial: bool,
                     family: Path | None = None) -> list[str]:
    cmd = [*EVALUATE_COMMAND, f"results_dir={results_dir}", f"run_ids={json.dumps(run_ids)}",
           f"out_dir={out_dir}"]
    return cmd + (["allow_trial=true"] if trial else []) + (
        [f"holm_family={family}"] if family is not None else [])


def up_to_date(out_dir: Path, results_dir: Path, run_ids: list[str], family: Path | None = None) -> bool:
    """Whether ``out_dir`` already compares exactly these runs in this Holm family, newer than
    each run's metrics and than the family's comparison."""
    report = out_dir / "aggregated_metrics.json"
    try:
        data = json.loads(report.read_text())
        inputs = [results_dir / r / "metrics.json" for r in run_ids] + ([family] if family else [])
        newest = max(p.stat().st_mtime for p in inputs)
        # a first look (no family) is satisfied by an output already adjusted in the family
        same_family = family is None or data.get("holm_family") == str(family)
        return data.get("run_ids") == run_ids and same_family and report.stat().st_mtime >= newest
    except (OSError, ValueError, AttributeError):
        return False


def copy_comparison(source: Path, target: Path) -> None:
    """``target`` holds what ``source`` holds (its files, not its folders): a comparison of the
    same runs in the same family, written once."""
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in source.iterdir() if p.is_file()}
    for old in target.iterdir():
        if old.is_file() and old.name not in names:
            old.unlink()
    for name in sorted(names - {"aggregated_metrics.json"}) + ["aggregated_metrics.json"]:  # the report last
        shutil.copyfile(source / name, target / f".{name}.tmp")
        (target / f".{name}.tmp").replace(target / name)


class Comparison:
    """One evaluate call, run in the background under ``grid/locks/comparison-<name>.lock`` (two
    grids on one folder never write one comparison at once)."""

    def __init__(self, name: str, results_dir: Path, run_ids: list[str], out_dir: Path, trial: bool,
                 grid_dir: Path, family: Path | None = None):
        self.name, self.results_dir, self.run_ids, self.out_dir = name, results_dir, run_ids, out_dir
        self.family = family
        self.command = evaluate_command(results_dir, run_ids, out_dir, trial, family)
        self.log = grid_dir / "logs" / f"comparison-{name}.log"
        self.lock_path = grid_dir / "locks" / f"comparison-{name}.lock"
        self.proc = None  # the started call: subprocess.Popen or PreloadedModule (both poll())
        self.lock = None
        self.result: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        return {"run_ids": self.run_ids, "out_dir": str(self.out_dir), "command": self.command,
                "log": str(self.log), **(self.result or {"status": "running" if self.proc else "waiting"})}

    def poll(self) -> bool:
        """Start it when its lock is free, collect it when it ends; True once finished."""
        if self.result is not None:
            return True
        if self.proc is None:
            return self._start()
        rc = self.proc.poll()
        if rc is None:
            return False
        self._finish(rc)
        return True

    def _start(self) -> bool:
        from filelock import FileLock, Timeout

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.lock_path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return False
        if up_to_date(self.out_dir, self.results_dir, self.run_ids, self.family):
            lock.release()
            self.result = {"status": "complete", "note": "already up to date"}
            return True
        self.lock = lock
        self.log.parent.mkdir(parents=True, exist_ok=True)
        if self.command[:3] == [sys.executable, "-m", EVALUATE_MODULE]:
            from rankwise.grid.worker import PreloadedModule

            self.proc = PreloadedModule(EVALUATE_MODULE, self.command[3:], self.log)
        else:
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        return False

    def _finish(self, rc: int) -> None:
        from rankwise.grid.worker import last_line

        self.lock.release()
        self.lock = None
        if rc == 0:
            self.result = {"status": "complete", "exit_code": 0}
        else:
            self.result = {"status": "failed", "exit_code": rc, "error": last_line(self.log) or f"exit code {rc}"}

    def wait(self, poll_s: float = 0.5) -> dict[str, Any]:
        import time

        while not self.poll():
            time.sleep(poll_s)
        return self.record()
