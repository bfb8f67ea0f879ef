"""The training loop: calibrate → for each batch: forward, task loss, + regularisers,
backward, step, (method hook), log → evaluate → save. One call trains one seed.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rankwise import distributed
from rankwise.config.loader import Job
from rankwise.data.loading import (DynamicPaddingCollator, TaskData, batches, epoch_permutation,
                                   eval_order, length_grouped_permutation, load_task_data,
                                   n_batches, row_lengths)
from rankwise.errors import NonFiniteLossError, RankwiseError
from rankwise.measure.after_training import measure_trained_model
from rankwise.methods import build_method
from rankwise.methods.base import FineTuningMethod
from rankwise.methods.targets import resolve_target_modules
from rankwise.metrics import compute_metrics
from rankwise.models import default_cache_dir, load_backbone
from rankwise.results import append_jsonl
from rankwise.training import checkpoint as ckpt
from rankwise.training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

TRIAL_MAX_BATCHES = 2
# Batch entries that are not model inputs (``loss_weight``: a process's share, see distributed).
NOT_MODEL_INPUTS = ("labels", "idx", "loss_weight")


class RunInterrupted(RankwiseError):
    """SIGINT/SIGTERM: a checkpoint was saved at the step boundary; exit non-zero."""

    exit_code = 130


@dataclass
class SeedResult:
    seed: int
    final: dict[str, float]
    best: dict[str, Any]
    history: list[dict[str, Any]]
    predictions: dict[str, dict[str, list]]  # split -> {"idx", "label", "prediction"}
    params: dict[str, Any]
    wall_time_s: dict[str, float]
    step_time_s: float | None
    peak_memory_mb: float | None
    method_metrics: dict[str, Any] = field(default_factory=dict)
    amp_skipped_steps: int = 0  # optimizer steps the fp16 GradScaler skipped (overflow)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from rankwise.errors import ConfigError

            raise ConfigError("device", "cuda requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(job: Job, device: torch.device) -> torch.dtype | None:
    t = job.run.training
    if not (t.fp16 or t.bf16):
        return None
    if device.type != "cuda":
        log.info("training.%s=true needs CUDA; running in float32 on %s",
                 "fp16" if t.fp16 else "bf16", device.type)
        return None
    return torch.float16 if t.fp16 else torch.bfloat16


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context without one."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_run_backbone(run, task):
    """(backbone, tokenizer) of a run's model with the task's head."""
    return load_backbone(
        run.model.name, task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        tokenizer_name=run.model.tokenizer)


def wrap_for_run(run, backbone: torch.nn.Module) -> tuple[FineTuningMethod, torch.nn.Module]:
    """(method, model): the run's method built and wrapped around ``backbone``'s targets."""
    method = build_method(run)
    patterns = getattr(run.model.adapter, "target_modules", None) or run.model.target_modules
    try:
        targets = resolve_target_modules(backbone, patterns)
    except ValueError as exc:
        from rankwise.errors import ConfigError

        raise ConfigError("model.adapter.target_modules", str(exc)) from None
    return method, method.wrap(backbone, targets)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop stops at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None


@contextmanager
def stop_on_signals():
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        flag.signal = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def labels_on(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    return batch["labels"].to(device, non_blocking=True)


def count_params(model: torch.nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):
        return None


class Trainer:
    """Trains one seed of one run. ``reporter(value, epoch)`` feeds Optuna's pruner."""

    def __init__(self, job: Job, seed: int, seed_dir: Path, reporter: Callable | None = None,
                 data: TaskData | None = None):
        self.job, self.cfg, self.seed, self.seed_dir = job, job.run, seed, seed_dir
        self.training = job.run.training  # the run's TrainingConfig (training: block)
        self.trial = job.command.mode == "trial"
        self.reporter = reporter
        self.dist = distributed.current()  # one process unless launched by torchrun
        self.device = resolve_device(job.command.device)
        self.amp_dtype = autocast_dtype(job, self.device)
        seed_everything(seed, self.training.deterministic)
        from rankwise.data.tasks import get_task

        self.task = get_task(self.cfg.dataset.name, self.cfg.dataset.subset)
        self.backbone, self.tokenizer = load_run_backbone(self.cfg, self.task)
        self._check_lengths()
        cap = TRIAL_MAX_BATCHES if self.trial else None
        eval_bs = self.training.eval_batch_size or self.training.batch_size
        self.data = data or load_task_data(
            self.cfg.dataset, self.tokenizer, default_cache_dir(),
            max_train=cap * self.training.batch_size * self.training.gradient_accumulation_steps if cap else None,
            max_eval=cap * eval_bs if cap else None)
        self.collate = DynamicPaddingCollator(self.tokenizer.pad_token_id, self.task.is_regression,
                                              pin_memory=self.device.type == "cuda")
        self._train_lengths: list[int] | None = None
        self.method, model = wrap_for_run(self.cfg, self.backbone)
        self.model = model.to(self.device)
        # The training forward runs through this (DDP under torchrun); everything else,
        # method hooks included, sees the unwrapped ``self.model``.
        self.train_model = self.model
        self.epochs = 1 if self.trial else self.training.epochs
        self.batches_per_epoch = n_batches(len(self.data.train), self.training.batch_size, cap)
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / self.training.gradient_accumulation_steps))
        self.total_steps = self.steps_per_epoch * self.epochs
        if self.training.max_steps is not None and not self.trial:
            self.total_steps = min(self.total_steps, self.training.max_steps)
        self.optimizer = build_optimizer(self.model, self.training)
        self.scheduler = build_scheduler(self.optimizer, self.training, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.amp_skipped_steps = 0  # optimizer steps the GradScaler skipped (fp16 overflow)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.wall = {"calibration": 0.0, "training": 0.0, "evaluation": 0.0}
        self.step_times: list[float] = []
        self.calibration_metrics: dict[str, Any] = {}
        self.calibrated = False
        self.history_file = seed_dir / "history.jsonl"

    # --- setup helpers ----------------------------------------------------------------------
    def _check_lengths(self) -> None:
        limit = getattr(self.backbone.config, "max_position_embeddings", None)
        rel = getattr(self.backbone.config, "relative_attention", False) and not getattr(
            self.backbone.config, "position_biased_input", True)
        if self.cfg.dataset.name == "lra":
            from rankwise.data.listops import check_length_fits

            # Relative positions (DeBERTa-v3) have no position limit, but a ListOps sample cut
            # to max_seq_length (truncation on) loses operands: refused as for absolute ones.
            check_length_fits(self.cfg.dataset.max_seq_length, None if rel else limit,
                              listops=self.cfg.dataset.listops)
        if limit and not rel and self.cfg.dataset.max_seq_length > limit:
            from rankwise.errors import ConfigError

            raise ConfigError("dataset.max_seq_length",
                              f"{self.cfg.dataset.max_seq_length} exceeds the model's position "
                              f"limit ({limit})")

    def epoch_order(self, epoch: int) -> list[int]:
        """Training order of ``epoch``: length-grouped (``training.group_by_length``) or a
        plain permutation; a pure function of (seed, epoch), so resume is exact."""
        if not self.training.group_by_length:
            return epoch_permutation(len(self.data.train), self.seed, epoch)
        if self._train_lengths is None:
            self._train_lengths = row_lengths(self.data.train)
        return length_grouped_permutation(self._train_lengths, self.training.batch_size, self.seed, epoch)

    def calibration_batches(self):
        """Training batches in an order drawn from the run's seed; cycles as needed."""
        order = epoch_permutation(len(self.data.train), self.seed, epoch=-1)
        while True:
            yield from batches(self.data.train, order, self.training.batch_size, self.collate)

    def loss_fn(self, model, batch) -> torch.Tensor:
        with self._autocast():
            logits = model(**model_inputs(batch, self.device)).logits
        return task_loss(logits, labels_on(batch, self.device), self.task.is_regression)

    def _autocast(self):
        return autocast_context(self.device, self.amp_dtype)

    # --- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.seed_dir / "checkpoints"

    def save(self) -> Path | None:
        if not self.dist.is_main:  # rank 0 holds the same state and writes it
            return None
        payload = {
            "model": ckpt.trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
            "global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "history": self.history, "best": self.best, "wall": self.wall,
            "step_times": self.step_times, "calibrated": self.calibrated,
            "amp_skipped_steps": self.amp_skipped_steps,
            "calibration_metrics": self.calibration_metrics,
            "method": self.method.state_dict(),
        }
        return ckpt.save_checkpoint(self.checkpoint_dir, self.global_step, payload, self.training.save_total_limit)

    def try_resume(self) -> bool:
        found = ckpt.latest_valid_checkpoint(self.checkpoint_dir)
        if found is None:
            return False
        path, state = found
        ckpt.load_trainable_state(self.model, state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for key in ("global_step", "epoch", "batch_in_epoch", "history", "best", "wall", "step_times",
                    "calibrated", "calibration_metrics"):
            setattr(self, key, state[key])
        self.amp_skipped_steps = state.get("amp_skipped_steps", 0)
        ckpt.set_rng_state(state["rng"])
        log.info("resumed from %s (step %d, epoch %d, batch %d)", path.name, self.global_step,
                 self.epoch, self.batch_in_epoch)
        return True

    # --- evaluation -------------------------------------------------------------------------
    @torch.inference_mode()
    def evaluate(self) -> tuple[dict[str, float], dict[str, dict[str, list]]]:
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        metrics: dict[str, float] = {}
        predictions: dict[str, dict[str, list]] = {}
        eval_bs = self.training.eval_batch_size or self.training.batch_size
        cap = TRIAL_MAX_BATCHES if self.trial else None
        for split in self.data.evals:
            self.method.begin_evaluation(self.model)
            losses, preds, labels, idxs = [], [], [], []
            # longest first (little padding); results are put back in dataset order below
            order = eval_order(row_lengths(split.data)) if cap is None else list(range(len(split.data)))
            for batch in batches(split.data, order, eval_bs, self.collate, limit=cap):
                with self._autocast():
                    logits = self.model(**model_inputs(batch, self.device)).logits.float()
                y = labels_on(batch, self.device)
                losses.append(task_loss(logits, y, self.task.is_regression) * len(y))
                preds.append(logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1))
                labels.append(batch["labels"].numpy())
                idxs.append(batch["idx"].numpy())
            back = np.argsort(order[: sum(len(y) for y in labels)], kind="stable")
            p_all = torch.cat(preds).cpu().numpy()[back]  # one device-to-host copy per split
            y_all = np.concatenate(labels)[back]
            m = compute_metrics(self.cfg.dataset.name, self.cfg.dataset.subset, p_all, y_all)
            m["loss"] = float(torch.stack(losses).double().sum()) / len(y_all)
            m.update(self.method.end_evaluation(self.model))
            metrics.update({f"{split.name}_{k}": v for k, v in m.items()})
            predictions[split.name] = {"idx": np.concatenate(idxs)[back].tolist(), "label": y_all.tolist(),
                                       "prediction": p_all.tolist()}
        if was_training:
            self.model.train()
        self.wall["evaluation"] += time.perf_counter() - t0
        return metrics, predictions

    # --- training ---------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.dist.is_main:
            append_jsonl(self.history_file, record)

    def _nonfinite(self, what: str, terms: dict[str, torch.Tensor]) -> None:
        bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
        self.save_last_good()
        raise NonFiniteLossError(
            f"non-finite {what} at step {self.global_step + 1} (epoch {self.epoch + 1}): "
            f"term(s) {', '.join(bad) or 'unknown'}; last good state saved in "
            f"{self.checkpoint_dir}")

    def save_last_good(self) -> None:
        """Checkpoint of the state before the failing step (parameters are not yet updated)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.save()

    def run(self, resume: bool, stop: StopFlag | None = None) -> SeedResult:
        self.seed_dir.mkdir(parents=True, exist_ok=True)
        resumed = resume and self.try_resume()
        if not resumed and self.history_file.exists() and self.dist.is_main:
            self.history_file.unlink()
        if not self.calibrated:
            t0 = time.perf_counter()
            cal = self.calibration_batches()
            if self.trial:  # trial mode: one calibration batch
                import itertools

                cal = itertools.islice(cal, 1)
            self.calibration_metrics = self.method.calibrate(self.model, cal, self.loss_fn)
            self.wall["calibration"] = time.perf_counter() - t0
            self.calibrated = True
        self.method.prepare_training(self.model, self.total_steps)
        self.train_model = self.dist.wrap(self.model)  # after hooks that set requires_grad
        final_predictions: dict[str, dict[str, list]] = {}
        self.model.train()
        accum = self.training.gradient_accumulation_steps
        progress = tqdm(total=self.total_steps, initial=self.global_step, desc=f"{self.cfg.run_id} seed {self.seed}",
                        unit="step", dynamic_ncols=True, mininterval=1.0, leave=False,
                        disable=not self.dist.is_main)
        anomaly = torch.autograd.set_detect_anomaly(True) if self.training.detect_anomaly else nullcontext()
        last_eval: dict[str, float] = {}
        with anomaly:
            while self.epoch < self.epochs and self.global_step < self.total_steps:
                order = self.epoch_order(self.epoch)
                self.method.begin_epoch(self.model, fresh=self.batch_in_epoch == 0)
                cap = TRIAL_MAX_BATCHES if self.trial else None
                running: dict[str, torch.Tensor] = {}  # summed on the device: no per-step sync
                n_running = 0
                t_step = time.perf_counter()
                for batch in batches(self.data.train, order, self.training.batch_size, self.collate,
                                     start=self.batch_in_epoch, limit=cap,
                                     shard=self.dist.shard if self.dist.enabled else None):
                    t0 = time.perf_counter()
                    terms = self.forward_backward(batch)
                    for k, v in terms.items():
                        v = v.detach().double()
                        running[k] = running[k] + v if k in running else v
                    n_running += 1
                    self.batch_in_epoch += 1
                    end_of_epoch = self.batch_in_epoch >= self.batches_per_epoch
                    self.wall["training"] += time.perf_counter() - t0
                    if self.batch_in_epoch % accum and not end_of_epoch:
                        continue
                    t0 = time.perf_counter()
                    stepped = self._optimizer_step()
                    self.wall["training"] += time.perf_counter() - t0
                    if not stepped:  # fp16 overflow: nothing advanced, gradients cleared
                        if self.global_step >= self.total_steps or end_of_epoch:
                            break
                        continue
                    self.global_step += 1
                    self.step_times.append(time.perf_counter() - t_step)
                    t_step = time.perf_counter()
                    progress.update(1)
                    if self.global_step % self.training.log_every_n_steps == 0 or self.global_step == self.total_steps:
                        means = {k: float(v) / n_running for k, v in running.items()}  # the sync
                        rec = {"step": self.global_step, "epoch": self.epoch + self.batch_in_epoch / self.batches_per_epoch,
                               "loss": sum(means.values()),
                               **means,
                               "lr": self.scheduler.get_last_lr()[0],
                               **self.method.step_log_metrics(self.model)}
                        self._log(rec)
                        progress.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
                        running, n_running = {}, 0
                    if (self.training.evaluation_strategy == "steps" and not self.trial
                            and self.global_step % self.training.eval_every_n_steps == 0):
                        last_eval, final_predictions = self._evaluate_and_record()
                    if (self.training.save_strategy == "steps" or self.training.save_every_n_steps) and not self.trial:
                        every = self.training.save_every_n_steps
                        if every and self.global_step % every == 0:
                            self.save()
                    if stop is not None and self.dist.any_rank(stop.signal is not None):
                        self.save()
                        raise RunInterrupted(f"stopped by signal {stop.signal or '(on another rank)'} at "
                                             f"step {self.global_step}; checkpoint saved, continue with "
                                             f"resume=true")
                    if self.global_step >= self.total_steps or end_of_epoch:
                        break
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.training.evaluation_strategy == "epoch" or self.trial:
                    last_eval, final_predictions = self._evaluate_and_record()
                    if self.reporter is not None:
                        self.reporter(last_eval.get(self.cfg.optuna.metric_name), self.epoch)
                if self.training.save_strategy == "epoch" and not self.trial:
                    self.save()
        progress.close()
        if not last_eval or self.history[-1].get("type") != "eval" or self.history[-1]["step"] != self.global_step:
            last_eval, final_predictions = self._evaluate_and_record()
        last_eval = {**last_eval, **self.method.training_metrics(self.model)}
        if self.dist.is_main:  # timed alone: the other ranks are done (and write nothing)
            last_eval = {**last_eval, **measure_trained_model(self, last_eval)}
        return SeedResult(
            seed=self.seed, final=last_eval, best=self.best, history=self.history,
            predictions=final_predictions, params=count_params(self.model),
            wall_time_s={**self.wall, "total": sum(self.wall.values())},
            step_time_s=float(np.mean(self.step_times)) if self.step_times else None,
            peak_memory_mb=peak_memory_mb(self.device), amp_skipped_steps=self.amp_skipped_steps,
            method_metrics={**self.calibration_metrics,
                            **(self.method.write_artifacts(self.model, self.seed_dir)
                               if self.dist.is_main else {})})

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward, task loss + each regulariser, backward (scaled for accumulation).

        Returns the detached loss terms (of the global batch under torchrun); raises
        NonFiniteLossError naming the bad term.
        """
        with self._autocast():
            logits = self.train_model(**model_inputs(batch, self.device)).logits
        terms = {"task_loss": task_loss(logits, labels_on(batch, self.device), self.task.is_regression)}
        for name, value in self.method.regularization_losses(self.model).items():
            terms[f"reg/{name}"] = value
        loss = sum(terms.values())
        weight = batch.get("loss_weight", 1.0)  # this process's share of the global batch
        logged = self.dist.mean_of_weighted(terms, weight)  # the terms themselves for one process
        if not torch.isfinite(sum(logged.values())):  # every rank sees the same verdict
            self._nonfinite("loss", logged)
        if weight != 1.0:
            loss = loss * weight
        self.scaler.scale(loss / self.training.gradient_accumulation_steps).backward()
        return {k: v.detach() for k, v in logged.items()}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One full optimizer step on one batch (no accumulation): used by benchmarks."""
        terms = self.forward_backward(batch)
        if self._optimizer_step():
            self.global_step += 1
        return terms

    def _optimizer_step(self) -> bool:
        """Unscale, clip, step; True when the optimizer stepped, False when the fp16
        GradScaler skipped the step (inf/NaN gradients).

        A skipped step advances nothing: no scheduler step, no method hook (AdaLoRA's
        importance update would turn inf gradients into NaN scores), and the caller does not
        count it in ``global_step``; the gradients are cleared and ``amp_skipped_steps`` counts
        it. The skip is read from the scaler itself: ``update()`` lowers the scale (by
        ``backoff_factor`` < 1) exactly when ``step()`` found inf/NaN gradients and skipped
        ``optimizer.step()``, and never otherwise (the same test as accelerate's
        ``step_was_skipped``).
        """
        if self.training.max_grad_norm is not None or self.amp_dtype == torch.float16:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.training.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.training.max_grad_norm)
        else:
            norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if not torch.isfinite(norm) and not self.scaler.is_enabled():
            bad = [n for n, p in self.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            self.save_last_good()
            raise NonFiniteLossError(f"non-finite gradient at step {self.global_step + 1}: "
                                     f"parameter {bad[0] if bad else '?'}; last good state saved")
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)  # skipped by the scaler on fp16 overflow
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.optimizer.zero_grad(set_to_none=True)
            self.amp_skipped_steps += 1
            log.warning("fp16 overflow before step %d: the GradScaler skipped it (scale %g -> %g); "
                        "scheduler, step count and method hooks not advanced (%d skipped so far)",
                        self.global_step + 1, scale_before, self.scaler.get_scale(),
                        self.amp_skipped_steps)
            return False
        self.scheduler.step()
        self.method.on_optimizer_step(self.model, self.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _evaluate_and_record(self):
        metrics, predictions = self.evaluate()
        rec = {"type": "eval", "step": self.global_step, "epoch": self.epoch, **metrics}
        self._log(rec)
        key = self.primary_key
        value = metrics.get(key)
        if value is not None and (not self.best or value > self.best.get(key, -math.inf)):
            self.best = {**metrics, "epoch": self.epoch, "step": self.global_step}
        log.info("eval step %d: %s", self.global_step,
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return metrics, predictions

    @property
    def primary_key(self) -> str:
        return f"validation_{self.task.primary_metric}"
