"""Which runs a grid trains, and the cells each run is cut into.

A run is one run id with all its seeds, one folder that ``rankwise.evaluate`` reads. The grid
cuts it into cells, each one ``python -m rankwise.main run=<id> ...`` doing one part of it:

- ``trial``: one trial of the run's search on its shared study (``max_trials=1``);
- ``seed<N>``: seed N with the study's best parameters, or as configured (``seed_only=N``);
- ``merge``: the run's ``metrics.json`` from its seeds (``merge_seeds=true``),

so the seeds of one run (and the trials of its search) run side by side on free workers, and
what the run folder holds at the end is what one ``rankwise.main`` would have written.

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
from dataclasses import dataclass, field
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


# What each experiment's comparison reports of the post-training measurement
# (``training.inference_measurement``): experiment 1 compares accuracy only; experiment 2 also
# latency, FLOPs against length and the rank histograms. With ``measure=reported`` (the grid's
# default) the cells of an experiment that reports none skip it.
REPORTED_MEASUREMENTS = {1: (), 2: ("latency", "flops_vs_length", "rank_histograms")}


@dataclass
class Cell:
    """One run of the grid (a run id with all its seeds); its parts are :class:`Part`."""

    run_id: str
    task: str
    role: str
    args: list[str]  # rankwise.main's arguments, as a user would type them
    config: dict[str, Any]  # the resolved run config metrics.json records (JSON-normalised)
    mode: str
    user_resume: bool = False  # the overrides set resume= themselves
    seeds: list[int] = field(default_factory=lambda: [1])  # the seeds the run trains in this mode
    n_trials: int = 0  # the run's search (0: none, and always in mode=trial)
    estimate: dict[str, Any] = field(default_factory=dict)  # what the time estimate needs (plan)

    def command(self, python: str = sys.executable, gpus: int = 0, part: list[str] = ()) -> list[str]:
        """The command of this run, or of one part of it (``part``: rankwise.main's part keys);
        several GPUs: under torchrun, one process each."""
        args = [*self.args, *part]
        if gpus > 1:
            return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                    "-m", "rankwise.main", *args]
        return [python, "-m", "rankwise.main", *args]

    def shell_command(self, gpus: int = 0, part: list[str] = ()) -> str:
        return shlex.join(["python", *self.command(gpus=gpus, part=part)[1:]])


@dataclass(frozen=True)
class Part:
    """One cell of the grid: a part of a run, one ``rankwise.main`` process."""

    run_id: str
    kind: str  # trial | seed | merge
    index: int  # the seed (seed), the trial's number in this grid (trial), 0 (merge)

    @property
    def name(self) -> str:
        return {"trial": f"trial{self.index}", "seed": f"seed{self.index}", "merge": "merge"}[self.kind]

    @property
    def id(self) -> str:
        return f"{self.run_id}/{self.name}"

    @property
    def args(self) -> list[str]:
        return {"trial": ["max_trials=1"], "seed": [f"seed_only={self.index}"],
                "merge": ["merge_seeds=true"]}[self.kind]


def parts_of(cell: Cell, trials: int) -> list[Part]:
    """The cells of a run: ``trials`` search trials still to run, each seed, the merge."""
    return ([Part(cell.run_id, "trial", i + 1) for i in range(trials)]
            + [Part(cell.run_id, "seed", s) for s in cell.seeds] + [Part(cell.run_id, "merge", 0)])


def measurement_args(run_id: str, measure: str, overrides: list[str]) -> list[str]:
    """The override that turns the post-training measurement off for a run of an experiment
    that reports none of it (``measure=reported``), unless the user set it themselves."""
    name = parse_run_name(run_id)
    if measure == "all" or name is None or REPORTED_MEASUREMENTS[name.experiment]:
        return []
    if any(o.split("=", 1)[0].lstrip("+~").startswith("training.inference_measurement") for o in overrides):
        return []
    return ["training.inference_measurement.enabled=false"]


def build_cells(run_refs: list[str], results_dir: Path, mode: str, seeds: list[int] | None,
                overrides: list[str], measure: str = "reported") -> list[Cell]:
    """Load and validate every run's config (exit 2 naming the key before anything runs)."""
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
        extra = measurement_args(run_id, measure, overrides)
        if extra:
            args = [*args, *extra]
            job = load_job(args)
        name = parse_run_name(run_id)
        dataset = job.run.dataset
        task = name.task if name else str(dataset.subset or dataset.name)
        role = name.role if name else str(job.run.method)
        config = json.loads(json.dumps(job.run_dict, default=str))
        cells[run_id] = Cell(run_id, task, role, args, config, mode, user_resume,
                             seeds=job.limits.seeds(job.run), n_trials=job.run.optuna.n_trials,
                             estimate=estimate_inputs(job))
    return list(cells.values())


def estimate_inputs(job) -> dict[str, Any]:
    """What :mod:`rankwise.grid.plan` needs to estimate a run's cells before any has run."""
    t, d = job.run.training, job.run.dataset
    m = t.inference_measurement
    return {"epochs": t.epochs, "max_steps": t.max_steps, "batch_size": t.batch_size,
            "eval_batch_size": t.eval_batch_size or t.batch_size,
            "max_train_samples": d.max_train_samples, "max_eval_samples": d.max_eval_samples,
            "max_seq_length": d.max_seq_length, "dataset": d.name, "subset": d.subset,
            "data_dir": d.data_dir, "max_batches": job.limits.max_batches,
            "measure": bool(m.enabled), "timed_batches": m.timed_batches,
            "n_lengths": len(m.lengths or [0, 0]), "repeats": m.repeats + m.warmup,
            "method": job.run.algorithm}
