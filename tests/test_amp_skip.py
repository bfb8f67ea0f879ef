"""fp16 overflow: a step the GradScaler skips advances nothing (scheduler, global step, method
hooks) and is counted. AdaLoRA trained through the real loop with one injected inf gradient
still prunes to its budget. The GradScaler is the CPU one (``torch.amp.GradScaler("cpu")``),
whose skip logic is the CUDA one's."""

from __future__ import annotations

import json
import math

import torch

from rankwise.config.loader import load_job
from rankwise.training.loop import Trainer

RUN = "cpu-comparative-2-MiniLM-L6--GLUE-SST-2"
OVERFLOW_BATCH = 6  # the 6th optimizer step (0-based step 5) gets an inf gradient


def adalora_job(results, glue, *extra):
    return load_job([f"run={RUN}", f"results_dir={results}", "mode=full", "model.name=tiny-bert",
                     f"dataset.data_dir={glue}", "dataset.max_train_samples=96",
                     "training.epochs=2", "training.batch_size=8", "training.seeds=[3]",
                     "training.warmup_steps=0", "training.warmup_ratio=null",
                     "training.save_strategy=no", "training.log_every_n_steps=1",
                     "training.inference_measurement.enabled=false", "model.adapter.deltaT=1",
                     "optuna.n_trials=0", *extra])


def lora_e_params(model):
    return [p for n, p in model.named_parameters() if "lora_E" in n]


def with_overflow(trainer: Trainer, at_batch: int):
    """Make the backward of the ``at_batch``-th batch (1-based) of the first epoch leave an inf
    in one lora_E gradient (E = 0 there early on, so peft's |E · grad| score would be
    0 · inf = NaN if the hook ran). Keyed by data position, so a resumed run overflows on the
    same batch as an uninterrupted one."""
    original = trainer.forward_backward

    def forward_backward(batch):
        terms = original(batch)
        if trainer.epoch == 0 and trainer.batch_in_epoch == at_batch - 1:
            lora_e_params(trainer.model)[0].grad[0] = math.inf
        return terms

    trainer.forward_backward = forward_backward


def test_peft_scores_turn_nan_on_an_inf_gradient(tiny_bert):
    """The failure the loop guards against, on peft itself: one importance update with an inf
    gradient on a zero E leaves NaN in the smoothed importance, which never recovers."""
    from peft import AdaLoraConfig, TaskType, get_peft_model

    backbone, _ = tiny_bert
    model = get_peft_model(backbone, AdaLoraConfig(
        task_type=TaskType.SEQ_CLS, init_r=4, target_r=2, tinit=0, tfinal=1, total_step=10,
        deltaT=1, target_modules=["query", "value"]))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    name, e = next((n, p) for n, p in model.named_parameters() if "lora_E" in n)
    assert float(e.detach().abs().sum()) == 0.0
    e.grad[0] = math.inf
    model.base_model.rankallocator.update_ipt(model)
    for _ in range(3):  # later finite updates do not wash it out
        e.grad.zero_()
        model.base_model.rankallocator.update_ipt(model)
    assert torch.isnan(model.base_model.rankallocator.exp_avg_ipt[name]).any()


def test_skipped_fp16_step_advances_nothing_and_adalora_still_prunes(tmp_path, fake_glue):
    job = adalora_job(tmp_path, fake_glue)
    trainer = Trainer(job, 3, tmp_path / "seed3")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    with_overflow(trainer, OVERFLOW_BATCH)
    hook_steps = []
    on_step = trainer.method.on_optimizer_step

    def recording_hook(model, global_step):
        hook_steps.append(global_step)
        for n, t in model.base_model.rankallocator.exp_avg_ipt.items():
            assert torch.isfinite(t).all(), (global_step, n)
        return on_step(model, global_step)

    trainer.method.on_optimizer_step = recording_hook
    result = trainer.run(resume=False)

    planned = 2 * math.ceil(96 / 8)  # 2 epochs of 12 batches, computed from the sizes
    assert trainer.total_steps == planned
    assert result.amp_skipped_steps == trainer.amp_skipped_steps == 1
    assert trainer.global_step == planned - 1  # the skipped step was not counted
    assert trainer.scheduler.last_epoch == planned - 1  # nor stepped the schedule
    assert trainer.scaler.get_scale() == 2.0**9  # backed off once, never grew (interval 1000)
    assert hook_steps == list(range(planned - 1))  # one hook per real step, none repeated
    assert all(p.grad is None for p in trainer.model.parameters())  # cleared after the skip
    steps = [r["step"] for r in result.history if "loss" in r]
    assert steps == list(range(1, planned))

    allocator = trainer.model.base_model.rankallocator
    for n, t in allocator.exp_avg_ipt.items():
        assert torch.isfinite(t).all(), n
    # Pruned to the budget: target_r kept triplets per matrix in total (read from the model's
    # own E vectors, not from the method's report).
    kept = sum(int((e.detach() != 0).sum()) for e in lora_e_params(trainer.model))
    n_matrices = len(lora_e_params(trainer.model))
    assert kept == job.run.model.adapter.target_r * n_matrices
    assert result.method_metrics["adalora_rank_total"] == kept


def test_amp_skipped_steps_reach_metrics_json(tmp_path, fake_glue, monkeypatch):
    """Per seed in ``per_seed`` and summed at the top level of metrics.json."""
    from rankwise import runner

    original_init = Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        with_overflow(self, OVERFLOW_BATCH if self.seed == 3 else 2 * OVERFLOW_BATCH)
        if self.seed == 4:
            with_overflow(self, 3)  # seed 4: two overflows

    monkeypatch.setattr(Trainer, "__init__", init)
    job = adalora_job(tmp_path, fake_glue, "training.seeds=[3,4]", "training.epochs=1")
    from rankwise.main import prepare_run_dir

    runner.execute(job, prepare_run_dir)
    metrics = json.loads((job.run_dir / "metrics.json").read_text())
    assert metrics["per_seed"]["3"]["amp_skipped_steps"] == 1
    assert metrics["per_seed"]["4"]["amp_skipped_steps"] == 2
    assert metrics["amp_skipped_steps"] == 3
    assert "amp_skipped_steps" not in metrics["final"]


def test_resume_after_a_skipped_step_matches_an_uninterrupted_run(tmp_path, fake_glue):
    """Interrupted after the skipped step and resumed from the checkpoint: same step count,
    skip count, AdaLoRA pattern and weights as the run that never stopped."""
    from rankwise.training.loop import RunInterrupted, StopFlag

    def trainer(folder):
        job = adalora_job(tmp_path / folder, fake_glue, "training.save_strategy=steps",
                          "training.save_every_n_steps=1")
        t = Trainer(job, 3, tmp_path / folder / "seed3")
        t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        with_overflow(t, OVERFLOW_BATCH)
        return t

    plain = trainer("plain")
    plain.run(resume=False)

    first, stop = trainer("resumed"), StopFlag()
    hook = first.method.on_optimizer_step

    def stop_after_step_8(model, global_step):
        hook(model, global_step)
        if global_step == 7:  # 0-based: the 8th real update, after the skipped batch
            stop.signal = 15

    first.method.on_optimizer_step = stop_after_step_8
    try:
        first.run(resume=False, stop=stop)
    except RunInterrupted:
        pass
    assert first.global_step == 8 and first.amp_skipped_steps == 1
    second = trainer("resumed")
    second.run(resume=True)
    assert second.amp_skipped_steps == plain.amp_skipped_steps == 1
    assert second.global_step == plain.global_step and second.scheduler.last_epoch == plain.scheduler.last_epoch
    assert second.method.rank_pattern(second.model) == plain.method.rank_pattern(plain.model)
    ours = dict(second.model.named_parameters())
    for name, p in plain.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ours[name]), name
