"""The grid's own keys, parsed with Hydra's override grammar like every rankwise command.

``python -m rankwise.grid experiment=1 scale=cpu tasks=[RTE] seeds=[1,2,3] workers=2 [key=value ...]``

Keys of a run config (``model.*``, ``dataset.*``, ``training.*``, ...) and rankwise.main's job
keys (``device``, ``resume``, ``wandb.*``) are passed to every cell unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from rankwise.config.typed import did_you_mean, from_mapping, require
from rankwise.errors import ConfigError

CELL_JOB_KEYS = ("device", "resume", "wandb")  # rankwise.main job keys a grid passes to its cells


@dataclass
class SlurmConfig:
    #: `slurm`, or `local`: submitit's local executor (no Slurm needed).
    cluster: Literal["slurm", "local"] = "slurm"
    #: The Slurm partition.
    partition: str | None = None
    #: Minutes per job.
    time: int = 24 * 60
    #: Memory per job in GB; null: the partition's default.
    mem_gb: float | None = None
    #: At most this many jobs of the array at once.
    array_parallelism: int | None = None
    #: The Slurm account.
    account: str | None = None
    #: The Slurm QOS.
    qos: str | None = None
    #: The Slurm constraint.
    constraint: str | None = None
    #: Any other sbatch option.
    additional: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        require(self.time >= 1, f"{path}.time", "must be >= 1 (minutes)")
        if self.array_parallelism is not None:
            require(self.array_parallelism >= 1, f"{path}.array_parallelism", "must be >= 1")


@dataclass
class RayConfig:
    #: null: a local Ray instance; `auto` or `ray://host:port`: a cluster.
    address: str | None = None


@dataclass
class GridConfig:
    #: Run experiment 1 (IW-LoRA) or 2 (TABS); needs `scale`.
    experiment: int | None = None
    #: `cpu`: the MiniLM twins `cpu-*`; `full`: the DeBERTaV3-base configs.
    scale: Literal["cpu", "full"] | None = None
    #: Only these tasks of the experiment (e.g. `[RTE,SST-2]`); null: all.
    tasks: list[str] | None = None
    #: Only these roles (e.g. `[proposed,comparative-1]`); null: all.
    roles: list[str] | None = None
    #: An explicit list of run ids or YAML paths instead of `experiment`.
    runs: list[str] | None = None
    #: Seeds of every cell; null: each config's own.
    seeds: list[int] | None = None
    #: The grid's results folder; null: `results/experiment<N>-<scale>`.
    results_dir: str | None = None
    #: `trial` or `full`, for every cell.
    mode: Literal["trial", "full"] = "full"
    #: Where the cells run: a local pool, Slurm (submitit) or Ray.
    launcher: Literal["local", "slurm", "ray"] = "local"
    #: Cells at a time; null: one per GPU, else 1.
    workers: int | None = None
    #: Cores per cell; null: cores / workers (local), 8 (Slurm).
    cpus_per_run: int | None = None
    #: GPUs per cell; null: 1 where GPUs are visible.
    gpus_per_run: int | None = None
    #: Re-submissions of a failed cell in the same grid command.
    retries: int = 1
    #: Compare each task's runs, then all runs, as they finish.
    compare: bool = True
    #: `reported`: each cell measures only what its experiment's comparison reports (no
    #: latency or FLOPs-vs-length pass for experiment 1); `all`: every run measures everything.
    measure: Literal["reported", "all"] = "reported"
    #: With `workers` and `cpus_per_run` unset on a CPU machine (local pool): time a short probe
    #: of the grid's own model under each workers × threads layout and take the fastest;
    #: false: one worker with every core.
    probe: bool = True
    #: Print the cells, their estimated times and the grid's total, and run nothing.
    plan: bool = False
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self, path: str) -> None:
        if self.runs is not None:
            require(self.experiment is None, "runs", "give runs=[...] or experiment=1|2, not both")
            require(len(self.runs) >= 1, "runs", "must list at least one run")
            for key in ("tasks", "roles", "scale"):
                require(getattr(self, key) is None, key, "selects among an experiment's runs; "
                                                         "with runs=[...] list the runs themselves")
            require(self.results_dir is not None, "results_dir", "required with runs=[...]")
        else:
            require(self.experiment is not None, "experiment", "required: experiment=1|2 or runs=[...]")
            require(self.experiment in (1, 2), "experiment", f"must be 1 or 2, got {self.experiment}")
            require(self.scale is not None, "scale", "required with experiment=: scale=cpu (MiniLM twins) "
                                                     "or scale=full (DeBERTaV3-base)")
        require(self.retries >= 0, "retries", "must be >= 0")
        for key in ("workers", "cpus_per_run"):
            value = getattr(self, key)
            require(value is None or value >= 1, key, "must be >= 1")
        require(self.gpus_per_run is None or self.gpus_per_run >= 0, "gpus_per_run", "must be >= 0")
        if self.seeds is not None:
            require(len(self.seeds) >= 1, "seeds", "must list at least one seed")
            require(len(set(self.seeds)) == len(self.seeds), "seeds", "seeds must be distinct")

    @property
    def results_path(self) -> str:
        return self.results_dir or f"results/experiment{self.experiment}-{self.scale}"


GRID_KEYS = tuple(f.name for f in dataclasses.fields(GridConfig))


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(key, f"{part} is not a mapping")
    tree[leaf] = value


def parse_grid_args(argv: list[str]) -> tuple[GridConfig, list[str]]:
    """(the grid's config, the overrides passed to every cell as typed)."""
    from rankwise.config.loader import RUN_SECTIONS, parse_overrides

    grid: dict[str, Any] = {}
    cell_overrides: list[str] = []
    for arg, (key, value, delete) in zip(argv, parse_overrides(argv)):
        head = key.split(".", 1)[0]
        if head in GRID_KEYS:
            if delete:
                raise ConfigError(key, "grid keys cannot be deleted")
            set_dotted(grid, key, value)
        elif head in RUN_SECTIONS or head in CELL_JOB_KEYS:
            cell_overrides.append(arg)
        elif head == "run":
            raise ConfigError("run", "a grid selects runs with runs=[...] or experiment=1|2")
        else:
            known = [*GRID_KEYS, *RUN_SECTIONS, *CELL_JOB_KEYS]
            raise ConfigError(key, f"unknown key{did_you_mean(head, known)} "
                                   f"(grid keys: {', '.join(GRID_KEYS)}; run-config and job keys go to every cell)")
    return from_mapping(GridConfig, grid, ""), cell_overrides
