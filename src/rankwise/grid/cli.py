"""``python -m rankwise.grid`` (and ``rankwise grid``): one command per experiment."""

from __future__ import annotations

import math
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
    failed = [cid for cid in grid.parts if grid.final.get(cid) == "failed"]
    done = sum(1 for s in grid.final.values() if s == "complete")
    rest = len(grid.parts) - done - len(failed)
    print(f"grid: {done}/{len(grid.parts)} cell(s) complete, {len(failed)} failed"
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
        summary="Train an experiment's grid of run configs on a local pool, Slurm or Ray, "
                "resumably, one cell per seed and per search trial of each run (then a merge into "
                "the run's folder), then compare each task's runs and all of them. "
                "python -m rankwise.grid takes the same arguments.",
        arguments=(*keys, ("key.path=VALUE", ("a run-config key (model.*, dataset.*, training.*, "
                                             "...) or device, resume, wandb.*: passed to every cell"))),
        examples=("rankwise grid experiment=1 scale=cpu tasks=[SST-2]",
                  "rankwise grid experiment=1 scale=cpu tasks=[SST-2] plan=true",
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
        if cfg.launcher == "local":  # the preloaded server imports while the runs are validated
            from rankwise.grid.worker import start_preloaded_server

            start_preloaded_server()
        results_dir = Path(cfg.results_path).expanduser().resolve()
        cells = build_cells(select_refs(cfg), results_dir, cfg.mode, cfg.seeds, overrides, cfg.measure)
        probe = layout_probe(cfg, cells, results_dir)
        launcher = make_launcher(cfg, results_dir / "grid")
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(describe(cfg, launcher, len(cells), results_dir), flush=True)
    if cfg.plan:
        return print_plan(cfg, cells, launcher, results_dir, probe)
    code = 130
    try:
        code = run(cfg, cells, launcher, results_dir, argv, probe)
        return code
    finally:
        launcher.close(wait=code != 130)


def layout_probe(cfg, cells, results_dir: Path) -> dict | None:
    """On a CPU machine with workers and cpus_per_run unset (local pool, full mode): the
    workers × threads layout of the fastest probe (:mod:`rankwise.grid.probe`), set on ``cfg``;
    kept in ``grid/probe.json`` and in this machine's ``<cache>/grid-probes.json``, and reused
    while the probed run, the cores, the host and the torch build are the same.
    With ``plan=true`` every run is probed at the grid's layout too. None when nothing was probed."""

    from rankwise.grid.launchers import thread_env, usable_cores, visible_gpus
    from rankwise.grid.plan import seed_steps
    from rankwise.grid.probe import choose_layout, run_probes
    from rankwise.results import atomic_write_json

    path = results_dir / "grid" / "probe.json"
    machine = machine_probes_path()
    cores = usable_cores()
    choose = (cfg.launcher == "local" and cfg.workers is None and cfg.cpus_per_run is None and cfg.probe
              and cfg.mode == "full" and len(cores) > 1 and not visible_gpus())
    # the run with the most work per seed (steps × length) stands for the grid's model
    longest = max(cells, key=lambda c: (seed_steps(c.estimate) or 0) * c.estimate["max_seq_length"])
    key = probe_key(longest.args, cores)
    result, where = None, None
    for source in (path, machine):  # this folder's probe, else this machine's for the same run
        cached = read_probe(source, key)
        if cached is not None:
            result, where = cached, source
            break
    if choose:
        if result and result.get("chosen"):
            print(f"grid: layout from the earlier probe in {where}", flush=True)
        else:
            print(f"grid: probing workers × threads on {longest.run_id} ...", flush=True)
            result = choose_layout(longest.args, cores, max_workers=min(len(cores), sum(len(c.seeds) for c in cells)))
        chosen = result.get("chosen")
        lines = [f"{t['workers']}×{t['threads']}: {t['s_per_step']:.3f} s/step, {t['steps_per_s']:.2f} steps/s"
                 for t in result["layouts"] if "steps_per_s" in t]
        if chosen is None:
            print("grid: the probe failed (" + "; ".join(t.get("error", "") for t in result["layouts"])
                  + "); 1 worker with every core", flush=True)
        else:
            print(f"grid: probe {'; '.join(lines)} -> {chosen['workers']} worker(s) × {chosen['threads']} "
                  f"thread(s)", flush=True)
            cfg.workers, cfg.cpus_per_run = chosen["workers"], chosen["threads"]
    result = dict(result or {})
    if cfg.plan and set(result.get("runs") or {}) != {c.run_id for c in cells}:
        workers = cfg.workers or 1
        threads = cfg.cpus_per_run or max(1, len(cores) // workers)
        print(f"grid: probing every run at {workers} worker(s) × {threads} thread(s) ...", flush=True)
        runs = {}
        for i in range(0, len(cells), workers):  # ``workers`` runs side by side, as the grid runs them
            batch = cells[i:i + workers]
            slots = [{"cores": cores[w * threads:(w + 1) * threads], "env": thread_env(threads)}
                     for w in range(len(batch))]
            for cell, r in zip(batch, run_probes([(c.args, slot) for c, slot in zip(batch, slots)])):
                runs[cell.run_id] = r
        result["runs"] = runs
    if result:
        atomic_write_json(path, {"key": key, "result": result})
        if result.get("chosen"):
            remember_probe(machine, key, {k: v for k, v in result.items() if k != "runs"})
    return result or None


def machine_probes_path() -> Path:
    """This machine's layout probes, one per probed run config (the rankwise cache folder)."""
    from rankwise.models import default_cache_dir

    return default_cache_dir() / "grid-probes.json"


def probe_key(args: list[str], cores: list[int]) -> dict:
    """What a layout probe depends on: the probed run as configured (not where it writes), the
    cores, the host and the torch build."""
    import platform
    from importlib.metadata import version

    return {"args": [a for a in args if not a.startswith("results_dir=")], "cores": cores,
            "host": platform.node(), "torch": version("torch")}


def read_probe(path: Path, key: dict) -> dict | None:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    entries = data.get("probes", [data]) if isinstance(data, dict) else []
    return next((e["result"] for e in entries if isinstance(e, dict) and e.get("key") == key), None)


def remember_probe(path: Path, key: dict, result: dict, keep: int = 50) -> None:
    import json

    from filelock import FileLock

    from rankwise.results import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=30):
        try:
            probes = json.loads(path.read_text()).get("probes", [])
        except (OSError, ValueError, AttributeError):
            probes = []
        probes = [p for p in probes if p.get("key") != key] + [{"key": key, "result": result}]
        atomic_write_json(path, {"probes": probes[-keep:]})


def print_plan(cfg, cells, launcher, results_dir: Path, probe: dict | None) -> int:
    """``plan=true``: every cell with its estimated time, and the grid's total; runs nothing."""
    from rankwise.grid.cells import parts_of
    from rankwise.grid.plan import Estimator, simulate
    from rankwise.grid.progress import fmt_s
    from rankwise.grid.worker import part_state, study_state

    estimator = Estimator({c.run_id: c for c in cells}, results_dir, probe)
    parts, seconds, rows = [], {}, []
    for cell in cells:
        trials = max(0, cell.n_trials - study_state(results_dir / cell.run_id)["finished"]) if cell.n_trials else 0
        for part in parts_of(cell, trials):
            from rankwise.grid.worker import CellSpec

            spec = CellSpec(cell.run_id, [], str(results_dir / cell.run_id), "", "", "", cell.config, cell.mode,
                            "", 0, kind=part.kind, index=part.index, n_trials=cell.n_trials)
            done = part_state(spec) == "complete"
            est = 0.0 if done else estimator.seconds(part)
            parts.append(part)
            seconds[part.id] = est if est is not None else float("nan")
            rows.append((part.id, "done" if done else fmt_s(est)))
    width = max(len(r[0]) for r in rows)
    for cid, est in rows:
        print(f"  {cid.ljust(width)}  {est}")
    total = simulate(parts, seconds, launcher.capacity if launcher.capacity != float("inf") else len(parts))
    core_s = sum(v for v in seconds.values() if not math.isnan(v))
    print(f"plan: {len(parts)} cell(s), {fmt_s(core_s)} of cell time on {launcher.capacity} worker(s) "
          f"-> about {fmt_s(total)} end to end (comparisons not included); nothing was run", flush=True)
    return 0


def run(cfg, cells, launcher, results_dir: Path, argv: list[str], probe: dict | None = None) -> int:
    from rankwise.grid.plan import Estimator
    from rankwise.grid.progress import Progress
    from rankwise.grid.run import Grid
    from rankwise.grid.state import GridState

    token = f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}"
    state = GridState(results_dir / "grid.json", token, argv)
    state.info["layout"] = {"workers": launcher.capacity, "probe": probe}
    estimator = Estimator({c.run_id: c for c in cells}, results_dir, probe, state.past_durations())
    grid = Grid(cells, launcher, state, results_dir, token, cfg.retries, cfg.compare, cfg.mode == "trial",
                estimator)
    grid.scan()
    state.save()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = False
    try:
        with Progress(grid) as progress:
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
    final = Progress(grid)
    if not final.live:  # a terminal already shows the live table
        final.print_table()
    code = report(grid, argv, results_dir, overall)
    return 130 if interrupted else code


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt
