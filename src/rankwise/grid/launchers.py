"""Where cells run: a local pool, a Slurm cluster through submitit, or Ray.

The launcher is configuration only: every launcher runs :func:`rankwise.grid.worker.run_cell`,
which runs the cell's ``rankwise.main`` command. A launcher hands back handles with
``done()`` and ``result()`` (a :class:`~rankwise.grid.worker.CellResult`; an exception means the
launcher lost the job) and says how many cells it takes at once (``capacity``).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankwise.errors import ConfigError
from rankwise.grid.worker import CellSpec, run_cell


def visible_gpus() -> list[str]:
    """GPU ids this process may use, without importing torch (CUDA_VISIBLE_DEVICES, else nvidia-smi)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def usable_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def thread_env(threads: int) -> dict[str, str]:
    n = str(max(1, threads))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def run_env(resources: Resources) -> dict[str, str]:
    """Thread counts for a run in a job (torchrun's processes share the run's cores)."""
    return thread_env(resources.cpus_per_run // max(1, resources.gpus_per_run))


@dataclass
class Resources:
    """How many cells run at once and what each gets."""

    workers: int
    cpus_per_run: int
    gpus_per_run: int
    slots: list[dict[str, Any]] = field(default_factory=list)  # local: cores, env per worker


def local_resources(workers: int | None, cpus_per_run: int | None, gpus_per_run: int | None) -> Resources:
    """Split this machine into ``workers`` slots without oversubscribing cores or GPUs."""
    cores, gpus = usable_cores(), visible_gpus()
    gpus_per_run = (1 if gpus else 0) if gpus_per_run is None else gpus_per_run
    if gpus_per_run > 0:
        fit = len(gpus) // gpus_per_run
        if fit == 0:
            raise ConfigError("gpus_per_run", f"{gpus_per_run} GPU(s) per run but {len(gpus)} visible")
        workers = fit if workers is None else workers
        if workers > fit:
            raise ConfigError("workers", f"{workers} workers × {gpus_per_run} GPU(s) per run need "
                                         f"{workers * gpus_per_run} GPUs; {len(gpus)} visible")
    workers = 1 if workers is None else workers
    cpus_per_run = len(cores) // workers if cpus_per_run is None else cpus_per_run
    if cpus_per_run < 1 or workers * cpus_per_run > len(cores):
        raise ConfigError("workers", f"{workers} workers × {max(cpus_per_run, 1)} cores per run exceed the "
                                     f"{len(cores)} usable cores (the pool never oversubscribes them)")
    slots = []
    for w in range(workers):
        slot_gpus = gpus[w * gpus_per_run:(w + 1) * gpus_per_run]
        env = {**thread_env(cpus_per_run // max(1, gpus_per_run)), "CUDA_VISIBLE_DEVICES": ",".join(slot_gpus)}
        slots.append({"cores": cores[w * cpus_per_run:(w + 1) * cpus_per_run], "env": env})
    return Resources(workers, cpus_per_run, gpus_per_run, slots)


class LocalLauncher:
    """A pool of worker processes (``concurrent.futures``), each pinned to its slot for life."""

    name = "local"

    def __init__(self, resources: Resources):
        self.resources = resources
        self.capacity = resources.workers
        self._pool: ProcessPoolExecutor | None = None

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            from rankwise.grid.worker import init_local_worker, preloaded_context

            ctx = preloaded_context()
            slots = ctx.Queue()
            for slot in self.resources.slots:
                slots.put(slot)

            self._pool = ProcessPoolExecutor(self.resources.workers, mp_context=ctx,
                                             initializer=init_local_worker, initargs=(slots,))
        return self._pool

    def submit(self, specs: list[CellSpec]) -> list[Future]:
        handles = []
        for spec in specs:
            try:
                handles.append(self._ensure_pool().submit(run_cell, spec))
            except BrokenProcessPool:  # a worker died (e.g. killed for memory): start a fresh pool
                self._pool = None
                handles.append(self._ensure_pool().submit(run_cell, spec))
        return handles

    def job_id(self, handle) -> str | None:
        return None

    def stop(self) -> None:
        """Ask running cells to stop (SIGTERM: each saves a checkpoint and exits 130)."""
        pool = self._pool
        for proc in list(getattr(pool, "_processes", {}).values()) if pool else []:
            if proc.is_alive():
                proc.terminate()

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None


class SubmititLauncher:
    """Slurm (or submitit's local executor): one job per cell, the first batch as one job array
    throttled by ``slurm.array_parallelism``; a run with several GPUs runs under torchrun."""

    name = "slurm"

    def __init__(self, slurm, resources: Resources, folder: Path, job_name: str):
        import submitit

        self.resources = resources
        # submitit's local executor starts every job at once: the grid throttles it to the workers
        self.capacity = resources.workers if slurm.cluster == "local" else math.inf
        self.executor = submitit.AutoExecutor(folder=folder, cluster=slurm.cluster)
        params: dict[str, Any] = {
            "name": job_name, "timeout_min": slurm.time, "nodes": 1, "tasks_per_node": 1,
            "cpus_per_task": resources.cpus_per_run, "gpus_per_node": resources.gpus_per_run or None,
            "mem_gb": slurm.mem_gb}
        if slurm.cluster == "slurm":
            additional = dict(slurm.additional)
            for key in ("account", "qos", "constraint"):
                if getattr(slurm, key) is not None:
                    additional[key] = getattr(slurm, key)
            params.update(slurm_partition=slurm.partition, slurm_array_parallelism=slurm.array_parallelism,
                          slurm_additional_parameters=additional or None)
        self.executor.update_parameters(**{k: v for k, v in params.items() if v is not None})

    def submit(self, specs: list[CellSpec]) -> list[Any]:
        if len(specs) == 1:
            return [self.executor.submit(run_cell, specs[0])]
        with self.executor.batch():
            jobs = [self.executor.submit(run_cell, spec) for spec in specs]
        return jobs

    def job_id(self, handle) -> str | None:
        return str(getattr(handle, "job_id", None))

    def stop(self) -> None:
        """Jobs keep running on the cluster (they hold their cells' locks); re-running the grid
        waits for them."""

    def close(self, wait: bool = True) -> None:
        pass


class _RayHandle:
    def __init__(self, ray, ref):
        self.ray, self.ref = ray, ref

    def done(self) -> bool:
        ready, _ = self.ray.wait([self.ref], timeout=0)
        return bool(ready)

    def result(self):
        return self.ray.get(self.ref)


class RayLauncher:
    """Ray tasks (``num_cpus`` / ``num_gpus`` per cell); starts a local Ray instance unless
    ``ray.address`` names a cluster (``auto`` joins the one this machine belongs to)."""

    name = "ray"

    def __init__(self, ray_cfg, resources: Resources, workers: int | None):
        import ray

        self.ray = ray
        self.resources = resources
        self.started = not ray.is_initialized()
        if self.started:
            local = ray_cfg.address is None
            ray.init(address=ray_cfg.address, include_dashboard=False, log_to_driver=False,
                     num_cpus=len(usable_cores()) if local else None, configure_logging=False)
        self.capacity = workers if workers is not None else math.inf
        self.remote = ray.remote(num_cpus=resources.cpus_per_run, num_gpus=resources.gpus_per_run,
                                 max_retries=0)(run_cell)

    def submit(self, specs: list[CellSpec]) -> list[_RayHandle]:
        return [_RayHandle(self.ray, self.remote.remote(spec)) for spec in specs]

    def job_id(self, handle) -> str | None:
        return handle.ref.hex()

    def stop(self) -> None:
        pass

    def close(self, wait: bool = True) -> None:
        if self.started:
            self.ray.shutdown()


def make_launcher(cfg, folder: Path):
    """The launcher ``cfg.launcher`` names, with its resources checked (ConfigError, exit 2)."""
    if cfg.launcher == "local":
        return LocalLauncher(local_resources(cfg.workers, cfg.cpus_per_run, cfg.gpus_per_run))
    if cfg.launcher == "slurm":
        if cfg.slurm.cluster == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError("launcher", "launcher=slurm needs Slurm (no sbatch on PATH); "
                                          "slurm.cluster=local runs the jobs here through submitit's local executor")
        if cfg.slurm.cluster == "local":
            resources = local_resources(cfg.workers, cfg.cpus_per_run, cfg.gpus_per_run or 0)
        else:
            resources = Resources(1, cfg.cpus_per_run or 8, 1 if cfg.gpus_per_run is None else cfg.gpus_per_run)
        return SubmititLauncher(cfg.slurm, resources, folder / "submitit", "rankwise-grid")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("launcher", "launcher=ray needs Ray: pip install -e '.[ray]'") from None
    gpus = len(visible_gpus())
    resources = Resources(cfg.workers or 1, cfg.cpus_per_run or max(1, len(usable_cores()) // (cfg.workers or 1)),
                          (1 if gpus else 0) if cfg.gpus_per_run is None else cfg.gpus_per_run)
    return RayLauncher(cfg.ray, resources, cfg.workers)
