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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rankwise.measure.adapter_flops import (
    NONE,
    REALISED,
    ForwardCost,
    forward_cost,
    trainable_param_counts,
)
from rankwise.measure.inputs import max_input_length, token_stream_batch
from rankwise.measure.latency import measure_latency, measure_latency_cycled, synchronizer
from rankwise.results import atomic_write_json

if TYPE_CHECKING:
    from rankwise.training.loop import Trainer

log = logging.getLogger(__name__)

# Present for every run (``budget_violations`` for budgeted methods, ``open_gates_per_token``
# for the spectral family only).
COST_KEYS = ("adapter_mflops_per_example", "controller_mflops_per_example",
             "trainable_params_incl_controllers")
HEADLINE_KEYS = (
    "latency_ms_mean", "latency_ms_p50", "latency_ms_p99", "latency_n_timed", *COST_KEYS,
    "position_mflops_per_forward", "budget_violations",
)
# Wall-clock numbers: the only headline keys that differ between two identical runs.
TIMING_KEYS = ("latency_ms_mean", "latency_ms_p50", "latency_ms_p99")
TRIAL_WARMUP, TRIAL_REPEATS, TRIAL_TIMED_BATCHES = 1, 3, 10


def _evaluated_token_rows(trainer: Trainer, split_index: int) -> list[list[int]]:
    """Token ids of the examples the final evaluation of that split ran on."""
    from rankwise.training.loop import TRIAL_MAX_BATCHES

    data = trainer.data.evals[split_index].data
    eval_bs = trainer.training.eval_batch_size or trainer.training.batch_size
    n = min(len(data), TRIAL_MAX_BATCHES * eval_bs) if trainer.trial else len(data)
    return data.select(range(n))["input_ids"]


def _eval_set_cost(trainer: Trainer, split_index: int) -> ForwardCost | None:
    """Per-example cost over one evaluated split, as the method counts it
    (``evaluation_cost``). A realised cost describes the most recent evaluation pass, the
    final evaluation's last split, so it answers for that split only (None for the others);
    an analytic one answers for any split's examples."""
    evals = trainer.data.evals
    lengths = [len(r) for r in _evaluated_token_rows(trainer, split_index)]
    cost = trainer.method.evaluation_cost(trainer.model, lengths)
    if cost is not None and cost.source == REALISED and split_index % len(evals) != len(evals) - 1:
        return None
    return cost


def _evaluation_cost(trainer: Trainer, final_metrics: dict[str, Any]) -> tuple[str, float, float] | None:
    """(source, adapter, controller FLOPs per example) over the primary evaluation split."""
    primary = trainer.data.evals[0].name
    spectral_key = f"{primary}_spectral_adapter_flops_per_example"
    if spectral_key in final_metrics:
        controller = final_metrics.get(f"{primary}_spectral_controller_flops_per_example", 0.0)
        return REALISED, float(final_metrics[spectral_key]), float(controller)
    eval_cost = _eval_set_cost(trainer, 0)
    if eval_cost is None:
        return None
    return eval_cost.source, eval_cost.adapter_flops_per_example, eval_cost.controller_flops_per_example


def cost_headline(trainer: Trainer, final_metrics: dict[str, Any]) -> dict[str, float]:
    """The cost scalars that need no forward pass (see the module docstring)."""
    trainable, _ = trainable_param_counts(trainer.model)
    out: dict[str, float] = {"trainable_params_incl_controllers": trainable}
    cost = _evaluation_cost(trainer, final_metrics)
    if cost is not None:
        out["adapter_mflops_per_example"] = cost[1] / 1e6
        out["controller_mflops_per_example"] = cost[2] / 1e6
    open_key = f"{trainer.data.evals[0].name}_spectral_open_gates_per_token"
    if open_key in final_metrics:
        out["open_gates_per_token"] = float(final_metrics[open_key])
    return out


def _timed_evaluation_batches(trainer: Trainer, n_timed: int, warmup: int, sync) -> dict[str, Any]:
    """Latency over the primary split's evaluation batches (module docstring, step 1)."""
    from rankwise.data.loading import batches
    from rankwise.training.loop import TRIAL_MAX_BATCHES, model_inputs

    split = trainer.data.evals[0].data
    eval_bs = trainer.training.eval_batch_size or trainer.training.batch_size
    cap = TRIAL_MAX_BATCHES if trainer.trial else None
    limit = min(n_timed + warmup, cap) if cap else n_timed + warmup
    inputs = [model_inputs(b, trainer.device)
              for b in batches(split, list(range(len(split))), eval_bs, trainer.collate, limit=limit)]
    model = trainer.model
    forwards = [lambda x=x: model(**x) for x in inputs]
    stats = measure_latency_cycled(forwards, warmup, n_timed, synchronize=sync)
    shapes = [tuple(x["input_ids"].shape) for x in inputs]
    return {"inputs": "primary evaluation split batches as evaluated (dynamic padding), cycled",
            "split": trainer.data.evals[0].name, "batch_size": eval_bs, "warmup": warmup,
            "n_timed": n_timed, "distinct_batches": len(inputs),
            "padded_lengths": [s[1] for s in shapes], "latency_ms": stats.to_dict()}


def _length_sweep(trainer: Trainer, lengths: list[int], batch_size: int, warmup: int,
                  repeats: int, sync) -> list[dict[str, Any]]:
    """Per length: one counting pass, then ``warmup`` untimed and ``repeats`` timed passes."""
    model, method, device = trainer.model, trainer.method, trainer.device
    rows = _evaluated_token_rows(trainer, 0)
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
    the warm-up / timed counts (trial mode: one length, one warm-up, a few timed passes)."""

    lengths: list[int]
    skipped: list[int]  # configured lengths beyond the model's positions
    position_limit: int | None
    batch_size: int
    warmup: int
    repeats: int
    n_timed: int

    @classmethod
    def for_trainer(cls, trainer: Trainer) -> MeasurementPlan:
        cfg, t = trainer.training.inference_measurement, trainer.training
        max_len = trainer.cfg.dataset.max_seq_length
        lengths = sorted(set(cfg.lengths or [max(1, max_len // 2), max_len]))
        limit = max_input_length(trainer.backbone.config)
        skipped = [n for n in lengths if limit is not None and n > limit]
        lengths = [n for n in lengths if n not in skipped]
        if skipped:
            log.info("inference measurement: lengths %s exceed the model's %d positions; skipped",
                     skipped, limit)
        warmup, repeats, n_timed = cfg.warmup, cfg.repeats, cfg.timed_batches
        if trainer.trial:
            warmup, repeats = min(warmup, TRIAL_WARMUP), min(repeats, TRIAL_REPEATS)
            n_timed, lengths = min(n_timed, TRIAL_TIMED_BATCHES), lengths[:1]
        return cls(lengths, skipped, limit, cfg.batch_size or t.eval_batch_size or t.batch_size,
                   warmup, repeats, n_timed)


def _timed_passes(trainer: Trainer, plan: MeasurementPlan) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(evaluation-batch latency, length sweep), in eval mode under the run's autocast."""
    from rankwise.training.loop import autocast_context

    model, sync = trainer.model, synchronizer(trainer.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_context(trainer.device, trainer.amp_dtype):
            timed = _timed_evaluation_batches(trainer, plan.n_timed, plan.warmup, sync)
            shapes = _length_sweep(trainer, plan.lengths, plan.batch_size, plan.warmup,
                                   plan.repeats, sync)
    finally:
        model.train(was_training)
    return timed, shapes


def _budget_violations(final_metrics: dict[str, Any], shapes: list[dict[str, Any]]) -> dict[str, int] | None:
    """Violations in the final evaluation (all splits) and in the measurement passes; None
    for a method without a budget."""
    evaluation = [v for k, v in final_metrics.items() if k.endswith("_spectral_budget_violations")]
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


def measure_trained_model(trainer: Trainer, final_metrics: dict[str, Any]) -> dict[str, float]:
    """Run the measurement pass; return the headline scalars (see the module docstring)."""
    cfg = trainer.training.inference_measurement
    headline = cost_headline(trainer, final_metrics)
    if not cfg.enabled:
        return headline
    start = time.perf_counter()
    plan = MeasurementPlan.for_trainer(trainer)
    timed, shapes = _timed_passes(trainer, plan)
    latency = timed["latency_ms"]
    headline.update(latency_ms_mean=latency["mean_ms"], latency_ms_p50=latency["p50_ms"],
                    latency_ms_p99=latency["p99_ms"], latency_n_timed=latency["n"])
    if shapes:
        headline["position_mflops_per_forward"] = shapes[0]["position_flops_per_forward"] / 1e6

    eval_cost = _evaluation_cost(trainer, final_metrics)
    if eval_cost is None:  # no evaluation statistics: fall back to the measurement passes
        eval_cost = _sweep_cost(shapes)
        headline.update(adapter_mflops_per_example=eval_cost[1] / 1e6,
                        controller_mflops_per_example=eval_cost[2] / 1e6)
    source, adapter, controller = eval_cost
    violations = _budget_violations(final_metrics, shapes)
    if violations is not None:
        headline["budget_violations"] = violations["total"]

    _, controller_params = trainable_param_counts(trainer.model)
    primary, last_split = trainer.data.evals[0].name, trainer.data.evals[-1].name
    figure_cost = _eval_set_cost(trainer, len(trainer.data.evals) - 1)
    per_token = _eval_set_cost(trainer, 0)
    report = {
        "algorithm": trainer.cfg.algorithm, "device": str(trainer.device),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(trainer.amp_dtype or next(trainer.model.parameters()).dtype),
        "latency": timed,
        "inputs": "length sweep: evaluation-set tokens cut into full rows (no padding)",
        "warmup": plan.warmup, "repeats": plan.repeats,
        "sweep_batch_size": plan.batch_size,
        "skipped_lengths": plan.skipped, "position_limit": plan.position_limit,
        "shapes": shapes,
        "evaluation": {
            "split": primary, "adapter_flops_per_example": adapter,
            "controller_flops_per_example": controller,
            "source": source,
            "per_token_flops": per_token.per_token_flops if per_token is not None else None,
            "position_flops_per_forward": shapes[0]["position_flops_per_forward"] if shapes else None,
            "merged_extra_flops": 0,
        },
        "gate_histogram": {"split": last_split, "counts": figure_cost.histogram}
        if figure_cost is not None and figure_cost.histogram else None,
        "budget_violations": violations,
        "trainable_params_incl_controllers": headline["trainable_params_incl_controllers"],
        "controller_params": controller_params,
        "headline": headline,
    }
    if cfg.figures and figure_cost is not None:
        _write_figures(trainer, figure_cost, last_split)
    report["seconds"] = time.perf_counter() - start
    atomic_write_json(trainer.seed_dir / "inference.json", report)
    return headline


def _write_figures(trainer: Trainer, cost: ForwardCost, split: str) -> None:
    from rankwise.measure import figures

    name = f"{trainer.cfg.run_id} ({trainer.cfg.algorithm}), {split}"
    if cost.source != NONE and cost.examples:
        figures.flops_per_example_vs_length(
            cost.valid_tokens, cost.adapter_flops, cost.controller_flops,
            f"adapter FLOPs per example ({cost.source}): {name}",
            figures.run_figure_stem(trainer.seed_dir, "flops_vs_length"))
    if cost.histogram:
        figures.open_gate_histogram(cost.histogram, f"open gates per token: {name}",
                                    figures.run_figure_stem(trainer.seed_dir, "gate_histogram"))
