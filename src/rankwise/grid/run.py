"""The grid loop: submit cells to the launcher, collect results, retry failures, compare tasks.

A cell is skipped when its run folder holds a complete run of the same configuration and mode,
waits while another process holds its lock (another grid command runs it), and otherwise goes
to the launcher; ``rankwise.main`` resumes an incomplete run from its checkpoints (``resume=auto``).
A failed cell is re-submitted up to ``retries`` times, except for the failures a retry cannot
fix (exit 2 config, 3 data, 4 model load, 5 non-finite loss).
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from rankwise.grid.cells import Cell
from rankwise.grid.compare import Comparison
from rankwise.grid.launchers import run_env
from rankwise.grid.state import GridState
from rankwise.grid.worker import CellResult, CellSpec, folder_state

NO_RETRY_EXIT_CODES = (2, 3, 4, 5)
POLL_S = 0.5


def lock_held(path: Path) -> bool:
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def read_owner(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Grid:
    def __init__(self, cells: list[Cell], launcher, state: GridState, results_dir: Path, token: str,
                 retries: int, compare: bool, trial: bool):
        self.cells = {c.run_id: c for c in cells}
        self.launcher, self.state, self.results_dir, self.token = launcher, state, results_dir, token
        self.retries, self.compare, self.trial = retries, compare, trial
        self.grid_dir = results_dir / "grid"
        self.pending: deque[str] = deque()
        self.inflight: dict[str, tuple[Any, CellSpec]] = {}
        self.waiting: set[str] = set()
        self.tries: Counter[str] = Counter()
        self.final: dict[str, str] = {}
        self.comparisons: dict[str, Comparison] = {}
        self.stopping = False
        gpus = getattr(getattr(launcher, "resources", None), "gpus_per_run", 0) or 0
        self.gpus = gpus
        self.env = {} if launcher.name == "local" else run_env(launcher.resources)

    # --- cells ------------------------------------------------------------------------------

    def lock_path(self, run_id: str) -> Path:
        return self.grid_dir / "locks" / f"{run_id}.lock"

    def owner_path(self, run_id: str) -> Path:
        return self.grid_dir / "locks" / f"{run_id}.owner.json"

    def scan(self) -> None:
        """Mark complete cells, queue the others."""
        for rid, cell in self.cells.items():
            self.state.set(rid, task=cell.task, role=cell.role, command=cell.shell_command(self.gpus),
                           tries=0, error=None, exit_code=None, note=None)
            if folder_state(self.results_dir / rid, cell.config, cell.mode) == "complete":
                self._finish(rid, "complete", note="already complete")
            else:
                self.state.set(rid, status="queued")
                self.pending.append(rid)

    def _finish(self, rid: str, status: str, **fields: Any) -> None:
        self.final[rid] = status
        self.state.set(rid, status=status, **fields)

    def spec(self, rid: str) -> CellSpec:
        cell, n = self.cells[rid], self.tries[rid]
        return CellSpec(rid, cell.command(gpus=self.gpus), str(self.results_dir / rid), str(self.lock_path(rid)),
                        str(self.owner_path(rid)), str(self.grid_dir / "logs" / rid / f"{self.token}-try{n}"),
                        cell.config, cell.mode, self.token, n, cell.user_resume, dict(self.env))

    def submit(self) -> None:
        batch: list[str] = []
        while self.pending and not self.stopping and len(self.inflight) + len(batch) < self.launcher.capacity:
            rid = self.pending.popleft()
            if lock_held(self.lock_path(rid)):
                self._wait_for_other(rid)
                continue
            cell = self.cells[rid]
            if folder_state(self.results_dir / rid, cell.config, cell.mode) == "complete":
                self._finish(rid, "complete", note="completed by another grid")
                continue
            self.tries[rid] += 1
            batch.append(rid)
        if not batch:
            return
        specs = [self.spec(rid) for rid in batch]
        for rid, spec, handle in zip(batch, specs, self.launcher.submit(specs)):
            self.inflight[rid] = (handle, spec)
            self.state.set(rid, status="queued", tries=self.tries[rid], job_id=self.launcher.job_id(handle))

    def _wait_for_other(self, rid: str) -> None:
        owner = read_owner(self.owner_path(rid))
        self.waiting.add(rid)
        where = f" (pid {owner.get('pid')} on {owner.get('host')})" if owner else ""
        self.state.set(rid, status="waiting", note=f"another grid runs it{where}")

    def recheck_waiting(self) -> None:
        for rid in sorted(self.waiting):
            if lock_held(self.lock_path(rid)):
                continue
            self.waiting.discard(rid)
            cell = self.cells[rid]
            if folder_state(self.results_dir / rid, cell.config, cell.mode) == "complete":
                self._finish(rid, "complete", note="completed by another grid")
            else:  # the other grid failed or stopped: this one takes it
                self.state.set(rid, status="queued", note=None)
                self.pending.appendleft(rid)

    def mark_running(self) -> None:
        """Cells whose worker has taken them: status running, and a running attempt written to
        grid.json at once, so a grid killed outright (SIGKILL) still leaves its attempt on record
        (the next grid marks it lost; ``GridState.save``)."""
        started = False
        for rid, (_, spec) in self.inflight.items():
            owner = read_owner(self.owner_path(rid))
            if owner.get("token") == self.token and owner.get("attempt") == spec.attempt \
                    and self.state.cells[rid].get("status") != "running":
                self.state.set(rid, status="running", started_at=owner.get("started_at"), host=owner.get("host"))
                self.state.add_attempt(rid, {"grid": self.token, "try": spec.attempt, "host": owner.get("host"),
                                             "pid": owner.get("pid"), "started_at": owner.get("started_at"),
                                             "ended_at": None, "status": "running"})
                started = True
        if started:
            self.state.save()

    def harvest(self) -> None:
        for rid, (handle, spec) in list(self.inflight.items()):
            if not handle.done():
                continue
            del self.inflight[rid]
            try:
                result = handle.result()
            except Exception as exc:  # noqa: BLE001  the launcher lost the job (worker killed, job failed)
                text = (str(exc).strip().splitlines() or [""])[-1]
                result = CellResult(rid, "failed", None, f"{type(exc).__name__}: {text}"[:500])
            self.collect(rid, spec, result)

    def collect(self, rid: str, spec: CellSpec, result: CellResult) -> None:
        if result.status == "busy":  # lost the race for the lock to another grid
            self.tries[rid] -= 1
            self._wait_for_other(rid)
            return
        if result.status == "skipped":
            self._finish(rid, "complete", note="completed by another grid")
            return
        duration = (result.ended_at - result.started_at) if result.started_at and result.ended_at else None
        self.state.add_attempt(rid, {"grid": self.token, "try": spec.attempt, "host": result.host,
                                     "pid": result.pid, "started_at": result.started_at,
                                     "ended_at": result.ended_at, "status": result.status,
                                     "exit_code": result.exit_code, "error": result.error, "log": result.log})
        fields = {"exit_code": result.exit_code, "error": result.error, "log": result.log, "duration_s": duration}
        if result.status == "complete":
            self._finish(rid, "complete", note=None, **fields)
        elif self.stopping:
            self._finish(rid, "interrupted", **fields, note="the grid was interrupted; re-run to resume")
        elif self.retryable(rid, result):
            self.state.set(rid, status="queued", **{**fields, "error": None},
                           note=f"retrying after: {result.error}")
            self.pending.append(rid)
        else:
            self._finish(rid, "failed", **fields)

    def retryable(self, rid: str, result: CellResult) -> bool:
        return (not self.stopping and self.tries[rid] <= self.retries
                and result.exit_code not in NO_RETRY_EXIT_CODES)

    # --- comparisons ------------------------------------------------------------------------

    def compare_finished_tasks(self) -> None:
        if not self.compare or self.stopping:
            return
        for task in dict.fromkeys(c.task for c in self.cells.values()):
            ids = [rid for rid, c in self.cells.items() if c.task == task]
            if task in self.comparisons or any(rid not in self.final for rid in ids):
                continue
            done = [rid for rid in ids if self.final[rid] == "complete"]
            if done:
                self.comparisons[task] = Comparison(task, self.results_dir, done,
                                                    self.results_dir / "comparison" / task, self.trial, self.grid_dir)
        for task, comp in self.comparisons.items():
            comp.poll()
            self.state.comparisons[task] = comp.record()

    def compare_all(self) -> Comparison | None:
        done = [rid for rid in self.cells if self.final.get(rid) == "complete"]
        if not self.compare or self.stopping or not done:
            return None
        for comp in self.comparisons.values():
            self.state.comparisons[comp.name] = comp.wait()
        comp = Comparison("all", self.results_dir, done, self.results_dir / "comparison", self.trial, self.grid_dir)
        self.state.comparisons["all"] = comp.wait()
        if comp.result.get("status") == "complete":
            self.compare_tasks_in_family(comp.out_dir / "aggregated_metrics.json")
        return comp

    def compare_tasks_in_family(self, family: Path) -> None:
        """Each task's comparison again, with the experiment-wide Holm family of ``family``."""
        for task, first in list(self.comparisons.items()):
            comp = Comparison(task, self.results_dir, first.run_ids, first.out_dir, self.trial,
                              self.grid_dir, family=family)
            self.comparisons[task] = comp
            self.state.comparisons[task] = comp.wait()

    # --- the loop ---------------------------------------------------------------------------

    def step(self) -> None:
        self.harvest()
        self.recheck_waiting()
        self.submit()
        self.mark_running()
        self.compare_finished_tasks()

    def busy(self) -> bool:
        return bool(self.pending or self.inflight or self.waiting)

    def run(self, progress) -> None:
        last_save = 0.0
        while self.busy() and not (self.stopping and not self.inflight):
            self.step()
            progress.refresh()
            if time.time() - last_save > 2.0:
                self.state.save()
                last_save = time.time()
            time.sleep(POLL_S)
        self.step()
        progress.refresh()
        self.state.save()

    def stop(self) -> None:
        """Stop submitting; running cells are asked to stop (they checkpoint and exit 130)."""
        self.stopping = True
        self.launcher.stop()
        for rid in list(self.pending) + sorted(self.waiting):
            self.state.set(rid, status="queued", note="not started: the grid was interrupted")
        self.pending.clear()
        self.waiting.clear()
