"""The training loop: calibrate → for each batch: forward, task loss, + regularisers,
backward, step, (method hook), log → evaluate → save. One call trains one seed.
"""

from __future__ import annotations

import itertools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rankwise import distributed
from rankwise.config.loader import Job
from rankwise.data.loading import (
    TaskData,
    batches,
    bucketed_batches,
    epoch_permutation,
    eval_order,
    length_grouped_permutation,
    row_lengths,
)
from rankwise.errors import NonFiniteLossError, RankwiseError
from rankwise.measure.after_training import TrainedRun, measure_trained_model
from rankwise.metrics import compute_metrics
from rankwise.results import append_jsonl, atomic_write_json
from rankwise.runtime import (
    autocast_context,
    count_params,
    labels_on,
    model_inputs,
    peak_memory_mb,
    precision_record,
    task_loss,
)
from rankwise.training import checkpoint as ckpt
from rankwise.training.build import Optimisation, Schedule, build_run
from rankwise.training.optim import clip_gradients

log = logging.getLogger(__name__)


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
    # the precision the seed trained and evaluated in (runtime.precision_record)
    precision: dict[str, str | None] = field(default_factory=lambda: precision_record(None, None))


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


class Trainer:
    """Trains one seed of one run. ``reporter(value, epoch)`` feeds Optuna's pruner.

    The run is built by :func:`rankwise.training.build.build_run` (seed, device, precision,
    backbone, data, method) and :class:`~rankwise.training.build.Optimisation`; the Trainer
    owns only the loop and its state (step, epoch, history, checkpoints). Trial mode's caps
    arrive resolved in ``job.run`` and ``job.limits``."""

    def __init__(self, job: Job, seed: int, seed_dir: Path, reporter: Callable | None = None,
                 data: TaskData | None = None):
        self.job, self.cfg, self.seed, self.seed_dir = job, job.run, seed, seed_dir
        self.training = job.run.training  # the run's TrainingConfig (training: block)
        self.limits = job.limits
        self.reporter = reporter
        self.dist = distributed.current()  # one process unless launched by torchrun
        built = build_run(job, seed, data)
        self.task, self.device, self.amp_dtype = built.task, built.device, built.amp_dtype
        self.backbone, self.tokenizer, self.data = built.backbone, built.tokenizer, built.data
        self.collate, self.method, self.model = built.collate, built.method, built.model
        self._train_lengths: list[int] | None = None
        # The training forward runs through this (DDP under torchrun); everything else,
        # method hooks included, sees the unwrapped ``self.model``.
        self.train_model = self.model
        self.schedule = Schedule.of(self.training, len(self.data.train), self.limits)
        self.epochs, self.total_steps = self.schedule.epochs, self.schedule.total_steps
        self.batches_per_epoch = self.schedule.batches_per_epoch
        opt = Optimisation.of(self.model, self.training, self.total_steps, self.device, self.amp_dtype,
                              self.method)
        self.optimizer, self.scheduler, self.scaler = opt.optimizer, opt.scheduler, opt.scaler
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
    def epoch_order(self, epoch: int) -> list[int]:
        """Training order of ``epoch``: batches from length-sorted mega-batches
        (``training.length_grouping: megabatch``) or a plain permutation; a pure function of
        (seed, epoch), so resume is exact."""
        t = self.training
        if not (t.group_by_length and t.length_grouping == "megabatch"):
            return epoch_permutation(len(self.data.train), self.seed, epoch)
        return length_grouped_permutation(self.train_lengths(), t.batch_size, self.seed, epoch,
                                          megabatch=t.length_megabatch)

    def train_lengths(self) -> list[int]:
        if self._train_lengths is None:
            self._train_lengths = row_lengths(self.data.train)
        return self._train_lengths

    def epoch_batches(self, epoch: int):
        """The rest of ``epoch``'s training batches (from ``batch_in_epoch``), each a list of
        parts: the batch itself, or its length buckets (``training.length_grouping:
        within_batch``, ``length_buckets`` > 1, a method whose rows are independent)."""
        t = self.training
        order = self.epoch_order(epoch)
        shard = self.dist.shard if self.dist.enabled else None
        if (t.group_by_length and t.length_grouping == "within_batch" and t.length_buckets > 1
                and self.method.rows_independent):
            yield from bucketed_batches(self.data.train, order, t.batch_size, self.collate,
                                        self.train_lengths(), t.length_buckets,
                                        start=self.batch_in_epoch, limit=self.limits.max_batches,
                                        shard=shard)
            return
        for batch in batches(self.data.train, order, t.batch_size, self.collate,
                             start=self.batch_in_epoch, limit=self.limits.max_batches, shard=shard):
            yield [batch]

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
    def evaluate_splits(self) -> tuple[dict[str, float], dict[str, dict[str, list]]]:
        """This seed's model on each evaluation split: metrics (``<split>_<metric>``, with the
        method's evaluation statistics) and predictions in dataset order. (The cross-run
        comparison is ``rankwise.evaluate``, a separate command.)"""
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        metrics: dict[str, float] = {}
        predictions: dict[str, dict[str, list]] = {}
        eval_bs = self.training.eval_batch_size or self.training.batch_size
        cap = self.limits.max_batches
        for split in self.data.evals:
            self.method.begin_evaluation(self.model, split.name)
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
        """Calibrate (once), train to ``total_steps`` with per-epoch evaluation and checkpoints,
        evaluate the final model, measure it; resumes from the latest checkpoint if asked."""
        self.seed_dir.mkdir(parents=True, exist_ok=True)
        resumed = resume and self.try_resume()
        if not resumed and self.history_file.exists() and self.dist.is_main:
            self.history_file.unlink()
        self._calibrate()
        self._progress_base = (self.global_step, time.time())  # this process's share of the steps
        self.method.prepare_training(self.model, self.total_steps)
        self.train_model = self.dist.wrap(self.model)  # after hooks that set requires_grad
        self.model.train()
        progress = tqdm(total=self.total_steps, initial=self.global_step, desc=f"{self.cfg.run_id} seed {self.seed}",
                        unit="step", dynamic_ncols=True, mininterval=1.0, leave=False,
                        disable=not self.dist.is_main)
        anomaly = torch.autograd.set_detect_anomaly(True) if self.training.detect_anomaly else nullcontext()
        last: tuple[dict[str, float], dict[str, dict[str, list]]] = ({}, {})
        with anomaly:
            while self.epoch < self.epochs and self.global_step < self.total_steps:
                last = self._train_epoch(progress, stop) or last
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.training.evaluation_strategy == "epoch":
                    last = self._evaluate_and_record()
                    if self.reporter is not None:
                        self.reporter(last[0].get(self.cfg.optuna.metric_name), self.epoch)
                if self.training.save_strategy == "epoch":
                    self.save()
        progress.close()
        return self._finish(*last)

    def _calibrate(self) -> None:
        """The method's calibration (IW-LoRA's importance weights), once per seed: a resumed
        run keeps the checkpointed result. ``limits.calibration_batches`` caps its batches."""
        if self.calibrated:
            return
        t0 = time.perf_counter()
        cal = self.calibration_batches()
        if self.limits.calibration_batches is not None:
            cal = itertools.islice(cal, self.limits.calibration_batches)
        self.calibration_metrics = self.method.calibrate(self.model, cal, self.loss_fn)
        self.wall["calibration"] = time.perf_counter() - t0
        self.calibrated = True

    def _train_epoch(self, progress, stop: StopFlag | None):
        """The rest of the current epoch's batches (from ``batch_in_epoch``): forward/backward
        per batch, an optimizer step per ``gradient_accumulation_steps`` batches, then the
        step's logging, evaluation, checkpoint and signal check. Returns the latest step
        evaluation's (metrics, predictions), or None when there was none."""
        self.method.begin_epoch(self.model, fresh=self.batch_in_epoch == 0)
        accum = self.training.gradient_accumulation_steps
        running: dict[str, torch.Tensor] = {}  # summed on the device: no per-step sync
        n_running = 0
        last = None
        t_step = time.perf_counter()
        for parts in self.epoch_batches(self.epoch):
            t0 = time.perf_counter()
            terms = self.forward_backward(parts)
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
            if stepped:  # not stepped: fp16 overflow, nothing advanced, gradients cleared
                self.global_step += 1
                self.step_times.append(time.perf_counter() - t_step)
                t_step = time.perf_counter()
                progress.update(1)
                self._write_progress()
                if self._log_due():
                    self._log_running(running, n_running, progress)
                    running, n_running = {}, 0
                last = self._after_step(stop) or last
            if self.global_step >= self.total_steps or end_of_epoch:
                break
        return last

    def _write_progress(self) -> None:
        """``<seed_dir>/progress.json`` (step, total steps, seconds per step since this process
        started training): what a grid's ETA reads. Written at steps 1, 2, 4, 8, 16 and at
        every logged step, so an estimate exists from the first steps."""
        done = self.global_step - self._progress_base[0]
        if not self.dist.is_main or not (self._log_due() or self.global_step in (1, 2, 4, 8, 16)) or done < 1:
            return
        elapsed = time.time() - self._progress_base[1]
        atomic_write_json(self.seed_dir / "progress.json",
                          {"step": self.global_step, "total_steps": self.total_steps,
                           "s_per_step": elapsed / done, "updated_at": time.time()})

    def _log_due(self) -> bool:
        return (self.global_step % self.training.log_every_n_steps == 0
                or self.global_step == self.total_steps)

    def _log_running(self, running: dict[str, torch.Tensor], n: int, progress) -> None:
        """Log the mean loss terms since the last record (the one host sync per record)."""
        means = {k: float(v) / n for k, v in running.items()}
        rec = {"step": self.global_step, "epoch": self.epoch + self.batch_in_epoch / self.batches_per_epoch,
               "loss": sum(means.values()),
               **means,
               "lr": self.scheduler.get_last_lr()[0],
               **self.method.step_log_metrics(self.model)}
        self._log(rec)
        progress.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)

    def _after_step(self, stop: StopFlag | None):
        """Step-based evaluation and checkpoint, then the signal check (checkpoint and
        RunInterrupted). Returns the evaluation's (metrics, predictions) when one ran."""
        t, evaluated = self.training, None
        if t.evaluation_strategy == "steps" and self.global_step % t.eval_every_n_steps == 0:
            evaluated = self._evaluate_and_record()
        if t.save_every_n_steps and self.global_step % t.save_every_n_steps == 0:
            self.save()  # required by save_strategy=steps, honoured with any strategy
        if stop is not None and self.dist.any_rank(stop.signal is not None):
            self.save()
            raise RunInterrupted(f"stopped by signal {stop.signal or '(on another rank)'} at "
                                 f"step {self.global_step}; checkpoint saved, continue with "
                                 f"resume=true")
        return evaluated

    def _finish(self, last_eval: dict[str, float], final_predictions: dict[str, dict[str, list]]) -> SeedResult:
        """Evaluate the final model unless the last evaluation was at the last step, add the
        method's training metrics and the measurement pass (rank 0), collect the SeedResult."""
        if not last_eval or self.history[-1].get("type") != "eval" or self.history[-1]["step"] != self.global_step:
            last_eval, final_predictions = self._evaluate_and_record()
        last_eval = {**last_eval, **self.method.training_metrics(self.model)}
        if self.dist.is_main:  # timed alone: the other ranks are done (and write nothing)
            last_eval = {**last_eval, **measure_trained_model(self.trained_run())}
        return SeedResult(
            seed=self.seed, final=last_eval, best=self.best, history=self.history,
            predictions=final_predictions, params=count_params(self.model),
            wall_time_s={**self.wall, "total": sum(self.wall.values())},
            step_time_s=float(np.mean(self.step_times)) if self.step_times else None,
            peak_memory_mb=peak_memory_mb(self.device), amp_skipped_steps=self.amp_skipped_steps,
            precision=precision_record(self.device, self.amp_dtype),
            method_metrics={**self.calibration_metrics,
                            **(self.method.write_artifacts(self.model, self.seed_dir)
                               if self.dist.is_main else {})})

    def trained_run(self) -> TrainedRun:
        """What the measurement pass reads, as plain values."""
        t = self.training
        return TrainedRun(
            model=self.model, method=self.method, device=self.device, amp_dtype=self.amp_dtype,
            evals=self.data.evals, collate=self.collate,
            eval_batch_size=t.eval_batch_size or t.batch_size,
            eval_batches=self.limits.max_batches, config=t.inference_measurement,
            max_seq_length=self.cfg.dataset.max_seq_length, model_config=self.backbone.config,
            seed_dir=self.seed_dir, run_id=self.cfg.run_id, algorithm=self.cfg.algorithm)

    def forward_backward(self, batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
        """Forward, task loss + each regulariser, backward (scaled for accumulation), for one
        batch given whole or as parts (length buckets, :func:`bucketed_batches`).

        Each part's terms are weighted by its ``loss_weight`` (its share of the batch's rows,
        times this process's share of the global batch) before its own backward, so the
        gradient is the batch's: regularisers are means over a batch's sequences or do not
        depend on the batch, and either way sum back exactly. Only the last part's backward
        synchronises gradients under DDP. Returns the detached loss terms (of the global batch
        under torchrun); raises NonFiniteLossError naming the bad term (after the backward: the
        optimizer has not stepped, and the saved last good state is the weights before it).
        """
        parts = batch if isinstance(batch, list) else [batch]
        summed: dict[str, torch.Tensor] = {}
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            sync = nullcontext() if last or not self.dist.enabled else self.train_model.no_sync()
            with sync:
                terms = self._part_forward_backward(part)
            for k, v in terms.items():
                summed[k] = summed[k] + v if k in summed else v
        logged = self.dist.mean_of_weighted(summed, 1.0)  # the terms themselves for one process
        if not torch.isfinite(sum(logged.values())):  # every rank sees the same verdict
            self._nonfinite("loss", logged)
        return logged

    def _part_forward_backward(self, part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One part's forward and backward; returns its terms × its ``loss_weight``, detached."""
        with self._autocast():
            logits = self.train_model(**model_inputs(part, self.device)).logits
        terms = {"task_loss": task_loss(logits, labels_on(part, self.device), self.task.is_regression)}
        for name, value in self.method.regularization_losses(self.model).items():
            terms[f"reg/{name}"] = value
        weight = part.get("loss_weight", 1.0)
        loss = sum(terms.values())
        if weight != 1.0:
            loss = loss * weight
        self.scaler.scale(loss / self.training.gradient_accumulation_steps).backward()
        return {k: v.detach() * weight for k, v in terms.items()}

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
        norm = clip_gradients(self.optimizer, self.training.max_grad_norm)
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
        metrics, predictions = self.evaluate_splits()
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
