"""The grid loop: submit cells to the launcher, collect results, retry failures, compare tasks.

A run is cut into cells (:mod:`rankwise.grid.cells`): its search trials, its seeds, its merge.
A cell is skipped when its part of the run is done (a complete seed of the same configuration,
a finished study, a complete run), waits while another process holds its lock (another grid
command runs it), and otherwise goes to the launcher when it is ready: a seed after its run's
search, a merge after its seeds. A free worker takes merges first, then trials, then the
longest seed (:func:`rankwise.grid.plan.priority`). ``rankwise.main`` resumes an incomplete
seed from its checkpoints (``resume=auto``). A failed cell is re-submitted up to ``retries``
times, except for the failures a retry cannot fix (exit 2 config, 3 data, 4 model load, 5
non-finite loss); the cells that wait for it then fail with it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rankwise.grid.cells import Cell, Part, parts_of
from rankwise.grid.compare import Comparison, copy_comparison
from rankwise.grid.launchers import run_env
from rankwise.grid.plan import Estimator, is_ready, priority
from rankwise.grid.state import GridState
from rankwise.grid.worker import CellResult, CellSpec, folder_state, part_state, study_state
from rankwise.results import empty_folder

NO_RETRY_EXIT_CODES = (2, 3, 4, 5)
TRIAL_CELLS_PER_TRIAL = 3  # trial cells a search may take in all, per trial it needs
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
                 retries: int, compare: bool, trial: bool, estimator: Estimator | None = None):
        self.cells = {c.run_id: c for c in cells}  # the runs
        self.launcher, self.state, self.results_dir, self.token = launcher, state, results_dir, token
        self.retries, self.compare, self.trial = retries, compare, trial
        self.grid_dir = results_dir / "grid"
        self.parts: dict[str, Part] = {}  # cell id (<run_id>/<part>) -> its part, in grid order
        self.pending: list[str] = []
        self.inflight: dict[str, tuple[Any, CellSpec]] = {}
        self.waiting: set[str] = set()
        self.tries: Counter[str] = Counter()
        self.final: dict[str, str] = {}  # per cell
        self.run_final: dict[str, str] = {}  # per run: complete | failed
        self.comparisons: dict[str, Comparison] = {}
        self.stopping = False
        gpus = getattr(getattr(launcher, "resources", None), "gpus_per_run", 0) or 0
        self.gpus = gpus
        self.env = {} if launcher.name == "local" else run_env(launcher.resources)
        self.estimator = estimator or Estimator(self.cells, results_dir, past=state.past_durations())

    # --- cells ------------------------------------------------------------------------------

    def lock_path(self, cid: str) -> Path:
        return self.grid_dir / "locks" / f"{cid}.lock"

    def owner_path(self, cid: str) -> Path:
        return self.grid_dir / "locks" / f"{cid}.owner.json"

    def scan(self) -> None:
        """Cut every run into its cells; mark the done ones complete, queue the others."""
        for rid, cell in self.cells.items():
            run_dir = self.results_dir / rid
            state = folder_state(run_dir, cell.config, cell.mode)
            if state == "other" and not cell.user_resume:
                self.clear_run_folder(rid)  # another configuration's run: start over
            trials = 0
            if cell.n_trials > 0 and state != "complete":
                trials = max(0, cell.n_trials - study_state(run_dir)["finished"])
            for part in parts_of(cell, trials):
                self.add_part(part, done=state == "complete")
            if state == "complete":
                self.run_final[rid] = "complete"

    def clear_run_folder(self, rid: str) -> None:
        """Empty a run folder that holds another configuration's run (what ``resume=false``
        does), unless another grid holds one of the run's cells."""
        locks = self.grid_dir / "locks" / rid
        if locks.is_dir() and any(lock_held(p) for p in locks.glob("*.lock")):
            return
        empty_folder(self.results_dir / rid)

    def add_part(self, part: Part, done: bool = False) -> None:
        cid, cell = part.id, self.cells[part.run_id]
        self.parts[cid] = part
        self.state.set(cid, run_id=part.run_id, part=part.name, kind=part.kind, task=cell.task, role=cell.role,
                       command=cell.shell_command(self.gpus, part.args), tries=0, error=None,
                       exit_code=None, note=None)
        if done or part_state(self.spec(cid)) == "complete":
            self._finish(cid, "complete", note="already complete")
        else:
            self.state.set(cid, status="queued")
            self.pending.append(cid)

    def _finish(self, cid: str, status: str, **fields: Any) -> None:
        self.final[cid] = status
        self.state.set(cid, status=status, **fields)

    def spec(self, cid: str) -> CellSpec:
        part = self.parts[cid]
        cell, n = self.cells[part.run_id], self.tries[cid]
        return CellSpec(part.run_id, cell.command(gpus=self.gpus, part=part.args),
                        str(self.results_dir / part.run_id), str(self.lock_path(cid)), str(self.owner_path(cid)),
                        str(self.grid_dir / "logs" / part.run_id / f"{part.name}-{self.token}-try{n}"),
                        cell.config, cell.mode, self.token, n, cell.user_resume, dict(self.env),
                        kind=part.kind, index=part.index, n_trials=cell.n_trials)

    def run_parts(self, rid: str) -> list[Part]:
        return [p for p in self.parts.values() if p.run_id == rid]

    def ready(self) -> list[str]:
        """Pending cells whose dependencies are met, in the order free workers take them."""
        done = {cid for cid, status in self.final.items() if status == "complete"}
        parts = list(self.parts.values())
        ready = [cid for cid in self.pending if is_ready(self.parts[cid], parts, done)]
        return sorted(ready, key=lambda cid: priority(self.parts[cid], self.estimator.seconds(self.parts[cid])))

    def submit(self) -> None:
        if self.stopping or len(self.inflight) >= self.launcher.capacity:
            return  # no free worker: nothing to order (ready() reads the cells' progress files)
        batch: list[str] = []
        for cid in self.ready():
            if self.stopping or len(self.inflight) + len(batch) >= self.launcher.capacity:
                break
            self.pending.remove(cid)
            if lock_held(self.lock_path(cid)):
                self._wait_for_other(cid)
                continue
            if part_state(self.spec(cid)) == "complete":
                self._finish(cid, "complete", note="completed by another grid")
                continue
            self.tries[cid] += 1
            batch.append(cid)
        if not batch:
            return
        specs = [self.spec(cid) for cid in batch]
        for cid, spec, handle in zip(batch, specs, self.launcher.submit(specs)):
            self.inflight[cid] = (handle, spec)
            self.state.set(cid, status="queued", tries=self.tries[cid], job_id=self.launcher.job_id(handle))

    def _wait_for_other(self, cid: str) -> None:
        owner = read_owner(self.owner_path(cid))
        self.waiting.add(cid)
        where = f" (pid {owner.get('pid')} on {owner.get('host')})" if owner else ""
        self.state.set(cid, status="waiting", note=f"another grid runs it{where}")

    def recheck_waiting(self) -> None:
        for cid in sorted(self.waiting):
            if lock_held(self.lock_path(cid)):
                continue
            self.waiting.discard(cid)
            if part_state(self.spec(cid)) == "complete":
                self._finish(cid, "complete", note="completed by another grid")
            else:  # the other grid failed or stopped: this one takes it
                self.state.set(cid, status="queued", note=None)
                self.pending.insert(0, cid)

    def mark_running(self) -> None:
        """Cells whose worker has taken them: status running, and a running attempt written to
        grid.json at once, so a grid killed outright (SIGKILL) still leaves its attempt on record
        (the next grid marks it lost; ``GridState.save``)."""
        started = False
        for cid, (_, spec) in self.inflight.items():
            owner = read_owner(self.owner_path(cid))
            if owner.get("token") == self.token and owner.get("attempt") == spec.attempt \
                    and self.state.cells[cid].get("status") != "running":
                self.state.set(cid, status="running", started_at=owner.get("started_at"), host=owner.get("host"))
                self.state.add_attempt(cid, {"grid": self.token, "try": spec.attempt, "host": owner.get("host"),
                                             "pid": owner.get("pid"), "started_at": owner.get("started_at"),
                                             "ended_at": None, "status": "running"})
                started = True
        if started:
            self.state.save()

    def harvest(self) -> None:
        for cid, (handle, spec) in list(self.inflight.items()):
            if not handle.done():
                continue
            del self.inflight[cid]
            try:
                result = handle.result()
            except Exception as exc:  # noqa: BLE001  the launcher lost the job (worker killed, job failed)
                text = (str(exc).strip().splitlines() or [""])[-1]
                result = CellResult(spec.run_id, "failed", None, f"{type(exc).__name__}: {text}"[:500])
            self.collect(cid, spec, result)
        self.follow_up()

    def collect(self, cid: str, spec: CellSpec, result: CellResult) -> None:
        if result.status == "busy":  # lost the race for the lock to another grid
            self.tries[cid] -= 1
            self._wait_for_other(cid)
            return
        if result.status == "skipped":
            self._finish(cid, "complete", note="completed by another grid")
            return
        duration = (result.ended_at - result.started_at) if result.started_at and result.ended_at else None
        self.state.add_attempt(cid, {"grid": self.token, "try": spec.attempt, "host": result.host,
                                     "pid": result.pid, "started_at": result.started_at,
                                     "ended_at": result.ended_at, "status": result.status,
                                     "exit_code": result.exit_code, "error": result.error, "log": result.log})
        fields = {"exit_code": result.exit_code, "error": result.error, "log": result.log, "duration_s": duration}
        if result.status == "complete":
            self._finish(cid, "complete", note=None, **fields)
        elif self.stopping:
            self._finish(cid, "interrupted", **fields, note="the grid was interrupted; re-run to resume")
        elif self.retryable(cid, result):
            self.state.set(cid, status="queued", **{**fields, "error": None},
                           note=f"retrying after: {result.error}")
            self.pending.append(cid)
        else:
            self._finish(cid, "failed", **fields)

    def follow_up(self) -> None:
        """After cells end: a search whose trial cells all ended short of ``n_trials`` finished
        trials (a trial failed or drew an invalid configuration) gets another trial cell, up to
        ``TRIAL_CELLS_PER_TRIAL × n_trials`` in all; a failed cell fails the cells that wait
        for it; a run is complete when its merge is."""
        for rid, cell in self.cells.items():
            if rid in self.run_final:
                continue
            parts = self.run_parts(rid)
            trials = [p for p in parts if p.kind == "trial"]
            failed = [p for p in parts if self.final.get(p.id) == "failed"]
            if failed:
                for p in parts:
                    if p.id in self.pending:
                        self.pending.remove(p.id)
                        self._finish(p.id, "failed", note=f"not run: {failed[0].name} failed")
                if not any(p.id in self.inflight for p in parts):
                    self.run_final[rid] = "failed"
                continue
            if trials and all(self.final.get(p.id) == "complete" for p in trials):
                finished = study_state(self.results_dir / rid)["finished"]
                if finished < cell.n_trials and any(p.kind != "trial" and p.id in self.pending for p in parts):
                    if len(trials) < TRIAL_CELLS_PER_TRIAL * cell.n_trials:
                        self.add_part(Part(rid, "trial", len(trials) + 1))
                    else:
                        for p in parts:
                            if p.id in self.pending:
                                self.pending.remove(p.id)
                                self._finish(p.id, "failed", note=f"the search has {finished}/{cell.n_trials} "
                                                                  f"finished trials after {len(trials)} trial cells")
                        self.run_final[rid] = "failed"
                        continue
            merge = self.parts.get(f"{rid}/merge")
            if merge is not None and self.final.get(merge.id) == "complete":
                self.run_final[rid] = "complete"

    def retryable(self, cid: str, result: CellResult) -> bool:
        return (not self.stopping and self.tries[cid] <= self.retries
                and result.exit_code not in NO_RETRY_EXIT_CODES)

    # --- comparisons ------------------------------------------------------------------------

    def compare_finished_tasks(self) -> None:
        """A first look at each task as soon as its runs are done, while other runs still train
        (the last task's first look would be redone at once in the experiment's family)."""
        if not self.compare or self.stopping:
            return
        training = len(self.run_final) < len(self.cells)
        for task in dict.fromkeys(c.task for c in self.cells.values()):
            ids = [rid for rid, c in self.cells.items() if c.task == task]
            if not training or task in self.comparisons or any(rid not in self.run_final for rid in ids):
                continue
            done = [rid for rid in ids if self.run_final[rid] == "complete"]
            if done:
                self.comparisons[task] = Comparison(task, self.results_dir, done,
                                                    self.results_dir / "comparison" / task, self.trial, self.grid_dir)
        for task, comp in self.comparisons.items():
            comp.poll()
            self.state.comparisons[task] = comp.record()

    def compare_all(self) -> Comparison | None:
        """Every complete run in one comparison (the experiment's one Holm family), then each
        task's comparison in that family. With one task the two compare the same runs in the
        same family: the task's folder gets a copy of the one comparison."""
        done = [rid for rid in self.cells if self.run_final.get(rid) == "complete"]
        if not self.compare or self.stopping or not done:
            return None
        for comp in self.comparisons.values():
            self.state.comparisons[comp.name] = comp.wait()
        comp = Comparison("all", self.results_dir, done, self.results_dir / "comparison", self.trial, self.grid_dir)
        tasks = list(dict.fromkeys(self.cells[rid].task for rid in done))
        self.state.comparisons["all"] = comp.wait()
        if len(tasks) == 1:
            out_dir = self.results_dir / "comparison" / tasks[0]
            record = {**comp.record(), "out_dir": str(out_dir)}
            if comp.result.get("status") == "complete":
                copy_comparison(comp.out_dir, out_dir)
                record["note"] = "the same runs and family as 'all': a copy of its files"
            self.state.comparisons[tasks[0]] = record
            return comp
        if comp.result.get("status") == "complete":
            self.compare_tasks_in_family(comp.out_dir / "aggregated_metrics.json")
        return comp

    def compare_tasks_in_family(self, family: Path) -> None:
        """Each task's comparison (again, after a first look), with the experiment-wide Holm
        family of ``family``; the tasks side by side."""
        started = []
        for task in dict.fromkeys(c.task for c in self.cells.values()):
            done = [rid for rid, c in self.cells.items() if c.task == task and self.run_final.get(rid) == "complete"]
            if not done:
                continue
            comp = Comparison(task, self.results_dir, done, self.results_dir / "comparison" / task, self.trial,
                              self.grid_dir, family=family)
            comp.poll()
            self.comparisons[task] = comp
            started.append(comp)
        for comp in started:
            self.state.comparisons[comp.name] = comp.wait()

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
        for cid in list(self.pending) + sorted(self.waiting):
            self.state.set(cid, status="queued", note="not started: the grid was interrupted")
        self.pending.clear()
        self.waiting.clear()
