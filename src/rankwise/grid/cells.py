"""Which cells a grid runs, and the ``rankwise.main`` command of each.

A cell is one run id with all its seeds: one ``python -m rankwise.main run=<id> ...`` that
trains every seed and writes one run folder (``metrics.json`` aggregates the seeds there and
``rankwise.evaluate`` reads one folder per run id), so a cell is exactly what a user would type.

Cells are selected from the shipped run configs by their names (see
``scripts/make_experiment_configs.py``):

- experiment 1: ``<role>-DeBERTaV3-base-86-M--GLUE-<TASK>``, CPU twins ``cpu-<role>-MiniLM-L6--GLUE-<TASK>``;
- experiment 2: ``tabs-<role>-DeBERTaV3-base-86-M--<TASK>``, CPU twins ``cpu-tabs-<role>-MiniLM-L6--<TASK>``.

Roles and tasks are read from the file names, so configs added later join the grid unchanged.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankwise.errors import ConfigError

RUN_NAME = re.compile(r"^(?P<cpu>cpu-)?(?P<experiment2>tabs-)?(?P<role>.+?)-"
                      r"(?P<model>MiniLM-L6|DeBERTaV3-base-86-M)--(?P<task>.+)$")
ROLE_ORDER = ("proposed", "comparative", "baseline", "ablation")


@dataclass(frozen=True)
class RunName:
    """What a shipped run id says about itself."""

    run_id: str
    experiment: int
    scale: str  # cpu (MiniLM twins) | full (DeBERTaV3-base)
    role: str
    task: str


def parse_run_name(run_id: str) -> RunName | None:
    """The experiment, scale, role and task a run id names; None for ids outside both experiments."""
    m = RUN_NAME.match(run_id)
    if m is None or (m["model"] == "MiniLM-L6") != bool(m["cpu"]):
        return None
    experiment = 2 if m["experiment2"] else 1
    task = m["task"]
    if experiment == 1:
        if not task.startswith("GLUE-"):
            return None
        task = task[len("GLUE-"):]
    return RunName(run_id, experiment, "cpu" if m["cpu"] else "full", m["role"], task)


def task_key(task: str) -> str:
    """``SST-2``, ``sst2`` and ``sst_2`` name the same task."""
    return re.sub(r"[-_ ]", "", task).lower()


def role_rank(role: str) -> tuple[int, str]:
    for i, prefix in enumerate(ROLE_ORDER):
        if role == prefix or role.startswith(prefix + "-"):
            return i, role
    return len(ROLE_ORDER), role


def select_experiment(available: list[str], experiment: int, scale: str, tasks: list[str] | None,
                      roles: list[str] | None) -> list[RunName]:
    """The shipped runs of one experiment at one scale, filtered by task and role, in
    task order (as given, else alphabetical) and role order (proposed, comparative, baseline,
    ablations)."""
    names = [n for n in map(parse_run_name, available)
             if n is not None and n.experiment == experiment and n.scale == scale]
    if not names:
        raise ConfigError("experiment", f"no shipped run config of experiment {experiment} at scale={scale}")
    known_tasks = sorted({n.task for n in names})
    known_roles = sorted({n.role for n in names}, key=role_rank)
    if tasks is not None:
        by_key = {task_key(t): t for t in known_tasks}
        for i, t in enumerate(tasks):
            if task_key(str(t)) not in by_key:
                raise ConfigError(f"tasks.{i}", f"experiment {experiment} (scale={scale}) has no task {t!r} "
                                                f"(tasks: {', '.join(known_tasks)})")
        order = [by_key[task_key(str(t))] for t in tasks]
    else:
        order = known_tasks
    if roles is not None:
        for i, r in enumerate(roles):
            if r not in known_roles:
                raise ConfigError(f"roles.{i}", f"experiment {experiment} (scale={scale}) has no role {r!r} "
                                                f"(roles: {', '.join(known_roles)})")
    picked = [n for n in names if n.task in order and (roles is None or n.role in roles)]
    picked.sort(key=lambda n: (order.index(n.task), role_rank(n.role)))
    if not picked:
        raise ConfigError("roles", f"no run of experiment {experiment} (scale={scale}) has these tasks and roles")
    return picked


@dataclass
class Cell:
    """One ``rankwise.main`` invocation of the grid."""

    run_id: str
    task: str
    role: str
    args: list[str]  # rankwise.main's arguments, as a user would type them
    config: dict[str, Any]  # the resolved run config metrics.json records (JSON-normalised)
    mode: str
    user_resume: bool = False  # the overrides set resume= themselves

    def command(self, python: str = sys.executable, gpus: int = 0) -> list[str]:
        """The command of this cell; several GPUs: the same run under torchrun, one process each."""
        if gpus > 1:
            return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                    "-m", "rankwise.main", *self.args]
        return [python, "-m", "rankwise.main", *self.args]

    def shell_command(self, gpus: int = 0) -> str:
        return shlex.join(["python", *self.command(gpus=gpus)[1:]])


def build_cells(run_refs: list[str], results_dir: Path, mode: str, seeds: list[int] | None,
                overrides: list[str]) -> list[Cell]:
    """Load and validate every cell's config (exit 2 naming the key before anything runs)."""
    from rankwise.config.loader import load_job

    seed_args = [f"training.seeds=[{','.join(str(s) for s in seeds)}]"] if seeds else []
    user_resume = any(o.split("=", 1)[0].lstrip("+~") == "resume" for o in overrides)
    cells: dict[str, Cell] = {}
    for ref in run_refs:
        args = [f"run={ref}", f"results_dir={results_dir}", f"mode={mode}", *seed_args, *overrides]
        job = load_job(args)
        run_id = job.run.run_id
        if run_id in cells:
            raise ConfigError("runs", f"run id {run_id!r} is selected twice")
        name = parse_run_name(run_id)
        dataset = job.run.dataset
        task = name.task if name else str(dataset.subset or dataset.name)
        role = name.role if name else str(job.run.method)
        config = json.loads(json.dumps(job.run_dict, default=str))
        cells[run_id] = Cell(run_id, task, role, args, config, mode, user_resume)
    return list(cells.values())
