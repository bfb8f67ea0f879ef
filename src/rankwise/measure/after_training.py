"""The post-training measurement pass every run makes (all methods), on the trained model.

Called once per seed by the training loop after the final evaluation
(``training.inference_measurement``; ``enabled: false`` turns it off). It

1. times forward passes (eval mode, ``no_grad``, the run's autocast) at the evaluation batch
   size and each configured length — inputs are the evaluation set's tokens cut into full
   rows (``inputs.token_stream_batch``), so there is no padding and gates see real text;
   one untimed pass per shape counts the adapter FLOPs, then ``warmup`` untimed and
   ``repeats`` timed passes;
2. takes adapter FLOPs per example over the evaluation set: realised from the gates for the
   spectral family (the final evaluation's statistics), analytic for the LoRA family, 0 for
   full fine-tuning (``adapter_flops.py``);
3. writes ``seed<seed>/inference.json`` (every shape, the FLOPs per example, the open-gate
   histogram, budget violations, parameter counts) and figures ``flops_vs_length`` and, for
   gated methods, ``gate_histogram`` (png + pdf, ``<run_dir>/<run_id>_<topic>_seed<N>``);
4. returns the headline scalars, which the loop adds to the seed's final metrics, so the
   per-seed aggregation carries them into ``metrics.json`` ``final`` (mean over seeds):

``latency_ms_mean`` / ``latency_ms_p50`` / ``latency_ms_p99``
    at the main shape: evaluation batch size × the longest measured length;
``adapter_mflops_per_example``, ``controller_mflops_per_example``
    mean over the primary evaluation split (10^6 FLOPs; controller = TABS/CBSP gate MLPs);
``budget_violations``
    budgeted methods only (BHSP, CBSP, TABS): violations in the final evaluation (all
    splits) plus the measurement passes — 0 whenever the projection is on;
``trainable_params_incl_controllers``
    every trainable parameter (adapters, gate controllers / log α, classification head).

The pass leaves the method's own evaluation statistics (``gates.json``) untouched.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from rankwise.measure.adapter_flops import (
    NONE,
    REALISED,
    ForwardCost,
    analytic_cost,
    forward_cost,
    trainable_param_counts,
)
from rankwise.measure.inputs import max_input_length, token_stream_batch
from rankwise.measure.latency import measure_latency, synchronizer
from rankwise.results import atomic_write_json

if TYPE_CHECKING:
    from rankwise.training.loop import Trainer

log = logging.getLogger(__name__)

HEADLINE_KEYS = (
    "latency_ms_mean", "latency_ms_p50", "latency_ms_p99", "adapter_mflops_per_example",
    "controller_mflops_per_example", "budget_violations", "trainable_params_incl_controllers",
)
# Wall-clock numbers: the only headline keys that differ between two identical runs.
TIMING_KEYS = ("latency_ms_mean", "latency_ms_p50", "latency_ms_p99")
TRIAL_WARMUP, TRIAL_REPEATS = 1, 3


def _evaluated_token_rows(trainer: Trainer, split_index: int) -> list[list[int]]:
    """Token ids of the examples the final evaluation of that split ran on."""
    from rankwise.training.loop import TRIAL_MAX_BATCHES

    data = trainer.data.evals[split_index].data
    eval_bs = trainer.t.eval_batch_size or trainer.t.batch_size
    n = min(len(data), TRIAL_MAX_BATCHES * eval_bs) if trainer.trial else len(data)
    return data.select(range(n))["input_ids"]


def _eval_set_cost(trainer: Trainer, split_index: int) -> ForwardCost | None:
    """Per-example cost over one evaluated split: gate statistics of the final evaluation
    (spectral; the method keeps those of the last split only, so other splits give None) or
    analytic (LoRA family, full fine-tuning)."""
    from rankwise.methods.spectral import spectral_layers

    layers = spectral_layers(trainer.model)
    if not layers:
        lengths = [len(r) for r in _evaluated_token_rows(trainer, split_index)]
        return analytic_cost(trainer.model, lengths)
    stats = getattr(trainer.method, "last_statistics", None)
    if stats is None or split_index % len(trainer.data.evals) != len(trainer.data.evals) - 1:
        return None
    stats.end_batch()
    gated = any(layer.gate_source is not None for layer in layers.values())
    return ForwardCost(
        source=REALISED, valid_tokens=[e.valid_tokens for e in stats.examples],
        adapter_flops=[e.adapter_flops for e in stats.examples],
        controller_flops=[e.controller_flops for e in stats.examples],
        histogram=stats.histogram() if gated else None)


def measure_trained_model(trainer: Trainer, final_metrics: dict[str, Any]) -> dict[str, float]:
    """Run the measurement pass; return the headline scalars (see the module docstring)."""
    from rankwise.training.loop import autocast_context

    cfg = trainer.t.inference_measurement
    if not cfg.enabled:
        return {}
    start = time.perf_counter()
    model, method, device = trainer.model, trainer.method, trainer.device
    max_len = trainer.cfg.dataset.max_seq_length
    lengths = sorted(set(cfg.lengths or [max(1, max_len // 2), max_len]))
    limit = max_input_length(trainer.backbone.config)
    skipped = [n for n in lengths if limit is not None and n > limit]
    lengths = [n for n in lengths if n not in skipped]
    if skipped:
        log.info("inference measurement: lengths %s exceed the model's %d positions; skipped",
                 skipped, limit)
    batch_size = cfg.batch_size or trainer.t.eval_batch_size or trainer.t.batch_size
    warmup, repeats = cfg.warmup, cfg.repeats
    if trainer.trial:  # a smoke run: one length, one warm-up, a few timed passes
        warmup, repeats = min(warmup, TRIAL_WARMUP), min(repeats, TRIAL_REPEATS)
        lengths = lengths[:1]
    rows = _evaluated_token_rows(trainer, 0)
    sync = synchronizer(device)
    autocast = autocast_context(device, trainer.amp_dtype)

    shapes: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            for length in lengths:
                inputs = {k: v.to(device) for k, v in token_stream_batch(rows, batch_size, length).items()}

                def forward(inputs=inputs):
                    return model(**inputs)

                cost = forward_cost(model, method, forward, inputs["attention_mask"])
                latency = measure_latency(forward, warmup, repeats, synchronize=sync)
                shapes.append({"batch_size": batch_size, "length": length,
                               "latency_ms": latency.to_dict(), **cost.summary()})
    finally:
        model.train(was_training)

    primary = trainer.data.evals[0].name
    eval_cost = _eval_set_cost(trainer, 0)
    spectral_key = f"{primary}_spectral_adapter_flops_per_example"
    if spectral_key in final_metrics:
        source = REALISED
        adapter = float(final_metrics[spectral_key])
        controller = float(final_metrics.get(f"{primary}_spectral_controller_flops_per_example", 0.0))
    elif eval_cost is not None:
        source = eval_cost.source
        adapter, controller = eval_cost.adapter_flops_per_example, eval_cost.controller_flops_per_example
    else:  # no evaluation statistics: fall back to the measurement passes
        source = f"{REALISED} (measurement passes)"
        adapter = sum(s["adapter_flops_per_example"] for s in shapes) / max(len(shapes), 1)
        controller = sum(s["controller_flops_per_example"] for s in shapes) / max(len(shapes), 1)

    eval_violations = [v for k, v in final_metrics.items() if k.endswith("_spectral_budget_violations")]
    pass_violations = [s["budget_violations"] for s in shapes if s["budget_violations"] is not None]
    budgeted = bool(eval_violations or pass_violations)
    violations = int(sum(eval_violations) + sum(pass_violations)) if budgeted else None

    trainable, controller_params = trainable_param_counts(model)
    headline: dict[str, float] = {
        "adapter_mflops_per_example": adapter / 1e6,
        "controller_mflops_per_example": controller / 1e6,
        "trainable_params_incl_controllers": trainable,
    }
    if shapes:
        main = shapes[-1]["latency_ms"]  # the longest length
        headline.update(latency_ms_mean=main["mean_ms"], latency_ms_p50=main["p50_ms"],
                        latency_ms_p99=main["p99_ms"])
    if violations is not None:
        headline["budget_violations"] = violations

    last_split = trainer.data.evals[-1].name
    figure_cost = _eval_set_cost(trainer, len(trainer.data.evals) - 1)
    report = {
        "algorithm": trainer.cfg.algorithm, "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(trainer.amp_dtype or next(model.parameters()).dtype),
        "inputs": "evaluation-set tokens cut into full rows (no padding)",
        "warmup": warmup, "repeats": repeats,
        "main_shape": {"batch_size": batch_size, "length": lengths[-1]} if lengths else None,
        "skipped_lengths": skipped, "position_limit": limit,
        "shapes": shapes,
        "evaluation": {
            "split": primary, "adapter_flops_per_example": adapter,
            "controller_flops_per_example": controller,
            "source": source,
            "per_token_flops": eval_cost.per_token_flops if eval_cost is not None else None,
            "merged_extra_flops": 0,
        },
        "gate_histogram": {"split": last_split, "counts": figure_cost.histogram}
        if figure_cost is not None and figure_cost.histogram else None,
        "budget_violations": None if violations is None else {
            "evaluation": int(sum(eval_violations)), "measurement": int(sum(pass_violations)),
            "total": violations},
        "trainable_params_incl_controllers": trainable, "controller_params": controller_params,
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
