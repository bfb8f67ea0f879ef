"""``bench train``: training-step speed of several methods side by side, in one process.

Every variant is a :class:`~rankwise.training.loop.Trainer` built from the run config (same
backbone, data, batch size, seed); a Hugging Face ``Trainer`` + peft LoRA can join
(``hf_trainer=true``). The timed steps are interleaved (variant 1, 2, ..., 1, 2, ...) on the
same batches, so drift in machine load hits all of them alike. A step is the loop's own
``forward_backward`` + ``_optimizer_step``; its phases are timed with hooks on the real code
path (CUDA-synchronised): ``forward`` (the model's forward), ``regularisers`` (the method's
loss terms), ``backward`` (loss + backward), ``optimizer`` (clip, step, schedule, zero_grad),
``method_hooks`` (``on_optimizer_step``, e.g. AdaLoRA's allocation). Collation is outside the
timed step for every variant. ``profile_steps`` more steps per variant run under
``torch.profiler``; the top operators (self time per step) go into the JSON.

The HF variant uses the Trainer's own ``training_step`` (forward, loss, backward through
accelerate), the optimiser and schedule from ``create_optimizer_and_scheduler`` (HF's default
optimiser), accelerate's gradient clipping and ``zero_grad``, i.e. ``Trainer.train``'s inner
loop, driven step by step on the same batches; peft's LoRA with its ``nn.Dropout`` and the
same targets, rank, alpha and dropout.
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rankwise.config.loader import Job
from rankwise.config.typed import join, require

log = logging.getLogger(__name__)

# ``<method>_bernoulli``: a method with a ``dropout_sampler`` drawing peft's per-element dropout
BERNOULLI = "_bernoulli"
PHASES = ("forward", "regularisers", "backward", "optimizer", "method_hooks")
HF_LABEL = "hf_trainer_peft_lora"


@dataclass
class TrainBenchOptions:
    """Options of ``bench train`` (validated like a run config; errors name the key)."""

    #: Methods to build from one `run=`: any registered method (those with rank, alpha and
    #: dropout take the run's), or `<method>_bernoulli` (that method with peft's per-element
    #: dropout draw); null: full fine-tuning and every method that takes the run's adapter
    #: settings; with several `run=`, the runs as given.
    methods: list[str] | None = None
    #: Timed steps per variant.
    steps: int = 10
    #: Untimed steps per variant first.
    warmup: int = 2
    #: Add a Hugging Face Trainer + peft LoRA on the same batches (needs a LoRA-family run).
    hf_trainer: bool = True
    #: Extra steps under torch.profiler (0: no profile).
    profile_steps: int = 1
    #: Operators kept per variant in `profile_top_ops`.
    profile_top: int = 12
    #: Pad every batch to this length; null: dynamic padding.
    pad_to: int | None = None
    #: The label the ratios are taken against; null: the cost reference method (LoRA), else the
    #: first.
    reference: str | None = None
    #: Batches of a method's calibration (importance weighting) before timing (untimed).
    calibration_batches: int = 1
    #: torch.set_num_threads for the run; null: torch's default.
    threads: int | None = None
    #: Output folder (`train.json`, `step_time.png/.pdf`).
    out: str = "bench-train"

    def validate(self, path: str) -> None:
        require(self.steps >= 1, join(path, "steps"), f"must be >= 1, got {self.steps}")
        require(self.warmup >= 0, join(path, "warmup"), f"must be >= 0, got {self.warmup}")
        require(self.profile_steps >= 0, join(path, "profile_steps"), "must be >= 0")
        require(self.profile_top >= 1, join(path, "profile_top"), f"must be >= 1, got {self.profile_top}")
        require(self.calibration_batches >= 1, join(path, "calibration_batches"), "must be >= 1")
        if self.threads is not None:
            require(self.threads >= 1, join(path, "threads"), f"must be >= 1, got {self.threads}")
        if self.pad_to is not None:
            require(self.pad_to >= 1, join(path, "pad_to"), f"must be >= 1, got {self.pad_to}")
        known = bench_method_names()
        for i, m in enumerate(self.methods or []):
            require(m in known, join(join(path, "methods"), i),
                    f"unknown method {m!r} (choose from {', '.join(known)})")


# --- variants ----------------------------------------------------------------------------------
def bench_method_names() -> tuple[str, ...]:
    """Every registered method, then ``<name>_bernoulli`` for those with a dropout sampler."""
    from dataclasses import fields

    from rankwise.methods import registered_methods

    methods = registered_methods()
    samplers = tuple(n + BERNOULLI for n, e in methods.items() if e.config_cls is not None
                     and "dropout_sampler" in {f.name for f in fields(e.config_cls)})
    return (*methods, *samplers)


def default_methods() -> tuple[str, ...]:
    """Full fine-tuning and every method that takes the run's adapter settings."""
    from rankwise.methods import FULL, registered_methods

    return tuple(n for n, e in registered_methods().items()
                 if e.adapter_type == FULL or e.takes_adapter_settings)


def method_variant(job: Job, kind: str) -> Job:
    """The job's run turned into method ``kind`` (``rankwise.methods.model_section``): one that
    takes adapter settings keeps the run's rank, alpha and dropout, and the run adapter's
    ``bias`` and ``dropout_sampler`` where its config has them (``<name>_bernoulli``: sampler
    ``bernoulli``); any other runs on its defaults."""
    from dataclasses import fields

    from rankwise.methods import adapter_settings_of, get_method, model_section

    name = kind[: -len(BERNOULLI)] if kind.endswith(BERNOULLI) else kind
    d = copy.deepcopy(job.run_dict)
    old = (d.get("model") or {}).get("adapter") or {}
    d["model"] = model_section(name, adapter_settings_of(job.run.model.adapter), d.get("model"))
    entry, new = get_method(name), d["model"]["adapter"]
    if entry.takes_adapter_settings:
        keys = {f.name for f in fields(entry.config_cls)}
        if "dropout_sampler" in keys:
            new["dropout_sampler"] = "bernoulli" if kind != name else old.get("dropout_sampler", "geometric")
        if "bias" in keys and "bias" in old:
            new["bias"] = old["bias"]
    d["run_id"] = f"{job.run.run_id}-{kind}"
    return job.with_run(d)


def runs_plain_lora(job: Job) -> bool:
    """Whether the job runs the cost reference method (peft LoRA) or its ``iw_`` twin: the
    runs a Hugging Face Trainer + peft LoRA twin can stand beside."""
    from rankwise.methods import cost_reference, get_method

    entry = get_method(job.run.algorithm)
    return (entry.importance_weighted_of or entry.name) == cost_reference()[0]


def pad_batch(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``batch`` with its token columns right-padded (masked) to ``length``."""
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in batch and batch[key].shape[1] < length:
            extra = length - batch[key].shape[1]
            out[key] = torch.nn.functional.pad(batch[key], (0, extra), value=pad_id if key == "input_ids" else 0)
    return out


class PhaseClock:
    """Per-step phase durations from hooks on the real code path."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.acc: dict[str, float] = defaultdict(float)
        self._start: float | None = None

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed(self, phase: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.acc[phase] += self.now() - t0
        return wrapper

    def attach_forward(self, model: torch.nn.Module) -> None:
        def pre(_module, _args):
            self._start = self.now()

        def post(_module, _args, _out):
            self.acc["forward"] += self.now() - self._start

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)


class TrainerStep:
    """One rankwise variant: ``step(batch)`` runs a timed optimiser step."""

    def __init__(self, label: str, trainer, clock_device: torch.device):
        self.label, self.trainer = label, trainer
        self.clock = PhaseClock(clock_device)
        self.clock.attach_forward(trainer.train_model)
        method = trainer.method
        method.regularization_losses = self.clock.timed("regularisers", method.regularization_losses)
        method.on_optimizer_step = self.clock.timed("method_hooks", method.on_optimizer_step)

    def step(self, batch) -> dict[str, float]:
        tr, clock = self.trainer, self.clock
        clock.acc.clear()
        c0 = time.process_time()
        t0 = clock.now()
        tr.forward_backward(batch)
        t1 = clock.now()
        tr._optimizer_step()
        t2 = clock.now()
        tr.global_step += 1
        acc = dict(clock.acc)
        return {"total": t2 - t0, "cpu": time.process_time() - c0, "forward": acc.get("forward", 0.0),
                "regularisers": acc.get("regularisers", 0.0),
                "backward": (t1 - t0) - acc.get("forward", 0.0) - acc.get("regularisers", 0.0),
                "optimizer": (t2 - t1) - acc.get("method_hooks", 0.0),
                "method_hooks": acc.get("method_hooks", 0.0)}


class HFTrainerDriver:
    """HF ``Trainer`` + peft LoRA; its own ``train()`` drives the interleaving.

    The Trainer reads the same rows in the same order (a sequential sampler over the bench's
    batches, batch size and padding as the others) and times each of its optimiser steps
    from ``on_step_begin`` to ``on_step_end`` (batch fetch and collation are outside, as for
    the rankwise variants); at ``on_step_end`` a callback runs every rankwise variant on the
    same batch, so all of them alternate step by step."""

    label = HF_LABEL

    def __init__(self, job: Job, data, order: list[int], n_batches: int, pad_to: int | None,
                 device: torch.device, workdir: Path):
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        from rankwise.methods.lora import head_modules_to_save
        from rankwise.methods.targets import resolve_target_modules
        from rankwise.training.build import load_run_backbone

        t, a = job.run.training, job.run.model.adapter
        torch.manual_seed(t.seed)
        model, tok = load_run_backbone(job.run, data.task)
        patterns = job.run.model.target_modules
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_CLS, r=a.rank, lora_alpha=a.lora_alpha, lora_dropout=a.dropout,
            target_modules=resolve_target_modules(model, patterns),
            modules_to_save=head_modules_to_save(model)))
        self.model = model
        need = n_batches * t.batch_size  # small sets cycle, as the bench's batch list does
        rows = data.train.select((order * (need // len(order) + 1))[:need]).remove_columns(
            [c for c in ("idx",) if c in data.train.column_names])
        args = TrainingArguments(
            output_dir=str(workdir / "hf"), per_device_train_batch_size=t.batch_size,
            learning_rate=t.learning_rate, weight_decay=t.weight_decay, lr_scheduler_type="linear",
            max_steps=n_batches, logging_strategy="no", save_strategy="no", eval_strategy="no",
            report_to=[], seed=t.seed, use_cpu=device.type == "cpu", dataloader_num_workers=0,
            disable_tqdm=True, max_grad_norm=t.max_grad_norm or 0.0)
        collator = (DataCollatorWithPadding(tok, padding="max_length", max_length=pad_to) if pad_to
                    else DataCollatorWithPadding(tok))
        self.trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        self.trainer._get_train_sampler = lambda *_a, **_k: torch.utils.data.SequentialSampler(rows)
        self.clock = PhaseClock(device)
        self.device = device

    def train(self, on_step: Callable[[int, dict[str, float], float | None], None]) -> str:
        """Run the Trainer; ``on_step(i, record, peak_mb)`` after each of its steps."""
        from transformers import TrainerCallback

        clock, device, marks = self.clock, self.device, {}

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                marks["begin"], marks["cpu"] = clock.now(), time.process_time()

            def on_pre_optimizer_step(self, args, state, control, **kw):
                marks["pre_opt"] = clock.now()

            def on_step_end(self, args, state, control, **kw):
                t2 = clock.now()
                t0, t1 = marks["begin"], marks.get("pre_opt", t2)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                on_step(state.global_step - 1, {"total": t2 - t0, "cpu": time.process_time() - marks["cpu"],
                                                "forward_backward_clip": t1 - t0,
                                                "optimizer": t2 - t1}, peak)

        self.trainer.add_callback(Timer())
        self.trainer.train()
        return type(self.trainer.optimizer.optimizer if hasattr(self.trainer.optimizer, "optimizer")
                    else self.trainer.optimizer).__name__


def labelled_jobs(jobs: list[Job], options: TrainBenchOptions) -> list[tuple[str, Job]]:
    """(label, job) per variant: one run × ``methods``, or several runs as they are."""
    if len(jobs) == 1:
        return [(m, method_variant(jobs[0], m)) for m in (options.methods or default_methods())]
    if options.methods:
        from rankwise.errors import ConfigError

        raise ConfigError("methods", "give one run= with methods=[...], or several run= without it")
    return [(j.run.run_id, j) for j in jobs]


# --- the measurement ---------------------------------------------------------------------------
def build_steppers(jobs: list[tuple[str, Job]], options: TrainBenchOptions, workdir: Path):
    """(steppers, shared data, first trainer): rankwise variants, then the HF Trainer."""
    from rankwise.training.loop import Trainer

    total = options.warmup + options.steps + options.profile_steps
    steppers, data, first = [], None, None
    for label, job in jobs:
        tr = Trainer(job, job.run.training.seed, workdir / label, data=data)
        data, first = tr.data, first or tr
        cal = tr.calibration_batches()  # e.g. importance weights: untimed, as in a run
        tr.method.calibrate(tr.model, (next(cal) for _ in range(options.calibration_batches)), tr.loss_fn)
        tr.method.prepare_training(tr.model, max(total, 10))
        tr.model.train()
        steppers.append(TrainerStep(label, tr, tr.device))
    return steppers, data, first


def batch_list(first, options: TrainBenchOptions) -> list[dict[str, torch.Tensor]]:
    from rankwise.data.loading import batches

    n = options.warmup + options.steps + options.profile_steps
    order = first.epoch_order(0)
    out = list(batches(first.data.train, order, first.training.batch_size, first.collate, limit=n))
    while len(out) < n:  # small datasets: cycle
        out += out[: n - len(out)]
    if options.pad_to:
        out = [pad_batch(b, options.pad_to, first.tokenizer.pad_token_id) for b in out]
    return out


def profile_top_ops(stepper, batches: list, device: torch.device, top: int = 12) -> list[dict[str, Any]]:
    """The operators with the largest self time per step under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for b in batches:
            stepper.step(b)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in events) or 1.0
    n = len(batches)
    return [{"op": e.key, "self_ms_per_step": getattr(e, key, 0.0) / 1e3 / n,
             "calls_per_step": e.count / n, "share": getattr(e, key, 0.0) / total}
            for e in events[:top]]


def summarise(label: str, records: list[dict[str, float]], batch_sizes: list[int]) -> dict[str, Any]:
    totals = sorted(r["total"] for r in records)
    p90 = totals[min(len(totals) - 1, int(round(0.9 * (len(totals) - 1))))]
    phases = [k for k in records[0] if k not in ("total", "cpu")]
    return {
        "label": label, "timed_steps": len(records),
        "examples_per_s": sum(batch_sizes) / sum(r["total"] for r in records),
        "step_time_s_median": statistics.median(totals), "step_time_s_p90": p90,
        "step_time_s_mean": statistics.fmean(totals),
        # process CPU time per step: with threads=1, the step's compute cost, much less
        # sensitive than wall time to other load on a shared machine
        "step_cpu_time_s_median": statistics.median(r["cpu"] for r in records),
        "breakdown_s_median": {k: statistics.median(r[k] for r in records) for k in phases},
        "breakdown_share_of_mean": {k: statistics.fmean(r[k] for r in records) / statistics.fmean(totals)
                                    for k in phases},
    }


def run(jobs: list[tuple[str, Job]], options: TrainBenchOptions) -> dict[str, Any]:
    from rankwise.results import provenance

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory(prefix="rankwise-bench-train-") as tmp:
        steppers, data, first = build_steppers(jobs, options, Path(tmp))
        device = first.device
        blist = batch_list(first, options)
        n_run = options.warmup + options.steps
        records: dict[str, list[dict[str, float]]] = defaultdict(list)
        peak: dict[str, float] = {}

        def keep(label: str, i: int, rec: dict[str, float], mb: float | None) -> None:
            if mb is not None:
                peak[label] = max(peak.get(label, 0.0), mb)
            if i >= options.warmup:
                records[label].append(rec)

        def rankwise_round(i: int) -> None:
            log.info("bench train: step %d of %d", i + 1, n_run)
            for s in steppers:  # interleaved: every variant on the same batch in turn
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rec = s.step(blist[i])
                keep(s.label, i, rec, torch.cuda.max_memory_allocated(device) / 2**20
                     if device.type == "cuda" else None)

        hf, hf_optimizer = None, None
        lora_like = [j for _, j in jobs if runs_plain_lora(j)]
        if options.hf_trainer and lora_like:
            hf = HFTrainerDriver(lora_like[0], data, first.epoch_order(0), n_run, options.pad_to,
                                 device, Path(tmp))

            def after_hf_step(i: int, rec: dict[str, float], mb: float | None) -> None:
                keep(hf.label, i, rec, mb)
                rankwise_round(i)

            hf_optimizer = hf.train(after_hf_step)
        else:
            for i in range(n_run):
                rankwise_round(i)
        profiles = {}
        if options.profile_steps:
            profiles = {s.label: profile_top_ops(s, blist[n_run:], device, options.profile_top)
                        for s in steppers}
        timed = blist[options.warmup:n_run]
        results = [variant_row(s, records[s.label], timed, peak, profiles) for s in steppers]
        if hf is not None:
            row = summarise(hf.label, records[hf.label], [len(b["labels"]) for b in timed])
            results.append({**row, "algorithm": "lora (HF Trainer + peft)", "params": _count(hf.model),
                            "peak_memory_mb": peak.get(hf.label), "profile_top_ops": None,
                            "optimizer": hf_optimizer})
    return report_of(results, options, first, timed, provenance(device))


def _count(model) -> dict[str, Any]:
    from rankwise.runtime import count_params

    return count_params(model)


def variant_row(s: TrainerStep, recs, timed, peak, profiles) -> dict[str, Any]:
    row = summarise(s.label, recs, [len(b["labels"]) for b in timed])
    opt = s.trainer.optimizer
    return {**row, "algorithm": s.trainer.cfg.algorithm, "params": _count(s.trainer.model),
            "peak_memory_mb": peak.get(s.label), "profile_top_ops": profiles.get(s.label),
            "optimizer": type(opt).__name__ + (" (fused)" if opt.param_groups[0].get("fused") else "")}


def report_of(results, options: TrainBenchOptions, first, timed, prov) -> dict[str, Any]:
    labels = [r["label"] for r in results]
    from rankwise.methods import cost_reference

    reference = cost_reference()[0]
    ref = options.reference or next((lb for lb in labels if lb == reference), labels[0])
    if ref not in labels:
        from rankwise.errors import ConfigError

        raise ConfigError("reference", f"no variant labelled {ref!r} (have: {', '.join(labels)})")
    by = {r["label"]: r for r in results}
    return {
        "options": dict(options.__dict__), "reference": ref, "results": results,
        "step_time_ratio_to_reference": {lb: by[lb]["step_time_s_median"] / by[ref]["step_time_s_median"]
                                         for lb in labels},
        "step_cpu_time_ratio_to_reference": {
            lb: by[lb]["step_cpu_time_s_median"] / by[ref]["step_cpu_time_s_median"] for lb in labels},
        "examples_per_s_ratio_to_reference": {lb: by[lb]["examples_per_s"] / by[ref]["examples_per_s"]
                                              for lb in labels},
        "batches": {"n_timed": len(timed), "batch_size": first.training.batch_size,
                    "lengths": [int(b["input_ids"].shape[1]) for b in timed],
                    "padding": f"to {options.pad_to}" if options.pad_to else "dynamic (longest in batch)",
                    "group_by_length": first.training.group_by_length},
        "process_max_rss_mb": _max_rss_mb(), "torch_threads": torch.get_num_threads(),
        "note": ("peak_memory_mb is per variant on CUDA; on the CPU only the process's max RSS "
                 "(all variants together) is known."),
        "provenance": prov,
    }


def _max_rss_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):
        return None


def write_outputs(report: dict[str, Any], out_dir: Path) -> list[Path]:
    from rankwise.results import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "train.json", report)
    return [out_dir / "train.json", *step_time_figure(report, out_dir / "step_time")]


def step_time_figure(report: dict[str, Any], stem: Path) -> list[Path]:
    """Stacked bars: median step time per variant split into its phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.5))
    phases = list(dict.fromkeys(k for r in rows for k in r["breakdown_s_median"]))
    for i, r in enumerate(rows):
        left = 0.0
        for j, ph in enumerate(phases):
            v = r["breakdown_s_median"].get(ph, 0.0)
            ax.barh(i, v, left=left, color=f"C{j}", label=ph if i == 0 or ph not in rows[0]["breakdown_s_median"] else None)
            left += v
        ax.text(left, i, f"  {r['examples_per_s']:.1f} ex/s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("median step time by phase (s)")
    handles, names = ax.get_legend_handles_labels()
    uniq = dict(zip(names, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def summary_lines(report: dict[str, Any]) -> list[str]:
    ref = report["reference"]
    lines = [f"{'variant':<24} {'ex/s':>8} {'median s':>9} {'p90 s':>8} {'/ ' + ref:>10}"]
    for r in report["results"]:
        lines.append(f"{r['label']:<24} {r['examples_per_s']:>8.2f} {r['step_time_s_median']:>9.3f} "
                     f"{r['step_time_s_p90']:>8.3f} {report['step_time_ratio_to_reference'][r['label']]:>10.3f}")
    return lines
