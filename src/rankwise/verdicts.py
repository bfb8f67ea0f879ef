"""What a comparison may claim (docs/methods.md, verdicts): each run's health judged from its
predictions, the few-seed rule, the minimum detectable effect and the verdict word.

A verdict is one of

- ``better`` / ``worse``: the family-adjusted p is below α, by the sign of the difference;
- ``no_difference_detected``: not significant, and both runs could have shown a difference;
  ``mde`` says how large a true difference this design would have caught with 80 % power;
- ``inconclusive``: the comparison cannot tell, whatever its p. Either run is degenerate (one
  constant prediction on every example of a seed, or a correlation ≤ 0), does not beat the best
  constant predictor by more than its own 95 % CI (``above_chance``), or fails its method's
  engagement checks (``engagement`` in ``metrics.json``); or the two runs predict identically,
  or there is nothing to test. ``inconclusive_reasons`` says which, in plain sentences.

Everything here is computed from the per-seed predictions (their rows carry the labels), so a
run written before these checks existed is judged the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rankwise.metrics import METRIC_FNS, f1_binary, is_lower_better
from rankwise.stats import minimum_detectable_effect, run_interval, seed_t_test

ALPHA = 0.05
POWER = 0.8
# Below this many seeds in either run, the bootstrap cannot range beyond the seeds it saw:
# the verdict takes the larger of its p and a t-test's over seed scores.
FEW_SEEDS = 5
ASO_MIN_SEEDS = 3
CORRELATIONS = ("matthews_correlation", "pearson")


def metric_function(leaf: str, positive: int):
    return (lambda p, y: f1_binary(p, y, positive)) if leaf == "f1" else METRIC_FNS[leaf]


# --- one run ------------------------------------------------------------------------------------

def seeds_on_common_examples(per_seed: dict[int, dict[int, tuple]]
                             ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(seeds, predictions (S, n), labels (n,)) on the examples every seed scored, from
    seed -> {idx: (label, prediction)}."""
    seeds = sorted(per_seed)
    common = sorted(set.intersection(*(set(rows) for rows in per_seed.values())))
    labels = np.asarray([per_seed[seeds[0]][i][0] for i in common])
    return seeds, np.asarray([[per_seed[s][i][1] for i in common] for s in seeds]), labels


def chance_level(labels: np.ndarray, leaf: str, positive: int) -> tuple[float, str]:
    """The best score a constant predictor gets on these labels, and which predictor that is
    (the majority class for accuracy, "always positive" for F1, 0 for a correlation)."""
    if leaf in CORRELATIONS:
        return 0.0, "a constant predictor (correlation 0)"
    fn = metric_function(leaf, positive)
    scores = {c.item(): fn(np.full_like(labels, c), labels) for c in np.unique(labels)}
    best = max(scores, key=scores.get)
    return float(scores[best]), f"the constant prediction {best!r}"


def degenerate_reasons(run_id: str, seeds: list[int], preds: np.ndarray, labels: np.ndarray,
                       leaf: str, positive: int) -> list[str]:
    """A sentence per seed that predicts one value on every example or, on a correlation
    metric, correlates ≤ 0 with the labels."""
    reasons = []
    fn = metric_function(leaf, positive)
    for seed, p in zip(seeds, preds):
        if np.all(p == p[0]):
            reasons.append(f"{run_id} seed {seed} predicts {p[0].item()!r} on every example")
        elif leaf in CORRELATIONS and fn(p, labels) <= 0:
            reasons.append(f"{run_id} seed {seed} has {leaf} {fn(p, labels):.3f} ≤ 0")
    return reasons


@dataclass
class RunHealth:
    """One run's checks on the reported split: its interval (the CI the verdicts use), the
    above-chance check, degenerate seeds and failed engagement checks."""
    run_id: str
    interval: dict | None = None
    above_chance: dict | None = None
    degenerate: list[str] = field(default_factory=list)
    engagement_failures: list[str] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        out = list(self.degenerate)
        if self.above_chance is not None and not self.above_chance["passed"]:
            out.append(f"{self.run_id} is not above chance: {self.above_chance['why']}")
        return out + self.engagement_failures

    def to_json(self) -> dict:
        return {"interval": self.interval, "above_chance": self.above_chance,
                "degenerate": self.degenerate, "engagement_failures": self.engagement_failures,
                "ok": not self.reasons}


def engagement_failures(run: dict) -> list[str]:
    """The failed checks of the run's ``engagement`` block (its own above-chance check aside:
    that one is recomputed from the predictions)."""
    block = run.get("engagement") or {}
    failed = [c for c in block.get("checks", []) if not c.get("passed", True)
              and c.get("name") != "above_chance"]
    return [f"{run['run_id']} fails its engagement check {c.get('name')}: {c.get('why', '')}".rstrip(": ")
            for c in failed]


def above_chance(preds: np.ndarray, labels: np.ndarray, leaf: str, positive: int) -> dict:
    """The ``above_chance`` check: the run's 95 % interval on ``leaf`` (the verdicts' two-level
    bootstrap; examples alone with one seed) lies above the best constant predictor's score.
    Returns the check (``name``, ``passed``, ``value``, ``threshold``, ``why``) with the
    interval under ``interval``."""
    interval = run_interval(preds, labels, leaf, positive=positive)
    chance, predictor = chance_level(labels, leaf, positive)
    lo, hi = interval["ci95"]
    passed = bool(lo > chance)
    why = (f"{leaf} {interval['mean']:.4f} (95 % CI [{lo:.4f}, {hi:.4f}], {interval['level']}) "
           f"{'clears' if passed else 'does not clear'} {predictor}'s {chance:.4f}")
    return {"name": "above_chance", "passed": passed, "value": interval["mean"], "ci95": [lo, hi],
            "threshold": chance, "why": why, "interval": interval}


def run_health(run: dict, seeds: list[int], preds: np.ndarray, labels: np.ndarray, leaf: str,
               positive: int) -> RunHealth:
    rid = run["run_id"]
    check = above_chance(preds, labels, leaf, positive)
    interval = check.pop("interval")
    return RunHealth(rid, interval, check, degenerate_reasons(rid, seeds, preds, labels, leaf, positive),
                     engagement_failures(run))


# --- one pair -----------------------------------------------------------------------------------

def seed_level(scores_a: list[float], scores_b: list[float], paired: bool) -> dict:
    """The t-test over seed scores (paired, else Welch) with its standard error and degrees of
    freedom, for the few-seed rule and the MDE; empty when a run has one seed."""
    a, b = np.asarray(scores_a, float), np.asarray(scores_b, float)
    p = seed_t_test(a, b, paired)
    if p is None:
        return {}
    if paired:
        se, df = float(np.std(a - b, ddof=1) / np.sqrt(len(a))), len(a) - 1
    else:
        va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
        se = float(np.sqrt(va + vb))
        denom = va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)
        df = float((va + vb) ** 2 / denom) if denom > 0 else len(a) + len(b) - 2
    return {"p": p, "se": se, "df": df, "test": "paired t" if paired else "Welch t"}


def apply_few_seed_rule(entry: dict, seed_test: dict) -> None:
    """Below FEW_SEEDS seeds in either run the verdict's p is the larger of the bootstrap's and
    the seed-level t-test's (methods.md, verdicts); the entry keeps both."""
    entry["p_bootstrap"] = entry["p_value"]
    entry["p_t_test"] = seed_test.get("p")
    entry["few_seeds"] = min(entry["n_seeds"]) < FEW_SEEDS
    if entry["few_seeds"] and seed_test:
        entry["p_value"] = max(entry["p_value"], seed_test["p"])


def mde(entry: dict, seed_test: dict, family_size: int) -> float:
    """The minimum detectable effect at 80 % power and the family's α: Holm's strictest
    threshold α/m, two-sided, from the bootstrap's standard error, and under the few-seed rule
    the larger of that and the seed-level t-test's."""
    alpha = ALPHA / max(1, family_size)
    value = minimum_detectable_effect(entry["se"], alpha, POWER)
    if entry.get("few_seeds") and seed_test:
        value = max(value, minimum_detectable_effect(seed_test["se"], alpha, POWER, df=seed_test["df"]))
    return value


def decide(entry: dict, health_a: RunHealth | None, health_b: RunHealth | None) -> None:
    """Set ``verdict`` and ``inconclusive_reasons`` on a finished, family-adjusted entry."""
    reasons = [*(health_a.reasons if health_a else []), *(health_b.reasons if health_b else [])]
    if entry.get("identical_predictions"):
        reasons.append("the two runs predict identically on every example of every seed: "
                       "nothing here tells them apart")
    if entry["p_value"] is None:
        reasons.append(f"no test: {entry.get('reason', 'not computed')}")
    if reasons:
        word = "inconclusive"
    elif entry["significant"]:
        gain = -entry["difference"] if is_lower_better(entry["metric"]) else entry["difference"]
        word = "better" if gain > 0 else "worse"
    else:
        word = "no_difference_detected"
    entry.update(verdict=word, inconclusive_reasons=reasons)


def aso_applies(entry: dict, health_a: RunHealth | None, health_b: RunHealth | None) -> str | None:
    """Why ε_min would mean nothing here (deepsig divides 0 by 0), or None where it applies."""
    if min(entry["n_seeds"]) < ASO_MIN_SEEDS:
        return f"fewer than {ASO_MIN_SEEDS} seeds"
    if entry.get("identical_predictions"):
        return "identical predictions"
    if any(h is not None and h.degenerate for h in (health_a, health_b)):
        return "a degenerate run"
    return None
