"""Data-parallel training under torchrun: the per-rank shares of a global batch, the loss
weights that make DDP's gradient average the full-batch gradient, and one run on 2 gloo
processes against the same run in one process (tiny BERT, IW-LoRA: calibration and the
regulariser go through the method hooks on the unwrapped module)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rankwise.distributed import DistributedContext
from rankwise.training import checkpoint as ckpt

RUN = "proposed-DeBERTaV3-base-86-M--GLUE-MNLI"


@pytest.mark.parametrize("world, n", [(2, 8), (2, 5), (3, 7), (2, 1), (4, 3)])
def test_ranks_split_each_global_batch_and_weights_average_to_one(world, n):
    batch = list(range(100, 100 + n))
    shares = [DistributedContext(rank=r, world_size=world).shard(batch) for r in range(world)]
    real = [(rows, w) for rows, w in shares if w > 0]
    assert sorted(i for rows, _ in real for i in rows) == batch  # every row once
    for rows, w in real:
        assert w == pytest.approx(len(rows) * world / n)
    for rows, w in shares:
        if w == 0:  # an empty share runs one row of the batch that contributes nothing
            assert rows == batch[:1]
    assert sum(w for _, w in shares) / world == pytest.approx(1.0)


def test_single_process_context_is_the_identity():
    ctx = DistributedContext()
    assert ctx.shard([3, 1, 2]) == ([3, 1, 2], 1.0)
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model) is model
    terms = {"task_loss": torch.tensor(0.5)}
    assert ctx.mean_of_weighted(terms, 1.0) is terms and ctx.any_rank(True) is True


@pytest.mark.parametrize("world, n", [(2, 7), (3, 4), (2, 1)])
def test_weighted_share_losses_average_to_the_full_batch_gradient(world, n):
    """What DDP computes, (1/K) Σ_r ∇(w_r L_r + R), equals ∇(L + R) of one process."""
    torch.manual_seed(0)
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    model = torch.nn.Linear(5, 3)

    def grad(rows, weight):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
        reg = 0.1 * model.weight.square().sum()  # a weight-only regulariser
        ((loss + reg) * weight).backward()
        return torch.cat([model.weight.grad.flatten(), model.bias.grad])

    full = grad(list(range(n)), 1.0)
    shares = [DistributedContext(rank=r, world_size=world).shard(list(range(n)))
              for r in range(world)]
    averaged = sum(grad(rows, w) for rows, w in shares) / world
    torch.testing.assert_close(averaged, full, rtol=1e-6, atol=1e-7)


def test_search_is_refused_under_torchrun(monkeypatch, tmp_path):
    from rankwise.config.loader import load_job
    from rankwise.errors import ConfigError
    from rankwise.main import prepare_run_dir
    from rankwise.runner import execute

    monkeypatch.setenv("WORLD_SIZE", "2")
    job = load_job([f"run={RUN}", f"results_dir={tmp_path}", "optuna.n_trials=2"])
    with pytest.raises(ConfigError) as exc:
        execute(job, prepare_run_dir)
    assert exc.value.key == "optuna.n_trials"
    assert not any(tmp_path.iterdir())


def run_args(results: Path, glue: Path) -> list[str]:
    # 41 rows in batches of 8: the last global batch has 1 row, so rank 1's share is empty.
    return [f"run={RUN}", f"results_dir={results}", "mode=full", "model.name=tiny-bert",
            f"dataset.data_dir={glue}", "dataset.subset=rte", "dataset.splits.validation=validation",
            "dataset.max_train_samples=41", "training.epochs=2", "training.batch_size=8",
            "training.warmup_steps=0", "training.log_every_n_steps=1", "training.fp16=false",
            "optuna.n_trials=0", "model.adapter.dropout=0",
            "model.importance_weighted_regularisation.sensitivity_warmup_steps=2",
            "model.importance_weighted_regularisation.reg_alpha=0.1"]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "seed42" / "history.jsonl").read_text().splitlines()]


@pytest.mark.long  # several processes; CI's second step (pytest -m long)
def test_two_gloo_processes_train_like_one(tmp_path, fake_glue):
    from rankwise.main import main

    assert main(run_args(tmp_path / "one", fake_glue)) == 0  # the reference, in this process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # On a timeout, SIGTERM lets torchrun's agent stop its workers (they run in sessions of
    # their own); SIGKILL to the agent's group is the last resort.
    ddp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", "-m", "rankwise.main",
                            *run_args(tmp_path / "two", fake_glue)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)
    try:
        out, err = ddp.communicate(timeout=600)
    finally:
        if ddp.poll() is None:
            ddp.terminate()
            try:
                ddp.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(ddp.pid, signal.SIGKILL)
                ddp.wait()
    assert ddp.returncode == 0, err[-3000:]
    assert out.count("complete:") == 1  # rank 0 alone reports

    one, two = tmp_path / "one" / RUN, tmp_path / "two" / RUN
    h1, h2 = history(one), history(two)
    assert [r["step"] for r in h1] == [r["step"] for r in h2] and len(h1) == 12 + 2
    for a, b in zip(h1, h2):
        assert set(a) == set(b)
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (a["step"], key)
            else:
                assert b[key] == value, (a["step"], key)
    assert any(r.get("reg/iw_reg", 0) > 0 for r in h2)  # the regulariser was on
    _, s1 = ckpt.latest_valid_checkpoint(one / "seed42" / "checkpoints")
    _, s2 = ckpt.latest_valid_checkpoint(two / "seed42" / "checkpoints")
    assert s1["model"].keys() == s2["model"].keys()
    for name, weight in s1["model"].items():
        torch.testing.assert_close(s2["model"][name], weight, rtol=1e-5, atol=1e-6)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["status"] == "complete" and m2["processes"] == 2 and "processes" not in m1
    assert m2["final"]["validation_loss"] == pytest.approx(m1["final"]["validation_loss"], abs=1e-6)
    preds = (two / "predictions" / "validation" / "seed42.jsonl").read_text().splitlines()
    assert len(preds) == 40
