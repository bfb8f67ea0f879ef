"""Verdict words (docs/methods.md, verdicts): what a comparison may claim around its arithmetic.

References are independent of the code under test: scipy's t-tests and quantiles, closed
forms of the normal power formula, label counts for the constant predictors.
"""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from fake_runs import edit_metrics, fake_run, seeds_with_gaps, with_accuracy
from scipy import stats

import rankwise.plots
import rankwise.stats
from rankwise.evaluate import EvaluationError, evaluate, gap, main
from rankwise.plots import axis_span
from rankwise.stats import minimum_detectable_effect, seed_t_test
from rankwise.verdicts import chance_level


@pytest.fixture(autouse=True)
def _fast_aso(monkeypatch, request):
    """ASO with 200 bootstrap iterations and verdicts with 4,000 replicates (the verdicts need
    no more here), and no figures except where a test looks at one (matplotlib costs about a
    second a comparison)."""
    monkeypatch.setattr(rankwise.stats, "ASO_BOOTSTRAP_ITERATIONS", 200)
    monkeypatch.setattr(rankwise.stats, "VERDICT_RESAMPLES", 4000)  # p down to 2/4001, CIs ±1 %
    if request.node.originalname != "test_one_seed_runs_show_their_test_set_interval":
        monkeypatch.setattr(rankwise.plots, "comparison_figures", lambda *args, **kwargs: None)


def test_majority_class_baseline_makes_the_verdict_inconclusive(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random(3000) < 0.6).astype(int)  # majority class 1 at about 60 %
    majority = {s: np.ones(3000, int) for s in range(1, 6)}
    above = {s: with_accuracy(labels, labels.mean() + 0.03, rng) for s in range(1, 6)}
    fake_run(tmp_path, "p", "proposed", "iw_lora", "rte", above, labels)
    fake_run(tmp_path, "b", "comparative-1", "lora", "rte", majority, labels)
    report = evaluate(tmp_path, ["p", "b"])
    t = report["significance"]
    assert t["significant"]  # the arithmetic alone would call it a win
    assert t["verdict"] == "inconclusive"
    assert any("b seed 1 predicts 1 on every example" in r for r in t["inconclusive_reasons"])
    assert any("b is not above chance" in r for r in t["inconclusive_reasons"])
    assert t["aso_epsilon"] is None and t["aso_skipped"] == "a degenerate run"
    assert report["gap"] is None and "predicts 1 on every example" in report["gap_reason"]
    assert report["gap_absolute"] == pytest.approx(0.03, abs=1e-9)
    checks = report["run_checks"]
    assert checks["b"]["above_chance"]["threshold"] == pytest.approx(labels.mean())
    assert not checks["b"]["ok"] and checks["p"]["ok"]
    summary = (tmp_path / "comparison" / "summary.md").read_text()
    assert "**inconclusive**" in summary and "predicts 1 on every example" in summary
    assert "## Run checks" in summary and "relative gap n/a" in summary


def test_a_run_at_chance_is_inconclusive_even_when_not_constant(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    coin = {s: rng.integers(0, 2, 300) for s in (1, 2, 3, 4, 5)}
    good = {s: with_accuracy(labels, 0.8, rng) for s in (1, 2, 3, 4, 5)}
    fake_run(tmp_path, "p", "proposed", "iw_lora", "rte", good, labels)
    fake_run(tmp_path, "b", "comparative-1", "lora", "rte", coin, labels)
    t = evaluate(tmp_path, ["p", "b"])["significance"]
    assert t["verdict"] == "inconclusive" and not any("every example" in r for r in t["inconclusive_reasons"])
    assert any("b is not above chance" in r for r in t["inconclusive_reasons"])


def test_identical_runs_get_no_aso_and_no_direction(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400)
    preds = {s: with_accuracy(labels, 0.8, rng) for s in range(1, 6)}
    fake_run(tmp_path, "p", "proposed", "iw_lora", "rte", preds, labels)
    fake_run(tmp_path, "b", "comparative-1", "lora", "rte", {s: p.copy() for s, p in preds.items()}, labels)
    t = evaluate(tmp_path, ["p", "b"])["significance"]
    assert t["identical_predictions"] and t["aso_epsilon"] is None
    assert t["aso_skipped"] == "identical predictions"
    assert t["verdict"] not in ("better", "worse") and t["verdict"] == "inconclusive"


def test_three_seeds_of_plus_6_2_10_points_are_not_significant(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 2000)
    a, b = seeds_with_gaps(labels, [6, 2, 10], rng, base_acc=0.75)
    fake_run(tmp_path, "p", "proposed", "iw_lora", "rte", a, labels)
    fake_run(tmp_path, "b", "comparative-1", "lora", "rte", b, labels)
    t = evaluate(tmp_path, ["p", "b"])["significance"]
    scores_a = [np.mean(a[s] == labels) for s in (1, 2, 3)]
    scores_b = [np.mean(b[s] == labels) for s in (1, 2, 3)]
    t_ref = stats.ttest_rel(scores_a, scores_b).pvalue
    assert t["p_bootstrap"] < 0.01  # the bootstrap alone cannot range beyond the 3 seeds it saw
    assert t["few_seeds"] and t["p_t_test"] == pytest.approx(t_ref) and t_ref > 0.05
    assert t["p_value"] == pytest.approx(max(t["p_bootstrap"], t_ref))
    assert not t["significant"] and t["verdict"] == "no_difference_detected"
    # MDE: the larger of the bootstrap's and the t-test's, at α/m = 0.05, 80 % power
    d = np.subtract(scores_a, scores_b)
    se_t = d.std(ddof=1) / np.sqrt(3)
    t_mde = (stats.t.ppf(0.975, 2) + stats.t.ppf(0.8, 2)) * se_t
    assert t["mde"] == pytest.approx(max(t_mde, (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * t["se"]))
    assert t["mde"] > t["difference"]  # the observed +6 points is below what 3 such seeds detect
    summary = (tmp_path / "comparison" / "summary.md").read_text()
    assert f"no difference larger than {t['mde']:.4f} detected" in summary and "few seeds" in summary


def steady_pair(root, seed: int, n: int):
    """Runs p (proposed) and b, 5 shared seeds, p a steady 4 points above b on n examples."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    a, b = seeds_with_gaps(labels, [4] * 5, rng)
    fake_run(root, "p", "proposed", "iw_lora", "rte", a, labels)
    fake_run(root, "b", "comparative-1", "lora", "rte", b, labels)
    return labels, a, b


def test_five_steady_seeds_stay_better_and_the_bootstrap_p_is_used(tmp_path):
    labels, a, b = steady_pair(tmp_path, seed=4, n=1000)
    t = evaluate(tmp_path, ["p", "b"])["significance"]
    assert t["verdict"] == "better" and not t["few_seeds"]
    assert t["p_value"] == t["p_bootstrap"] and t["inconclusive_reasons"] == []
    # and the mirror image is "worse"
    fake_run(tmp_path, "p2", "proposed", "iw_lora", "rte", b, labels)
    fake_run(tmp_path, "b2", "comparative-1", "lora", "rte", a, labels)
    assert evaluate(tmp_path, ["p2", "b2"], out_dir=tmp_path / "c2")["significance"]["verdict"] == "worse"


def test_every_non_significant_verdict_has_a_numeric_mde(tmp_path):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 500)
    for k, gaps in enumerate(([0.5, -0.5, 0, 1, 0], [1], [2, -1])):
        a, b = seeds_with_gaps(labels, gaps, rng)
        fake_run(tmp_path, f"p{k}", "proposed", "iw_lora", f"task{k}", a, labels)
        fake_run(tmp_path, f"b{k}", "comparative-1", "lora", f"task{k}", b, labels)
    report = evaluate(tmp_path, [f"{r}{k}" for k in range(3) for r in "pb"])
    assert len(report["pairwise"]) == 3
    for t in report["pairwise"]:
        assert not t["significant"] and isinstance(t["mde"], float) and t["mde"] > 0
        assert t["n_tests_corrected"] == 3


def test_minimum_detectable_effect_closed_forms():
    z = stats.norm.ppf(1 - 0.05 / 2) + stats.norm.ppf(0.8)
    assert minimum_detectable_effect(0.01, 0.05) == pytest.approx(z * 0.01)
    assert minimum_detectable_effect(0.01, 0.05 / 4) == pytest.approx(
        (stats.norm.ppf(1 - 0.05 / 8) + stats.norm.ppf(0.8)) * 0.01)
    assert minimum_detectable_effect(0.02, 0.05, df=4) == pytest.approx(
        (stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * 0.02)


def test_mde_has_its_stated_power():
    """Simulated: a true difference equal to the MDE, estimated with that standard error, is
    detected by a two-sided z-test at α in about 80 % of draws."""
    rng = np.random.default_rng(6)
    se = 0.013
    delta = minimum_detectable_effect(se, 0.05)
    estimates = rng.normal(delta, se, 40_000)
    power = np.mean(np.abs(estimates / se) > stats.norm.ppf(0.975))
    assert power == pytest.approx(0.8, abs=0.01)


def test_seed_t_test_matches_scipy():
    a, b = [0.81, 0.79, 0.84], [0.78, 0.79, 0.80]
    assert seed_t_test(a, b, paired=True) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert seed_t_test(a, b[:2], paired=False) == pytest.approx(
        stats.ttest_ind(a, b[:2], equal_var=False).pvalue)
    assert seed_t_test([0.8], [0.7], paired=True) is None
    assert seed_t_test([0.8, 0.8], [0.8, 0.8], paired=True) == 1.0


def test_chance_levels_are_the_best_constant_predictor():
    labels = np.array([1] * 7 + [0] * 3)
    assert chance_level(labels, "accuracy", 1) == (pytest.approx(0.7), "the constant prediction 1")
    # F1 of the positive class: always predicting it gives 2·7 / (2·7 + 3)
    assert chance_level(labels, "f1", 1)[0] == pytest.approx(14 / 17)
    assert chance_level(labels, "matthews_correlation", 1)[0] == 0.0
    assert chance_level(labels.astype(float), "pearson", 1)[0] == 0.0


def test_gap_is_null_on_a_baseline_at_or_below_zero():
    g = gap(0.28, -0.07, "validation_pearson", [])
    assert g["percent"] is None and "≤ 0" in g["reason"] and g["absolute"] == pytest.approx(0.35)
    ok = gap(0.84, 0.80, "validation_accuracy", [])
    assert ok["percent"] == pytest.approx(5.0) and ok["reason"] is None
    assert gap(0.84, 0.80, "validation_accuracy", ["b seed 1 predicts 0"])["percent"] is None


def test_negative_correlation_is_degenerate(tmp_path):
    rng = np.random.default_rng(7)
    labels = (rng.random(300) < 0.3).astype(int)
    good = {s: with_accuracy(labels, 0.85, rng) for s in (1, 2, 3)}
    worse_than_coin = {s: 1 - with_accuracy(labels, 0.8, rng) for s in (1, 2, 3)}  # MCC < 0
    fake_run(tmp_path, "p", "proposed", "tabs", "cola", good, labels)
    fake_run(tmp_path, "b", "comparative-1", "lora", "cola", worse_than_coin, labels)
    t = evaluate(tmp_path, ["p", "b"])["significance"]
    assert t["verdict"] == "inconclusive"
    assert any("matthews_correlation" in r and "≤ 0" in r for r in t["inconclusive_reasons"])


def test_failed_engagement_check_makes_the_verdict_inconclusive(tmp_path):
    steady_pair(tmp_path, seed=8, n=2000)
    edit_metrics(tmp_path, "p", lambda m: m.update(engagement={"engaged": False, "checks": [
        {"name": "regulariser_share", "passed": False, "value": 3e-4, "threshold": 0.01,
         "why": "the IW term is 0.03 % of the loss"}]}))
    t = evaluate(tmp_path, ["p", "b"])["significance"]
    assert t["significant"] and t["verdict"] == "inconclusive"
    assert t["inconclusive_reasons"] == [
        "p fails its engagement check regulariser_share: the IW term is 0.03 % of the loss"]


def test_trial_runs_form_their_own_family_and_carry_the_dagger(tmp_path):
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 2, 400)
    for k in range(3):
        a, b = seeds_with_gaps(labels, [1, 2], rng)
        fake_run(tmp_path, f"p{k}", "proposed", "iw_lora", f"t{k}", a, labels)
        fake_run(tmp_path, f"b{k}", "comparative-1", "lora", f"t{k}", b, labels,
                 mode="trial" if k == 2 else "full")
    report = evaluate(tmp_path, [f"{r}{k}" for k in range(3) for r in "pb"], allow_trial=True)
    sizes = {t["runs"][1]: (t["family"], t["n_tests_corrected"]) for t in report["pairwise"]}
    assert sizes == {"b0": ("call", 2), "b1": ("call", 2), "b2": ("trial runs", 1)}
    summary = (tmp_path / "comparison" / "summary.md").read_text()
    assert "- p2 vs b2 †" in summary and "- p0 vs b0 on" in summary


def test_a_run_without_mode_is_refused_like_a_trial_run(tmp_path, capsys):
    rng = np.random.default_rng(10)
    labels = rng.integers(0, 2, 100)
    fake_run(tmp_path, "p", "proposed", "iw_lora", "rte", {1: with_accuracy(labels, 0.8, rng)}, labels)
    fake_run(tmp_path, "b", "comparative-1", "lora", "rte", {1: with_accuracy(labels, 0.7, rng)}, labels)
    edit_metrics(tmp_path, "b", lambda m: m.pop("mode"))
    with pytest.raises(EvaluationError, match="'b' does not say which mode it ran in"):
        evaluate(tmp_path, ["p", "b"])
    report = evaluate(tmp_path, ["p", "b"], allow_trial=True)
    assert report["trial_runs"] == ["b"] and report["significance"]["family"] == "trial runs"


def test_an_experiment_family_gives_every_output_the_same_adjusted_p(tmp_path):
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 600)
    ids = []
    for task, gaps in (("rte", [3, 4]), ("sst2", [1, 0])):  # 2 seeds: no ASO to wait for
        a, b = seeds_with_gaps(labels, gaps, rng)
        fake_run(tmp_path, f"p-{task}", "proposed", "iw_lora", task, a, labels)
        fake_run(tmp_path, f"b-{task}", "comparative-1", "lora", task, b, labels)
        ids += [f"p-{task}", f"b-{task}"]
    overall = evaluate(tmp_path, ids)
    family = str(tmp_path / "comparison" / "aggregated_metrics.json")
    lone = evaluate(tmp_path, ids[:2], out_dir=tmp_path / "lone")["significance"]
    assert lone["n_tests_corrected"] == 1  # a lone call is its own family
    per_task = evaluate(tmp_path, ids[:2], out_dir=tmp_path / "rte", holm_family=family)["significance"]
    ref = next(t for t in overall["pairwise"] if t["runs"] == ["p-rte", "b-rte"])
    assert per_task["p_adjusted"] == ref["p_adjusted"] and per_task["n_tests_corrected"] == 2
    assert per_task["verdict"] == ref["verdict"] and per_task["family"] == family
    # a family that does not hold the call's pairs is refused with one line
    assert main([f"results_dir={tmp_path}", "run_ids=[p-sst2,b-sst2]", f"out_dir={tmp_path / 'x'}",
                 f"holm_family={tmp_path / 'lone' / 'aggregated_metrics.json'}"]) == 2
    with pytest.raises(EvaluationError, match="not in the Holm family"):
        evaluate(tmp_path, ids[2:], out_dir=tmp_path / "y",
                 holm_family=str(tmp_path / "lone" / "aggregated_metrics.json"))


def test_gzipped_predictions_are_read(tmp_path):
    rng = np.random.default_rng(12)
    labels = rng.integers(0, 2, 300)
    a, b = seeds_with_gaps(labels, [5, 6], rng)
    fake_run(tmp_path, "p", "proposed", "iw_lora", "rte", a, labels)
    fake_run(tmp_path, "b", "comparative-1", "lora", "rte", b, labels)
    plain = evaluate(tmp_path, ["p", "b"], out_dir=tmp_path / "plain")["significance"]
    for f in (tmp_path / "p" / "predictions" / "validation").glob("seed*.jsonl"):
        with gzip.open(f.with_name(f.name + ".gz"), "wt") as out:
            out.write(f.read_text())
        f.unlink()
    zipped = evaluate(tmp_path, ["p", "b"], out_dir=tmp_path / "gz")["significance"]
    assert zipped["p_value"] == plain["p_value"] and zipped["ci95"] == plain["ci95"]


def test_one_seed_runs_show_their_test_set_interval(tmp_path):
    """The main job's shape: one seed per run, 872 examples, accuracy near 0.85: each run's
    interval is test-set sampling alone, about ±2.4 points, and the figure's axis holds it."""
    rng = np.random.default_rng(13)
    labels = rng.integers(0, 2, 872)
    fake_run(tmp_path, "lora", "proposed", "lora", "sst2", {42: with_accuracy(labels, 0.848, rng)}, labels)
    fake_run(tmp_path, "full", "baseline", "full_ft", "sst2", {42: with_accuracy(labels, 0.846, rng)}, labels)
    report = evaluate(tmp_path, ["lora", "full"])
    for rid in ("lora", "full"):
        iv = report["run_checks"][rid]["interval"]
        assert iv["level"] == "test-set sampling only"
        half = (iv["ci95"][1] - iv["ci95"][0]) / 2
        binomial = 1.96 * np.sqrt(iv["mean"] * (1 - iv["mean"]) / 872)  # normal approximation
        assert half == pytest.approx(binomial, rel=0.1) and 0.02 < half < 0.028
    spans = [tuple(report["run_checks"][r]["interval"]["ci95"]) for r in ("lora", "full")]
    lo, hi = axis_span([0.848, 0.846], spans)
    assert lo < min(s[0] for s in spans) and hi > max(s[1] for s in spans)
    assert (tmp_path / "comparison" / "comparison_validation_accuracy.png").stat().st_size > 1000
    agg = json.loads((tmp_path / "comparison" / "aggregated_metrics.json").read_text())
    assert agg["significance"]["verdict"] == "no_difference_detected"


COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "verdicts-cpu"
ASO_DEFAULT = rankwise.stats.ASO_BOOTSTRAP_ITERATIONS  # read before the fixture lowers them
RESAMPLES_DEFAULT = rankwise.stats.VERDICT_RESAMPLES


@pytest.mark.parametrize("name", sorted(p.name for p in COMMITTED.iterdir() if (p / "runs").is_dir()))
def test_committed_comparison_is_recomputed_from_its_predictions(name, tmp_path, monkeypatch):
    """Every committed comparison ships the runs it compared; evaluate on them today gives the
    same verdicts, p-values, intervals and run checks as the committed output."""
    monkeypatch.setattr(rankwise.stats, "ASO_BOOTSTRAP_ITERATIONS", ASO_DEFAULT)
    monkeypatch.setattr(rankwise.stats, "VERDICT_RESAMPLES", RESAMPLES_DEFAULT)
    folder = COMMITTED / name
    committed = json.loads((folder / "aggregated_metrics.json").read_text())
    report = evaluate(folder / "runs", committed["run_ids"], out_dir=tmp_path)
    keys = ("runs", "verdict", "inconclusive_reasons", "difference", "ci95", "p_value", "p_bootstrap",
            "p_t_test", "p_adjusted", "n_tests_corrected", "mde", "aso_epsilon")
    fresh = [{k: t.get(k) for k in keys} for t in json.loads(json.dumps(report["pairwise"]))]
    assert fresh == [{k: t.get(k) for k in keys} for t in committed["pairwise"]]
    assert json.loads(json.dumps(report["run_checks"])) == committed["run_checks"]


def test_aso_of_several_pairs_at_once_equals_each_computed_alone(monkeypatch):
    """The pairs of one comparison get their ε_min in forked workers, each the value of a lone
    deepsig call (deepsig seeds every bootstrap iteration)."""
    from rankwise import stats

    monkeypatch.setattr(stats, "ASO_BOOTSTRAP_ITERATIONS", 40)
    rng = np.random.default_rng(3)
    jobs = [(list(rng.normal(0.8, 0.02, 5)), list(rng.normal(m, 0.02, 5)), 3) for m in (0.75, 0.8, 0.85)]
    alone = [stats.aso_epsilon(a, b, n) for a, b, n in jobs]
    assert stats.aso_epsilons(jobs) == alone
    assert alone[0] < 0.5 < alone[2]  # the order shows in ε: A over a worse B, then over a better one
