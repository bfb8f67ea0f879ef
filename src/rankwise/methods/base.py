"""The small interface every fine-tuning method implements (one method, one module).

A method turns a frozen backbone into a trainable model and tells the training loop what
extra it needs. The loop (``rankwise.training.loop``) reads like the algorithm box:

    method = build_method(run_cfg)                     # from the registry
    model = method.wrap(backbone, target_modules)      # adapters in, base frozen
    method.calibrate(model, calibration_batches, task_loss_fn)   # e.g. IW-LoRA; no-op default
    method.prepare_training(model, total_steps)        # e.g. AdaLoRA's total_step
    for batch in loader:
        logits = model(**inputs).logits
        loss = task_loss(logits, labels)
        regs = method.regularization_losses(model)    # dict name -> scalar tensor (weighted)
        (loss + sum(regs.values())).backward()
        optimizer.step()
        method.on_optimizer_step(model, global_step)  # e.g. AdaLoRA update_and_allocate
        optimizer.zero_grad()
        log(..., **method.step_log_metrics(model))     # every logging step
    final |= method.training_metrics(model)           # e.g. the training-time open rate
    method.begin_evaluation(model, split); ...eval forward passes...; stats = method.end_evaluation(model)
    extra = method.write_artifacts(model, run_dir)     # importance.json, rank pattern, ...
    cost = method.forward_cost(model, forward, mask)   # extra FLOPs per example of one pass
    checks = method.engagement_checks(evidence, thresholds)  # after every seed: was it engaged?

Adapters never edit ``outputs.loss`` behind the loop's back: every regulariser is returned
by ``regularization_losses`` (already multiplied by its coefficient) and logged under its
name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from rankwise.methods.cost import ForwardCost
    from rankwise.methods.engagement import Check, SeedEvidence

TaskLossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
"""``task_loss_fn(model, batch) -> scalar``: forward + task loss (CE or MSE) on one batch."""


class FineTuningMethod:
    """Base class with no-op defaults; subclasses override what they need.

    ``config`` is the validated dataclass of the run's ``model.adapter`` block (``None`` for
    full fine-tuning); ``run_cfg`` is the whole validated run config.
    """

    name: ClassVar[str] = "base"

    def __init__(self, config: Any, run_cfg: Any):
        self.config = config
        self.run_cfg = run_cfg

    # --- building -------------------------------------------------------------------------
    def wrap(self, backbone: nn.Module, target_modules: list[str]) -> nn.Module:
        """Return the trainable model. The classification head stays fully trainable."""
        raise NotImplementedError

    def adapter_params(self, model: nn.Module) -> list[nn.Parameter]:
        """Trainable parameters (default: every parameter with requires_grad)."""
        return [p for p in model.parameters() if p.requires_grad]

    def parameter_learning_rate(self, name: str) -> float | None:
        """A learning rate of the method's own for parameter ``name`` (e.g. gates and
        controllers), or None for the run's (``training.learning_rate``)."""
        return None

    def clip_group(self, name: str) -> str | None:
        """The name of a group of parameters whose gradient norm is clipped on its own (e.g. a
        gated method's gates), or None for the one norm over the rest."""
        return None

    # --- training hooks -------------------------------------------------------------------
    @property
    def rows_independent(self) -> bool:
        """Whether a training batch may run as parts (length buckets) with its gradient
        unchanged in distribution: no random draw is shared by the batch's rows, and every
        regulariser is a mean over the batch's sequences or does not depend on the batch.
        False keeps each batch whole under ``training.length_grouping: within_batch``."""
        return True

    def calibrate(
        self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], task_loss_fn: TaskLossFn
    ) -> dict[str, Any]:
        """Run before training; must update no parameter. Returns metrics to record."""
        return {}

    def prepare_training(self, model: nn.Module, total_steps: int) -> None:
        """Called once the real number of optimizer steps is known."""

    def regularization_losses(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Named, already-weighted regularisers added to the task loss this step."""
        return {}

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        """Called after ``optimizer.step()`` and before ``zero_grad()``."""

    def begin_epoch(self, model: nn.Module, fresh: bool) -> None:
        """Called before each training epoch; ``fresh`` is False when resuming inside it."""

    def step_log_metrics(self, model: nn.Module) -> dict[str, float]:
        """Numbers added to each training step log (since the previous one)."""
        return {}

    def training_metrics(self, model: nn.Module) -> dict[str, float]:
        """Training-time numbers added to the seed's final metrics after training."""
        return {}

    # --- evaluation -----------------------------------------------------------------------
    def begin_evaluation(self, model: nn.Module, split: str | None = None) -> None:
        """Reset per-evaluation statistics (gate counts, FLOPs, budget violations) before the
        evaluation pass over ``split`` (its metric prefix, e.g. ``validation``)."""

    def end_evaluation(self, model: nn.Module) -> dict[str, Any]:
        """Statistics gathered during the evaluation pass, merged into the eval metrics."""
        return {}

    def evaluation_rules(self) -> tuple[str, ...]:
        """Ways to evaluate one trained model that need no retraining (a gated method's
        evaluation gate rules). A search's trials score every one on their held-out selection
        slice (``eval_rule_scores``); empty: the method evaluates one way."""
        return ()

    @contextlib.contextmanager
    def evaluation_rule(self, model: nn.Module, rule: str) -> Iterator[None]:
        """Evaluate with ``rule`` (one of :meth:`evaluation_rules`) inside the block."""
        if rule not in self.evaluation_rules():
            raise ValueError(f"{self.name} has no evaluation rule {rule!r}")
        yield

    # --- cost (every method says what it costs; nothing outside asks which method it is) -----
    def forward_cost(self, model: nn.Module, forward: Callable[[], Any],
                     attention_mask: torch.Tensor) -> ForwardCost:
        """Run ``forward()`` once and return the extra FLOPs it cost over the frozen backbone:
        adapter and controller FLOPs per example (real tokens of ``attention_mask``) and the
        batch-shared position rows per forward. ``rankwise.methods.cost`` has the building
        blocks (``PeftLayerCost`` for peft LoRA-family layers). There is no default: a method
        that does not count its cost must not report 0, as full fine-tuning would."""
        raise NotImplementedError(
            f"method {self.name!r} does not count its cost: implement forward_cost and "
            "evaluation_cost (see rankwise.methods.cost)")

    def evaluation_cost(self, model: nn.Module, valid_tokens: list[int],
                        split: str | None = None) -> ForwardCost | None:
        """Per-example cost of the most recent evaluation pass over ``split`` (None: the most
        recent pass of any split), whose examples had ``valid_tokens`` real tokens; ``None``
        when the method kept no record of that pass."""
        raise NotImplementedError(
            f"method {self.name!r} does not count its cost: implement forward_cost and "
            "evaluation_cost (see rankwise.methods.cost)")

    # --- mechanism checks -----------------------------------------------------------------
    @property
    def engagement_check_names(self) -> tuple[str, ...]:
        """The names of the checks ``engagement_checks`` runs for this configuration (the
        runner adds ``above_chance`` to every run): each method says which apply to it."""
        return ()

    def engagement_checks(self, evidence: list[SeedEvidence],
                          thresholds: dict[str, float]) -> list[Check]:
        """Whether the run switched on this method's mechanism, from every seed's evidence
        after training (``rankwise.methods.engagement``): e.g. a regulariser's share of the
        loss, gates' capacity at evaluation against training. Must not need the model: it
        runs on the finished run. Default: none (nothing beyond training the parameters)."""
        return []

    # --- outputs and resume ---------------------------------------------------------------
    def write_artifacts(self, model: nn.Module, run_dir: Path) -> dict[str, Any]:
        """Write method-specific files into ``run_dir``; return summary metrics."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method state that is not in the model's parameters (for exact resume)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


def zero_loss(model: nn.Module) -> torch.Tensor:
    """A scalar zero on the model's device (for regularisers that are off)."""
    p = next(model.parameters())
    return torch.zeros((), device=p.device, dtype=torch.float32)


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def classifier_head_names() -> tuple[str, ...]:
    """Module names of sequence-classification heads, pooler included (kept trainable by every
    method, as PEFT's SEQ_CLS does; ``training.head_learning_rate`` applies to them). The one
    home of this list."""
    return ("classifier", "pooler", "score")


def is_head_parameter(name: str) -> bool:
    """Whether the parameter ``name`` belongs to the classification head (or pooler)."""
    return any(part in name.split(".") for part in classifier_head_names())


def unfreeze_head(model: nn.Module) -> None:
    """Make the classification head (and pooler, as PEFT's SEQ_CLS does) trainable."""
    for name, p in model.named_parameters():
        if is_head_parameter(name):
            p.requires_grad_(True)
