"""How long each cell of a grid should take: before anything runs, from the run config and a
probe's step time; while it runs, from the cells' own measured step rates.

A seed cell's time is ``load + calibration + steps × s_per_step + evaluations +
measurement``:

- steps: ``epochs × ⌈rows / batch⌉`` (or ``max_steps``), rows from ``dataset.max_train_samples``
  or the training split's parquet metadata;
- evaluations: one pass over the evaluation rows per epoch and at the end, each batch
  ``s_per_eval_batch``;
- measurement (when the run measures): ``timed_batches`` evaluation batches plus the length
  sweep's passes.

``s_per_step`` comes, in this order, from the run's own finished seeds (``result.json``: the
mean step time), a running seed's ``progress.json``, the probe (:mod:`rankwise.grid.probe`),
else nothing (the ETA shows ``?``). A trial cell is a seed cell on the search's training rows
without the measurement. A merge is a few seconds.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

from rankwise.grid.cells import Cell, Part
from rankwise.grid.worker import read_json_file

MERGE_S = 2.0  # a merge forked from a preloaded worker: read the seeds, write metrics.json (0.5 s here)
FALLBACK_LOAD_S = 10.0  # process start and model load when no probe measured it
SWEEP_FORWARDS_PER_LENGTH_BATCH = 1.0


def split_rows(est: dict[str, Any], split: str) -> int | None:
    """Rows a seed reads of ``split`` (``train`` | ``validation``): its ``max_*_samples`` cap,
    else (or below it) the local split's row count."""
    n = est.get("max_train_samples" if split == "train" else "max_eval_samples")
    rows = parquet_rows(est, split)
    if n is not None:
        return min(n, rows) if rows is not None else n
    return rows


def parquet_rows(est: dict[str, Any], split: str) -> int | None:
    """Rows of a local GLUE-layout split from the parquet footer (no data read), else None."""
    import os

    root = est.get("data_dir") or os.environ.get("RANKWISE_DATA_DIR")
    if est.get("dataset") != "glue" or not root:
        return None
    return _footer_rows(str(root), str(est.get("subset")), split)


@functools.cache
def _footer_rows(root: str, subset: str, split: str) -> int | None:
    """Read once per split: estimates are asked for at every scheduling pass."""
    files = sorted((Path(root) / subset).glob(f"{split}*-of-*.parquet"))
    if not files:
        return None
    try:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files[:1])
    except Exception:  # noqa: BLE001  an estimate only
        return None


def seed_steps(est: dict[str, Any]) -> int | None:
    rows = split_rows(est, "train")
    if rows is None:
        return None
    per_epoch = math.ceil(rows / est["batch_size"])
    if est.get("max_batches") is not None:
        per_epoch = min(per_epoch, est["max_batches"])
    steps = per_epoch * est["epochs"]
    return min(steps, est["max_steps"]) if est.get("max_steps") else steps


def seed_seconds(cell: Cell, s_per_step: float, s_per_eval_batch: float, load_s: float,
                 measure: bool = True) -> float | None:
    est = cell.estimate
    steps = seed_steps(est)
    if steps is None:
        return None
    n_eval = split_rows(est, "validation")
    eval_batches = math.ceil(n_eval / est["eval_batch_size"]) if n_eval else 0
    if est.get("max_batches") is not None:
        eval_batches = min(eval_batches, est["max_batches"])
    evaluations = (est["epochs"] + 1) * eval_batches * s_per_eval_batch
    measurement = 0.0
    if measure and est.get("measure"):
        measurement = (est["timed_batches"] + est["n_lengths"] * est["repeats"]) * s_per_eval_batch
    return load_s + steps * s_per_step + evaluations + measurement


class Estimator:
    """Seconds per cell, from the best evidence at hand (see the module's docstring)."""

    def __init__(self, cells: dict[str, Cell], results_dir: Path, probe: dict[str, Any] | None = None,
                 past: dict[str, list[float]] | None = None):
        self.cells, self.results_dir = cells, results_dir
        self.probe = probe or {}
        self.past = past or {}

    def step_time(self, run_id: str) -> float | None:
        """The run's seconds per step: its finished seeds', else a running seed's, else the probe's."""
        run_dir = self.results_dir / run_id
        cell = self.cells[run_id]
        probed = (self.probe.get("runs") or {}).get(run_id) or {}
        measured = []
        for seed in cell.seeds:
            record = read_json_file(run_dir / f"seed{seed}" / "result.json")
            if record and record.get("run_config") == cell.config and record.get("step_time_s"):
                measured.append(float(record["step_time_s"]))
        if measured:
            return sum(measured) / len(measured)
        running = [p["s_per_step"] for p in (self.progress(run_id, s) for s in cell.seeds) if p]
        if running:
            return sum(running) / len(running)
        return probed.get("s_per_step") or self.probe.get("s_per_step")

    def progress(self, run_id: str, seed: int) -> dict[str, Any] | None:
        data = read_json_file(self.results_dir / run_id / f"seed{seed}" / "progress.json")
        return data if data and data.get("s_per_step") else None

    def seconds(self, part: Part) -> float | None:
        """The whole cell's expected seconds."""
        if part.kind == "merge":
            return MERGE_S
        past = self.past.get(part.id)
        step = self.step_time(part.run_id)
        if step is None:
            return past[-1] if past else None
        cell = self.cells[part.run_id]
        probed = (self.probe.get("runs") or {}).get(part.run_id) or {}
        own = probed if probed.get("s_per_step") else self.probe
        probe_step, eval_batch = own.get("s_per_step"), own.get("s_per_eval_batch")
        if eval_batch is None:
            eval_batch = step / 3  # a forward at the evaluation batch size: about a third of a step
        elif probe_step:
            eval_batch *= step / probe_step  # the run's own speed relative to its probe
        load = self.load_s(part.run_id)
        return seed_seconds(cell, step, eval_batch, load, measure=part.kind == "seed")

    def load_s(self, run_id: str) -> float:
        probed = (self.probe.get("runs") or {}).get(run_id) or {}
        return probed.get("load_s") or self.probe.get("load_s") or FALLBACK_LOAD_S

    def remaining(self, part: Part, elapsed: float | None) -> float | None:
        """Seconds left of a running cell: from its own progress (steps left × its seconds per
        step, plus what follows training) when it has logged steps, else estimate − elapsed."""
        total = self.seconds(part)
        if part.kind == "seed":
            p = self.progress(part.run_id, part.index)
            if p and p.get("updated_at", 0) >= time.time() - 3600:
                cell = self.cells[part.run_id]
                tail = 0.0
                if total is not None:
                    steps = seed_steps(cell.estimate) or p["total_steps"]
                    tail = max(0.0, total - steps * self.step_time(part.run_id) - self.load_s(part.run_id))
                return max(0.0, (p["total_steps"] - p["step"]) * p["s_per_step"]) + tail
        if total is None:
            return None
        return max(0.0, total - (elapsed or 0.0))


def priority(part: Part, seconds: float | None) -> tuple:
    """Which ready cell a free worker takes first: merges (they finish runs), then search
    trials (a run's seeds wait for its study), then the longest seed."""
    rank = {"merge": 0, "trial": 1, "seed": 2}[part.kind]
    return rank, -(seconds if seconds is not None else math.inf)


def is_ready(part: Part, parts: list[Part], done: set[str]) -> bool:
    """A seed waits for its run's search trials; a merge for its run's seeds and trials."""
    if part.kind == "trial":
        return True
    before = ("trial",) if part.kind == "seed" else ("trial", "seed")
    return all(p.id in done for p in parts if p.run_id == part.run_id and p.kind in before)


def simulate(parts: list[Part], seconds: dict[str, float], workers: int) -> float:
    """The grid's schedule played out with these cell times: when the last cell ends."""
    import heapq

    done: set[str] = set()
    todo = list(parts)
    running: list[tuple[float, str]] = []
    now = 0.0
    while todo or running:
        ready = sorted((p for p in todo if is_ready(p, parts, done)), key=lambda p: priority(p, seconds[p.id]))
        while ready and len(running) < workers:
            p = ready.pop(0)
            todo.remove(p)
            heapq.heappush(running, (now + seconds[p.id], p.id))
        if not running:
            break  # nothing can start (cannot happen with the dependencies above)
        now, finished = heapq.heappop(running)
        done.add(finished)
    return now
