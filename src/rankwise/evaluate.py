"""``python -m rankwise.evaluate results_dir=<dir> run_ids='["a","b"]' [allow_incomplete=true]``

Reads each run's ``metrics.json`` and predictions and writes ``<results_dir>/comparison/``:
``aggregated_metrics.json`` (``primary_metric``, ``metrics{metric:{run_id:value}}``, ``std``,
``best_proposed``, ``best_baseline``, ``gap``, ``significance``, ``pairwise``),
``summary.md`` and figures (``comparison_<metric>.png/.pdf``, ``learning_curves.png/.pdf``).

Significance (``pairwise``): every proposed run against every other run of the same task on
the primary metric's split, paired per example on predictions pooled over the seeds both runs
share — exact McNemar for classification, paired bootstrap (10k resamples) for regression;
``significance`` is the best proposed vs the best baseline. Differences with p >= 0.05 are
marked **not significant** in ``summary.md``. The summary table shows mean ± std over seeds per
task metric and, where the runs measured them, adapter FLOPs per example, mean and p99 latency
and budget violations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rankwise.errors import RankwiseError
from rankwise.metrics import METRIC_FNS, is_lower_better
from rankwise.results import atomic_write_json, read_json
from rankwise.stats import mcnemar_test, paired_bootstrap

ALPHA = 0.05


class EvaluationError(RankwiseError):
    exit_code = 2


def parse_args(argv: list[str]) -> dict[str, Any]:
    from rankwise.config.loader import parse_overrides
    from rankwise.config.typed import did_you_mean

    known = {"results_dir": None, "run_ids": None, "allow_incomplete": False}
    for key, value, _ in parse_overrides(argv):
        if key not in known:
            raise EvaluationError(f"unknown argument '{key}'{did_you_mean(key, known)}")
        known[key] = value
    if not known["results_dir"]:
        raise EvaluationError("results_dir=<dir> is required")
    if not isinstance(known["run_ids"], list) or not known["run_ids"]:
        raise EvaluationError("run_ids='[\"id1\",\"id2\"]' (a non-empty list) is required")
    return known


def load_run(results_dir: Path, run_id: str, allow_incomplete: bool) -> dict[str, Any]:
    path = results_dir / run_id / "metrics.json"
    if not path.is_file():
        raise EvaluationError(f"run '{run_id}': no metrics.json in {results_dir / run_id}")
    data = read_json(path)
    if data.get("status") != "complete" and not allow_incomplete:
        raise EvaluationError(f"run '{run_id}' has status '{data.get('status')}', not complete "
                              "(pass allow_incomplete=true to include it)")
    data.setdefault("final", {})
    return data


def load_predictions(results_dir: Path, run_id: str, split: str) -> dict[int, dict[int, tuple]]:
    """seed -> {idx: (label, prediction)}."""
    out = {}
    for f in sorted((results_dir / run_id / "predictions" / split).glob("seed*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[int(f.stem[4:])] = {r["idx"]: (r["label"], r["prediction"]) for r in rows}
    return out


def paired_test(results_dir: Path, a: str, b: str, split: str, metric: str, regression: bool) -> dict:
    pa, pb = load_predictions(results_dir, a, split), load_predictions(results_dir, b, split)
    seeds = sorted(set(pa) & set(pb)) or ([min(pa)] if pa and pb else [])
    if not seeds or not (pa and pb):
        return {"runs": [a, b], "test": None, "reason": "predictions missing"}
    seed_pairs = list(zip(seeds, seeds)) if set(pa) & set(pb) else [(min(pa), min(pb))]
    ya, xa, xb = [], [], []
    for sa, sb in seed_pairs:
        common = sorted(set(pa[sa]) & set(pb[sb]))
        ya += [pa[sa][i][0] for i in common]
        xa += [pa[sa][i][1] for i in common]
        xb += [pb[sb][i][1] for i in common]
    y, xa, xb = map(np.asarray, (ya, xa, xb))
    if regression:
        fn = METRIC_FNS.get(metric.split("_", 1)[-1], METRIC_FNS["pearson"])
        res = paired_bootstrap(xa, xb, y, fn)
    else:
        res = mcnemar_test(xa == y, xb == y)
    res.update({"runs": [a, b], "seeds": [s for s, _ in seed_pairs], "alpha": ALPHA,
                "significant": res["p_value"] < ALPHA})
    return res


def task_of(run: dict) -> tuple[str, str]:
    task = run.get("task", {})
    return (str(task.get("dataset", "?")), str(task.get("subset", "?")))


def best_of(runs: list[dict], metric: str) -> dict | None:
    scored = [r for r in runs if isinstance(r["final"].get(metric), (int, float))]
    if not scored:
        return None
    pick = (min if is_lower_better(metric) else max)(scored, key=lambda r: r["final"][metric])
    return {"run_id": pick["run_id"], "value": pick["final"][metric]}


def evaluate(results_dir: Path, run_ids: list[str], allow_incomplete: bool = False) -> dict[str, Any]:
    runs = [load_run(results_dir, r, allow_incomplete) for r in run_ids]
    primary = runs[0].get("task", {}).get("primary_metric", "validation_accuracy")
    regression = bool(runs[0].get("task", {}).get("is_regression", False))
    metric_names = sorted({k for r in runs for k, v in r["final"].items() if isinstance(v, (int, float))})
    metrics = {m: {r["run_id"]: r["final"][m] for r in runs if m in r["final"]} for m in metric_names}
    std = {m: {r["run_id"]: r.get("std", {}).get(m, 0.0) for r in runs if m in r["final"]} for m in metric_names}
    proposed = [r for r in runs if r.get("method") == "proposed"]
    baselines = [r for r in runs if r.get("method") != "proposed" and not str(r.get("method")).startswith("ablation")]
    baselines = baselines or [r for r in runs if r.get("method") != "proposed"]
    bp, bb = best_of(proposed, primary), best_of(baselines, primary)
    gap = None
    if bp and bb and bb["value"] != 0:
        gap = 100.0 * (bp["value"] - bb["value"]) / abs(bb["value"])
        gap = -gap if is_lower_better(primary) else gap
    split = primary.split("_")[0]
    by_id = {r["run_id"]: r for r in runs}
    same_task = bool(bp and bb) and task_of(by_id[bp["run_id"]]) == task_of(by_id[bb["run_id"]])
    significance = paired_test(results_dir, bp["run_id"], bb["run_id"], split, primary, regression) if same_task else None
    # Every proposed run against every other run of the same task (pooled seed-matched predictions).
    pairwise = [paired_test(results_dir, p["run_id"], r["run_id"], split, primary, regression)
                for p in proposed for r in runs
                if r.get("method") != "proposed" and task_of(r) == task_of(p)]
    report = {"primary_metric": primary, "run_ids": run_ids, "metrics": metrics, "std": std,
              "n_seeds": {r["run_id"]: len(r.get("seeds", [1])) for r in runs},
              "roles": {r["run_id"]: r.get("method") for r in runs},
              "algorithms": {r["run_id"]: r.get("algorithm") for r in runs},
              "best_proposed": bp, "best_baseline": bb, "gap": gap,
              "significance": significance, "pairwise": pairwise}
    out = results_dir / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "aggregated_metrics.json", report)
    (out / "summary.md").write_text(summary_markdown(report, runs))
    from rankwise.plots import comparison_bars, learning_curves

    plotted = {primary} | {key for _, key, _ in COST_COLUMNS} | {
        m for m in metric_names if any(m.endswith("_" + name) for name in METRIC_FNS) and "_spectral_" not in m}
    for m in metric_names:
        if m in plotted and (len(metrics[m]) > 1 or m == primary):
            comparison_bars(metrics[m], std[m], m, out / f"comparison_{m}")
    learning_curves(runs, primary, out / "learning_curves")
    return report


# Cost columns of the summary: (label, key in metrics.json ``final`` or ``method_metrics``, format).
COST_COLUMNS = (
    ("adapter MFLOPs / example", "adapter_mflops_per_example", "{:.3g}"),
    ("latency mean (ms)", "latency_ms_mean", "{:.2f}"),
    ("latency p99 (ms)", "latency_ms_p99", "{:.2f}"),
    ("budget violations", "budget_violations", "{:.0f}"),
)


def run_value(run: dict, key: str) -> float | None:
    for block in ("final", "method_metrics"):
        value = run.get(block, {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


def mean_std_cell(run: dict, metric: str) -> str:
    value = run["final"].get(metric)
    if not isinstance(value, (int, float)):
        return "—"
    n = len(run.get("seeds") or [1])
    std = run.get("std", {}).get(metric)
    if n > 1 and isinstance(std, (int, float)) and std == std:
        return f"{value:.4f} ± {std:.4f} (n={n})"
    return f"{value:.4f}"


def summary_markdown(report: dict, runs: list[dict]) -> str:
    primary = report["primary_metric"]
    # task metrics only (<split>_<metric>); method statistics such as validation_spectral_* stay
    # in aggregated_metrics.json
    task_metrics = sorted({m for r in runs for m in r["final"]
                           if m != primary and m.startswith("validation")
                           and any(m.endswith("_" + name) for name in METRIC_FNS)
                           and "_spectral_" not in m})
    costs = [c for c in COST_COLUMNS if any(run_value(r, c[1]) is not None for r in runs)]
    multi_task = len({task_of(r) for r in runs}) > 1
    head = (["run", "role", "algorithm"] + (["task"] if multi_task else [])
            + [f"{primary} (mean ± std)"] + task_metrics + [c[0] for c in costs]
            + ["trainable params", "wall time (s)"])
    lines = ["# Comparison", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        row = [r["run_id"], str(r.get("method")), str(r.get("algorithm"))]
        row += ["/".join(task_of(r))] if multi_task else []
        row += [mean_std_cell(r, primary)] + [mean_std_cell(r, m) for m in task_metrics]
        for _, key, fmt in costs:
            value = run_value(r, key)
            row.append("—" if value is None else fmt.format(value))
        trainable = r.get("params", {}).get("trainable")
        row += [f"{trainable:,}" if isinstance(trainable, int) else "—",
                f"{r.get('wall_time_s', {}).get('total', float('nan')):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Values are means over seeds (± sample std, n seeds) where a run has several seeds."]
    gap = "n/a" if report["gap"] is None else f"{report['gap']:+.2f} %"
    lines += ["", (f"Best proposed: {report['best_proposed']}; best baseline: {report['best_baseline']}; "
                   f"gap: {gap}"), "", "## Paired tests", ""]
    for t in report["pairwise"]:
        if t.get("test") is None:
            lines.append(f"- {t['runs'][0]} vs {t['runs'][1]}: no test ({t['reason']})")
            continue
        verdict = "significant" if t["significant"] else "**not significant**"
        lines.append(f"- {t['runs'][0]} vs {t['runs'][1]}: {t['test']} p = {t['p_value']:.4g} "
                     f"(n = {t['n_pairs']} paired predictions, seeds {t['seeds']}) — {verdict} at α = {ALPHA}")
    if not report["pairwise"]:
        lines.append("- none (no proposed run, or no other run on the same task)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        report = evaluate(Path(args["results_dir"]), [str(r) for r in args["run_ids"]],
                          bool(args["allow_incomplete"]))
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    out = Path(args["results_dir"]) / "comparison"
    print(f"wrote {out / 'aggregated_metrics.json'}, {out / 'summary.md'} "
          f"(best proposed {report['best_proposed']}, best baseline {report['best_baseline']}, gap {report['gap']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
