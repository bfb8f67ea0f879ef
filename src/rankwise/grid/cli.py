"""``python -m rankwise.grid`` (and ``rankwise grid``): one command per experiment."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

from rankwise.errors import RankwiseError


def select_refs(cfg) -> list[str]:
    from rankwise.config.loader import available_runs
    from rankwise.grid.cells import select_experiment

    if cfg.runs is not None:
        return [str(r) for r in cfg.runs]
    names = select_experiment(available_runs(), cfg.experiment, cfg.scale, cfg.tasks, cfg.roles)
    return [n.run_id for n in names]


def describe(cfg, launcher, n_cells: int, results_dir: Path) -> str:
    where = {"local": lambda: f"{launcher.resources.workers} worker(s) × {launcher.resources.cpus_per_run} core(s)"
                              + (f" × {launcher.resources.gpus_per_run} GPU(s)" if launcher.resources.gpus_per_run else ""),
             "slurm": lambda: f"submitit ({cfg.slurm.cluster})",
             "ray": lambda: f"Ray ({cfg.ray.address or 'local instance'})"}[cfg.launcher]()
    return f"grid: {n_cells} cell(s), mode={cfg.mode}, launcher={cfg.launcher}: {where}; results in {results_dir}"


def report(grid, argv: list[str], results_dir: Path, overall) -> int:
    """Print the outcome; the exit code (0 all complete and compared, 1 otherwise)."""
    failed = [rid for rid in grid.cells if grid.final.get(rid) == "failed"]
    done = sum(1 for s in grid.final.values() if s == "complete")
    rest = len(grid.cells) - done - len(failed)
    print(f"grid: {done}/{len(grid.cells)} cell(s) complete, {len(failed)} failed"
          + (f", {rest} interrupted or not started" if rest else "") + f"; state in {results_dir / 'grid.json'}")
    if failed:
        print("failed cells (re-running the grid command retries them and skips complete ones:\n"
              f"  {shlex.join(['python', '-m', 'rankwise.grid', *argv])}):")
        for rid in failed:
            c = grid.state.cells[rid]
            print(f"  {rid}: exit {c.get('exit_code')}: {c.get('error')}\n"
                  f"    retry alone: {c.get('command')}\n    log: {c.get('log')}")
    bad = {name: rec for name, rec in grid.state.comparisons.items() if rec.get("status") != "complete"}
    for name, rec in bad.items():
        print(f"comparison {name} {rec.get('status')}: {rec.get('error')} (log {rec.get('log')})")
    for name, rec in grid.state.comparisons.items():
        if name != "all" and rec.get("status") == "complete":
            print(f"comparison {name}: {Path(rec['out_dir']) / 'summary.md'}")
    if overall is not None and overall.result and overall.result.get("status") == "complete":
        print(f"summary: {overall.out_dir / 'summary.md'}")
    return 1 if failed or bad else 0


def grid_help():
    """``rankwise grid --help``: the grid's keys (defaults and meanings from its schema)."""
    from rankwise.cli_help import CommandHelp, key_argument
    from rankwise.config.reference import sections
    from rankwise.grid.config import GridConfig

    keys = [key_argument(row) for section in sections(GridConfig, "") for row in section.rows]
    return CommandHelp(
        command="rankwise grid",
        usage=("experiment=1|2 scale=cpu|full [tasks=[...]] [roles=[...]] [seeds=[...]] [key=VALUE ...]",
               "runs=[<id|path.yaml>,...] results_dir=DIR [key=VALUE ...]"),
        summary="Train an experiment's grid of run configs (one cell per run id, all its seeds) on "
                "a local pool, Slurm or Ray, resumably, then compare each task's runs and all of "
                "them. python -m rankwise.grid takes the same arguments.",
        arguments=(*keys, ("key.path=VALUE", ("a run-config key (model.*, dataset.*, training.*, "
                                             "...) or device, resume, wandb.*: passed to every cell"))),
        examples=("rankwise grid experiment=1 scale=cpu tasks=[RTE] workers=2",
                  "rankwise grid experiment=2 scale=cpu mode=trial",
                  ("rankwise grid experiment=1 scale=full launcher=slurm slurm.partition=gpu "
                  "'seeds=[1,2,3]'")),
        more="docs/grid.md, docs/config.md (run-config keys)",
    )


def main(argv: list[str] | None = None) -> int:
    from rankwise.cli_help import answer_flags
    from rankwise.grid.cells import build_cells
    from rankwise.grid.config import parse_grid_args
    from rankwise.grid.launchers import make_launcher

    argv = sys.argv[1:] if argv is None else list(argv)
    if (answered := answer_flags(argv, grid_help)) is not None:  # --help, unknown flags
        return answered
    try:
        cfg, overrides = parse_grid_args(argv)
        results_dir = Path(cfg.results_path).expanduser().resolve()
        cells = build_cells(select_refs(cfg), results_dir, cfg.mode, cfg.seeds, overrides)
        launcher = make_launcher(cfg, results_dir / "grid")
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(describe(cfg, launcher, len(cells), results_dir), flush=True)
    code = 130
    try:
        code = run(cfg, cells, launcher, results_dir, argv)
        return code
    finally:
        launcher.close(wait=code != 130)


def run(cfg, cells, launcher, results_dir: Path, argv: list[str]) -> int:
    from rankwise.grid.progress import Progress
    from rankwise.grid.run import Grid
    from rankwise.grid.state import GridState

    token = f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}"
    state = GridState(results_dir / "grid.json", token, argv)
    grid = Grid(cells, launcher, state, results_dir, token, cfg.retries, cfg.compare, cfg.mode == "trial")
    grid.scan()
    state.save()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = False
    try:
        with Progress(state, list(grid.cells), launcher.capacity) as progress:
            try:
                grid.run(progress)
            except KeyboardInterrupt:
                interrupted = True
                print("grid: interrupted; waiting for running cells to checkpoint (Ctrl-C again: leave now)",
                      file=sys.stderr, flush=True)
                grid.stop()
                grid.run(progress)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    overall = None if interrupted else grid.compare_all()
    state.info.update(status="interrupted" if interrupted else "finished", ended_at=time.time())
    state.save()
    final = Progress(state, list(grid.cells), launcher.capacity)
    if not final.live:  # a terminal already shows the live table
        final.print_table()
    code = report(grid, argv, results_dir, overall)
    return 130 if interrupted else code


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt
