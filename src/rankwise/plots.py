"""Comparison figures (matplotlib, Agg): metric bars with std error bars, learning curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, stem: Path) -> None:
    """Write ``stem``.png and ``stem``.pdf and close the figure."""
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(stem.with_suffix(f".{ext}"))
    plt.close(fig)


def comparison_bars(values: dict[str, float], std: dict[str, float], metric: str, stem: Path) -> None:
    ids = list(values)
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(ids) + 1), 3.5))
    ax.bar(range(len(ids)), [values[i] for i in ids], yerr=[std.get(i, 0) for i in ids], capsize=4)
    ax.set_xticks(range(len(ids)), ids, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(metric)
    save_figure(fig, stem)


def learning_curves(runs: list[dict], metric: str, stem: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in runs:
        pts = [(h["step"], h[metric]) for h in r.get("history", []) if metric in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=r["run_id"])
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title("learning curves")
    if ax.lines:
        ax.legend(fontsize=7)
    save_figure(fig, stem)
