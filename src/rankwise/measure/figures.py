"""Measurement figures (png + pdf): FLOPs per example vs length, latency vs length, the
per-token open-gate histogram.

A run's own figures lie at the top of its run folder as ``<run_id>_<topic>_seed<N>.png/.pdf``
(:func:`run_figure_stem`): one file per seed, since each seed is its own measurement, and
names unique across runs and seeds, so the figures of many runs can be copied into one
folder without clashing.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import ticker

from rankwise.plots import plt, save_figure
from rankwise.results import run_figure_stem  # noqa: F401  (where run figures go)


def _length_bins(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Power-of-two bins [1,16], [17,32], [33,64], ... covering ``lengths`` (as statistics.py)."""
    hi, bins = 16, [(1, 16)]
    while hi < lengths.max():
        bins.append((hi + 1, 2 * hi))
        hi *= 2
    return bins


def flops_per_example_vs_length(lengths: list[int], adapter_flops: list[float],
                                controller_flops: list[float], title: str, stem: Path) -> None:
    """One run: per-example adapter (+ controller) MFLOPs against T_valid, with binned means."""
    x = np.asarray(lengths, dtype=float)
    adapter = np.asarray(adapter_flops, dtype=float) / 1e6
    extra = adapter + np.asarray(controller_flops, dtype=float) / 1e6
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.scatter(x, adapter, s=6, alpha=0.35, label="adapter (per example)")
    if np.any(extra != adapter):
        ax.scatter(x, extra, s=6, alpha=0.35, marker="x", label="adapter + controller")
    if len(x):
        centres, means = [], []
        for lo, hi in _length_bins(x):
            inside = (x >= lo) & (x <= hi)
            if inside.any():
                centres.append(x[inside].mean())
                means.append(adapter[inside].mean())
        ax.plot(centres, means, "k-o", ms=3, lw=1, label="adapter, mean per length bin")
    ax.set_xlabel("real tokens per example (T_valid)")
    ax.set_ylabel("MFLOPs per example")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, stem)


def open_gate_histogram(histogram: list[int], title: str, stem: Path) -> None:
    """Share of (token, target) pairs with j open directions, j = 0..R."""
    counts = np.asarray(histogram, dtype=float)
    share = counts / counts.sum() if counts.sum() else counts
    fig, ax = plt.subplots(figsize=(5, 3.3))
    ax.bar(np.arange(len(share)), share)
    mean = float((np.arange(len(share)) * share).sum())
    ax.axvline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.2f}")
    ax.set_xlabel("open directions per token (adapter rank of the token)")
    ax.set_ylabel("share of (token, target) pairs")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, stem)


def _by_variant(report: dict[str, Any], batch_size: int, key) -> dict[str, tuple[list, list]]:
    series: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for row in report["results"]:
        if row["batch_size"] == batch_size:
            xs, ys = series[row["variant"]]
            value = key(row)
            if value is not None:
                xs.append(row["length"])
                ys.append(value)
    return dict(series)


def _length_axis(ax, report: dict[str, Any]) -> None:
    lengths = sorted({row["length"] for row in report["results"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("sequence length (tokens)")


def bench_flops_vs_length(report: dict[str, Any], stem: Path) -> None:
    """Per variant: extra (adapter + controller) and total MFLOPs per example vs length."""
    batch = min(row["batch_size"] for row in report["results"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    extra = _by_variant(report, batch, lambda r: r["extra_flops_per_example"] / 1e6)
    total = _by_variant(report, batch, lambda r: (r["total_flops_per_example"] / 1e6
                                                  if r.get("total_flops_per_example") else None))
    for label, (xs, ys) in extra.items():
        left.plot(xs, ys, marker="o", label=label)
    for label, (xs, ys) in total.items():
        right.plot(xs, ys, marker="o", label=label)
    left.set_title("adapter + controller FLOPs per example", fontsize=9)
    left.set_ylabel("MFLOPs")
    right.set_title("whole model FLOPs per example (backbone counted)", fontsize=9)
    right.set_ylabel("MFLOPs")
    right.set_yscale("log")
    for ax in (left, right):
        _length_axis(ax, report)
        ax.legend(fontsize=7)
    save_figure(fig, stem)


def bench_latency_vs_length(report: dict[str, Any], stem: Path) -> None:
    """One panel per batch size: mean latency per variant (line), p50–p99 (vertical bar)."""
    sizes = sorted({row["batch_size"] for row in report["results"]})
    labels = list(dict.fromkeys(row["variant"] for row in report["results"]))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], sizes):
        for label in labels:
            rows = sorted((r for r in report["results"]
                           if r["variant"] == label and r["batch_size"] == batch),
                          key=lambda r: r["length"])
            if not rows:
                continue
            x = [r["length"] for r in rows]
            (line,) = ax.plot(x, [r["latency_ms"]["mean_ms"] for r in rows], marker="o", label=label)
            ax.vlines(x, [r["latency_ms"]["p50_ms"] for r in rows],
                      [r["latency_ms"]["p99_ms"] for r in rows], color=line.get_color(), lw=2,
                      alpha=0.5)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        _length_axis(ax, report)
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"batch size {batch}: mean (line), p50–p99 (bar)", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, stem)
