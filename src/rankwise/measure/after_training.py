"""The post-training measurement pass every run makes (all methods), on the trained model.

Called once per seed by the training loop after the final evaluation
(``training.inference_measurement``). It

1. times ``timed_batches`` (default 100) forward passes (eval mode, ``no_grad``, the run's
   autocast, CUDA-synchronised) over the primary evaluation split's batches exactly as the
   evaluation builds them (evaluation batch size, dynamic padding, in evaluation order),
   cycling through them when the split has fewer, after ``warmup`` (default 3) untimed
   ones: the latency percentiles are a distribution over real inputs of varied lengths;
2. sweeps lengths: at the evaluation batch size and each configured length, inputs are the
   evaluation set's tokens cut into full rows (``inputs.token_stream_batch``, no padding);
   one untimed pass per shape counts the adapter FLOPs, then ``warmup`` untimed and
   ``repeats`` timed passes;
3. takes adapter FLOPs per example over the evaluation set: realised from the gates for the
   spectral family (the final evaluation's statistics), analytic for the LoRA family, 0 for
   full fine-tuning (``adapter_flops.py``);
4. writes ``seed<seed>/inference.json`` (the evaluation-batch latency, every shape, the FLOPs
   per example, the open-gate histogram, budget violations, parameter counts) and figures
   ``flops_vs_length`` and, for gated methods, ``gate_histogram`` (png + pdf,
   ``<run_dir>/<run_id>_<topic>_seed<N>``);
5. returns the headline scalars, which the loop adds to the seed's final metrics, so the
   per-seed aggregation carries them into ``metrics.json`` ``final`` (mean over seeds):

``latency_ms_mean`` / ``latency_ms_p50`` / ``latency_ms_p99``, ``latency_n_timed``
    over the timed evaluation-batch passes, and their count;
``adapter_mflops_per_example``, ``controller_mflops_per_example``
    mean over the primary evaluation split (10^6 FLOPs; controller = TABS/CBSP gate MLPs,
    0 for every other method);
``extra_mflops_per_example_at_eval_batch``
    adapter + controller MFLOPs per example plus the primary split's per-forward work
    (DoRA's weight rebuild, ...) shared by an evaluation batch (``training.eval_batch_size``):
    every cost shape at the stated batch size; ``inference.json`` ``evaluation`` has the split
    by shape (``flops_per_example_by_shape``) and ``sources``;
``position_mflops_per_forward``
    adapter + controller FLOPs (10^6) of DeBERTa's relative-position rows, projected once per
    forward through query/key and shared by the batch (0 for other backbones);
``open_gates_per_token``
    spectral family: the primary split's evaluation open (token, direction) pairs per token
    and target (its training-time counterpart, ``train_expected_open_gates_per_token``, comes
    from the method);
``budget_violations``
    budgeted methods only (BHSP, CBSP, TABS): violations in the final evaluation (all
    splits) plus the measurement passes — 0 whenever the projection is on;
``trainable_params_incl_controllers``
    every trainable parameter (adapters, gate controllers / log α, classification head).

With ``enabled: false`` nothing is timed and no file is written, but the cost scalars that
need no forward pass (adapter and controller MFLOPs, open gates, trainable parameters) are
still returned. The pass leaves the method's own evaluation statistics (``gates.json``)
untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rankwise.config.schema import InferenceMeasurementConfig
from rankwise.data.loading import EvalSplit, batches
from rankwise.measure.adapter_flops import (
    NONE,
    REALISED,
    ForwardCost,
    forward_cost,
    trainable_param_counts,
)
from rankwise.measure.inputs import max_input_length, token_stream_batch
from rankwise.measure.latency import measure_latency, measure_latency_cycled, synchronizer
from rankwise.methods.base import FineTuningMethod
from rankwise.results import atomic_write_json
from rankwise.runtime import autocast_context, model_inputs

log = logging.getLogger(__name__)

# Present for every run (``budget_violations`` for budgeted methods, ``open_gates_per_token``
# for the spectral family only).
COST_KEYS = ("adapter_mflops_per_example", "controller_mflops_per_example",
             "extra_mflops_per_example_at_eval_batch",
             "trainable_params_incl_controllers")
HEADLINE_KEYS = (
    "latency_ms_mean", "latency_ms_p50", "latency_ms_p99", "latency_n_timed", *COST_KEYS,
    "position_mflops_per_forward", "budget_violations",
)
# Wall-clock numbers: the only headline keys that differ between two identical runs.
TIMING_KEYS = ("latency_ms_mean", "latency_ms_p50", "latency_ms_p99")


@dataclass(frozen=True)
class TrainedRun:
    """What the measurement reads of a trained seed, as plain values (the training loop
    builds it: ``Trainer.trained_run``)."""

    model: torch.nn.Module
    method: FineTuningMethod
    device: torch.device
    amp_dtype: torch.dtype | None  # the run's autocast dtype (None: float32)
    evals: list[EvalSplit]  # the evaluation splits, the primary one first
    collate: Callable  # batch padding, as the evaluation pads
    eval_batch_size: int
    eval_batches: int | None  # evaluation batches per split (None: all of them)
    config: InferenceMeasurementConfig
    max_seq_length: int
    model_config: Any  # the backbone's config: its position limit
    seed_dir: Path
    run_id: str
    algorithm: str


def _evaluated_token_rows(run: TrainedRun, split_index: int) -> list[list[int]]:
    """Token ids of the examples the final evaluation of that split ran on."""
    data = run.evals[split_index].data
    n = len(data) if run.eval_batches is None else min(len(data), run.eval_batches * run.eval_batch_size)
    return data.select(range(n))["input_ids"]


def _eval_set_cost(run: TrainedRun, split_index: int) -> ForwardCost | None:
    """Per-example cost over one evaluated split as the method counts it
    (``evaluation_cost``): realised from that split's final evaluation pass, or analytic."""
    lengths = [len(r) for r in _evaluated_token_rows(run, split_index)]
    return run.method.evaluation_cost(run.model, lengths, split=run.evals[split_index].name)


def cost_headline(run: TrainedRun, primary: ForwardCost | None) -> dict[str, float]:
    """The cost scalars that need no forward pass (see the module docstring), from the
    primary split's cost."""
    trainable, _ = trainable_param_counts(run.model)
    out: dict[str, float] = {"trainable_params_incl_controllers": trainable}
    if primary is not None:
        out["adapter_mflops_per_example"] = primary.adapter_flops_per_example / 1e6
        out["controller_mflops_per_example"] = primary.controller_flops_per_example / 1e6
        # every shape at the evaluation batch size (per-forward work shared by its examples)
        out["extra_mflops_per_example_at_eval_batch"] = (
            primary.flops_per_example_at(run.eval_batch_size) / 1e6)
        if primary.open_gates_per_token is not None:
            out["open_gates_per_token"] = float(primary.open_gates_per_token)
    return out


def _timed_evaluation_batches(run: TrainedRun, n_timed: int, warmup: int, sync) -> dict[str, Any]:
    """Latency over the primary split's evaluation batches (module docstring, step 1)."""
    split = run.evals[0].data
    limit = n_timed + warmup
    if run.eval_batches is not None:
        limit = min(limit, run.eval_batches)
    inputs = [model_inputs(b, run.device)
              for b in batches(split, list(range(len(split))), run.eval_batch_size, run.collate, limit=limit)]
    model = run.model
    forwards = [lambda x=x: model(**x) for x in inputs]
    stats = measure_latency_cycled(forwards, warmup, n_timed, synchronize=sync)
    shapes = [tuple(x["input_ids"].shape) for x in inputs]
    return {"inputs": "primary evaluation split batches as evaluated (dynamic padding), cycled",
            "split": run.evals[0].name, "batch_size": run.eval_batch_size, "warmup": warmup,
            "n_timed": n_timed, "distinct_batches": len(inputs),
            "padded_lengths": [s[1] for s in shapes], "latency_ms": stats.to_dict()}


def _length_sweep(run: TrainedRun, lengths: list[int], batch_size: int, warmup: int,
                  repeats: int, sync) -> list[dict[str, Any]]:
    """Per length: one counting pass, then ``warmup`` untimed and ``repeats`` timed passes."""
    model, method, device = run.model, run.method, run.device
    rows = _evaluated_token_rows(run, 0)
    shapes: list[dict[str, Any]] = []
    for length in lengths:
        inputs = {k: v.to(device) for k, v in token_stream_batch(rows, batch_size, length).items()}

        def forward(inputs=inputs):
            return model(**inputs)

        cost = forward_cost(model, method, forward, inputs["attention_mask"])
        latency = measure_latency(forward, warmup, repeats, synchronize=sync)
        shapes.append({"batch_size": batch_size, "length": length,
                       "latency_ms": latency.to_dict(), **cost.summary()})
    return shapes


@dataclass(frozen=True)
class MeasurementPlan:
    """What the pass times: the sweep's lengths (those the model can take) and batch size, and
    the warm-up / timed counts (as configured; trial mode's caps arrive resolved in them)."""

    lengths: list[int]
    skipped: list[int]  # configured lengths beyond the model's positions
    position_limit: int | None
    batch_size: int
    warmup: int
    repeats: int
    n_timed: int

    @classmethod
    def of(cls, run: TrainedRun) -> MeasurementPlan:
        cfg, max_len = run.config, run.max_seq_length
        lengths = sorted(set(cfg.lengths or [max(1, max_len // 2), max_len]))
        limit = max_input_length(run.model_config)
        skipped = [n for n in lengths if limit is not None and n > limit]
        lengths = [n for n in lengths if n not in skipped]
        if skipped:
            log.info("inference measurement: lengths %s exceed the model's %d positions; skipped",
                     skipped, limit)
        return cls(lengths, skipped, limit, cfg.batch_size or run.eval_batch_size,
                   cfg.warmup, cfg.repeats, cfg.timed_batches)


def _timed_passes(run: TrainedRun, plan: MeasurementPlan) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(evaluation-batch latency, length sweep), in eval mode under the run's autocast."""
    model, sync = run.model, synchronizer(run.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_context(run.device, run.amp_dtype):
            timed = _timed_evaluation_batches(run, plan.n_timed, plan.warmup, sync)
            shapes = _length_sweep(run, plan.lengths, plan.batch_size, plan.warmup,
                                   plan.repeats, sync)
    finally:
        model.train(was_training)
    return timed, shapes


def _budget_violations(split_costs: list[ForwardCost | None],
                       shapes: list[dict[str, Any]]) -> dict[str, int] | None:
    """Violations in the final evaluation (all splits) and in the measurement passes; None
    for a method without a budget."""
    evaluation = [c.budget_violations for c in split_costs
                  if c is not None and c.budget_violations is not None]
    passes = [s["budget_violations"] for s in shapes if s["budget_violations"] is not None]
    if not (evaluation or passes):
        return None
    return {"evaluation": int(sum(evaluation)), "measurement": int(sum(passes)),
            "total": int(sum(evaluation) + sum(passes))}


def _sweep_cost(shapes: list[dict[str, Any]]) -> tuple[str, float, float]:
    """(source, adapter, controller FLOPs per example) averaged over the length sweep."""
    n = max(len(shapes), 1)
    return (f"{REALISED} (measurement passes)",
            sum(s["adapter_flops_per_example"] for s in shapes) / n,
            sum(s["controller_flops_per_example"] for s in shapes) / n)


def measure_trained_model(run: TrainedRun) -> dict[str, float]:
    """Run the measurement pass; return the headline scalars (see the module docstring)."""
    primary = _eval_set_cost(run, 0)
    headline = cost_headline(run, primary)
    if not run.config.enabled:
        return headline
    # the other splits' costs: their budget violations, the last one's gate histogram
    split_costs = [primary] + [_eval_set_cost(run, i) for i in range(1, len(run.evals))]
    start = time.perf_counter()
    plan = MeasurementPlan.of(run)
    timed, shapes = _timed_passes(run, plan)
    latency = timed["latency_ms"]
    headline.update(latency_ms_mean=latency["mean_ms"], latency_ms_p50=latency["p50_ms"],
                    latency_ms_p99=latency["p99_ms"], latency_n_timed=latency["n"])
    if shapes:
        headline["position_mflops_per_forward"] = shapes[0]["position_flops_per_forward"] / 1e6
    if primary is None:  # no evaluation statistics: fall back to the measurement passes
        source, adapter, controller = _sweep_cost(shapes)
        headline.update(adapter_mflops_per_example=adapter / 1e6,
                        controller_mflops_per_example=controller / 1e6)
    else:
        source = primary.source
        adapter, controller = primary.adapter_flops_per_example, primary.controller_flops_per_example
    violations = _budget_violations(split_costs, shapes)
    if violations is not None:
        headline["budget_violations"] = violations["total"]
    _, controller_params = trainable_param_counts(run.model)
    last_split, figure_cost = run.evals[-1].name, split_costs[-1]
    report = {
        "algorithm": run.algorithm, "device": str(run.device),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(run.amp_dtype or next(run.model.parameters()).dtype),
        "latency": timed,
        "inputs": "length sweep: evaluation-set tokens cut into full rows (no padding)",
        "warmup": plan.warmup, "repeats": plan.repeats,
        "sweep_batch_size": plan.batch_size,
        "skipped_lengths": plan.skipped, "position_limit": plan.position_limit,
        "shapes": shapes,
        "evaluation": {
            "split": run.evals[0].name, "adapter_flops_per_example": adapter,
            "controller_flops_per_example": controller, "source": source,
            "per_token_flops": primary.per_token_flops if primary is not None else None,
            "position_flops_per_forward": shapes[0]["position_flops_per_forward"] if shapes else None,
            "merged_extra_flops": 0,
            **_shapes_at_eval_batch(primary, run.eval_batch_size),
        },
        "gate_histogram": {"split": last_split, "counts": figure_cost.histogram}
        if figure_cost is not None and figure_cost.histogram else None,
        "budget_violations": violations,
        "trainable_params_incl_controllers": headline["trainable_params_incl_controllers"],
        "controller_params": controller_params,
        "headline": headline,
    }
    if run.config.figures and figure_cost is not None:
        _write_figures(run, figure_cost, last_split)
    report["seconds"] = time.perf_counter() - start
    atomic_write_json(run.seed_dir / "inference.json", report)
    return headline


def _shapes_at_eval_batch(cost: ForwardCost | None, batch_size: int) -> dict[str, Any]:
    """The evaluation's FLOPs per example at its batch size, split by cost shape, and what
    was counted or measured for each shape (``methods.cost``)."""
    if cost is None:
        return {}
    return {"batch_size": batch_size,
            "extra_flops_per_example_at_batch": cost.flops_per_example_at(batch_size),
            "per_forward_flops": cost.per_forward_flops,
            "flops_per_example_by_shape": cost.shape_split(batch_size),
            "sources": dict(cost.sources)}


def _write_figures(run: TrainedRun, cost: ForwardCost, split: str) -> None:
    from rankwise.measure import figures

    name = f"{run.run_id} ({run.algorithm}), {split}"
    if cost.source != NONE and cost.examples:
        figures.flops_per_example_vs_length(
            cost.valid_tokens, cost.adapter_flops, cost.controller_flops,
            f"adapter FLOPs per example ({cost.source}): {name}",
            figures.run_figure_stem(run.seed_dir, "flops_vs_length"))
    if cost.histogram:
        figures.open_gate_histogram(cost.histogram, f"open gates per token: {name}",
                                    figures.run_figure_stem(run.seed_dir, "gate_histogram"))
