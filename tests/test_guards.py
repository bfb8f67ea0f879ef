"""Numerical guards: a NaN term stops the run naming the step and the term, after saving a
checkpoint of the last good state; interrupted runs are marked so."""

import json

import pytest
import torch

from rankwise.config.loader import load_job
from rankwise.errors import NonFiniteLossError
from rankwise.training import checkpoint as ckpt
from rankwise.training.loop import Trainer

RUN = "comparative-1-DeBERTaV3-base-86-M--GLUE-MNLI"


def tiny_job(fake_glue, tmp_path, *extra):
    return load_job([f"run={RUN}", f"results_dir={tmp_path}", "mode=full", "model.name=tiny-bert",
                     f"dataset.data_dir={fake_glue}", "dataset.subset=rte",
                     "dataset.splits.validation=validation", "training.epochs=1",
                     "training.batch_size=8", "training.fp16=false", *extra])


def test_nan_regulariser_stops_with_step_and_term(fake_glue, tmp_path):
    job = tiny_job(fake_glue, tmp_path)
    trainer = Trainer(job, 42, tmp_path / "seed42")
    def poisoned(model):  # NaN during the third optimizer step (each of its batch's parts)
        bad = torch.tensor(float("nan")) if trainer.global_step == 2 else torch.zeros(())
        return {"boom": bad}

    trainer.method.regularization_losses = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*reg/boom"):
        trainer.run(resume=False)
    path, state = ckpt.latest_valid_checkpoint(tmp_path / "seed42" / "checkpoints")
    assert state["global_step"] == 2  # the last good state, before the failing step
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_task_loss_is_named(fake_glue, tmp_path):
    job = tiny_job(fake_glue, tmp_path)
    trainer = Trainer(job, 42, tmp_path / "seed42")
    with torch.no_grad():
        trainer.model.classifier.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*task_loss"):
        trainer.run(resume=False)


def test_cli_marks_failed_run(fake_glue, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "rankwise.main", f"run={RUN}", f"results_dir={tmp_path}",
                           "mode=full", "model.name=tiny-bert", f"dataset.data_dir={fake_glue}",
                           "dataset.subset=rte", "dataset.splits.validation=validation",
                           "training.epochs=1", "training.learning_rate=1e30", "training.optimizer=sgd",
                           "training.max_grad_norm=null", "training.fp16=false", "optuna.n_trials=0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "non-finite" in proc.stderr.strip().splitlines()[-1]
    metrics = json.loads((tmp_path / RUN / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "non-finite" in metrics["error"]
