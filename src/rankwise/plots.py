"""Comparison figures (matplotlib, Agg): per-seed points with mean ± CI, learning curves."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

from rankwise.results import per_seed_values

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, stem: Path, tight: bool = True) -> None:
    """Write ``stem``.png and ``stem``.pdf and close the figure."""
    if tight:
        fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(stem.with_suffix(f".{ext}"))
    plt.close(fig)


def axis_span(values: list[float], intervals: list[tuple[float, float]], margin: float = 0.08
              ) -> tuple[float, float]:
    """A y-range holding every point and every interval whole, with a margin on both sides."""
    lo = min([*values, *(i[0] for i in intervals)])
    hi = max([*values, *(i[1] for i in intervals)])
    pad = margin * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.01
    return lo - pad, hi + pad


def seed_points(runs: list[dict], metric: str, stem: Path, title: str | None = None,
                intervals: dict[str, dict] | None = None, verdicts: list[str] | None = None) -> None:
    """Per-seed values (points) and each run's mean with its 95 % interval, on an axis that holds
    every interval (not from 0, so differences of a point or two stay visible).

    ``intervals`` (run id → ``{"mean", "ci95", "level"}``) are the intervals the verdicts use (the
    two-level bootstrap; test-set sampling alone with one seed); runs without one get the
    t-interval over seeds. ``verdicts`` are written under the plot.
    """
    from rankwise.stats import mean_std_ci95

    runs = [r for r in runs if per_seed_values(r, metric)]
    if not runs:
        return
    intervals = intervals or {}
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(runs) + 1.5), 3.6 + 0.22 * len(verdicts or [])))
    points, spans = [], []
    for k, r in enumerate(runs):
        values = per_seed_values(r, metric)
        own = intervals.get(r["run_id"])
        if own:
            mean, (lo, hi) = own["mean"], own["ci95"]
        else:
            mean, _, (lo, hi) = mean_std_ci95(values)
        offsets = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
        ax.scatter(k + np.asarray(offsets), values, s=14, color="0.45", zorder=2)
        ax.errorbar(k, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", color=f"C{k % 10}",
                    capsize=5, markersize=7, zorder=3)
        points += values
        spans.append((lo, hi))
    ax.set_xticks(range(len(runs)), [r["run_id"] for r in runs], rotation=20, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(runs) - 0.4)
    ax.set_ylim(*axis_span(points, spans))
    ax.set_ylabel(metric)
    levels = sorted({i["level"] for i in intervals.values()}) if intervals else ["t-interval over seeds"]
    ax.set_title(title or f"{metric}\nseeds (grey), mean ± 95 % CI\n({'; '.join(levels)})", fontsize=8)
    if verdicts:
        fig.text(0.01, 0.01, "\n".join(verdicts), fontsize=7, va="bottom", ha="left")
        fig.tight_layout(rect=(0, 0.06 * len(verdicts), 1, 1))
    save_figure(fig, stem, tight=not verdicts)


def read_step_logs(results_dir: Path, run: dict) -> list[list[dict]]:
    """Each seed's step log (``seed<N>/history.jsonl``) of a run."""
    logs = []
    for seed in run.get("seeds") or []:
        path = results_dir / run["run_id"] / f"seed{seed}" / "history.jsonl"
        if path.is_file():
            logs.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    return logs


def learning_curves(runs: list[dict], results_dir: Path, metric: str, stem: Path) -> None:
    """Training loss per logged step (mean over seeds) and the evaluation points of ``metric``."""
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, r in enumerate(runs):
        logs = read_step_logs(results_dir, r)
        train = [{h["step"]: h["loss"] for h in log if h.get("type") != "eval" and "loss" in h} for log in logs]
        evals = [{h["step"]: h[metric] for h in log if h.get("type") == "eval" and metric in h} for log in logs]
        steps = sorted(set.intersection(*(set(t) for t in train))) if train and all(train) else []
        if steps:
            ax_loss.plot(steps, [np.mean([t[s] for t in train]) for s in steps], color=f"C{k % 10}",
                         label=r["run_id"], linewidth=1)
        if not evals or not all(evals):  # no step logs: the evaluation points metrics.json keeps
            evals = [{h["step"]: h[metric] for h in r.get("history", []) if metric in h}]
        eval_steps = sorted(set.intersection(*(set(e) for e in evals))) if all(evals) else []
        if eval_steps:
            ax_eval.plot(eval_steps, [np.mean([e[s] for e in evals]) for s in eval_steps], marker="o",
                         color=f"C{k % 10}", label=r["run_id"])
    ax_loss.set(xlabel="step", ylabel="training loss (mean over seeds)", title="training loss")
    ax_eval.set(xlabel="step", ylabel=metric, title="evaluations")
    for ax in (ax_loss, ax_eval):
        if ax.lines:
            ax.legend(fontsize=7)
    save_figure(fig, stem)


def comparison_figures(report: dict, runs: list[dict], results_dir: Path, out: Path) -> None:
    """``comparison_<topic>`` figures of one comparison: the primary metric (per task when
    several), the other task metrics of a single task, and the learning curves."""
    by_task = report["by_task"]
    for task, summary in by_task.items():
        task_runs = [r for r in runs if report["tasks"][r["run_id"]] == task]
        primary = summary["primary_metric"]
        name = primary if len(by_task) == 1 else f"{task}_{primary}"
        words = [f"{t['runs'][0]} vs {t['runs'][1]}: {t['verdict']}" for t in report["pairwise"]
                 if report["tasks"][t["runs"][0]] == task]
        intervals = {rid: c["interval"] for rid, c in (report.get("run_checks") or {}).items()
                     if c is not None and report["tasks"][rid] == task}
        seed_points(task_runs, primary, out / f"comparison_{name}", intervals=intervals, verdicts=words)
        suffix = "" if len(by_task) == 1 else f"_{task}"
        learning_curves(task_runs, results_dir, primary, out / f"comparison_learning_curves{suffix}")
    if len(by_task) == 1:
        primary = next(iter(by_task.values()))["primary_metric"]
        from rankwise.summary import task_metric_names

        for metric in task_metric_names(runs, {primary}):
            seed_points(runs, metric, out / f"comparison_{metric}")
