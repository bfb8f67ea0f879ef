"""One job end to end: (search →) one training per seed → aggregated ``metrics.json``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rankwise.config.loader import Job
from rankwise.data.tasks import get_task
from rankwise.results import atomic_write_json, provenance, write_yaml
from rankwise.stats import mean_std_ci95

log = logging.getLogger(__name__)


def write_predictions(run_dir: Path, seed: int, predictions: dict[str, dict[str, list]]) -> None:
    for split, cols in predictions.items():
        path = run_dir / "predictions" / split / f"seed{seed}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"idx": i, "label": y, "prediction": p})
                 for i, y, p in zip(cols["idx"], cols["label"], cols["prediction"])]
        path.write_text("\n".join(lines) + "\n")


def aggregate_seeds(results: list) -> dict[str, Any]:
    """Per-seed final metrics, mean, std (ddof=1) and 95 % t-interval per metric."""
    per_seed = {str(r.seed): r.final for r in results}
    keys = sorted({k for r in results for k, v in r.final.items() if isinstance(v, (int, float))})
    mean, std, ci = {}, {}, {}
    for k in keys:
        vals = [r.final[k] for r in results if isinstance(r.final.get(k), (int, float))]
        m, s, (lo, hi) = mean_std_ci95(vals)
        mean[k], std[k], ci[k] = m, s, [lo, hi]
    return {"seeds": [r.seed for r in results], "per_seed": per_seed, "mean": mean, "std": std, "ci95": ci}


def glue_average(dataset: str, subset: str, metrics: dict[str, float]) -> dict[str, float]:
    if dataset != "glue":
        return {}
    task = get_task(dataset, subset)
    key = f"validation_{task.primary_metric}"
    return {"glue_avg": metrics[key]} if key in metrics else {}


def train_seeds(job: Job, resume: bool, reporter: Callable | None = None, write_outputs: bool = True):
    """Train the job's configuration once per seed; return the SeedResults."""
    from rankwise.training.loop import Trainer, stop_on_signals

    results = []
    data = None
    with stop_on_signals() as stop:
        seeds = job.run.training.seed_list()
        for seed in seeds[:1] if job.job.mode == "trial" else seeds:  # trial: a smoke run, one seed
            seed_dir = job.run_dir / f"seed{seed}"
            trainer = Trainer(job, seed, seed_dir, reporter=reporter, data=data)
            data = trainer.data  # same tokenised data for every seed
            result = trainer.run(resume=resume, stop=stop)
            if write_outputs:
                write_predictions(job.run_dir, seed, result.predictions)
            results.append(result)
    return results


def execute(job: Job, prepare_run_dir: Callable[[Job], bool]) -> str:
    """Run the job; return the one-line summary printed by the CLI."""
    t_start = time.perf_counter()
    if job.job.mode == "full" and job.run.optuna.n_trials > 0:
        # The Optuna search engine is not part of this release yet: refuse before anything is
        # written rather than silently training only the defaults.
        from rankwise.errors import ConfigError

        raise ConfigError("optuna.n_trials", f"{job.run.optuna.n_trials} trials requested, but this "
                          "release has no Optuna search yet; set optuna.n_trials=0 (or use mode=trial)")
    resume = prepare_run_dir(job)
    run_dir = job.run_dir
    task = get_task(job.run.dataset.name, job.run.dataset.subset)
    from rankwise.training.loop import resolve_device

    device = resolve_device(job.job.device)
    base = {"run_id": job.run.run_id, "method": job.run.method, "algorithm": job.run.algorithm,
            "status": "running", "mode": job.job.mode,
            "task": {"dataset": job.run.dataset.name, "subset": job.run.dataset.subset,
                     "primary_metric": f"validation_{task.primary_metric}",
                     "is_regression": task.is_regression},
            "config": job.run_dict, "provenance": provenance(device)}
    atomic_write_json(run_dir / "metrics.json", base)
    write_yaml(run_dir / "config.yaml", job.run_dict)
    from rankwise.tracking import start_tracker

    tracker = start_tracker(job.job.wandb, job.run.run_id, job.run_dict, run_dir,
                            enabled=job.job.mode == "full")
    results = train_seeds(job, resume)
    first = results[0]
    agg = aggregate_seeds(results)
    final = {**agg["mean"], **glue_average(job.run.dataset.name, job.run.dataset.subset, agg["mean"])}
    metrics = {
        **base, "status": "complete",
        "final": final, "best": first.best, "history": [h for h in first.history if h.get("type") == "eval"],
        **agg,
        "params": first.params,
        "wall_time_s": {k: float(np.sum([r.wall_time_s[k] for r in results])) for k in first.wall_time_s},
        "job_wall_time_s": time.perf_counter() - t_start,
        "step_time_s": first.step_time_s, "peak_memory_mb": max((r.peak_memory_mb or 0) for r in results) or None,
        "method_metrics": first.method_metrics,
        "per_seed_method_metrics": {str(r.seed): r.method_metrics for r in results},
    }
    tracker.summary(final)
    tracker.finish()
    atomic_write_json(run_dir / "metrics.json", metrics)
    primary = metrics["task"]["primary_metric"]
    std = agg["std"].get(primary, 0.0)
    seeds = len(results)
    return f"{primary}={final.get(primary, float('nan')):.4f}" + (f" ± {std:.4f} over {seeds} seeds" if seeds > 1 else "") + f" -> {run_dir / 'metrics.json'}"
