"""Per-step cost of the rank-r methods on identical batches, and IW calibration's share.

The methods (:func:`overhead_methods`, from the registry: LoRA, the cost reference; IW-LoRA,
its importance-weighted twin; AdaLoRA, DoRA, PiSSA, ...: every other method that takes the
run's rank, alpha and dropout) are built in one process from the same run config (same
backbone, data, batch size, rank, seed); the timed steps are interleaved (LoRA, IW-LoRA,
AdaLoRA, ..., LoRA, ...) on the same batch, so drift in machine load hits all alike. Reported: mean and median
step time per method, the ratios to LoRA, the measured calibration time, and the
calibration's share of a whole run's wall time, computed for this run's size and for an
MNLI-sized run (392,702 examples, batch 32, 3 epochs) from the measured per-batch costs.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rankwise.config.loader import Job

MNLI_TRAIN_EXAMPLES = 392_702


def overhead_methods() -> tuple[str, str, tuple[str, ...]]:
    """(the cost reference method, its importance-weighted twin, every method timed): the two,
    then every other method that takes the run's adapter settings (IW twins aside)."""
    from rankwise.methods import cost_reference, method_for_adapter_type, registered_methods

    methods = registered_methods()
    reference = cost_reference()[0]
    twin = method_for_adapter_type(methods[reference].adapter_type, importance_weighted=True)
    rest = [n for n, e in methods.items()
            if e.takes_adapter_settings and not e.importance_weighted_of and n != reference]
    return reference, twin, (reference, twin, *rest)


def variant(job: Job, kind: str) -> Job:
    """The job's run turned into method ``kind`` with the run's rank, alpha and dropout."""
    from rankwise.bench.train import method_variant

    return method_variant(job, kind)


def run(job: Job, steps: int = 20, warmup: int = 3, calibration_batches: int | None = None,
        workdir: Path | None = None) -> dict[str, Any]:
    from rankwise.results import device_description
    from rankwise.training.loop import Trainer

    workdir = workdir or Path(job.command.results_dir) / "bench-overhead"
    reference, twin, kinds = overhead_methods()
    trainers: dict[str, Trainer] = {}
    data = None
    for kind in kinds:
        trainers[kind] = Trainer(variant(job, kind), job.run.training.seed, workdir / kind, data=data)
        data = trainers[kind].data
    n_cal = calibration_batches or job.run.model.importance_weighted_regularisation.sensitivity_warmup_steps
    cal_metrics, calibration_s = _calibrate(trainers[twin], n_cal)
    total = warmup + steps
    for tr in trainers.values():
        tr.method.prepare_training(tr.model, max(total, 10))
        tr.model.train()
    batch_list = _timed_batches(job, data, trainers[reference].collate, total)
    times = _interleaved_step_times(trainers, batch_list, warmup)
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    bs = job.run.training.batch_size

    def share(n_examples: int, epochs: int, batch: int) -> dict[str, float]:
        return _calibration_share(n_examples, epochs, batch, mean[twin], n_cal, calibration_s)

    return {
        "run": job.run.run_id, "model": job.run.model.name, "batch_size": bs, "timed_steps": steps,
        "warmup_steps": warmup, "reference": reference, "step_time_s_mean": mean,
        "step_time_s_median": median,
        "ratio_to_lora_mean": {k: mean[k] / mean[reference] for k in kinds},
        "ratio_to_lora_median": {k: median[k] / median[reference] for k in kinds},
        "calibration_s": calibration_s, "calibration_s_per_batch": calibration_s / n_cal,
        "calibration": cal_metrics,
        "calibration_share_this_run": share(len(data.train), job.run.training.epochs, bs),
        "calibration_share_mnli_sized_run": share(MNLI_TRAIN_EXAMPLES, 3, 32),
        "note": ("AdaLoRA masks pruned ranks instead of shrinking them: its compute stays at "
                 "init_r throughout training."),
        "device": device_description(trainers[reference].device),
    }


def _calibrate(iw: Any, n_cal: int) -> tuple[dict[str, Any], float]:
    """IW-LoRA's calibration on its first ``n_cal`` calibration batches: metrics and seconds."""
    t0 = time.perf_counter()
    cal_iter = iw.calibration_batches()
    cal_metrics = iw.method.calibrate(iw.model, (next(cal_iter) for _ in range(n_cal)), iw.loss_fn)
    return cal_metrics, time.perf_counter() - t0


def _timed_batches(job: Job, data: Any, collate: Any, total: int) -> list[dict]:
    """The first ``total`` training batches of epoch 0 (cycled when the data set is smaller);
    every method steps on the same ones."""
    from rankwise.data.loading import batches, epoch_permutation

    order = epoch_permutation(len(data.train), job.run.training.seed, 0)
    batch_list = list(batches(data.train, order, job.run.training.batch_size, collate,
                              limit=total))
    while len(batch_list) < total:  # small datasets: cycle
        batch_list += batch_list[: total - len(batch_list)]
    return batch_list


def _interleaved_step_times(trainers: dict[str, Any], batch_list: list[dict],
                            warmup: int) -> dict[str, list[float]]:
    """Seconds per training step of each method, the methods taking turns on every batch
    (so drift in machine load hits all alike); the first ``warmup`` batches are not timed."""
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for i, batch in enumerate(batch_list):
        for kind, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.train_step(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times[kind].append(time.perf_counter() - t0)
    return times


def _calibration_share(n_examples: int, epochs: int, batch: int, iw_step_s: float, n_cal: int,
                       calibration_s: float) -> dict[str, float]:
    """Calibration's share of a run of ``n_examples`` × ``epochs`` at IW-LoRA's mean step time."""
    n_steps = math.ceil(n_examples / batch) * epochs
    train_s = n_steps * iw_step_s
    return {"train_steps": n_steps, "calibration_batches": n_cal,
            "calibration_share": calibration_s / (calibration_s + train_s)}
