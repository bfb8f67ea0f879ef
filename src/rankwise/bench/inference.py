"""Inference cost of several runs side by side: latency and adapter FLOPs vs sequence length.

``python -m rankwise.bench inference run=<id|yaml> [run=...] [options] [overrides]`` builds
each run's model in one process, then sweeps sequence lengths × batch sizes. Per shape and
model: one untimed instrumented pass (gate statistics → realised adapter FLOPs, budget
violations; at the smallest batch size also ``FlopCounterMode`` on the whole model), then
``warmup`` untimed and ``repeats`` timed passes, interleaved across models (round-robin,
starting one model later each repetition) so that drift in machine load hits all alike.
Latency: eval mode, ``no_grad``, the run's autocast, CUDA-synchronised (``measure.latency``).

Inputs: random non-special token ids, every position real (no padding), the same ids for
every model of a shape. Models:

- ``weights=trained`` loads each run's trainable weights (adapters, gates, head) from its
  latest checkpoint under ``results_dir`` (``<results_dir>/<run_id>/seed<seed>/checkpoints``);
  ``fresh`` builds them untrained; ``auto`` (default) uses the checkpoint where one fits.
- Fresh gates are put in a realistic state — the state a trained model sits in, at its budget:
  TABS and CBSP controllers as initialised, their logits centred on the evaluation rule's
  threshold (about half of the R directions want to open; TABS's projection then keeps b·T pairs, CBSP opens ≈ R/2 ≈ b
  per sequence), BHSP with the first ⌊b⌋ directions of every target open (its init opens all
  R). The open-gates-per-token column says what each model actually ran. P_U, P_V (and
  LoRA's B) stay zero: values do not change the cost.
- ``lora_merge=both`` (default) adds ``<label>+merged`` for every LoRA-family model (peft
  ``merge_and_unload``: no adapter compute left); ``merged`` / ``unmerged`` keep one.
- ``adapters=[tabs,cbsp,lora]`` measures one run (``run=``) with its adapter replaced by each
  listed type at that type's default config (labels = type names).
- ``spectral_path=config|sparse|dense|both`` (default ``config``): the inference path of gated
  spectral models — sparse (only open (token, direction) pairs are computed) or dense-masked
  (all R directions, closed ones multiplied by 0); ``both`` adds ``<label>+<other path>``.
  Their adapter FLOPs are the ones the path executes; ``open_pair_flops_per_example`` is the
  realised count either way.

FLOPs (``measure.adapter_flops``): extra FLOPs per example — analytic for the LoRA family,
realised from the open gates for the spectral family (plus their controllers), 0 for full
fine-tuning and merged LoRA. Whole-model FLOPs per example = the frozen backbone's, counted
once per length by ``FlopCounterMode`` (eager attention, so attention is counted on the CPU
too), + the extra. DeBERTa's relative-position rows, projected once per forward through
query/key and adapted by every method, are batch-shared: ``position_flops_per_forward``
counts them apart. The flop-counter cross-check compares each model's own count minus the
backbone's, per example, with extra + position_flops_per_forward / batch; they agree exactly.

Writes ``<out>/inference.json`` (options, variants, hardware and versions, one row per
(model, batch size, length), ratios of the reference model to every other model) and figures
``flops_vs_length`` and ``latency_vs_length`` (png + pdf).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rankwise.config.loader import Job
from rankwise.config.typed import join, require
from rankwise.errors import ConfigError
from rankwise.measure.adapter_flops import (
    forward_cost,
    lora_target_costs,
    measured_flops,
    trainable_param_counts,
)
from rankwise.measure.inputs import max_input_length, random_token_batch
from rankwise.measure.latency import LatencyStats, synchronizer, timed_call
from rankwise.methods import FULL, adapter_types
from rankwise.results import atomic_write_json, provenance

log = logging.getLogger(__name__)

DEFAULT_LENGTHS = [128, 256, 512, 1024, 2048, 4096]


@dataclass
class InferenceBenchOptions:
    """Options of ``bench inference`` (validated like a run config; errors name the key)."""

    #: Sequence lengths of the sweep.
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    #: Batch sizes of the sweep.
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    #: Cap on batch × length for batch sizes above 1 (a CPU-sized default).
    max_tokens: int = 4096
    #: Untimed passes per shape and model.
    warmup: int = 1
    #: Timed passes per shape and model (round-robin across models).
    repeats: int = 3
    #: LoRA models unmerged, merged (peft `merge_and_unload`), or `both` (adds
    #: `<label>+merged`).
    lora_merge: Literal["both", "merged", "unmerged"] = "both"
    #: Inference path of gated spectral models: the run's (`config`), `sparse`, `dense`, or
    #: `both` (adds `<label>+dense`).
    spectral_path: Literal["config", "sparse", "dense", "both"] = "config"
    #: `trained`: the latest checkpoint under `results_dir`; `fresh`: as initialised; `auto`:
    #: trained where a checkpoint exists.
    weights: Literal["auto", "trained", "fresh"] = "auto"
    #: The label the ratios are taken against; null: the first model.
    reference: str | None = None
    #: With one `run=`: one model per listed adapter type, each at its default config.
    adapters: list[str] | None = None
    #: Seed of the random inputs.
    input_seed: int = 0
    #: Output folder (`inference.json`, figures).
    out: str = "bench-inference"

    def validate(self, path: str) -> None:
        for key in ("lengths", "batch_sizes"):
            values = getattr(self, key)
            require(bool(values), join(path, key), "must list at least one value")
            for i, v in enumerate(values):
                require(v >= 1, join(join(path, key), i), f"must be >= 1, got {v}")
        require(self.max_tokens >= 1, join(path, "max_tokens"), "must be >= 1")
        require(self.warmup >= 0, join(path, "warmup"), f"must be >= 0, got {self.warmup}")
        require(self.repeats >= 1, join(path, "repeats"), f"must be >= 1, got {self.repeats}")
        known = adapter_types()
        for i, a in enumerate(self.adapters or []):
            require(a in known, join(join(path, "adapters"), i),
                    f"unknown adapter type {a!r} (choose from {', '.join(known)})")


@dataclass
class Variant:
    """One model of the comparison."""

    label: str
    job: Job
    model: nn.Module
    method: Any
    tokenizer: Any
    merged: bool
    weights: dict[str, Any]
    trainable_params: int
    controller_params: int
    amp_dtype: torch.dtype | None
    execution: str | None = None  # gated spectral models: "sparse" | "dense" inference path

    def describe(self) -> dict[str, Any]:
        costs = lora_target_costs(self.model)
        return {
            "run_id": self.job.run.run_id, "algorithm": self.job.run.algorithm,
            "model": self.job.run.model.name, "merged": self.merged, "weights": self.weights,
            "adapter": self.job.run_dict["model"].get("adapter"),
            "trainable_params_incl_controllers": self.trainable_params,
            "controller_params": self.controller_params,
            "lora_ranks": sorted({c.rank for c in costs.values()}) or None,
            "autocast": str(self.amp_dtype) if self.amp_dtype is not None else None,
            "spectral_inference_path": self.execution,
        }


# --- building the models ----------------------------------------------------------------------
def with_adapter(job: Job, kind: str) -> Job:
    """The job's run with ``model.adapter`` replaced by ``kind`` at that type's defaults (the
    target modules, ``model.target_modules``, stay)."""
    d = copy.deepcopy(job.run_dict)
    model = d.setdefault("model", {})
    model["adapter"] = None if kind == FULL else {"type": kind}
    model.setdefault("importance_weighted_regularisation", {})["enabled"] = False
    d["run_id"] = f"{job.run.run_id}-{kind}"
    return job.with_run(d)


def build_model(job: Job, device: torch.device):
    """(model, method, tokenizer) exactly as the training loop builds them (seeded)."""
    from rankwise.training.build import build_model

    model, method, tokenizer = build_model(job.run, job.run.training.seed, device)
    model.eval()
    return model, method, tokenizer


def load_trained_weights(job: Job, model: nn.Module, mode: str) -> dict[str, Any] | None:
    """Load the run's latest checkpoint into ``model``; None where ``auto`` finds none that fits."""
    from rankwise.training import checkpoint as ckpt

    seed = job.run.training.seed_list()[0]
    directory = job.run_dir / f"seed{seed}" / "checkpoints"
    found = ckpt.latest_valid_checkpoint(directory)
    problem = None
    if found is None:
        problem = f"no checkpoint in {directory}"
    else:
        path, state = found
        params = dict(model.named_parameters())
        bad = [k for k, v in state["model"].items()
               if k not in params or tuple(params[k].shape) != tuple(v.shape)]
        if bad:
            problem = f"checkpoint {path} does not fit this model (e.g. {bad[0]!r})"
    if problem is not None:
        if mode == "trained":
            raise ConfigError("weights", f"run {job.run.run_id!r}: {problem}; use weights=fresh")
        log.info("run %s: %s; using fresh weights", job.run.run_id, problem)
        return None
    ckpt.load_trainable_state(model, state["model"])
    return {"source": "trained", "checkpoint": str(path)}


def realistic_fresh_gates(method: Any, model: nn.Module) -> dict[str, Any]:
    """Put untrained gates where a trained model keeps them (see the module docstring)."""
    from rankwise.methods.spectral import SpectralFamily, spectral_layers

    info: dict[str, Any] = {"source": "fresh"}
    if not isinstance(method, SpectralFamily):
        return info
    recipe = method.recipe
    if recipe.gate_source == "static":
        n_open = math.floor(recipe.static_budget_per_target)
        with torch.no_grad():
            for layer in spectral_layers(model).values():
                log_alpha = layer.gate_source.log_alpha
                # shut under every evaluation rule (sign: 0, prob_open: −1.6, louizos: −2.4)
                log_alpha.fill_(-4.0)
                log_alpha[:n_open] = 1.0
        info["gates"] = f"static: first {n_open} of {recipe.rank} directions open per target"
    elif recipe.gate_source in ("token", "sequence"):
        # centre the fresh logits on the evaluation rule's threshold, so about half open
        with torch.no_grad():
            for layer in spectral_layers(model).values():
                layer.gate_source.mlp.init_offset = layer.gate.eval_threshold
        info["gates"] = (f"{recipe.gate_source} controller as initialised, logits centred at the "
                         f"evaluation rule's threshold ({recipe.eval_gates})")
    else:
        info["gates"] = "ungated (g = 1)"
    return info


def build_variants(jobs: list[Job], options: InferenceBenchOptions, device: torch.device) -> list[Variant]:
    from rankwise.runtime import autocast_dtype

    if options.adapters:
        if len(jobs) != 1:
            raise ConfigError("adapters", "give exactly one run= with adapters=[...]")
        runs = [(kind, with_adapter(jobs[0], kind)) for kind in options.adapters]
    else:
        runs = [(job.run.run_id, job) for job in jobs]
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        raise ConfigError("run", f"the same model is listed twice ({labels})")
    variants: list[Variant] = []
    for label, job in runs:
        model, method, tokenizer = build_model(job, device)
        weights = None
        if options.weights != "fresh":
            weights = load_trained_weights(job, model, options.weights)
        weights = weights or realistic_fresh_gates(method, model)
        trainable, controller = trainable_param_counts(model)
        common = {"job": job, "method": method, "tokenizer": tokenizer, "weights": weights,
                  "trainable_params": trainable, "controller_params": controller,
                  "amp_dtype": autocast_dtype(job.run.training, device)}
        is_lora = bool(lora_target_costs(model)) and hasattr(model, "merge_and_unload")
        paths = spectral_paths(method, model, options.spectral_path)
        if paths:
            for i, (path, suffix) in enumerate(paths):
                copy_i = model if i == 0 else copy.deepcopy(model)
                set_spectral_path(copy_i, path)
                variants.append(Variant(label=label + suffix, model=copy_i, merged=False,
                                        execution=path, **common))
            continue
        if not is_lora or options.lora_merge != "merged":
            variants.append(Variant(label=label, model=model, merged=False, **common))
        if is_lora and options.lora_merge != "unmerged":
            merged = copy.deepcopy(model).merge_and_unload().eval()
            variants.append(Variant(label=f"{label}+merged", model=merged, merged=True, **common))
    return variants


def spectral_paths(method: Any, model: nn.Module, choice: str) -> list[tuple[str, str]]:
    """(inference path, label suffix) per variant of a gated spectral model; [] otherwise.

    The run's configured path keeps the plain label; the other one gets ``+<path>``.
    """
    from rankwise.methods.spectral import SpectralFamily, spectral_layers

    layers = spectral_layers(model).values()
    if not isinstance(method, SpectralFamily) or not any(l.gate_source is not None for l in layers):
        return []
    configured = method.recipe.inference_path
    other = "dense" if configured == "sparse" else "sparse"
    wanted = {"config": [configured], "both": [configured, other]}.get(choice, [choice])
    return [(path, "" if path == configured else f"+{path}") for path in wanted]


def set_spectral_path(model: nn.Module, path: str) -> None:
    """Evaluate gated layers on the sparse (open pairs only) or the dense-masked path."""
    from rankwise.methods.spectral import spectral_layers

    for layer in spectral_layers(model).values():
        layer.execution = "auto" if path == "sparse" else "dense"  # auto = sparse in eval


# --- the sweep --------------------------------------------------------------------------------
def _forward(variant: Variant, inputs: dict[str, torch.Tensor], device: torch.device):
    from rankwise.runtime import autocast_context

    def run():
        with autocast_context(device, variant.amp_dtype):
            return variant.model(**inputs)

    return run


def backbone_flops(jobs: list[Job], lengths: list[int], tokenizers: dict[str, Any], seed: int,
                   device: torch.device) -> dict[str, dict[int, int]]:
    """Frozen backbone FLOPs per example (batch 1), per model name and length."""
    from rankwise.data.tasks import get_task
    from rankwise.models import load_backbone

    out: dict[str, dict[int, int]] = {}
    for job in jobs:
        name = job.run.model.name
        if name in out:
            continue
        task = get_task(job.run.dataset.name, job.run.dataset.subset)
        backbone, _ = load_backbone(name, task.num_labels, tokenizer_name=job.run.model.tokenizer)
        backbone.to(device).eval()
        out[name] = {}
        for length in lengths:
            inputs = {k: v.to(device) for k, v in
                      random_token_batch(tokenizers[name], 1, length, seed).items()}
            with torch.no_grad():
                out[name][length] = measured_flops(
                    backbone, lambda backbone=backbone, inputs=inputs: backbone(**inputs))
    return out


def plan_shapes(variants: list[Variant], options: InferenceBenchOptions):
    """(shapes to run, skipped shapes with reasons)."""
    limits = [max_input_length(_hf_config(v.model)) for v in variants]
    limit = min((x for x in limits if x is not None), default=None)
    shapes, skipped = [], []
    for length in sorted(set(options.lengths)):
        for batch in sorted(set(options.batch_sizes)):
            if limit is not None and length > limit:
                skipped.append({"batch_size": batch, "length": length,
                                "reason": f"exceeds the model's {limit} positions"})
            elif batch > 1 and batch * length > options.max_tokens:
                skipped.append({"batch_size": batch, "length": length,
                                "reason": f"batch × length > max_tokens={options.max_tokens}"})
            else:
                shapes.append((batch, length))
    return shapes, skipped, limit


def _hf_config(model: nn.Module):
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return hf.config if hf is not None else None


def _cost_row(v: Variant, inputs: dict[str, torch.Tensor], forward: Callable[[], Any], batch: int,
              length: int, backbone: float, count: bool) -> dict[str, Any]:
    """One variant's FLOPs at one shape: the method's own count (``forward_cost``) and, when
    ``count``, ``FlopCounterMode``'s count of the whole model checked against it."""
    counted: dict[str, int] = {}

    def instrumented():
        if count:
            counted["flops"] = measured_flops(v.model, forward)
        else:
            forward()

    cost = forward_cost(v.model, v.method, instrumented, inputs["attention_mask"])
    summary = cost.summary()
    open_pairs = summary["adapter_flops_per_example"] if v.execution else None
    if v.execution == "dense":  # executes all R directions of every token
        summary["adapter_flops_per_example"] = cost.detail["dense_adapter_flops_per_example"]
        summary["extra_flops_per_example"] = (summary["adapter_flops_per_example"]
                                              + summary["controller_flops_per_example"])
        summary["position_flops_per_forward"] = (cost.position_dense_adapter_flops
                                                 + cost.position_controller_flops)
    row = {"variant": v.label, "algorithm": v.job.run.algorithm, "merged": v.merged,
           "spectral_inference_path": v.execution,
           "batch_size": batch, "length": length, **summary,
           "open_pair_flops_per_example": open_pairs,
           "backbone_flops_per_example": backbone,
           "total_flops_per_example": backbone + summary["extra_flops_per_example"],
           "flop_counter": None}
    if "flops" in counted:
        per_example = counted["flops"] / batch
        measured_extra = per_example - backbone
        expected = (summary["extra_flops_per_example"]
                    + summary["position_flops_per_forward"] / batch)
        row["flop_counter"] = {
            "model_flops_per_example": per_example,
            "extra_flops_per_example": measured_extra,
            "agrees": math.isclose(measured_extra, expected, rel_tol=0, abs_tol=0.5),
        }
    return row


def _shape_rows(variants: list[Variant], batch: int, length: int, options: InferenceBenchOptions,
                base_flops: dict[str, dict[int, float]], count: bool, device: torch.device,
                sync) -> list[dict[str, Any]]:
    """Every variant at one (batch, length): its cost row, then ``warmup`` untimed and
    ``repeats`` timed forwards, interleaved in a rotating order."""
    rows: dict[str, dict[str, Any]] = {}
    forwards = {}
    with torch.no_grad():
        for v in variants:
            inputs = {k: x.to(device) for k, x in random_token_batch(
                v.tokenizer, batch, length, options.input_seed).items()}
            forward = forwards[v.label] = _forward(v, inputs, device)
            rows[v.label] = _cost_row(v, inputs, forward, batch, length,
                                      base_flops[v.job.run.model.name][length], count)
        for _ in range(options.warmup):
            for v in variants:
                forwards[v.label]()
        samples: dict[str, list[float]] = {v.label: [] for v in variants}
        for rep in range(options.repeats):
            shift = rep % len(variants)
            for v in variants[shift:] + variants[:shift]:
                samples[v.label].append(timed_call(forwards[v.label], synchronize=sync))
    for v in variants:
        rows[v.label]["latency_ms"] = LatencyStats.from_seconds(samples[v.label]).to_dict()
    return [rows[v.label] for v in variants]


def run(jobs: list[Job], options: InferenceBenchOptions) -> dict[str, Any]:
    """Build the variants, plan the shapes, count and time every variant at every shape
    (interleaved, one process) and return the report."""
    from rankwise.runtime import resolve_device

    start = time.perf_counter()
    device = resolve_device(jobs[0].command.device)
    variants = build_variants(jobs, options, device)
    labels = [v.label for v in variants]
    reference = options.reference or labels[0]
    if reference not in labels:
        raise ConfigError("reference", f"{reference!r} is not one of the models ({', '.join(labels)})")
    shapes, skipped, limit = plan_shapes(variants, options)
    if not shapes:
        raise ConfigError("lengths", f"no (batch size, length) left to run: {skipped}")
    tokenizers = {v.job.run.model.name: v.tokenizer for v in variants}
    lengths = sorted({length for _, length in shapes})
    base_flops = backbone_flops([v.job for v in variants], lengths, tokenizers, options.input_seed, device)
    smallest_batch = min(batch for batch, _ in shapes)
    sync = synchronizer(device)
    results: list[dict[str, Any]] = []
    for batch, length in shapes:
        log.info("bench inference: batch %d × length %d", batch, length)
        results += _shape_rows(variants, batch, length, options, base_flops,
                               batch == smallest_batch, device, sync)
    report = {
        "benchmark": "inference",
        "runs": [job.run.run_id for job in jobs],
        "options": {**options.__dict__},
        "reference": reference,
        "variants": {v.label: v.describe() for v in variants},
        "position_limit": limit,
        "skipped": skipped,
        "results": results,
        "ratios": ratios(results, reference),
        "notes": NOTES,
        "provenance": provenance(device),
    }
    report["seconds"] = time.perf_counter() - start
    return report


NOTES = {
    "flops": "2 FLOPs per multiply-add (torch.utils.flop_counter convention); per example, real "
             "tokens only; extra = adapter + controller; total = backbone (FlopCounterMode, eager "
             "attention, batch 1) + extra; position_flops_per_forward: DeBERTa's batch-shared "
             "relative-position rows through adapted query/key, per forward (the flop counter "
             "check adds it / batch); spectral adapter FLOPs are those the inference path "
             "executes: open pairs on the sparse path (= open_pair_flops_per_example), all R "
             "directions of every token on the dense-masked path",
    "ratios": "reference / other, per (batch size, length); extra_flops is null where the "
              "other model has no adapter compute (merged LoRA, full fine-tuning)",
    "latency": "eval mode, no_grad, synchronised on CUDA; percentiles interpolate linearly, so "
               "with few repeats p99 is close to the maximum",
    "inputs": "random non-special token ids, no padding, identical across models",
}


def ratios(results: list[dict[str, Any]], reference: str) -> dict[str, list[dict[str, Any]]]:
    """reference / other for latency (mean, p50, p99) and FLOPs (total, extra), per shape."""
    by_shape: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for row in results:
        by_shape.setdefault((row["batch_size"], row["length"]), {})[row["variant"]] = row

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    out: dict[str, list[dict[str, Any]]] = {}
    for (batch, length), rows in by_shape.items():
        ref = rows.get(reference)
        if ref is None:
            continue
        for label, other in rows.items():
            if label == reference:
                continue
            out.setdefault(f"{reference}/{label}", []).append({
                "batch_size": batch, "length": length,
                **{f"latency_{q}": ratio(ref["latency_ms"][f"{q}_ms"], other["latency_ms"][f"{q}_ms"])
                   for q in ("mean", "p50", "p99")},
                "total_flops": ratio(ref["total_flops_per_example"], other["total_flops_per_example"]),
                "extra_flops": ratio(ref["extra_flops_per_example"], other["extra_flops_per_example"]),
            })
    return out


def write_outputs(report: dict[str, Any], out_dir: Path) -> list[Path]:
    from rankwise.measure import figures

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "inference.json", report)
    figures.bench_flops_vs_length(report, out_dir / "flops_vs_length")
    figures.bench_latency_vs_length(report, out_dir / "latency_vs_length")
    return [out_dir / name for name in ("inference.json", "flops_vs_length.png", "flops_vs_length.pdf",
                                        "latency_vs_length.png", "latency_vs_length.pdf")]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Ratio table for the console: reference / other per shape."""
    lines = []
    for pair, rows in report["ratios"].items():
        for r in sorted(rows, key=lambda r: (r["batch_size"], r["length"])):
            extra = "n/a" if r["extra_flops"] is None else f"{r['extra_flops']:.3f}"
            lines.append(f"{pair:<40} B={r['batch_size']:<3} L={r['length']:<5} latency(mean) "
                         f"{r['latency_mean']:.3f}  total FLOPs {r['total_flops']:.4f}  extra FLOPs {extra}")
    return lines
