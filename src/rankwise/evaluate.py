"""``python -m rankwise.evaluate results_dir=<dir> run_ids='["a","b"]' [out_dir=<dir>]
[allow_incomplete=true] [allow_trial=true] [holm_family=<aggregated_metrics.json>]
[figures=false]``

Reads each run's ``metrics.json`` and per-seed predictions (``seed<N>.jsonl``, or gzipped
``seed<N>.jsonl.gz``) and writes ``out_dir`` (default ``<results_dir>/comparison/``):
``aggregated_metrics.json``, ``summary.md`` and figures ``comparison_<topic>.png/.pdf``.

Verdicts (docs/methods.md, verdicts): every proposed run is compared with every other run of
the same task, never across tasks, on the task's primary metric (CoLA MCC, STS-B Pearson,
MRPC/QQP F1, the rest accuracy) on the reported split. Each comparison is a two-level bootstrap
over seeds and examples (difference of seed means, 95 % CI, two-sided p); below 5 seeds in either
run the p is the larger of the bootstrap's and a t-test's over seed scores. The p-values of one
family are Holm-adjusted together: by default the call's comparisons of full runs (trial runs
form a family of their own); with ``holm_family=`` the adjusted p-values are taken from that
earlier comparison over a whole experiment, so every output of the experiment carries the same
ones. Each comparison ends in a verdict word (``better``, ``worse``,
``no_difference_detected`` with its minimum detectable effect, ``inconclusive`` with reasons:
see :mod:`rankwise.verdicts`); the almost-stochastic-order ε_min is given where both runs have ≥
3 seeds and neither is degenerate nor identical to the other. Per-seed exact McNemar tests are
kept as a detail, never pooled over seeds.

With runs of several tasks the call also writes the methods × tasks table (GLUE scores as papers
report them, mean ± std over seeds, ``glue_avg`` over the tasks every method has).
"""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rankwise.data.tasks import TASKS, TaskSpec
from rankwise.errors import RankwiseError
from rankwise.metrics import glue_score, is_lower_better
from rankwise.results import atomic_write_bytes, atomic_write_json, per_seed_values, read_json
from rankwise.stats import aso_epsilons, hierarchical_bootstrap, holm, mcnemar_test, mean_std_ci95
from rankwise.verdicts import (
    ALPHA,
    RunHealth,
    apply_few_seed_rule,
    aso_applies,
    decide,
    mde,
    metric_function,
    run_health,
    seed_level,
    seeds_on_common_examples,
)

ASO_THRESHOLD = 0.2


class EvaluationError(RankwiseError):
    exit_code = 2


def parse_args(argv: list[str]) -> dict[str, Any]:
    from rankwise.config.loader import parse_overrides
    from rankwise.config.typed import did_you_mean

    known = {"results_dir": None, "run_ids": None, "out_dir": None, "allow_incomplete": False,
             "allow_trial": False, "holm_family": None, "figures": True}
    for key, value, _ in parse_overrides(argv):
        if key not in known:
            raise EvaluationError(f"unknown argument '{key}'{did_you_mean(key, known)}")
        known[key] = value
    if not known["results_dir"]:
        raise EvaluationError("results_dir=<dir> is required")
    if not isinstance(known["run_ids"], list) or not known["run_ids"]:
        raise EvaluationError("run_ids='[\"id1\",\"id2\"]' (a non-empty list) is required")
    for flag in ("allow_incomplete", "allow_trial", "figures"):
        if not isinstance(known[flag], bool):
            raise EvaluationError(f"{flag} must be true or false, got '{known[flag]}'")
    return known


# --- runs ---------------------------------------------------------------------------------------

def load_run(results_dir: Path, run_id: str, allow_incomplete: bool, allow_trial: bool) -> dict[str, Any]:
    path = results_dir / run_id / "metrics.json"
    if not path.is_file():
        raise EvaluationError(f"run '{run_id}': no metrics.json in {results_dir / run_id}")
    data = read_json(path)
    if data.get("status") != "complete" and not allow_incomplete:
        raise EvaluationError(f"run '{run_id}' has status '{data.get('status')}', not complete "
                              "(pass allow_incomplete=true to include it)")
    if is_trial(data) and not allow_trial:
        what = ("is a trial-mode run (at most 2 batches)" if "mode" in data else
                "does not say which mode it ran in (no 'mode' in metrics.json)")
        raise EvaluationError(f"run '{run_id}' {what}: its numbers are not results (pass "
                              "allow_trial=true to compare it anyway, as a trial run)")
    data.setdefault("final", {})
    data.setdefault("run_id", run_id)
    return data


def is_trial(run: dict) -> bool:
    """Trial mode, or no mode recorded: neither counts as a result."""
    return run.get("mode") != "full"


def task_of(run: dict) -> tuple[str, str]:
    task = run.get("task", {})
    return (str(task.get("dataset", "?")), str(task.get("subset", "?")))


def task_label(task: tuple[str, str]) -> str:
    return task[1] if task[0] in ("glue", "lra") else "/".join(task)


def task_spec(run: dict) -> TaskSpec | None:
    dataset, subset = task_of(run)
    return TASKS.get(dataset, {}).get(subset)


def primary_metric(run: dict) -> str:
    """The verdict metric's key (``validation_<metric>``), from the task table where known."""
    spec = task_spec(run)
    if spec is not None:
        return f"validation_{spec.primary_metric}"
    return run.get("task", {}).get("primary_metric", "validation_accuracy")


def run_glue_scores(run: dict) -> list[float]:
    """Per-seed GLUE scores (``glue_score``, or computed from the per-seed metrics)."""
    scores = per_seed_values(run, "glue_score")
    if scores:
        return scores
    per_seed = run.get("per_seed") or {"final": run["final"]}
    computed = [glue_score(task_of(run)[1], m) for m in per_seed.values()]
    return [s for s in computed if s is not None]


def best_of(runs: list[dict], metric: str) -> dict | None:
    scored = [r for r in runs if isinstance(r["final"].get(metric), (int, float))]
    if not scored:
        return None
    pick = (min if is_lower_better(metric) else max)(scored, key=lambda r: r["final"][metric])
    return {"run_id": pick["run_id"], "value": pick["final"][metric]}


def gap(proposed: float, baseline: float, metric: str, degenerate: list[str]) -> dict:
    """Proposed − baseline, absolute and as a percentage of the baseline (sign: positive is
    better). The percentage is null, with the reason, where the baseline's value is ≤ 0 (a
    percentage of it would mislead) or a run it is built on fails its checks (``degenerate``:
    degenerate, not above chance, not engaged)."""
    sign = -1.0 if is_lower_better(metric) else 1.0
    absolute = sign * (proposed - baseline)
    reason = None
    if degenerate:
        reason = "built on a run that cannot carry it: " + "; ".join(degenerate)
    elif baseline <= 0 and not is_lower_better(metric):
        reason = f"the best baseline's value {baseline:.4g} is ≤ 0"
    elif baseline == 0:
        reason = "the best baseline's value is 0"
    relative = None if reason else 100.0 * absolute / abs(baseline)
    return {"absolute": absolute, "percent": relative, "reason": reason}


def is_baseline(run: dict) -> bool:
    role = str(run.get("method"))
    return role != "proposed" and not role.startswith("ablation")


# --- predictions and run health -----------------------------------------------------------------

def read_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_predictions(results_dir: Path, run_id: str, split: str) -> dict[int, dict[int, tuple]]:
    """seed -> {idx: (label, prediction)}, from ``seed<N>.jsonl`` or ``seed<N>.jsonl.gz``."""
    out = {}
    folder = results_dir / run_id / "predictions" / split
    for f in sorted(folder.glob("seed*.jsonl")) + sorted(folder.glob("seed*.jsonl.gz")):
        seed = int(f.name[4:].split(".")[0])
        if seed in out:
            raise EvaluationError(f"run '{run_id}': seed {seed} has both {f.name} and its "
                                  "(un)compressed twin in predictions/{split}; keep one")
        out[seed] = {r["idx"]: (r["label"], r["prediction"]) for r in read_rows(f)}
    return out


@dataclass
class SeedPredictions:
    """Both runs' per-seed predictions on the examples every seed of both runs scored."""
    seeds_a: list[int]
    seeds_b: list[int]
    preds_a: np.ndarray  # (seeds_a, n)
    preds_b: np.ndarray  # (seeds_b, n)
    labels: np.ndarray  # (n,)

    @property
    def paired(self) -> bool:
        return self.seeds_a == self.seeds_b


class Predictions:
    """Per-seed predictions of the call's runs, each file read once."""

    def __init__(self, results_dir: Path):
        self.results_dir = results_dir
        self.cache: dict[tuple[str, str], dict] = {}

    def of(self, run_id: str, split: str) -> dict[int, dict[int, tuple]]:
        if (run_id, split) not in self.cache:
            self.cache[run_id, split] = load_predictions(self.results_dir, run_id, split)
        return self.cache[run_id, split]

    def aligned(self, a: str, b: str, split: str) -> SeedPredictions | str:
        """The two runs' predictions aligned by example, or the reason there are none."""
        pa, pb = self.of(a, split), self.of(b, split)
        if not pa or not pb:
            return f"predictions on '{split}' missing for {a if not pa else b}"
        common = sorted(set.intersection(*(set(p) for p in (*pa.values(), *pb.values()))))
        if not common:
            return "no example scored by every seed of both runs"
        first = next(iter(pa.values()))
        labels = np.asarray([first[i][0] for i in common])
        for run_id, preds in ((a, pa), (b, pb)):
            for seed, rows in preds.items():
                if any(rows[i][0] != first[i][0] for i in common):
                    raise EvaluationError(f"run '{run_id}' seed {seed}: labels of split '{split}' "
                                          f"differ from run '{a}''s; are they the same task and split?")
        return SeedPredictions(sorted(pa), sorted(pb), stack(pa, common), stack(pb, common), labels)

    def health(self, run: dict) -> RunHealth | None:
        """The run's checks on its primary metric's split (None without predictions)."""
        split, leaf = primary_metric(run).split("_", 1)
        preds = self.of(run["run_id"], split)
        if not preds:
            return None
        seeds, stacked, labels = seeds_on_common_examples(preds)
        return run_health(run, seeds, stacked, labels, leaf, positive_label(run))


def stack(preds: dict[int, dict[int, tuple]], idx: list[int]) -> np.ndarray:
    return np.asarray([[preds[s][i][1] for i in idx] for s in sorted(preds)])


def positive_label(run: dict) -> int:
    spec = task_spec(run)
    return spec.f1_positive_label if spec is not None else 1


def per_seed_mcnemar(sp: SeedPredictions) -> list[dict]:
    """Exact McNemar per shared seed (a detail: each covers test-set sampling of one seed only)."""
    out = []
    for k, seed in enumerate(sp.seeds_a):
        if seed in sp.seeds_b:
            res = mcnemar_test(sp.preds_a[k] == sp.labels, sp.preds_b[sp.seeds_b.index(seed)] == sp.labels)
            out.append({"seed": seed, **res})
    return out


# --- verdicts -----------------------------------------------------------------------------------

def compare(predictions: Predictions, run_a: dict, run_b: dict) -> tuple[dict, dict]:
    """A vs B on A's task and primary metric (docs/methods.md, verdicts), before the family's
    adjustment: the entry, and the seed-level test behind the few-seed rule and the MDE."""
    a, b = run_a["run_id"], run_b["run_id"]
    metric = primary_metric(run_a)
    split, leaf = metric.split("_", 1)
    entry = {"runs": [a, b], "metric": metric, "test": None, "n_seeds": [0, 0], "difference": None,
             "ci95": None, "p_value": None, "p_adjusted": None, "significant": False,
             "aso_epsilon": None, "mde": None, "trial": is_trial(run_a) or is_trial(run_b)}
    sp = predictions.aligned(a, b, split)
    if isinstance(sp, str):
        return {**entry, "reason": sp}, {}
    positive = positive_label(run_a)
    res = hierarchical_bootstrap(sp.preds_a, sp.preds_b, sp.labels, leaf, paired_seeds=sp.paired,
                                 positive=positive)
    entry.update(res, n_seeds=[len(sp.seeds_a), len(sp.seeds_b)], seeds=[sp.seeds_a, sp.seeds_b])
    # Same predictions on every example of every seed: the two runs cannot be told apart by any
    # test, whatever the metric (a regulariser too weak to flip a single prediction, say).
    entry["identical_predictions"] = bool(sp.paired and np.array_equal(sp.preds_a, sp.preds_b))
    fn = metric_function(leaf, positive)
    entry["seed_scores"] = [[float(fn(p, sp.labels)) for p in sp.preds_a],
                            [float(fn(p, sp.labels)) for p in sp.preds_b]]
    seed_test = seed_level(*entry["seed_scores"], paired=sp.paired)
    apply_few_seed_rule(entry, seed_test)
    entry["coverage"] = ("seeds and examples" if min(entry["n_seeds"]) > 1 else
                         "test-set sampling only: one seed per run, training variance not covered")
    spec = task_spec(run_a)
    if not (spec is not None and spec.is_regression):
        entry["per_seed_mcnemar"] = per_seed_mcnemar(sp)
    return entry, seed_test


def comparison_pairs(runs: list[dict]) -> list[tuple[dict, dict]]:
    """Every proposed run against every other run of the same task."""
    return [(p, r) for p in runs if p.get("method") == "proposed" for r in runs
            if r.get("method") != "proposed" and task_of(r) == task_of(p)]


def adjust_in_families(tests: list[dict], family: dict | None) -> None:
    """Holm within each family: the call's full runs, and (apart) any pair with a trial run.
    With ``family`` (an experiment-wide comparison's pairwise entries by pair) the full runs'
    adjusted p-values are that comparison's, so every output of an experiment agrees."""
    done = [t for t in tests if t["p_value"] is not None]
    for name, members in (("call", [t for t in done if not t["trial"]]),
                          ("trial runs", [t for t in done if t["trial"]])):
        adjusted, reject = holm([t["p_value"] for t in members], ALPHA)
        for t, p_adj, rej in zip(members, adjusted, reject):
            t.update(p_adjusted=p_adj, significant=rej, alpha=ALPHA, correction="holm",
                     n_tests_corrected=len(members), family=name)
    if family is not None:
        for t in (t for t in done if not t["trial"]):
            t.update(family_entry(family, t))


def family_entry(family: dict, t: dict) -> dict:
    key = tuple(t["runs"])
    if key not in family["pairs"]:
        raise EvaluationError(f"{t['runs'][0]} vs {t['runs'][1]} is not in the Holm family "
                              f"{family['path']}: it must compare every run of this call")
    ref = family["pairs"][key]
    if ref.get("p_value") is None or abs(ref["p_value"] - t["p_value"]) > 1e-9:
        raise EvaluationError(f"{t['runs'][0]} vs {t['runs'][1]}: p = {t['p_value']:.6g} here but "
                              f"{ref.get('p_value')} in the Holm family {family['path']}; "
                              "re-run that comparison on these runs")
    return {"p_adjusted": ref["p_adjusted"], "significant": ref["significant"],
            "n_tests_corrected": ref["n_tests_corrected"], "family": str(family["path"])}


def load_family(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        data = read_json(Path(path))
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"holm_family: cannot read {path}: {exc}") from exc
    pairs = {tuple(t["runs"]): t for t in data.get("pairwise", []) if t.get("p_adjusted") is not None}
    return {"path": path, "pairs": pairs}


def finish(done: list[tuple[dict, dict]], health: dict[str, RunHealth | None]) -> None:
    """ASO (where it means something; all pairs' at once), MDE and the verdict word of each
    adjusted entry."""
    asked = []
    for t, seed_test in done:
        if t["p_value"] is None:
            continue
        t["mde"] = mde(t, seed_test, t["n_tests_corrected"])
        t["aso_skipped"] = aso_applies(t, *(health.get(r) for r in t["runs"]))
        if t["aso_skipped"] is None:
            asked.append(t)
    jobs = []
    for t in asked:
        sign = -1.0 if is_lower_better(t["metric"]) else 1.0  # ASO reads higher = better
        a, b = ([sign * v for v in s] for s in t["seed_scores"])
        jobs.append((a, b, t["n_tests_corrected"]))
    for t, eps in zip(asked, aso_epsilons(jobs)):
        t["aso_epsilon"] = eps
        if eps is None:
            t["aso_skipped"] = "deepsig's violation ratio is 0/0 (the seed scores' quantiles coincide)"
    for t, _ in done:
        decide(t, *(health.get(r) for r in t["runs"]))


def verdicts(predictions: Predictions, runs: list[dict], health: dict[str, RunHealth | None],
             family: dict | None = None) -> list[dict]:
    """All comparisons of one call: tested, adjusted in their family, then given a word."""
    done = [compare(predictions, a, b) for a, b in comparison_pairs(runs)]
    adjust_in_families([t for t, _ in done], family)
    finish(done, health)
    return [t for t, _ in done]


# --- per task and across tasks ------------------------------------------------------------------

def degenerate_of(health: dict[str, RunHealth | None], *run_ids: str) -> list[str]:
    return [r for rid in run_ids if health.get(rid) is not None for r in health[rid].degenerate]


def failing_of(health: dict[str, RunHealth | None], *run_ids: str) -> list[str]:
    """Every reason the runs cannot carry a claim: degenerate, not above chance, not engaged."""
    return [r for rid in run_ids if health.get(rid) is not None for r in health[rid].reasons]


def task_summary(runs: list[dict], pairwise: list[dict], health: dict[str, RunHealth | None]) -> dict:
    """Primary metric, best proposed / baseline, gap and the best-vs-best verdict of one task."""
    metric = primary_metric(runs[0])
    proposed = [r for r in runs if r.get("method") == "proposed"]
    baselines = [r for r in runs if is_baseline(r)] or [r for r in runs if r.get("method") != "proposed"]
    bp, bb = best_of(proposed, metric), best_of(baselines, metric)
    g = gap(bp["value"], bb["value"], metric, failing_of(health, bp["run_id"], bb["run_id"])) \
        if bp and bb else None
    significance = next((t for t in pairwise if bp and bb and t["runs"] == [bp["run_id"], bb["run_id"]]),
                        None)
    return {"primary_metric": metric, "best_proposed": bp, "best_baseline": bb,
            "gap": g["percent"] if g else None, "gap_absolute": g["absolute"] if g else None,
            "gap_reason": g["reason"] if g else None, "significance": significance}


def row_label(run: dict) -> str:
    return f"{run.get('method')} ({run.get('algorithm')})"


def methods_by_tasks(runs: list[dict], health: dict[str, RunHealth | None]) -> dict:
    """Rows = method role (algorithm), columns = tasks, cells = GLUE score (else the primary
    metric) mean ± std over seeds; ``glue_avg`` over the GLUE tasks every row has."""
    cells: dict[str, dict[str, dict]] = {}
    for r in runs:
        task = task_of(r)
        values = run_glue_scores(r) if task[0] == "glue" else per_seed_values(r, primary_metric(r))
        if not values:
            continue
        row = row_label(r)
        if task_label(task) in cells.get(row, {}):
            row = f"{row} [{r['run_id']}]"
        mean, std, _ = mean_std_ci95(values)
        cells.setdefault(row, {})[task_label(task)] = {
            "mean": mean, "std": std, "n_seeds": len(values), "run_id": r["run_id"],
            "metric": "glue_score" if task[0] == "glue" else primary_metric(r),
            "trial": is_trial(r), "degenerate": bool(degenerate_of(health, r["run_id"])),
            "fails_checks": bool(failing_of(health, r["run_id"]))}
    tasks = sorted({t for row in cells.values() for t in row})
    glue_tasks = sorted({task_label(task_of(r)) for r in runs if task_of(r)[0] == "glue"})
    shared = [t for t in glue_tasks if all(t in row for row in cells.values())]
    glue_avg = {row: float(np.mean([c[t]["mean"] for t in shared])) for row, c in cells.items()} if shared else {}
    return {"tasks": tasks, "rows": cells, "glue_avg": glue_avg, "glue_avg_tasks": shared}


# --- costs --------------------------------------------------------------------------------------

def run_value(run: dict, key: str) -> float | None:
    for block in ("final", "method_metrics"):
        value = run.get(block, {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def first_value(run: dict, keys: tuple[str, ...]) -> float | None:
    return next((v for v in (run_value(run, k) for k in keys) if v is not None), None)


def is_cost_reference(run: dict) -> bool:
    """Whether ``run`` is the registry's cost reference (``rankwise.methods.cost_reference``:
    LoRA r=8), the run ``extra_vs_lora_r8`` divides by."""
    from rankwise.methods import is_cost_reference as registry_says

    adapter = (run.get("config", {}).get("model") or {}).get("adapter") or {}
    return registry_says(run.get("algorithm"), adapter)


def costs(runs: list[dict]) -> dict[str, dict[str, float | None]]:
    """Per run: adapter, controller and total extra MFLOPs per example, the extra relative to
    the cost reference (LoRA r=8, :func:`is_cost_reference`) of the same task, parameters, latency, budget and gate statistics."""
    out = {}
    for r in runs:
        adapter = run_value(r, "adapter_mflops_per_example")
        controller = run_value(r, "controller_mflops_per_example")
        extra = None if adapter is None else adapter + (controller or 0.0)
        ref = next((x for x in runs if is_cost_reference(x) and task_of(x) == task_of(r)), None)
        ref_extra = run_value(ref, "adapter_mflops_per_example") if ref else None
        trainable = first_value(r, ("trainable_params_incl_controllers",))
        if trainable is None:
            trainable = r.get("params", {}).get("trainable")
        out[r["run_id"]] = {
            "adapter_mflops_per_example": adapter,
            "controller_mflops_per_example": controller,
            "extra_mflops_per_example": extra,
            "extra_vs_lora_r8": (extra / ref_extra) if extra is not None and ref_extra else None,
            "trainable_params_incl_controllers": trainable,
            "latency_ms_mean": run_value(r, "latency_ms_mean"),
            "latency_ms_p99": run_value(r, "latency_ms_p99"),
            "latency_n_timed": run_value(r, "latency_n_timed"),
            "budget_violations": run_value(r, "budget_violations"),
            "train_expected_open_gates_per_token": first_value(
                r, ("train_expected_open_gates_per_token",)),
            "eval_open_gates_per_token": first_value(
                r, ("open_gates_per_token", "validation_spectral_open_gates_per_token")),
        }
    return out


# --- the call -----------------------------------------------------------------------------------

def evaluate(results_dir: Path, run_ids: list[str], allow_incomplete: bool = False,
             allow_trial: bool = False, out_dir: Path | None = None,
             holm_family: str | None = None, figures: bool = True) -> dict[str, Any]:
    runs = [load_run(results_dir, r, allow_incomplete, allow_trial) for r in run_ids]
    predictions = Predictions(results_dir)
    health = {r["run_id"]: predictions.health(r) for r in runs}
    pairwise = verdicts(predictions, runs, health, load_family(holm_family))
    tasks = list(dict.fromkeys(task_of(r) for r in runs))
    by_task = {task_label(t): task_summary([r for r in runs if task_of(r) == t], pairwise, health)
               for t in tasks}
    metric_names = sorted({k for r in runs for k, v in r["final"].items() if isinstance(v, (int, float))})
    report = {
        "run_ids": run_ids,
        "metrics": {m: {r["run_id"]: r["final"][m] for r in runs if m in r["final"]} for m in metric_names},
        "std": {m: {r["run_id"]: r.get("std", {}).get(m, 0.0) for r in runs if m in r["final"]}
                for m in metric_names},
        "n_seeds": {r["run_id"]: len(r.get("seeds") or [1]) for r in runs},
        "roles": {r["run_id"]: r.get("method") for r in runs},
        "algorithms": {r["run_id"]: r.get("algorithm") for r in runs},
        "tasks": {r["run_id"]: task_label(task_of(r)) for r in runs},
        "trial_runs": [r["run_id"] for r in runs if is_trial(r)],
        "selection": {r["run_id"]: selection_of(r) for r in runs},
        "run_checks": {rid: h.to_json() if h else None for rid, h in health.items()},
        "costs": costs(runs),
        "by_task": by_task,
        "pairwise": pairwise,
        "holm_family": holm_family,
    }
    if len(tasks) == 1:
        report.update(by_task[task_label(tasks[0])])
    else:
        table = methods_by_tasks(runs, health)
        report["methods_by_tasks"] = table
        report.update(cross_task_headline(runs, table))
    write_outputs(report, runs, results_dir, out_dir or results_dir / "comparison", figures)
    return report


def write_outputs(report: dict, runs: list[dict], results_dir: Path, out: Path,
                  figures: bool = True) -> None:
    from rankwise.plots import comparison_figures
    from rankwise.summary import summary_markdown

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "aggregated_metrics.json", report)
    atomic_write_bytes(out / "summary.md", summary_markdown(report, runs).encode())
    if figures:
        comparison_figures(report, runs, results_dir, out)


def cross_task_headline(runs: list[dict], table: dict) -> dict:
    """Across tasks there is no single test: the headline is the best rows' ``glue_avg`` gap,
    null where either row holds a run that fails its run checks."""
    roles = {row_label(r): r.get("method") for r in runs}
    avg = table["glue_avg"]
    prop = {k: v for k, v in avg.items() if roles.get(k) == "proposed"}
    base = {k: v for k, v in avg.items() if roles.get(k) not in (None, "proposed")
            and not str(roles.get(k)).startswith("ablation")}
    bp = max(prop.items(), key=lambda kv: kv[1]) if prop else None
    bb = max(base.items(), key=lambda kv: kv[1]) if base else None
    g = None
    if bp and bb:
        cells = [c for row in (bp[0], bb[0]) for t, c in table["rows"][row].items()
                 if t in table["glue_avg_tasks"] and c["fails_checks"]]
        failing = [f"{c['run_id']} fails its run checks" for c in cells]
        g = gap(bp[1], bb[1], "glue_avg", failing)
    return {"primary_metric": "glue_avg",
            "best_proposed": {"row": bp[0], "value": bp[1]} if bp else None,
            "best_baseline": {"row": bb[0], "value": bb[1]} if bb else None,
            "gap": g["percent"] if g else None, "gap_absolute": g["absolute"] if g else None,
            "gap_reason": g["reason"] if g else None, "significance": None}


def selection_of(run: dict) -> dict | None:
    """How the run's hyper-parameters were selected (after a search), for the summary."""
    search = run.get("search")
    if not search:
        return None
    return {"split": search.get("selection_split"), "optimistic": search.get("selection_optimistic"),
            "metric": search.get("metric_name"), "best_value": search.get("best_value"),
            "n_finished": search.get("n_finished"), "n_trials": search.get("n_trials"),
            "chosen": search.get("best_overrides") or search.get("best_params") or {},
            "eval_rule_scores": search.get("eval_rule_scores") or {}}


def main(argv: list[str] | None = None) -> int:
    from rankwise.cli_help import EVALUATE_HELP, answer_flags

    argv = sys.argv[1:] if argv is None else argv
    if (answered := answer_flags(argv, EVALUATE_HELP)) is not None:  # --help, unknown flags
        return answered
    try:
        args = parse_args(argv)
        out_dir = Path(args["out_dir"]) if args["out_dir"] else None
        report = evaluate(Path(args["results_dir"]), [str(r) for r in args["run_ids"]],
                          args["allow_incomplete"], args["allow_trial"], out_dir,
                          args["holm_family"], args["figures"])
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    out = Path(args["out_dir"]) if args["out_dir"] else Path(args["results_dir"]) / "comparison"
    words = [f"{t['runs'][0]} vs {t['runs'][1]}: {t['verdict']}" for t in report["pairwise"]]
    print(f"wrote {out / 'aggregated_metrics.json'}, {out / 'summary.md'}"
          + (f" ({'; '.join(words)})" if words else " (no verdicts: no proposed run with a baseline)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
