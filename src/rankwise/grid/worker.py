"""What runs one cell, wherever the launcher put it (a local pool process, a Slurm job, a Ray task).

:func:`run_cell` takes the cell's lock (``filelock``; held by this process for the whole run, so
two grids on one results folder never train a cell twice), re-checks the run folder, and runs the
cell's ``rankwise.main`` command as a child process with its logs under ``grid/logs/``. This
module imports nothing heavy: pool workers and jobs start fast.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rankwise.config.typed import with_dotted_values

STDERR_TAIL_BYTES = 64 * 1024
TQDM_BAR = re.compile(r"^.*\|\s*[\d.]+[kMG]?/[\d.?]+[kMG]? \[[^\]]*\]")


@dataclass
class CellSpec:
    """Everything a worker needs to run one cell (plain data: it is pickled to jobs)."""

    run_id: str
    command: list[str]
    run_dir: str
    lock_path: str
    owner_path: str
    log_prefix: str  # <results_dir>/grid/logs/<run_id>/<grid token>-try<n>; .out / .err appended
    config: dict[str, Any]
    mode: str
    token: str  # the grid invocation that submitted it
    attempt: int
    user_resume: bool = False
    env: dict[str, str] = field(default_factory=dict)
    kind: str = "run"  # run (the whole run) | trial | seed | merge (rankwise.grid.cells.Part)
    index: int = 0  # the seed of a seed cell
    n_trials: int = 0  # the run's search


@dataclass
class CellResult:
    run_id: str
    status: str  # complete | failed | busy (another process holds the lock) | skipped (already complete)
    exit_code: int | None = None
    error: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    log: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the run folder -----------------------------------------------------------------------------


def read_json_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    return read_json_file(Path(run_dir) / "metrics.json")


def same_config(metrics: dict[str, Any], config: dict[str, Any], mode: str) -> bool:
    """Whether a run folder's ``metrics.json`` was written by this configuration and mode
    (after a search, with the search's best parameters applied, as the final run is trained)."""
    expected = config
    best = (metrics.get("search") or {}).get("best_overrides")
    if isinstance(best, dict):
        expected = with_dotted_values(config, best)  # as the final run of a search has it
    return metrics.get("mode") == mode and metrics.get("config") == expected


def study_state(run_dir: Path) -> dict[str, Any]:
    """How far the run's search is, from the study files every search worker rewrites after
    each trial (``optuna/best_params.json``): finished trials (complete or pruned), the target,
    the best trial; zeros before the first trial."""
    data = read_json_file(Path(run_dir) / "optuna" / "best_params.json") or {}
    finished = int(data.get("n_complete") or 0) + int(data.get("n_pruned") or 0)
    return {"finished": finished, "n_trials": data.get("n_trials"), "best_trial_number": data.get("best_trial_number")}


def seed_done(run_dir: Path, seed: int, config: dict[str, Any], mode: str, n_trials: int) -> bool:
    """Whether ``seed<N>/result.json`` is a complete seed of this run config and mode (after a
    search, of the study's current best trial); what ``rankwise.main seed_only=N`` keeps."""
    record = read_json_file(Path(run_dir) / f"seed{seed}" / "result.json")
    if record is None or record.get("mode") != mode or record.get("run_config") != config:
        return False
    if n_trials > 0 and mode == "full":
        search, study = record.get("search") or {}, study_state(run_dir)
        return (search.get("n_trials") == n_trials and study["finished"] >= n_trials
                and search.get("best_trial_number") == study["best_trial_number"])
    return True


def part_state(spec: CellSpec) -> str:
    """``complete`` when the cell's part of the run is done, else what :func:`folder_state`
    says of the run folder (``other``: another configuration's run is there)."""
    run_dir = Path(spec.run_dir)
    state = folder_state(run_dir, spec.config, spec.mode)
    if spec.kind in ("run", "merge") or state == "complete":
        return state
    if spec.kind == "trial":
        return "complete" if study_state(run_dir)["finished"] >= spec.n_trials else state
    return "complete" if seed_done(run_dir, spec.index, spec.config, spec.mode, spec.n_trials) else state


def folder_state(run_dir: Path, config: dict[str, Any], mode: str) -> str:
    """``complete`` (this config, done), ``other`` (a different config or mode is there),
    ``incomplete`` (this config, not done: rankwise.main resumes it) or ``empty``."""
    metrics = read_metrics(run_dir)
    if metrics is None:
        return "empty"
    if not same_config(metrics, config, mode):
        return "other"
    return "complete" if metrics.get("status") == "complete" else "incomplete"


# --- the child process --------------------------------------------------------------------------

_child: subprocess.Popen | None = None
_forked: int | None = None  # the pid of a run forked from this (preloaded) worker
_stopping = False
_pool_parent: int | None = None  # a local pool worker's parent (the grid), set by init_local_worker
_preloaded = False  # this worker imported rankwise.main and its libraries once (init_local_worker)
MAIN_MODULE = ["-m", "rankwise.main"]
# What a preloaded worker imports once (the libraries every run imports, lazily or not, and the
# model code of both backbones); nothing here starts a thread or touches a GPU.
PRELOAD = ("rankwise.main", "rankwise.runner", "rankwise.training.loop", "rankwise.measure.after_training",
           "rankwise.verdicts", "peft", "peft.tuners.lora", "datasets", "optuna",
           "transformers.models.bert.modeling_bert", "transformers.models.deberta_v2.modeling_deberta_v2")


def preloaded_context():
    """The multiprocessing context of this machine's grid processes (pool workers, layout
    probes): each forks from one server that imported :data:`PRELOAD` once, so none of them pays
    the imports again. The server is started on first use and lives as long as the grid."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # read when the server starts; later calls change nothing
    return ctx


def start_preloaded_server() -> None:
    """Start :func:`preloaded_context`'s server now, so that its imports overlap what the
    caller does before the first process is asked of it (which then waits for them)."""
    from multiprocessing import forkserver

    preloaded_context()
    forkserver.ensure_running()


def take_slot(slot: dict[str, Any]) -> None:
    """This process runs on the slot's cores with its thread counts. The libraries were imported
    before the slot was known (in the fork server), so torch's threads are set here as well as
    in the environment its runs and their children read."""
    cores = slot.get("cores")
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    os.environ.update(slot.get("env", {}))
    threads = slot.get("env", {}).get("OMP_NUM_THREADS")
    if threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def _prepare_child() -> None:  # runs in the child between fork and exec (or the forked run)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # pool workers ignore SIGINT; the run must not
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        try:  # PR_SET_PDEATHSIG: if this worker dies, the run gets SIGTERM (checkpoints, exits 130)
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        except (OSError, AttributeError):
            pass


def _forward_and_stop(signum, _frame) -> None:
    """A worker told to stop passes the signal to its run, waits for it, then exits."""
    global _stopping
    _stopping = True
    if _forked is not None:
        try:
            os.kill(_forked, signum)
        except ProcessLookupError:
            pass
    elif _child is not None and _child.poll() is None:
        _child.send_signal(signum)
    else:
        os._exit(128 + signum)


def last_line(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - STDERR_TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    # progress bars redraw with carriage returns and may end without a newline before a message
    lines = [piece.strip() for line in tail.splitlines() for piece in line.split("\r")]
    lines = [TQDM_BAR.sub("", line).strip() or line for line in lines if line]
    return lines[-1][:500] if lines else None


def run_as_main(module: str, args: list[str]) -> int:
    """``python -m <module> <args>`` in this process, as the interpreter would run it
    (``runpy``); returns its exit code, as the interpreter would exit with."""
    import runpy

    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001  as an uncaught exception ends `python -m`
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _fork_module(module: str, args: list[str], out, err) -> int:
    """``python -m <module> <args>`` in a forked child of this preloaded worker, with the imports
    already done: a cell starts in milliseconds instead of seconds. The child's stdout/stderr go
    to the log files. Returns the exit code (negative: killed by a signal), as ``subprocess``
    reports it."""
    global _forked
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the run
        code = 1
        try:
            _prepare_child()
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            code = run_as_main(module, args)
        finally:
            os._exit(code)
    _forked = pid
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    finally:
        _forked = None
    return os.waitstatus_to_exitcode(status)


def _module_to_log(module: str, args: list[str], log: str) -> None:
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.exit(run_as_main(module, args))


class PreloadedModule:
    """``python -m <module> <args>`` in a process forked from :func:`preloaded_context`'s server
    (its imports done), stdout and stderr in ``log``; ``poll()`` as ``subprocess.Popen``'s."""

    def __init__(self, module: str, args: list[str], log: Path):
        self.process = preloaded_context().Process(target=_module_to_log, args=(module, list(args), str(log)))
        self.process.start()

    def poll(self) -> int | None:
        return None if self.process.is_alive() else self.process.exitcode


def _run_child(spec: CellSpec, command: list[str]) -> tuple[int, Path]:
    global _child
    prefix = Path(spec.log_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = prefix.with_name(prefix.name + ".out"), prefix.with_name(prefix.name + ".err")
    env = {**os.environ, **spec.env}
    with open(out_path, "w") as out, open(err_path, "w") as err:
        err.write(f"$ {' '.join(command)}\n")
        err.flush()
        if _preloaded and command[1:3] == MAIN_MODULE and not spec.env:
            return _fork_module(command[2], command[3:], out, err), err_path
        # preexec_fn: the parent-death signal must be set in the child itself (workers run one thread)
        _child = subprocess.Popen(command, stdout=out, stderr=err, env=env, preexec_fn=_prepare_child)  # noqa: PLW1509
        try:
            rc = _child.wait()
        finally:
            _child = None
    return rc, err_path


def run_cell(spec: CellSpec) -> CellResult:
    """Run one cell under its lock; never raises for a failing run (the result says why)."""
    from filelock import FileLock, Timeout

    Path(spec.lock_path).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(spec.lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return CellResult(spec.run_id, "busy")
    try:
        state = part_state(spec)
        if state == "complete":  # another grid finished it since this one looked
            return CellResult(spec.run_id, "skipped")
        command = list(spec.command)
        if state == "other" and not spec.user_resume and spec.kind == "run":
            command.append("resume=false")  # never resume a checkpoint of another configuration
        started = time.time()
        owner = {"token": spec.token, "attempt": spec.attempt, "pid": os.getpid(),
                 "host": socket.gethostname(), "started_at": started, "command": command}
        Path(spec.owner_path).write_text(json.dumps(owner) + "\n")
        rc, err_path = _run_child(spec, command)
        result = CellResult(spec.run_id, "failed", rc, None, started, time.time(), log=str(err_path))
        # a trial cell is done when its trial finished (the study may still need others)
        done = rc == 0 if spec.kind == "trial" else part_state(spec) == "complete"
        if rc == 0 and done:
            result.status = "complete"
        elif rc == 0 and spec.kind == "seed":
            result.error = f"exited 0 but seed{spec.index}/result.json is not a complete seed of this run"
        elif rc == 0:
            metrics = read_metrics(Path(spec.run_dir)) or {}
            result.error = f"exited 0 but metrics.json status is {metrics.get('status')!r}"
        else:
            result.error = last_line(err_path) or f"exit code {rc}"
        return result
    finally:
        lock.release()
        if _stopping and _pool_parent is not None and os.getppid() != _pool_parent:
            os._exit(128 + signal.SIGTERM)  # the grid is gone: nobody will read the result


# --- local pool workers ---------------------------------------------------------------------------


def init_local_worker(slots, preload: bool = True) -> None:
    """ProcessPoolExecutor initializer: take one slot (cores, GPUs, thread counts) for this worker's
    life; its runs inherit the affinity and the environment. ``preload``: rankwise.main and its
    libraries (torch, transformers, peft, datasets) are imported in this worker (already, when it
    forked from :func:`preloaded_context`'s server), so each cell's run is forked from this worker
    rather than started as a new interpreter."""
    global _pool_parent
    _pool_parent = os.getppid()
    slot = slots.get(timeout=60)
    take_slot(slot)
    if preload:  # every cell forks from here (_fork_module)
        global _preloaded
        import importlib
        import threading

        for module in PRELOAD:
            try:
                importlib.import_module(module)
            except ImportError:  # an optional library: the run imports (or misses) it itself
                pass
        take_slot(slot)  # torch's threads, torch being imported now
        from tqdm import tqdm

        # tqdm's default lock is a multiprocessing semaphore, made by a run's first bar; a forked
        # run ends with os._exit, which leaves the semaphore to the resource tracker's warning
        tqdm.set_lock(threading.RLock())
        _preloaded = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the runs; the worker waits for them
    signal.signal(signal.SIGTERM, _forward_and_stop)
    if sys.platform.startswith("linux"):
        import ctypes

        try:  # the grid died: stop this worker's run cleanly
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
