"""Within-batch length buckets: a batch run as length-sorted parts, each padded to its own
longest row and weighted by its share of rows, gives the whole batch's loss terms and
gradient (checked against the batch run whole, with every random draw switched off)."""

from __future__ import annotations

import itertools
import random

import datasets
import pytest
import torch
from torch import nn

from rankwise.data.loading import DynamicPaddingCollator, batches, bucketed_batches, length_buckets
from rankwise.methods import registered_methods
from rankwise.methods.iw_lora import ImportanceWeighted


def _fewest_padded_tokens(sorted_lengths: list[int], k: int) -> int:
    """Brute force over every way to cut the sorted lengths into k contiguous parts."""
    m = len(sorted_lengths)
    best = None
    for cuts in itertools.combinations(range(1, m), k - 1):
        bounds = (0, *cuts, m)
        cost = sum((b - a) * sorted_lengths[a] for a, b in itertools.pairwise(bounds))
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("n,k,seed", [(12, 3, 0), (13, 4, 1), (10, 2, 2), (3, 4, 3), (1, 1, 4),
                                      (9, 9, 5), (14, 1, 6)])
def test_buckets_partition_the_batch_with_the_fewest_padded_tokens(n, k, seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 50) for _ in range(100)]
    idx = rng.sample(range(100), n)
    parts = length_buckets(idx, lengths, k)
    assert len(parts) == min(k, n) and all(parts)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == sorted(idx)
    ranked = sorted((lengths[i] for i in idx), reverse=True)
    assert [lengths[i] for i in flat] == ranked  # longest first, cut into contiguous parts
    padded = sum(len(p) * max(lengths[i] for i in p) for p in parts)
    assert padded == _fewest_padded_tokens(ranked, min(k, n))


def _dataset(lengths: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "input_ids": [[7 + (j % 5) for j in range(n)] for n in lengths],
        "attention_mask": [[1] * n for n in lengths],
        "labels": [i % 2 for i in range(len(lengths))],
        "idx": list(range(len(lengths))),
    })


@pytest.mark.parametrize("shard_weight", [None, 0.75])
def test_parts_hold_the_batch_rows_padded_to_their_own_longest(shard_weight):
    lengths = [random.Random(i).randint(2, 40) for i in range(20)]
    ds, collate = _dataset(lengths), DynamicPaddingCollator(0, regression=False)
    order = list(range(20))[::-1]
    shard = None if shard_weight is None else (lambda idx: (idx, shard_weight))
    plain = list(batches(ds, order, 8, collate))
    split = list(bucketed_batches(ds, order, 8, collate, lengths, 3, shard=shard))
    assert len(split) == len(plain) == 3
    for whole, parts in zip(plain, split):
        assert sorted(torch.cat([p["idx"] for p in parts]).tolist()) == sorted(whole["idx"].tolist())
        for p in parts:
            rows = p["idx"].tolist()
            assert p["input_ids"].shape[1] == max(lengths[i] for i in rows)  # its own longest
            assert p["loss_weight"] == pytest.approx((shard_weight or 1.0) * len(rows) / len(whole["idx"]))
        assert sum(p["loss_weight"] for p in parts) == pytest.approx(shard_weight or 1.0)
    # the padded tokens shrink: the point of the buckets
    padded = sum(p["input_ids"].numel() for parts in split for p in parts)
    assert padded < sum(b["input_ids"].numel() for b in plain)


# --- gradients: parts vs the whole batch ----------------------------------------------------
def _trainer(fake_glue, tmp_path, method: str, *extra, adapter: dict | None = None):
    import copy

    from rankwise.bench.train import method_variant
    from rankwise.config.loader import load_job
    from rankwise.training.loop import Trainer

    job = load_job(["run=minilm-sst2-lora", f"results_dir={tmp_path}", "model.name=tiny-bert",
                    f"dataset.data_dir={fake_glue}", "dataset.max_train_samples=null",
                    "training.batch_size=14", *extra])
    job = method_variant(job, method)
    if adapter:
        d = copy.deepcopy(job.run_dict)
        d["model"]["adapter"].update(adapter)
        job = job.with_run(d)
    return Trainer(job, 3, tmp_path / method)


def _no_random_draws(trainer, monkeypatch) -> None:
    """Dropout off everywhere and HardConcrete gates at their noise-free value (u = ½), so
    the whole batch and its parts see the same function."""
    from rankwise.methods.spectral.gates import HardConcreteGate

    for m in trainer.model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for cfg in (getattr(trainer.model, "config", None), getattr(trainer.backbone, "config", None)):
        if cfg is not None and hasattr(cfg, "attention_probs_dropout_prob"):
            cfg.attention_probs_dropout_prob = 0.0

    def noiseless(self, logits, generator=None):
        s = torch.sigmoid(logits.float() / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    monkeypatch.setattr(HardConcreteGate, "sample", noiseless)


def _grads(trainer, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    trainer.optimizer.zero_grad(set_to_none=True)
    terms = trainer.forward_backward(batch)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in terms.items()}, grads


@pytest.mark.parametrize("method", list(registered_methods()))
def test_parts_give_the_whole_batch_gradient(fake_glue, tmp_path, monkeypatch, method):
    """Every registered method that says its rows are independent (the default) keeps the
    batch's gradient when the batch runs as length buckets."""
    live_budget = {"budget_tokens": 1} if method == "tabs" else None  # a non-zero budget penalty
    trainer = _trainer(fake_glue, tmp_path, method, adapter=live_budget)
    if not trainer.method.rows_independent:
        pytest.skip(f"{method} keeps batches whole (test_batch_shared_draws_keep_the_batch_whole)")
    _no_random_draws(trainer, monkeypatch)
    weighted = isinstance(trainer.method, ImportanceWeighted)
    if weighted:  # a non-zero IW regulariser: coefficients as calibration would set
        trainer.method.coefficients = torch.linspace(0.5, 2.0, len(trainer.method.names))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # factors that start at zero (B, E) made non-zero: every gradient live
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name or "lora_E" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    trainer.model.train()
    assert trainer.method.rows_independent
    lengths = trainer.train_lengths()
    order = list(range(len(lengths)))
    whole = next(iter(batches(trainer.data.train, order, 14, trainer.collate)))
    parts = next(iter(bucketed_batches(trainer.data.train, order, 14, trainer.collate, lengths, 4)))
    # parts of different sizes and padded lengths: each part's weight is its share of rows
    assert len({len(p["idx"]) for p in parts}) > 1 and len({p["input_ids"].shape[1] for p in parts}) > 1
    terms_whole, grads_whole = _grads(trainer, whole)
    terms_parts, grads_parts = _grads(trainer, parts)
    assert terms_parts.keys() == terms_whole.keys()
    if weighted or method in ("adalora", "tabs"):
        reg = [k for k in terms_whole if k.startswith("reg/")]
        assert reg and all(terms_whole[k] > 0 for k in reg), terms_whole
    for k in terms_whole:
        assert terms_parts[k] == pytest.approx(terms_whole[k], rel=1e-5, abs=1e-7), k
    assert grads_parts.keys() == grads_whole.keys() and grads_whole
    for n, g in grads_whole.items():
        torch.testing.assert_close(grads_parts[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_batch_shared_draws_keep_the_batch_whole(fake_glue, tmp_path):
    bhsp = _trainer(fake_glue, tmp_path, "bhsp")
    assert not bhsp.method.rows_independent  # one static gate sample per forward
    assert all(len(parts) == 1 for parts in bhsp.epoch_batches(0))
    lora = _trainer(fake_glue, tmp_path, "lora", "training.length_buckets=3")
    assert all(len(parts) == 3 for parts in lora.epoch_batches(0))
    deberta = _trainer(fake_glue, tmp_path, "tabs", "model.name=tiny-deberta")
    assert not deberta.method.rows_independent  # position rows gated once per forward
    assert _trainer(fake_glue, tmp_path, "spectral", "model.name=tiny-deberta").method.rows_independent


def test_grouping_off_or_megabatch_runs_whole_batches(fake_glue, tmp_path):
    for extra in ("training.group_by_length=false", "training.length_grouping=megabatch",
                  "training.length_buckets=1"):
        trainer = _trainer(fake_glue, tmp_path, "lora", extra)
        assert all(len(parts) == 1 for parts in trainer.epoch_batches(0)), extra
