"""One job end to end: (search →) one training per seed → aggregated ``metrics.json``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from rankwise import distributed
from rankwise.config.loader import Job
from rankwise.data.loading import missing_eval_splits
from rankwise.data.tasks import get_task
from rankwise.errors import ConfigError
from rankwise.metrics import glue_score
from rankwise.results import atomic_write_json, provenance, read_json, write_yaml
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


def add_glue_score(dataset: str, subset: str, results: list) -> None:
    """Each seed's ``glue_score`` (the task's score as GLUE papers report it), before aggregation."""
    if dataset != "glue":
        return
    for r in results:
        score = glue_score(subset, r.final)
        if score is not None:
            r.final["glue_score"] = score


def first_trainer(job: Job) -> tuple[Any, dict[str, Any]]:
    """The first seed's Trainer (backbone, data, length checks) and the RNG state right after it
    was built: built before the run folder is touched, so a data, model or length error leaves
    no folder behind and never clears an earlier run's."""
    from rankwise.training.checkpoint import rng_state
    from rankwise.training.loop import Trainer

    seed = job.run.training.seed_list()[0]
    with distributed.current().main_first():  # under torchrun rank 0 fills the caches
        trainer = Trainer(job, seed, job.run_dir / f"seed{seed}")
    return trainer, rng_state()


def train_seeds(job: Job, resume: bool, reporter: Callable | None = None, write_outputs: bool = True,
                first: tuple[Any, dict[str, Any]] | None = None):
    """Train the job's configuration once per seed; return the SeedResults. ``first``: the first
    seed's Trainer and RNG state from :func:`first_trainer` (restored before it trains)."""
    from rankwise.training.checkpoint import set_rng_state
    from rankwise.training.loop import Trainer, stop_on_signals

    ctx = distributed.current()
    results = []
    data = None
    with stop_on_signals() as stop:
        for seed in job.limits.seeds(job.run):  # trial mode: the first seed only
            seed_dir = job.run_dir / f"seed{seed}"
            if first is not None and not results:
                trainer, rng = first
                set_rng_state(rng)  # as if it had been built just now
            else:
                with ctx.main_first():  # under torchrun rank 0 fills the data and model caches
                    trainer = Trainer(job, seed, seed_dir, reporter=reporter, data=data)
            data = trainer.data  # same tokenised data for every seed
            job.training_started = True  # from here on an error keeps the run folder
            result = trainer.run(resume=resume, stop=stop)
            if write_outputs:
                write_predictions(job.run_dir, seed, result.predictions)
            results.append(result)
    return results


def execute(job: Job, prepare_run_dir: Callable[..., bool]) -> str:
    """Run the job (search first when it asks for one), or the one part of it the command
    names (``max_trials``, ``seed_only``, ``merge_seeds``: the grid's cells); return the CLI's
    one-line summary."""
    t_start = time.perf_counter()
    c = job.command
    if c.max_trials is not None:
        return search_trials_only(job)
    if c.seed_only is not None or c.merge_seeds:
        search, run_config = None, job.run_dict
        if job.run.optuna.n_trials > 0:
            job, search = finished_search(job)
        job.seed_identity = seed_identity(job, search, run_config)
        if c.merge_seeds:
            return merge_seed_results(job, t_start, search)
        return train_seed_only(job, c.seed_only)
    if job.run.optuna.n_trials > 0:  # 0 in trial mode (config.loader.resolve_mode)
        return search_then_final_run(job, prepare_run_dir, t_start)
    return train_and_write(job, prepare_run_dir, t_start)


# --- search ------------------------------------------------------------------------------


def check_search_is_runnable(job: Job) -> None:
    """Refuse a search under torchrun and a search space the run config cannot take (ConfigError)."""
    from rankwise.search import validate_search_space

    if distributed.launched_by_torchrun():
        raise ConfigError("optuna.n_trials", "a search is not run under torchrun: start workers as "
                          "separate processes sharing optuna.storage, or set optuna.n_trials=0")
    validate_search_space(job.run_dict, job.as_configured.optuna)


def search_then_final_run(job: Job, prepare_run_dir: Callable[..., bool], t_start: float) -> str:
    """Optuna search over the run's ``optuna`` block, then the final run with the best params.

    Workers: every process started with the same command and storage joins the one study
    (named ``run_id``) and runs trials until ``n_trials`` are COMPLETE or PRUNED. Then the
    final run: the process that takes ``<run_dir>/optuna/final.lock`` trains the best
    configuration once per seed, exactly as a run without search would; a process that finds
    the lock held leaves the final run to its holder and exits 0, and one that finds a complete
    final run of the same finished study keeps it (``resume=false`` retrains it). The lock is
    an OS file lock: it is released when its holder exits or dies, so re-running the command
    resumes an interrupted final run from its checkpoints.
    """
    from rankwise.search import SearchAborted, run_search

    # Before anything is written: a bad search space exits 2 naming optuna.search_space.<name>.
    check_search_is_runnable(job)
    if job.run.optuna.selection_optimistic:
        log.warning("optuna.selection_split=validation: trials are scored on the split the final "
                    "run reports, so its numbers are optimistic (marked in metrics.json search)")
    study_dir = job.run_dir / "optuna"
    job.training_started = True  # the study may be shared with other workers: never removed
    seed = job.run.training.seed
    result = run_search(job.run.run_id, job.run_dict, job.run.optuna, seed, study_dir,
                        trial_objective(job, seed))
    metric = job.run.optuna.metric_name
    if result.best_value is None:
        raise SearchAborted(f"search {job.run.run_id}: no trial completed, so there is no best "
                            f"configuration; see {study_dir / 'trials.csv'}")
    params = final_params(job, result)
    search = search_summary(job, result, params)
    best = (f"best {metric}={result.best_value:.4f} on {job.run.optuna.selection_label} "
            f"(trial #{result.best_trial_number})")
    with final_run_lock(study_dir) as held:
        if not held:
            log.info("search %s finished; another worker holds %s and writes the final run",
                     job.run.run_id, study_dir / "final.lock")
            return f"search finished, {best}; the final run is written by another worker -> {job.run_dir}"
        if job.command.resume is not False and final_run_is_complete(job.run_dir, search):
            log.info("final run of this study already complete in %s; kept (resume=false retrains it)",
                     job.run_dir)
            return f"search finished, {best}; final run already complete -> {job.run_dir / 'metrics.json'}"
        final_job = with_params(job, params)
        log.info("final run with the best parameters: %s",
                 ", ".join(f"{k}={v}" for k, v in search["best_overrides"].items()))
        return train_and_write(final_job, prepare_run_dir, t_start, search=search)


def search_trials_only(job: Job) -> str:
    """``max_trials=N``: at most N trials of the run's search on its shared study, no final
    run (the grid's search cells; the seed cells start when the study is finished)."""
    from rankwise.search import run_search

    check_search_is_runnable(job)
    job.training_started = True  # the study is shared: never removed
    seed = job.run.training.seed
    result = run_search(job.run.run_id, job.run_dict, job.run.optuna, seed, job.run_dir / "optuna",
                        trial_objective(job, seed), max_trials=job.command.max_trials)
    return (f"search {job.run.run_id}: {result.n_finished}/{job.run.optuna.n_trials} trials finished"
            + ("" if result.best_value is None else f", best {job.run.optuna.metric_name}="
               f"{result.best_value:.4f} (trial #{result.best_trial_number})"))


def finished_search(job: Job) -> tuple[Job, dict[str, Any]]:
    """The job with its finished study's best parameters, and the search block; a study with
    trials still to run is refused (its seeds would train an unsettled configuration)."""
    from rankwise.errors import RankwiseError
    from rankwise.search import SearchAborted, run_search

    check_search_is_runnable(job)
    seed = job.run.training.seed
    result = run_search(job.run.run_id, job.run_dict, job.run.optuna, seed, job.run_dir / "optuna",
                        trial_objective(job, seed), max_trials=0)
    n_trials = job.run.optuna.n_trials
    if result.n_finished < n_trials:
        raise RankwiseError(f"search {job.run.run_id}: {result.n_finished}/{n_trials} trials finished; "
                            f"its seeds train the best configuration of a finished study (run the "
                            f"trials first: max_trials=1 per process, or the whole run)")
    if result.best_value is None:
        raise SearchAborted(f"search {job.run.run_id}: no trial completed, so there is no best "
                            f"configuration; see {job.run_dir / 'optuna' / 'trials.csv'}")
    params = final_params(job, result)
    return with_params(job, params), search_summary(job, result, params)


def trial_objective(job: Job, seed: int) -> Callable:
    """``objective(trial_cfg, reporter)`` for :func:`rankwise.search.run_search`: trains one
    Trainer on the trial's config in ``<run_dir>/optuna/trials/<number>/`` and returns the final
    ``optuna.metric_name``; each epoch's value goes to the pruner through ``reporter``.

    With ``optuna.selection_split`` a fraction, the trial trains on the training split minus a
    held-out slice (seeded by ``seed``, stratified) and the metric is measured on the slice
    (:mod:`rankwise.data.selection`); with ``validation``, on the validation split."""
    from rankwise.errors import RankwiseError
    from rankwise.training.loop import Trainer, stop_on_signals

    metric = job.run.optuna.metric_name
    selection = job.run.optuna.selection_split
    data_by_source: dict[str, Any] = {}

    def trial_data(run, source: str):
        """The trials' TaskData, loaded and split once per data source (None: let the
        Trainer load the run's own data)."""
        if source in data_by_source or selection == "validation":
            return data_by_source.get(source)
        from rankwise.data.loading import load_task_data
        from rankwise.data.selection import selection_data
        from rankwise.models import default_cache_dir
        from rankwise.training.build import load_run_backbone

        _, tokenizer = load_run_backbone(run, get_task(run.dataset.name, run.dataset.subset))
        full = load_task_data(run.dataset, tokenizer, default_cache_dir())
        return selection_data(full, selection, seed)

    def objective(trial_cfg: dict, reporter) -> float:
        # A trial is never resumed (a dead one is retried from scratch), so it saves nothing;
        # its value is the metric, so the post-training latency/FLOPs measurement is skipped.
        training = trial_cfg.setdefault("training", {})
        training.update(save_strategy="no", save_every_n_steps=None)
        training["inference_measurement"] = {**(training.get("inference_measurement") or {}),
                                             "enabled": False}
        trial_job = job.with_run(trial_cfg)
        model = trial_job.run.model
        source = json.dumps([trial_cfg.get("dataset"), model.name, model.tokenizer], sort_keys=True,
                            default=str)
        trial_dir = job.run_dir / "optuna" / "trials" / str(reporter.trial_number)
        trainer = Trainer(trial_job, seed, trial_dir, reporter=reporter.report,
                          data=trial_data(trial_job.run, source))
        data_by_source[source] = trainer.data  # trials that share data tokenise it once
        reporter.set_user_attr("train_rows", len(trainer.data.train))
        reporter.set_user_attr("selection_rows", len(trainer.data.evals[0].data))
        with stop_on_signals() as stop:
            result = trainer.run(resume=False, stop=stop)
        if result.final.get(metric) is None:
            raise RankwiseError(f"trial #{reporter.trial_number} produced no {metric} "
                                f"(got {', '.join(result.final)})")
        return trial_value(trial_job, trainer, result.final, reporter)

    return objective


CHOSEN_RULE = "eval_gates"  # a trial's user attribute under ``eval_gates: select``


def trial_value(trial_job: Job, trainer, final: dict[str, Any], reporter) -> float:
    """A finished trial's value: its metric or, under ``eval_gates: select``, its best
    evaluation rule's (the rule stored with the trial). A gated method's rules are all scored
    on the selection slice and stored (``eval_rule_scores``).

    Mechanism first: a rule that breaks the method's budget, or opens at evaluation a share of
    what training kept open outside the ``capacity_ratio`` bounds, cannot win over one that does
    neither, and the trial records how far the evaluation it stands for is from that as Optuna
    constraints (:func:`record_constraints`), so the search prefers trials that hold
    (:func:`rankwise.search.trials._best_trial`, and TPE's constraints). So does a trial whose
    regulariser was too weak to change training, or swamped the task loss
    (:func:`regulariser_gap`)."""
    from rankwise.methods.engagement import resolve_thresholds

    metric = trial_job.run.optuna.metric_name
    thresholds = resolve_thresholds(trial_job.run.training.engagement_thresholds)
    trained = {"regulariser_gap": regulariser_gap(trainer, final, thresholds)}
    scores = eval_rule_scores(trainer, final, metric)
    if scores:
        reporter.set_user_attr("eval_rule_scores", scores)
    if not scores or getattr(trial_job.run.model.adapter, "eval_gates", None) != "select":
        configured = evaluation_row(final, metric, trainer.data.evals[0].name, final)
        record_constraints(reporter, {**rule_constraints(configured, thresholds), **trained})
        return float(final[metric])
    chosen = best_rule(scores, trial_job.run.optuna.direction, thresholds)
    reporter.set_user_attr(CHOSEN_RULE, chosen)
    record_constraints(reporter, {**rule_constraints(scores[chosen], thresholds), **trained})
    return float(scores[chosen]["value"])


def regulariser_gap(trainer, final: dict[str, Any], thresholds: dict[str, float]) -> float:
    """How far the trial's regularisers were from engaged: the distance of each share of the
    training loss that the method's ``regulariser_share`` check tests (IW-LoRA's term, a
    spectral budget penalty) from the check's bounds, summed; 0 for a method without one.
    A trial whose term is a rounding error of the loss tests the plain adapter, not the method."""
    from rankwise.methods.engagement import SeedEvidence

    evidence = [SeedEvidence(trainer.seed, final, trainer.history)]
    shares = [c.value for c in trainer.method.engagement_checks(evidence, thresholds)
              if c.name == "regulariser_share"]
    return float(sum(1.0 if v is None else bound_gap(v, thresholds, "regulariser_share") for v in shares))


def bound_gap(value: float, thresholds: dict[str, float], check: str) -> float:
    """How far ``value`` lies outside the check's [``<check>_min``, ``<check>_max``] (0 inside)."""
    return max(0.0, thresholds[f"{check}_min"] - value, value - thresholds[f"{check}_max"])


def rule_constraints(row: dict[str, Any], thresholds: dict[str, float]) -> dict[str, float]:
    """How far one evaluation is from holding its mechanism (0 where it holds, or where the
    method has no budget or gates): its budget violations, and the distance of its capacity
    ratio from the ``capacity_ratio`` bounds."""
    ratio = row.get("capacity_ratio")
    return {"budget_violations": float(row.get("spectral_budget_violations") or 0),
            "capacity_gap": 0.0 if ratio is None else bound_gap(ratio, thresholds, "capacity_ratio")}


def best_rule(scores: dict[str, dict[str, Any]], direction: str, thresholds: dict[str, float]) -> str:
    """The best-scoring rule among those that hold (no budget violation, capacity ratio within
    its bounds); when none does, the fewest violations, then the smallest capacity gap. Ties go
    to the first listed."""
    sign = 1.0 if direction == "maximize" else -1.0

    def key(rule: str) -> tuple[float, float, float]:
        gaps = rule_constraints(scores[rule], thresholds)
        return gaps["budget_violations"], gaps["capacity_gap"], -sign * scores[rule]["value"]

    return min(scores, key=key)


def capacity_ratio(opened: float | None, expected: float | None) -> float | None:
    """Open gates per token at evaluation ÷ expected open in training (None without gates)."""
    return opened / expected if expected and opened is not None else None


def record_constraints(reporter, constraints: dict[str, float]) -> None:
    """The trial's constraints (feasible at 0), also as user attributes for the reports."""
    for name, value in constraints.items():
        reporter.set_user_attr(name, value)
        reporter.set_constraint(name, value)


RULE_STATISTICS = ("spectral_open_gates_per_token", "spectral_budget_violations")


def eval_rule_scores(trainer, final: dict[str, Any], metric: str) -> dict[str, dict[str, Any]]:
    """A trained trial model scored under each of its method's evaluation rules on the trial's
    selection slice (no retraining): the metric, open gates per token, budget violations and
    the capacity ratio (open at evaluation ÷ expected open in training). Empty for a method
    with one way to evaluate."""
    rules = trainer.method.evaluation_rules()
    if not rules:
        return {}
    split = trainer.data.evals[0].name
    scores = {}
    for rule in rules:
        with trainer.method.evaluation_rule(trainer.model, rule):
            metrics, _ = trainer.evaluate_splits()
        scores[rule] = evaluation_row(metrics, metric, split, final)
    return scores


def evaluation_row(metrics: dict[str, Any], metric: str, split: str, final: dict[str, Any]) -> dict[str, Any]:
    """One evaluation on ``split`` as a rule-score row: the metric, open gates per token, budget
    violations and the capacity ratio against training's expected open gates (from ``final``)."""
    row = {"value": metrics.get(metric)}
    row.update({key: metrics.get(f"{split}_{key}") for key in RULE_STATISTICS})
    row["capacity_ratio"] = capacity_ratio(row["spectral_open_gates_per_token"],
                                           final.get("train_expected_open_gates_per_token"))
    return row


def final_params(job: Job, result) -> dict[str, Any]:
    """The best trial's parameters, with the evaluation rule it chose under ``eval_gates: select``."""
    params = dict(result.best_params)
    if getattr(job.run.model.adapter, "eval_gates", None) == "select":
        rule = (result.best_user_attrs or {}).get(CHOSEN_RULE)
        if rule is None:
            from rankwise.errors import RankwiseError

            raise RankwiseError(f"search {job.run.run_id}: eval_gates is select but the best trial "
                                f"#{result.best_trial_number} recorded no chosen rule")
        params["model.adapter.eval_gates"] = rule
    return params


def with_params(job: Job, params: dict[str, Any]) -> Job:
    """The job with search parameters written into its run config (and re-validated)."""
    from rankwise.search import apply_params

    final = job.with_run(apply_params(job.run_dict, params))
    final.training_started = job.training_started
    return final


def search_summary(job: Job, result, params: dict[str, Any]) -> dict[str, Any]:
    """The ``search`` block of metrics.json; ``params``: the final run's (``final_params``)."""
    from rankwise.config.search_aliases import resolve_search_key

    cfg = job.run.optuna
    return {
        "study_name": job.run.run_id, "storage": result.storage, "study_dir": "optuna",
        "metric_name": cfg.metric_name, "direction": cfg.direction, "n_trials": cfg.n_trials,
        # What scored the trials; "validation" = selected on the reported split (optimistic).
        "selection_split": cfg.selection_label, "selection_optimistic": cfg.selection_optimistic,
        "n_finished": result.n_finished, "timed_out": result.timed_out,
        "best_value": result.best_value, "best_trial_number": result.best_trial_number,
        "best_params": result.best_params,
        "best_overrides": {resolve_search_key(k, job.run_dict): v for k, v in params.items()},
        # each evaluation rule of the best trial's model on the selection slice (gated methods)
        **{key: result.best_user_attrs[key] for key in ("eval_rule_scores", "budget_violations", "capacity_gap",
                                                         "regulariser_gap")
           if key in (result.best_user_attrs or {})},
        "states": {"complete": result.n_complete, "pruned": result.n_pruned,
                   "failed": result.n_failed, "cancelled": result.n_cancelled,
                   "invalid_config": result.n_invalid},
        "wall_time_s": result.wall_time_s,
    }


def final_run_is_complete(run_dir: Path, search: dict[str, Any]) -> bool:
    """Whether ``run_dir`` holds a complete final run of this very study result."""
    try:
        metrics = read_json(run_dir / "metrics.json")
    except (OSError, ValueError):
        return False
    done = metrics.get("search") or {}
    same = ("storage", "n_trials", "best_trial_number", "best_params")
    return metrics.get("status") == "complete" and all(done.get(k) == search[k] for k in same)


@contextmanager
def final_run_lock(study_dir: Path) -> Iterator[bool]:
    """Yield whether this process holds ``final.lock`` (non-blocking; released on exit)."""
    import fcntl

    fd = os.open(study_dir / "final.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- one seed at a time (the grid's seed cells) --------------------------------------------

SEED_RESULT = "result.json"
SEED_FIELDS = ("seed", "final", "best", "history", "params", "wall_time_s", "step_time_s",
               "peak_memory_mb", "method_metrics", "amp_skipped_steps", "precision")


def seed_identity(job: Job, search: dict[str, Any] | None, run_config: dict[str, Any]) -> dict[str, Any]:
    """What a seed's result must match to count for this run: the config it trained (after a
    search, with the best parameters), the run config as given, the mode and the study."""
    identity = {"config": job.run_dict, "run_config": run_config, "mode": job.command.mode,
                "search": None if search is None else
                {k: search[k] for k in ("storage", "n_trials", "best_trial_number", "best_params")}}
    return json.loads(json.dumps(identity, default=str))


def read_seed_result(job: Job, seed: int) -> dict[str, Any] | None:
    """``seed<N>/result.json`` when it is this run's (same identity), else None."""
    try:
        record = read_json(job.run_dir / f"seed{seed}" / SEED_RESULT)
    except (OSError, ValueError):
        return None
    same = job.seed_identity
    return record if {k: record.get(k) for k in same} == same else None


def train_seed_only(job: Job, seed: int) -> str:
    """``seed_only=N``: train seed N as the whole run would (same Trainer, data, checkpoints,
    predictions file) into ``seed<N>/`` and write ``seed<N>/result.json``; the run folder is
    shared with the other seeds' processes and never cleared. A complete result of this
    identity is kept (``resume=false`` retrains it); a seed folder of another identity is
    replaced; an incomplete one resumes from its checkpoint (``resume=auto``)."""
    import shutil

    from rankwise.training.loop import Trainer, stop_on_signals

    ctx = distributed.current()
    seed_dir = job.run_dir / f"seed{seed}"
    identity = job.seed_identity
    resume = job.command.resume
    if resume is not False and read_seed_result(job, seed) is not None:
        return f"seed {seed} already complete -> {seed_dir / SEED_RESULT} (resume=false retrains it)"
    with ctx.main_first():
        trainer = Trainer(job, seed, seed_dir)
    if ctx.is_main:
        try:
            started = read_json(seed_dir / "identity.json")
        except (OSError, ValueError):
            started = None
        if seed_dir.exists() and (started != identity or resume is False):
            shutil.rmtree(seed_dir)  # another configuration's (or a restart's) checkpoints
        seed_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(seed_dir / "identity.json", identity)
        (seed_dir / SEED_RESULT).unlink(missing_ok=True)
    ctx.barrier()
    job.training_started = True
    with stop_on_signals() as stop:
        result = trainer.run(resume=resume is not False, stop=stop)
    if ctx.is_main:
        write_predictions(job.run_dir, seed, result.predictions)
        record = {**identity, **{k: getattr(result, k) for k in SEED_FIELDS}}
        atomic_write_json(seed_dir / SEED_RESULT, record)
    primary = f"validation_{get_task(job.run.dataset.name, job.run.dataset.subset).primary_metric}"
    return (f"seed {seed}: {primary}={result.final.get(primary, float('nan')):.4f} -> "
            f"{seed_dir / SEED_RESULT}")


def read_predictions(run_dir: Path, seed: int) -> dict[str, dict[str, list]]:
    """The per-split predictions :func:`write_predictions` wrote for ``seed``."""
    out: dict[str, dict[str, list]] = {}
    for path in sorted((run_dir / "predictions").glob(f"*/seed{seed}.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        out[path.parent.name] = {k: [r[k] for r in rows] for k in ("idx", "label", "prediction")}
    return out


def merge_seed_results(job: Job, t_start: float, search: dict[str, Any] | None) -> str:
    """``merge_seeds=true``: the run's ``metrics.json`` and ``config.yaml`` from the seeds'
    ``result.json`` files, as :func:`train_and_write` writes them after training every seed in
    one process (times are the seeds' own; ``job_wall_time_s`` is their sum)."""
    from rankwise.errors import RankwiseError
    from rankwise.training.loop import SeedResult

    results = []
    for seed in job.limits.seeds(job.run):
        record = read_seed_result(job, seed)
        if record is None:
            raise RankwiseError(f"run {job.run.run_id}: seed {seed} has no complete result of this "
                                f"configuration in {job.run_dir / f'seed{seed}'}; train it first "
                                f"(seed_only={seed})")
        results.append(SeedResult(predictions=read_predictions(job.run_dir, seed),
                                  **{k: record[k] for k in SEED_FIELDS}))
    base = run_header(job, search)
    metrics = complete_metrics(job, base, results, t_start)
    metrics["job_wall_time_s"] = float(sum(r.wall_time_s.get("total", 0.0) for r in results))
    metrics["seed_cells"] = True  # trained one seed per process (seed_only), then merged
    metrics["engagement"] = engagement(job, results)
    log.info("mechanism checks: %s", engagement_line(metrics["engagement"]))
    write_yaml(job.run_dir / "config.yaml", job.run_dict)
    atomic_write_json(job.run_dir / "metrics.json", metrics)
    primary, final = metrics["task"]["primary_metric"], metrics["final"]
    return (f"merged {len(results)} seed(s): {primary}={final.get(primary, float('nan')):.4f}; "
            f"{engagement_line(metrics['engagement'])} -> {job.run_dir / 'metrics.json'}")


# --- one configuration -------------------------------------------------------------------


def tracked_config(job: Job) -> dict[str, Any]:
    """What the W&B run's config holds: the resolved run config, the job keys, kept-aside sections."""
    return {**job.run_dict, "job": dataclasses.asdict(job.command), "mode": job.command.mode,
            "ignored_sections": job.ignored_sections}


def run_header(job: Job, search: dict[str, Any] | None) -> dict[str, Any]:
    """metrics.json as written before training (status ``running``): the run, its task, the
    config as written, provenance and, after a search, the search block."""
    from rankwise.runtime import resolve_device

    ctx = distributed.current()
    task = get_task(job.run.dataset.name, job.run.dataset.subset)
    t = job.run.training
    requested = "fp16" if t.fp16 else "bf16" if t.bf16 else "float32"
    return {"run_id": job.run.run_id, "method": job.run.method, "algorithm": job.run.algorithm,
            "status": "running", "mode": job.command.mode,
            "task": {"dataset": job.run.dataset.name, "subset": job.run.dataset.subset,
                     "primary_metric": f"validation_{task.primary_metric}",
                     "is_regression": task.is_regression,
                     **({"f1_positive_class": task.f1_positive_class} if "f1" in task.metrics else {}),
                     "missing_splits": missing_eval_splits(job.run.dataset, task)},
            "config": job.run_dict, "ignored_sections": job.ignored_sections,
            "provenance": provenance(resolve_device(job.command.device)),
            # what the config asks for; ``precision`` (what the run used) comes with the results
            "precision_requested": requested,
            **({"processes": ctx.world_size} if ctx.enabled else {}),
            **({"search": search} if search is not None else {})}


def complete_metrics(job: Job, base: dict[str, Any], results: list, t_start: float) -> dict[str, Any]:
    """metrics.json of the finished run: the seeds' final metrics aggregated (mean, std, 95 %
    interval), the first seed's best and history, times, memory and method metrics."""
    first = results[0]
    add_glue_score(job.run.dataset.name, job.run.dataset.subset, results)
    agg = aggregate_seeds(results)
    # fp16 steps the GradScaler skipped (nothing advanced on them): per seed and summed.
    agg["per_seed"] = {str(r.seed): {**r.final, "amp_skipped_steps": r.amp_skipped_steps} for r in results}
    return {
        **base, "status": "complete",
        "final": dict(agg["mean"]), "best": first.best,
        "history": [h for h in first.history if h.get("type") == "eval"],
        **agg,
        "params": first.params,
        "wall_time_s": {k: float(np.sum([r.wall_time_s[k] for r in results])) for k in first.wall_time_s},
        "job_wall_time_s": time.perf_counter() - t_start,
        "amp_skipped_steps": int(sum(r.amp_skipped_steps for r in results)),
        # the precision the run used (float32 | bf16 | fp16) and autocast's device; a CPU run of
        # an fp16 config without training.cpu_autocast records float32
        **first.precision,
        "step_time_s": first.step_time_s, "peak_memory_mb": max((r.peak_memory_mb or 0) for r in results) or None,
        "method_metrics": first.method_metrics,
        "per_seed_method_metrics": {str(r.seed): r.method_metrics for r in results},
    }


def chance_check(job: Job, results: list):
    """``above_chance`` of the finished run, from its predictions on the primary split (the
    examples every seed scored)."""
    from rankwise.methods.engagement import Check
    from rankwise.verdicts import above_chance, seeds_on_common_examples

    task = get_task(job.run.dataset.name, job.run.dataset.subset)
    preds = {r.seed: r.predictions.get("validation") for r in results}
    if not all(p and p["idx"] for p in preds.values()):
        return Check("above_chance", False, None, None, "no predictions on the validation split")
    _, stacked, labels = seeds_on_common_examples(
        {seed: dict(zip(p["idx"], zip(p["label"], p["prediction"]))) for seed, p in preds.items()})
    check = above_chance(stacked, labels, task.primary_metric, task.f1_positive_label)
    return Check(check["name"], check["passed"], check["value"], check["threshold"], check["why"])


def engagement(job: Job, results: list) -> dict[str, Any]:
    """The run's mechanism checks (``rankwise.methods.engagement``): above chance, from the
    predictions, then the method's own, from every seed's final metrics and step log."""
    from rankwise.methods import build_method
    from rankwise.methods.engagement import SeedEvidence, engagement_block, resolve_thresholds

    thresholds = resolve_thresholds(job.run.training.engagement_thresholds)
    evidence = [SeedEvidence(r.seed, {**r.final, **r.method_metrics}, r.history) for r in results]
    checks = [chance_check(job, results), *build_method(job.run).engagement_checks(evidence, thresholds)]
    return {**engagement_block(checks), "thresholds": thresholds}


def engagement_line(block: dict[str, Any]) -> str:
    if block["engaged"]:
        return "engaged (" + ", ".join(c["name"] for c in block["checks"]) + ")"
    failed = [c for c in block["checks"] if not c["passed"]]
    return "NOT engaged: " + "; ".join(f"{c['name']}: {c['why']}" for c in failed)


def train_and_write(job: Job, prepare_run_dir: Callable[..., bool], t_start: float,
                    search: dict[str, Any] | None = None) -> str:
    """Train the configuration once per seed and write the run folder (rank 0 under torchrun)."""
    ctx = distributed.current()
    first = first_trainer(job)
    # Rank 0 alone decides and clears the folder (a search's optuna/ stays); the others wait.
    keep = ("optuna",) if search is not None else ()
    resume = prepare_run_dir(job, keep=keep) if ctx.is_main else None
    resume = ctx.broadcast(resume)
    run_dir = job.run_dir
    base = run_header(job, search)
    if ctx.is_main:
        atomic_write_json(run_dir / "metrics.json", base)
        write_yaml(run_dir / "config.yaml", job.run_dict)
    from rankwise.tracking import start_tracker

    tracker = start_tracker(job.command.wandb, job.run.run_id, tracked_config(job), run_dir,
                            enabled=job.command.mode == "full" and ctx.is_main)
    try:
        results = train_seeds(job, resume, write_outputs=ctx.is_main, first=first)
    except BaseException as exc:
        tracker.fail("interrupted" if getattr(exc, "exit_code", None) == 130
                     or isinstance(exc, KeyboardInterrupt) else "failed", f"{type(exc).__name__}: {exc}")
        raise
    for r in results:
        tracker.log_history(r.seed, r.history)
    metrics = complete_metrics(job, base, results, t_start)
    metrics["engagement"] = engagement(job, results)
    log.info("mechanism checks: %s", engagement_line(metrics["engagement"]))
    tracker.complete(metrics)
    if ctx.is_main:
        atomic_write_json(run_dir / "metrics.json", metrics)
    primary, final = metrics["task"]["primary_metric"], metrics["final"]
    std = metrics["std"].get(primary, 0.0)
    seeds = len(results)
    return (f"{primary}={final.get(primary, float('nan')):.4f}"
            + (f" ± {std:.4f} over {seeds} seeds" if seeds > 1 else "")
            + f"; {engagement_line(metrics['engagement'])} -> {run_dir / 'metrics.json'}")
