"""``summary.md`` of a comparison (``rankwise.evaluate``): task metrics, costs, the methods ×
tasks table, verdicts and the notes a reader needs to weigh them."""

from __future__ import annotations

import math

from rankwise.metrics import METRIC_FNS

ROLE_NOTE = ("Values are means over seeds (± sample std, n seeds). † marks trial-mode runs "
             "(at most 2 batches) and runs that record no mode: not results. ‡ marks a run that "
             "fails its run checks (see Run checks).")

TIME_NOTE = ("Times: 'train + eval' sums calibration, training steps and evaluation over seeds; "
             "'job' is the whole command (loading, a search when there is one, the post-training "
             "FLOPs and latency measurement, writing).")

# (label, key in the comparison's ``costs`` block, format)
COST_COLUMNS = (
    ("adapter MFLOPs / example", "adapter_mflops_per_example", "{:.3g}"),
    ("controller MFLOPs / example", "controller_mflops_per_example", "{:.3g}"),
    ("extra MFLOPs / example", "extra_mflops_per_example", "{:.3g}"),
    ("extra vs LoRA r=8", "extra_vs_lora_r8", "{:.2f}×"),
    ("trainable params (incl. controllers)", "trainable_params_incl_controllers", "{:,.0f}"),
    ("latency mean (ms)", "latency_ms_mean", "{:.2f}"),
    ("latency p99 (ms)", "latency_ms_p99", "{:.2f}"),
    ("timed passes", "latency_n_timed", "{:.0f}"),
    # a mean over seeds: "{:g}" keeps 0.4 (violations in 2 of 5 seeds) from printing as 0
    ("budget violations (mean per seed)", "budget_violations", "{:g}"),
    ("open gates / token, training (expected)", "train_expected_open_gates_per_token", "{:.2f}"),
    ("open gates / token, evaluation", "eval_open_gates_per_token", "{:.2f}"),
)


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(row) + " |" for row in rows]


def mean_std_cell(run: dict, metric: str) -> str:
    value = run["final"].get(metric)
    if not isinstance(value, (int, float)):
        return "—"
    n = len(run.get("seeds") or [1])
    std = run.get("std", {}).get(metric)
    if n > 1 and isinstance(std, (int, float)) and math.isfinite(std):
        return f"{value:.4f} ± {std:.4f} (n={n})"
    return f"{value:.4f}"


def fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def run_name(run: dict) -> str:
    return run["run_id"] + (" †" if run.get("mode") != "full" else "")


def task_metric_names(runs: list[dict], primary: set[str]) -> list[str]:
    """Task metrics (<split>_<metric>, glue_score); method statistics stay in the JSON."""
    return sorted({m for r in runs for m in r["final"] if m not in primary and (
        m == "glue_score" or (m.startswith("validation") and "_spectral_" not in m
                              and any(m.endswith("_" + name) for name in METRIC_FNS)))})


def metrics_section(report: dict, runs: list[dict]) -> list[str]:
    primaries = {t["primary_metric"] for t in report["by_task"].values()}
    others = task_metric_names(runs, primaries)
    head = ["run", "role", "algorithm", "task", "primary metric", "primary (mean ± std)"] + others + [
        "train + eval (s)", "job (s)", "precision"]
    rows = []
    for r in runs:
        primary = report["by_task"][report["tasks"][r["run_id"]]]["primary_metric"]
        rows.append([run_name(r), str(r.get("method")), str(r.get("algorithm")),
                     report["tasks"][r["run_id"]], primary, mean_std_cell(r, primary)]
                    + [mean_std_cell(r, m) for m in others]
                    + [f"{r.get('wall_time_s', {}).get('total', float('nan')):.1f}",
                       f"{r.get('job_wall_time_s', float('nan')):.1f}",
                       str(r.get("precision", "—"))])  # as run (metrics.json), not as configured
    return ["## Task metrics", ""] + table(head, rows) + ["", ROLE_NOTE + " " + TIME_NOTE, ""]


def costs_section(report: dict, runs: list[dict]) -> list[str]:
    costs = report["costs"]
    columns = [c for c in COST_COLUMNS if any(costs[r["run_id"]].get(c[1]) is not None for r in runs)]
    if not columns:
        return []
    rows = [[run_name(r)] + ["—" if costs[r["run_id"]].get(k) is None else fmt.format(costs[r["run_id"]][k])
                             for _, k, fmt in columns] for r in runs]
    notes = ["", ("Extra FLOPs are adapter + gate-controller FLOPs per evaluation example (real "
             "tokens, 2 per multiply-add); latency percentiles come from the timed forward passes "
             "counted in 'timed passes'.")]
    return ["## Costs", ""] + table(["run"] + [c[0] for c in columns], rows) + notes + [""]


def methods_by_tasks_section(report: dict) -> list[str]:
    t = report.get("methods_by_tasks")
    if not t:
        return []
    head = ["method (algorithm)"] + t["tasks"] + (["glue_avg"] if t["glue_avg"] else [])
    rows = []
    for row, cells in t["rows"].items():
        line = [row]
        for task in t["tasks"]:
            c = cells.get(task)
            line.append("—" if c is None else f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f}"
                        + (f" (n={c['n_seeds']})" if c["n_seeds"] > 1 else "") + (" †" if c["trial"] else "")
                        + (" ‡" if c.get("fails_checks") else ""))
        if t["glue_avg"]:
            avg = t["glue_avg"].get(row)
            line.append("—" if avg is None else f"**{100 * avg:.2f}**")
        rows.append(line)
    note = ("GLUE tasks show the GLUE score ×100 (CoLA MCC; STS-B mean of Pearson and Spearman; MRPC "
            "and QQP mean of F1 and accuracy; MNLI mean of matched and mismatched accuracy; the rest "
            "accuracy); other tasks their primary metric ×100. glue_avg averages the tasks every row has: "
            + (", ".join(t["glue_avg_tasks"]) or "none") + ". ‡: a run that fails its run checks "
            "(degenerate, not above chance or not engaged; see Run checks): its cell, and any "
            "glue_avg holding it, are not results.")
    headline = (f"Best proposed row {report['best_proposed']}; best baseline row "
                f"{report['best_baseline']}; glue_avg gap {gap_text(report)}.")
    return ["## Methods × tasks", ""] + table(head, rows) + ["", note, "", headline, ""]


def verdict_line(t: dict, trial_runs: set[str]) -> str:
    a, b = (r + (" †" if r in trial_runs else "") for r in t["runs"])
    word = f"**{t['verdict']}**"
    reasons = "".join(f"\n  - {r}" for r in t.get("inconclusive_reasons", []))
    if t["p_value"] is None:
        return f"- {a} vs {b}: {word}{reasons}"
    claims = t["verdict"] != "inconclusive"  # no dominance or detection claim from such a pair
    aso = "" if t["aso_epsilon"] is None else f", ASO ε_min = {t['aso_epsilon']:.3f}" + (
        " (A almost stochastically dominates B)" if t["aso_epsilon"] < 0.2 and claims else "")
    lo, hi = t["ci95"]
    few = ""
    if t.get("few_seeds"):
        t_p = "no t-test: one seed" if t.get("p_t_test") is None else f"t-test p = {t['p_t_test']:.4g}"
        few = f"; few seeds: p is the larger of bootstrap p = {t['p_bootstrap']:.4g} and {t_p}"
    detect = ""
    if t["verdict"] == "no_difference_detected":
        detect = f" — no difference larger than {t['mde']:.4f} detected (80 % power)"
    elif t.get("mde") is not None and not t["significant"]:
        detect = f" (MDE {t['mde']:.4f})"
    return (f"- {a} vs {b} on {t['metric']}: {word}{detect}. Δ = {t['difference']:+.4f} (95 % CI "
            f"[{lo:+.4f}, {hi:+.4f}]), p = {t['p_value']:.4g}, Holm p = {t['p_adjusted']:.4g} "
            f"(family of {t['n_tests_corrected']}){aso}; seeds {t['n_seeds'][0]} vs {t['n_seeds'][1]}"
            f"{' (paired)' if t.get('paired_seeds') else ''}, {t['n_examples']} examples{few}"
            + ("" if t["coverage"] == "seeds and examples" else f" ({t['coverage']})") + reasons)


def family_sentence(report: dict) -> str:
    if report.get("holm_family"):
        sizes = sorted({t["n_tests_corrected"] for t in report["pairwise"]
                        if t.get("n_tests_corrected") and not t.get("trial")})
        return (f"Holm-adjusted over the experiment's family ({', '.join(map(str, sizes))} tests, "
                f"from {report['holm_family']})")
    n = sum(t["p_value"] is not None and not t.get("trial") for t in report["pairwise"])
    return f"Holm-adjusted over the {n} tests of full runs in this comparison (trial runs apart)"


def verdicts_section(report: dict) -> list[str]:
    lines = ["## Verdicts", "",
             ("Each proposed run against every other run of its task, on the task's primary metric: "
              "two-level bootstrap (10,000 replicates drawing seeds, then examples; paired by seed where "
              "both runs share seeds), 95 % percentile CI of the difference of seed means, two-sided p; "
              "with fewer than 5 seeds in either run, p is the larger of that and a t-test's over seed "
              f"scores (paired, else Welch). {family_sentence(report)}. Words: better / worse "
              "(significant, by sign), no_difference_detected (with the smallest difference the "
              "design detects with 80 % power at the family's α), inconclusive (a run degenerate, "
              "not above chance or not engaged, or identical predictions). ASO ε_min (deepsig) where "
              "both runs have ≥ 3 seeds and neither is degenerate nor identical to the other."), ""]
    trial = set(report["trial_runs"])
    lines += [verdict_line(t, trial) for t in report["pairwise"]] or [
        "- none (no proposed run, or no other run on the same task)"]
    for task, s in report["by_task"].items():
        lines.append(f"\n{task}: best proposed {s['best_proposed']}; best baseline {s['best_baseline']}; "
                     f"gap {gap_text(s)}.")
    return lines + [""]


def gap_text(s: dict) -> str:
    if s.get("gap_absolute") is None:
        return "n/a"
    relative = f"{s['gap']:+.2f} %" if s["gap"] is not None else f"relative gap n/a ({s['gap_reason']})"
    return f"{s['gap_absolute']:+.4f} absolute, {relative}"


def checks_section(report: dict) -> list[str]:
    """Each run's health on the reported split: above chance, degenerate seeds, engagement."""
    checks = report.get("run_checks") or {}
    if not checks:
        return []
    rows = []
    for rid, c in checks.items():
        if c is None:
            rows.append([rid, "—", "no predictions", "—"])
            continue
        ac = c["above_chance"]
        rows.append([rid, ("yes" if ac["passed"] else "**no**") + f": {ac['why']}",
                     "; ".join(c["degenerate"]) or "no",
                     "; ".join(c["engagement_failures"]) or "—"])
    note = ("A run that fails any of these makes every verdict it is in inconclusive. Above chance: "
            "the 95 % CI of the run's primary metric (the verdicts' two-level bootstrap; test-set "
            "sampling alone with one seed) lies above the best constant predictor's score.")
    return ["## Run checks", ""] + table(["run", "above chance", "degenerate", "failed engagement checks"],
                                          rows) + ["", note, ""]


def search_section(report: dict, runs: list[dict]) -> list[str]:
    """Each searched run's chosen values (the study's best trial, applied to the final run), how
    many trials finished and where they were scored, so arms tuned alike can be checked."""
    rows = []
    for r in runs:
        sel = report["selection"].get(r["run_id"])
        if not sel:
            continue
        chosen = ", ".join(f"`{k}={v:.3g}`" if isinstance(v, float) else f"`{k}={v}`"
                           for k, v in sorted(sel.get("chosen", {}).items())) or "—"
        best = sel.get("best_value")
        rows.append([run_name(r), f"{sel.get('n_finished', '?')}/{sel.get('n_trials', '?')}",
                     str(sel.get("split")), f"{sel.get('metric')} = {best:.4f}" if isinstance(best, float) else "—",
                     chosen])
    if not rows:
        return []
    return ["## Search", ""] + table(["run", "trials finished", "scored on", "best trial", "chosen values"],
                                     rows) + [""] + rule_scores_section(report, runs)


def rule_scores_section(report: dict, runs: list[dict]) -> list[str]:
    """Gated runs: the best trial's model under every evaluation rule on the selection slice
    (no retraining; the reported split is never used to choose one)."""
    rows = []
    for r in runs:
        scores = (report["selection"].get(r["run_id"]) or {}).get("eval_rule_scores") or {}
        for rule, row in scores.items():
            rows.append([run_name(r), f"`{rule}`", fmt(row.get("value")),
                         fmt(row.get("spectral_open_gates_per_token"), 2), fmt(row.get("capacity_ratio"), 2),
                         str(row.get("spectral_budget_violations", "—"))])
    if not rows:
        return []
    lead = ("Evaluation rules of the best trial's model on the selection slice (metric, open gates "
            "per token, capacity ratio = open at evaluation ÷ expected open in training, budget "
            "violations):")
    return [lead, ""] + table(["run", "rule", "metric", "open / token", "capacity ratio", "violations"],
                              rows) + [""]


def notes_section(report: dict, runs: list[dict]) -> list[str]:
    notes = []
    for r in runs:
        rid, task = r["run_id"], r.get("task", {})
        sel = report["selection"].get(rid)
        if sel and sel.get("optimistic"):
            notes.append(f"- {rid}: hyper-parameters were selected on the reported split "
                         f"({sel.get('split')}): its numbers are **optimistic**.")
        elif sel:
            notes.append(f"- {rid}: hyper-parameters selected on {sel.get('split')}.")
        if task.get("missing_splits"):
            notes.append(f"- {rid}: evaluation splits missing from the data source: "
                         f"{', '.join(task['missing_splits'])} (scores use what exists).")
        if task.get("f1_positive_class") and "validation_f1" in r["final"]:
            notes.append(f"- {rid}: F1 is the F1 of the '{task['f1_positive_class']}' class.")
        if r.get("amp_skipped_steps"):
            notes.append(f"- {rid}: {r['amp_skipped_steps']} optimiser steps skipped by the fp16 "
                         "gradient scaler (they advanced nothing).")
        if (r.get("method_metrics") or {}).get("iw_coefficient_spread_warning"):
            notes.append(f"- {rid}: IW-LoRA's importance coefficients spread by less than 5 %: it "
                         "behaves like uniform L2.")
    return (["## Notes", ""] + notes + [""]) if notes else []


def summary_markdown(report: dict, runs: list[dict]) -> str:
    lines = ["# Comparison", ""]
    if report["trial_runs"]:
        lines += [(f"**Trial-mode runs included** ({', '.join(report['trial_runs'])}): "
                  "their numbers are smoke tests, not results."), ""]
    for section in (metrics_section(report, runs), methods_by_tasks_section(report),
                    costs_section(report, runs), search_section(report, runs), checks_section(report),
                    verdicts_section(report), notes_section(report, runs)):
        lines += section
    return "\n".join(lines).rstrip() + "\n"
