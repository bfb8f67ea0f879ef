"""rankwise.evaluate on fake finished runs: seed-level verdicts, Holm, task grouping, GLUE table.

References are independent: scipy's binomial test, scikit-learn's metrics, statsmodels' Holm,
closed forms of the bootstrap's seed level, and a plain-loop bootstrap.
"""

import json

import numpy as np
import pytest
from fake_runs import edit_metrics, fake_run, seeds_with_gaps, with_accuracy
from scipy import stats
from sklearn import metrics as skm
from statsmodels.stats.multitest import multipletests

import rankwise.plots
import rankwise.stats
from rankwise.evaluate import EvaluationError, evaluate, main
from rankwise.stats import hierarchical_bootstrap

CONTRACT = ("runs", "metric", "test", "n_seeds", "difference", "ci95", "p_value", "p_adjusted",
            "significant", "aso_epsilon")


@pytest.fixture(autouse=True)
def _no_figures(monkeypatch, request):
    """No figures except where a test looks at them (matplotlib costs about a second a call)."""
    if request.node.originalname != "test_summary_costs_and_figures":
        monkeypatch.setattr(rankwise.plots, "comparison_figures", lambda *args, **kwargs: None)


@pytest.fixture
def results(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    labels = rng.integers(0, 2, n)
    base = {s: with_accuracy(labels, 0.7, rng) for s in (1, 2)}
    better = {s: np.where(rng.random(n) < 0.5, labels, base[s]) for s in (1, 2)}  # more right answers
    fake_run(tmp_path, "iw", "proposed", "iw_lora", "rte", better, labels,
             {"adapter_mflops_per_example": 1.5, "controller_mflops_per_example": 0.5,
              "latency_ms_p99": 3.25, "latency_n_timed": 120, "validation_f1": 0.5,
              "validation_spectral_open_gates_per_token": 2.5})
    fake_run(tmp_path, "lora", "comparative-1", "lora", "rte", base, labels,
             {"adapter_mflops_per_example": 2.0, "latency_ms_p99": 4.0})
    fake_run(tmp_path, "lora-twin", "comparative-2", "lora", "rte", {s: p.copy() for s, p in base.items()}, labels)
    fake_run(tmp_path, "other-task", "baseline", "full_ft", "sst2", base, labels)
    return tmp_path, labels, base, better


def test_contract_holm_and_per_seed_mcnemar(results):
    root, labels, base, better = results
    report = evaluate(root, ["iw", "lora", "lora-twin", "other-task"])
    # no test across tasks: iw (RTE) only against the two RTE runs
    assert {tuple(t["runs"]) for t in report["pairwise"]} == {("iw", "lora"), ("iw", "lora-twin")}
    for t in report["pairwise"]:
        assert set(CONTRACT) <= set(t)
        assert t["test"] == "hierarchical_bootstrap" and t["n_seeds"] == [2, 2] and t["paired_seeds"]
        assert t["aso_epsilon"] is None  # fewer than 3 seeds
    test = next(t for t in report["pairwise"] if t["runs"] == ["iw", "lora"])
    expected_d = np.mean([np.mean(better[s] == labels) - np.mean(base[s] == labels) for s in (1, 2)])
    assert test["difference"] == pytest.approx(expected_d)
    assert test["ci95"][0] < expected_d < test["ci95"][1]
    # Holm over every p of the call, as statsmodels computes it
    ps = [t["p_value"] for t in report["pairwise"]]
    _, adjusted, _, _ = multipletests(ps, alpha=0.05, method="holm")
    assert [t["p_adjusted"] for t in report["pairwise"]] == pytest.approx(list(adjusted))
    assert all(t["significant"] == (t["p_adjusted"] < 0.05) for t in report["pairwise"])
    # per-seed McNemar (a detail), each seed on its own: scipy's exact binomial test
    for row in test["per_seed_mcnemar"]:
        a, b = better[row["seed"]] == labels, base[row["seed"]] == labels
        only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
        assert row["n_pairs"] == len(labels)
        assert row["p_value"] == pytest.approx(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def test_summary_costs_and_figures(results):
    root, *_ = results
    evaluate(root, ["iw", "lora", "lora-twin"])
    summary = (root / "comparison" / "summary.md").read_text()
    for column in ("adapter MFLOPs / example", "controller MFLOPs / example", "extra MFLOPs / example",
                   "extra vs LoRA r=8", "latency p99 (ms)", "timed passes",
                   "open gates / token, evaluation"):
        assert column in summary, column
    assert "| 2 | 1.00× |" in summary  # iw: 1.5 + 0.5 extra MFLOPs = 1.00 × LoRA r=8's 2.0
    assert "Holm p =" in summary and "± " in summary and "(n=2)" in summary
    assert "spectral_open_gates" not in summary.split("## Costs")[0]  # method stats: not task metrics
    agg = json.loads((root / "comparison" / "aggregated_metrics.json").read_text())
    assert agg["costs"]["iw"]["extra_mflops_per_example"] == pytest.approx(2.0)
    for name in ("comparison_validation_accuracy.png", "comparison_validation_accuracy.pdf",
                 "comparison_learning_curves.png"):
        assert (root / "comparison" / name).stat().st_size > 1000, name


def test_seed_noise_is_not_significant_but_a_consistent_gain_is(tmp_path, monkeypatch):
    monkeypatch.setattr(rankwise.stats, "ASO_BOOTSTRAP_ITERATIONS", 200)  # the verdicts need no more here
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 2000)
    noisy_a, noisy_b = seeds_with_gaps(labels, [4, 4, -0.5], rng)
    fake_run(tmp_path, "p3", "proposed", "iw_lora", "rte", noisy_a, labels)
    fake_run(tmp_path, "b3", "comparative-1", "lora", "rte", noisy_b, labels)
    noisy = evaluate(tmp_path, ["p3", "b3"])["significance"]
    assert noisy["difference"] == pytest.approx(0.025, abs=1e-9)
    assert not noisy["significant"] and noisy["p_value"] > 0.05
    assert noisy["aso_epsilon"] is not None  # 3 seeds each
    assert noisy["identical_predictions"] is False
    # pooled McNemar over the 3 × 2000 predictions would call this highly significant
    pooled_a = np.concatenate([noisy_a[s] == labels for s in (1, 2, 3)])
    pooled_b = np.concatenate([noisy_b[s] == labels for s in (1, 2, 3)])
    only_a, only_b = int((pooled_a & ~pooled_b).sum()), int((~pooled_a & pooled_b).sum())
    assert stats.binomtest(only_a, only_a + only_b, 0.5).pvalue < 1e-3

    steady_a, steady_b = seeds_with_gaps(labels, [4] * 5, rng)
    fake_run(tmp_path, "p5", "proposed", "iw_lora", "rte", steady_a, labels)
    fake_run(tmp_path, "b5", "comparative-1", "lora", "rte", steady_b, labels)
    steady = evaluate(tmp_path, ["p5", "b5"])["significance"]
    assert steady["significant"] and steady["p_adjusted"] < 0.01
    assert steady["aso_epsilon"] < 0.2  # A almost stochastically dominates B


def test_seed_level_closed_form():
    """Seed effects far above example noise: d_r ≤ 0 only when every drawn seed is the losing
    one, probability 1/27 with 3 paired seeds, so p = 2 · (1 + R/27) / (1 + R)."""
    rng = np.random.default_rng(5)
    n = 10_000
    labels = rng.integers(0, 2, n)
    a, b = seeds_with_gaps(labels, [4, 4, -0.5], rng)
    res = hierarchical_bootstrap(np.stack(list(a.values())), np.stack(list(b.values())), labels,
                                 "accuracy", paired_seeds=True)
    assert res["p_value"] == pytest.approx(2 / 27, abs=0.012)
    # identical seeds: the seed level adds nothing, so 3 copies of one seed give one seed's p
    one = hierarchical_bootstrap(a[3][None], b[3][None], labels, "accuracy", paired_seeds=True)
    three = hierarchical_bootstrap(np.stack([a[3]] * 3), np.stack([b[3]] * 3), labels, "accuracy",
                                   paired_seeds=True)
    assert three["p_value"] == pytest.approx(one["p_value"], rel=0.15)
    assert three["ci95"] == pytest.approx(one["ci95"], abs=0.002)


def naive_bootstrap(pa, pb, y, metric_fn, paired, n_resamples, rng):
    """The two-level bootstrap written as plain loops over replicates."""
    diffs = []
    for _ in range(n_resamples):
        seeds_a = rng.integers(0, len(pa), len(pa))
        seeds_b = seeds_a if paired else rng.integers(0, len(pb), len(pb))
        idx = rng.integers(0, len(y), len(y))
        ma = np.mean([metric_fn(y[idx], pa[s][idx]) for s in seeds_a])
        mb = np.mean([metric_fn(y[idx], pb[s][idx]) for s in seeds_b])
        diffs.append(ma - mb)
    return np.percentile(diffs, [2.5, 97.5])


def np_accuracy(y, p):
    return np.mean(y == p)


def np_mcc(y, p):
    return np.corrcoef(y, p)[0, 1]  # MCC of binary labels is their Pearson correlation


def np_f1(y, p):
    tp = np.sum((p == 1) & (y == 1))
    return 2 * tp / (np.sum(p == 1) + np.sum(y == 1))


@pytest.mark.parametrize("metric,fn,sk,paired", [
    ("accuracy", np_accuracy, skm.accuracy_score, True),
    ("matthews_correlation", np_mcc, skm.matthews_corrcoef, False),
    ("f1", np_f1, skm.f1_score, True),
])
def test_bootstrap_matches_a_plain_loop(metric, fn, sk, paired):
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 300)
    pa = np.stack([np.where(rng.random(300) < acc, y, 1 - y) for acc in (0.85, 0.8, 0.9)])
    pb = np.stack([np.where(rng.random(300) < acc, y, 1 - y) for acc in (0.75, 0.8, 0.7)])
    res = hierarchical_bootstrap(pa, pb, y, metric, paired_seeds=paired, n_resamples=4000)
    lo, hi = naive_bootstrap(pa, pb, y, fn, paired, 1500, rng)
    assert res["difference"] == pytest.approx(np.mean([sk(y, p) for p in pa]) - np.mean([sk(y, p) for p in pb]))
    assert res["ci95"] == pytest.approx([lo, hi], abs=0.015)


def test_cola_is_tested_on_mcc(tmp_path):
    rng = np.random.default_rng(2)
    labels = (rng.random(300) < 0.3).astype(int)  # imbalanced, where accuracy and MCC disagree
    a = {1: with_accuracy(labels, 0.8, rng)}
    b = {1: np.zeros(300, int)}  # always the majority class: accuracy ~0.7, MCC 0
    fake_run(tmp_path, "p", "proposed", "tabs", "cola", a, labels)
    fake_run(tmp_path, "b", "comparative-1", "lora", "cola", b, labels)
    report = evaluate(tmp_path, ["p", "b"])
    test = report["significance"]
    assert test["metric"] == "validation_matthews_correlation"
    assert test["difference"] == pytest.approx(skm.matthews_corrcoef(labels, a[1]))
    assert "test-set sampling only" in test["coverage"]
    assert "test-set sampling only" in (tmp_path / "comparison" / "summary.md").read_text()


def test_methods_by_tasks_table_and_glue_avg(tmp_path):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 150)
    expected = {}
    for task in ("rte", "sst2", "qnli", "cola"):
        for role, algo, acc in (("proposed", "lora", 0.8), ("baseline", "full_ft", 0.75)):
            preds = {s: with_accuracy(labels, acc + 0.02 * s, rng) for s in (1, 2)}
            fake_run(tmp_path, f"{role}-{task}", role, algo, task, preds, labels)
            key = "matthews_correlation" if task == "cola" else "accuracy"
            fn = skm.matthews_corrcoef if key == "matthews_correlation" else skm.accuracy_score
            expected[(role, task)] = [fn(labels, p) for p in preds.values()]
    ids = [f"{r}-{t}" for t in ("rte", "sst2", "qnli", "cola") for r in ("proposed", "baseline")]
    report = evaluate(tmp_path, ids)
    table = report["methods_by_tasks"]
    assert table["tasks"] == ["cola", "qnli", "rte", "sst2"] and table["glue_avg_tasks"] == table["tasks"]
    for role, algo in (("proposed", "lora"), ("baseline", "full_ft")):
        row = table["rows"][f"{role} ({algo})"]
        for task in table["tasks"]:
            assert row[task]["mean"] == pytest.approx(np.mean(expected[(role, task)]))
            assert row[task]["std"] == pytest.approx(np.std(expected[(role, task)], ddof=1))
        assert table["glue_avg"][f"{role} ({algo})"] == pytest.approx(
            np.mean([np.mean(expected[(role, t)]) for t in table["tasks"]]))
    # tests stay within one task: 4 tasks × 1 comparison, Holm over the 4
    assert len(report["pairwise"]) == 4 and all(t["n_tests_corrected"] == 4 for t in report["pairwise"])
    assert report["primary_metric"] == "glue_avg" and report["gap"] is not None
    summary = (tmp_path / "comparison" / "summary.md").read_text()
    assert "## Methods × tasks" in summary and "| glue_avg |" in summary


def test_trial_runs_refused_unless_allowed(results, capsys):
    root, *_ = results
    edit_metrics(root, "lora", lambda m: m.update(mode="trial"))
    with pytest.raises(EvaluationError, match="'lora' is a trial-mode run"):
        evaluate(root, ["iw", "lora"])
    assert main([f"results_dir={root}", "run_ids=[iw,lora]"]) == 2
    assert "lora" in capsys.readouterr().err
    report = evaluate(root, ["iw", "lora"], allow_trial=True, out_dir=root / "cmp")
    assert report["trial_runs"] == ["lora"]
    assert "Trial-mode runs included" in (root / "cmp" / "summary.md").read_text()


def test_incomplete_run_is_refused(results):
    root, *_ = results
    edit_metrics(root, "lora", lambda m: m.update(status="interrupted"))
    with pytest.raises(EvaluationError, match="lora.*interrupted"):
        evaluate(root, ["iw", "lora"])
    assert evaluate(root, ["iw", "lora"], allow_incomplete=True)["best_baseline"]["run_id"] == "lora"


def test_identical_predictions_are_not_significant(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 100)
    preds = {1: with_accuracy(labels, 0.8, rng)}
    fake_run(tmp_path, "p", "proposed", "tabs", "rte", preds, labels)
    fake_run(tmp_path, "b", "comparative-1", "lora", "rte", {1: preds[1].copy()}, labels)
    report = evaluate(tmp_path, ["p", "b"])
    assert report["significance"]["p_value"] == 1.0 and not report["significance"]["significant"]
    assert report["significance"]["identical_predictions"] is True
    assert report["significance"]["verdict"] == "inconclusive"
    assert report["significance"]["aso_epsilon"] is None
    summary = (tmp_path / "comparison" / "summary.md").read_text()
    assert "**inconclusive**" in summary and "predict identically on every example" in summary
    assert report["gap"] == pytest.approx(0.0)


def test_optimistic_selection_and_missing_split_are_shown(results):
    root, *_ = results

    def edit(m):
        m["search"] = {"selection_split": "validation", "selection_optimistic": True}
        m["task"]["missing_splits"] = ["validation_mismatched"]

    edit_metrics(root, "iw", edit)
    evaluate(root, ["iw", "lora"])
    summary = (root / "comparison" / "summary.md").read_text()
    assert "**optimistic**" in summary and "validation_mismatched" in summary


def test_each_searched_run_s_chosen_values_are_in_the_summary(results):
    root, *_ = results

    def edit(m):
        m["search"] = {"selection_split": "train[0.1]", "selection_optimistic": False, "n_trials": 4,
                       "n_finished": 4, "metric_name": "validation_accuracy", "best_value": 0.8125,
                       "best_overrides": {"training.learning_rate": 0.00031, "training.batch_size": 16}}

    edit_metrics(root, "iw", edit)
    evaluate(root, ["iw", "lora"])
    summary = (root / "comparison" / "summary.md").read_text()
    section = summary[summary.index("## Search"):]
    row = next(line for line in section.splitlines() if line.startswith("| iw"))
    assert "4/4" in row and "train[0.1]" in row and "validation_accuracy = 0.8125" in row
    assert "`training.batch_size=16`" in row and "`training.learning_rate=0.00031`" in row
    assert "| lora" not in section.split("\n\n## ")[0]  # no search, no row
