"""The run, built in one place: seed → device and precision → backbone → data → method →
optimiser. The training loop, the measurement (through the loop), the benches and the
search's trials all get their model from here, so a bench times what training trains.

Each part takes its slice of the config, as torchtune's recipes set up the model, the data and
the optimiser apart from the training loop; the order below is the order the random number
generator sees them in, so every caller builds bit-identical models for one seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rankwise.config.loader import Job, RunLimits
from rankwise.config.schema import RunConfig, TrainingConfig
from rankwise.data.loading import DynamicPaddingCollator, TaskData, load_task_data, n_batches
from rankwise.data.tasks import TaskSpec, get_task
from rankwise.errors import ConfigError
from rankwise.methods import build_method
from rankwise.methods.base import FineTuningMethod
from rankwise.methods.engagement import resolve_thresholds
from rankwise.methods.targets import resolve_target_modules
from rankwise.models import default_cache_dir, load_backbone
from rankwise.runtime import autocast_dtype, resolve_device, seed_everything
from rankwise.training.optim import build_optimizer, build_scheduler


def load_run_backbone(run: RunConfig, task: TaskSpec):
    """(backbone, tokenizer) of a run's model with the task's head."""
    return load_backbone(
        run.model.name, task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        tokenizer_name=run.model.tokenizer)


def wrap_for_run(run: RunConfig, backbone: torch.nn.Module) -> tuple[FineTuningMethod, torch.nn.Module]:
    """(method, model): the run's method built and wrapped around ``backbone``'s targets."""
    method = build_method(run)
    resolve_thresholds(run.training.engagement_thresholds)  # an unknown name fails here, early
    try:
        targets = resolve_target_modules(backbone, run.model.target_modules)
    except ValueError as exc:
        raise ConfigError("model.target_modules", str(exc)) from None
    return method, method.wrap(backbone, targets)


def check_lengths(run: RunConfig, model_config: Any) -> None:
    """``dataset.max_seq_length`` must fit the model's absolute positions (ConfigError), and a
    ListOps sample must fit whole (relative positions, as DeBERTa-v3's, have no limit, but a
    ListOps sample cut to max_seq_length loses operands)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    relative = getattr(model_config, "relative_attention", False) and not getattr(
        model_config, "position_biased_input", True)
    max_len = run.dataset.max_seq_length
    if run.dataset.name == "lra":
        from rankwise.data.listops import check_length_fits

        check_length_fits(max_len, None if relative else limit, listops=run.dataset.listops)
    if limit and not relative and max_len > limit:
        raise ConfigError("dataset.max_seq_length",
                          f"{max_len} exceeds the model's position limit ({limit})")


def load_run_data(run: RunConfig, tokenizer, limits: RunLimits) -> TaskData:
    """The run's tokenised data; with ``limits.max_batches`` only the rows those batches read."""
    t, cap = run.training, limits.max_batches
    eval_bs = t.eval_batch_size or t.batch_size
    return load_task_data(run.dataset, tokenizer, default_cache_dir(),
                          max_train=cap * t.batch_size * t.gradient_accumulation_steps if cap else None,
                          max_eval=cap * eval_bs if cap else None)


@dataclass
class BuiltRun:
    """One seed of a run, ready to train: the model on its device, the method that wraps it,
    its data and how batches are padded."""

    task: TaskSpec
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype (None: float32)
    backbone: torch.nn.Module  # the wrapped backbone (its ``config`` holds the position limit)
    tokenizer: Any
    data: TaskData
    collate: DynamicPaddingCollator
    method: FineTuningMethod
    model: torch.nn.Module


def build_run(job: Job, seed: int, data: TaskData | None = None) -> BuiltRun:
    """Seed, device, precision, backbone (length check), data (``data``: already loaded, as the
    search's trials share it), method and model, in that order."""
    run = job.run
    device = resolve_device(job.command.device)
    amp_dtype = autocast_dtype(run.training, device)
    seed_everything(seed, run.training.deterministic)
    task = get_task(run.dataset.name, run.dataset.subset)
    backbone, tokenizer = load_run_backbone(run, task)
    check_lengths(run, backbone.config)
    data = data or load_run_data(run, tokenizer, job.limits)
    collate = DynamicPaddingCollator(tokenizer.pad_token_id, task.is_regression,
                                     pin_memory=device.type == "cuda")
    method, model = wrap_for_run(run, backbone)
    return BuiltRun(task, device, amp_dtype, backbone, tokenizer, data, collate, method,
                    model.to(device))


def build_model(run: RunConfig, seed: int, device: torch.device):
    """(model, method, tokenizer) of ``run`` without its data, seeded as :func:`build_run`
    seeds it (the data loading between them draws no random numbers), so the model is the
    one a training run of that seed starts from."""
    seed_everything(seed, deterministic=False)
    backbone, tokenizer = load_run_backbone(run, get_task(run.dataset.name, run.dataset.subset))
    method, model = wrap_for_run(run, backbone)
    return model.to(device), method, tokenizer


@dataclass
class Schedule:
    """How many steps a seed trains: batches per epoch (capped by ``limits.max_batches``),
    optimizer steps per epoch (gradient accumulation), epochs, and the total (``max_steps``)."""

    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int

    @classmethod
    def of(cls, training: TrainingConfig, n_train: int, limits: RunLimits) -> Schedule:
        batches = n_batches(n_train, training.batch_size, limits.max_batches)
        steps = max(1, math.ceil(batches / training.gradient_accumulation_steps))
        total = steps * training.epochs
        if training.max_steps is not None:
            total = min(total, training.max_steps)
        return cls(batches, steps, training.epochs, total)


@dataclass
class Optimisation:
    """The optimiser over the trainable parameters, its learning-rate schedule, and the fp16
    GradScaler (disabled in float32 and bf16)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler

    @classmethod
    def of(cls, model: torch.nn.Module, training: TrainingConfig, total_steps: int,
           device: torch.device, amp_dtype: torch.dtype | None,
           method: FineTuningMethod | None = None) -> Optimisation:
        optimizer = build_optimizer(model, training, method)
        return cls(optimizer, build_scheduler(optimizer, training, total_steps),
                   torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16))
