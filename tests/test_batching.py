"""Length-grouped training order, length-sorted evaluation order, the fused/foreach AdamW
choice and the CPU fallback of the pinned collator."""

from __future__ import annotations

import random

import pytest
import torch

from rankwise.data.loading import (DynamicPaddingCollator, epoch_permutation, eval_order,
                                   length_grouped_permutation, row_lengths)


def lengths_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 64) for _ in range(n)]


def padded_tokens(order: list[int], lengths: list[int], bs: int) -> int:
    return sum(max(lengths[i] for i in order[b:b + bs]) * len(order[b:b + bs])
               for b in range(0, len(order), bs))


@pytest.mark.parametrize("n,bs", [(1000, 32), (1003, 32), (40, 8), (7, 8)])
def test_grouped_order_is_a_permutation_with_the_short_batch_last(n, bs):
    lengths = lengths_of(n)
    order = length_grouped_permutation(lengths, bs, seed=3, epoch=1, megabatch=5)
    assert sorted(order) == list(range(n))
    # a pure function of (lengths, seed, epoch): resume recomputes the same order
    assert order == length_grouped_permutation(lengths, bs, seed=3, epoch=1, megabatch=5)
    assert order != length_grouped_permutation(lengths, bs, seed=3, epoch=2, megabatch=5) or n < 9


def test_batches_come_from_one_sorted_megabatch():
    n, bs, mega = 960, 16, 6
    lengths = lengths_of(n, seed=1)
    order = length_grouped_permutation(lengths, bs, seed=0, epoch=0, megabatch=mega)
    perm = epoch_permutation(n, seed=0, epoch=0)  # the same generator's first draw
    chunks = [set(perm[i:i + mega * bs]) for i in range(0, n, mega * bs)]
    for b in range(0, n, bs):
        batch = order[b:b + bs]
        home = [c for c in chunks if batch[0] in c][0]
        assert set(batch) <= home  # the batch was cut from one mega-batch
        # and it is a contiguous slice of that mega-batch sorted by length
        ranked = sorted(home, key=lambda i: (-lengths[i], perm.index(i)))
        start = ranked.index(batch[0])
        assert batch == ranked[start:start + bs]


def test_grouping_cuts_padding_and_shuffles_batches():
    n, bs = 4000, 32
    lengths = lengths_of(n, seed=2)
    plain = epoch_permutation(n, seed=5, epoch=0)
    grouped = length_grouped_permutation(lengths, bs, seed=5, epoch=0)
    assert padded_tokens(grouped, lengths, bs) < 0.75 * padded_tokens(plain, lengths, bs)
    # batch order is shuffled: the first batch's length is not always the longest
    first = [max(lengths[i] for i in length_grouped_permutation(lengths, bs, 5, e)[:bs])
             for e in range(8)]
    assert len(set(first)) > 1


def test_trainer_orders_batches_as_configured(fake_glue, tmp_path):
    from rankwise.config.loader import load_job
    from rankwise.training.loop import Trainer

    def trainer(*extra):
        job = load_job(["run=minilm-sst2-lora", f"results_dir={tmp_path}", "model.name=tiny-bert",
                        f"dataset.data_dir={fake_glue}", "dataset.max_train_samples=null",
                        "training.batch_size=4", *extra])
        return Trainer(job, 7, tmp_path / "seed7")

    grouped = trainer("training.length_grouping=megabatch", "training.length_megabatch=3")
    lengths = row_lengths(grouped.data.train)
    assert len(set(lengths)) > 3  # the fake rows differ in length, so the orders below differ
    expect = length_grouped_permutation(lengths, 4, seed=7, epoch=1, megabatch=3)
    assert grouped.epoch_order(1) == expect
    assert expect != length_grouped_permutation(lengths, 4, seed=7, epoch=1, megabatch=24)
    for extra in ("training.group_by_length=false", "training.length_grouping=within_batch"):
        # plain order (within_batch sorts inside each batch, tests/test_length_buckets.py)
        assert trainer(extra).epoch_order(1) == epoch_permutation(len(lengths), seed=7, epoch=1)


def test_eval_order_longest_first_and_stable():
    lengths = [3, 9, 9, 1, 5]
    assert eval_order(lengths) == [1, 2, 4, 0, 3]


def test_collator_pins_only_when_asked():
    rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1, "idx": 0},
            {"input_ids": [4], "attention_mask": [1], "labels": 0, "idx": 1}]
    batch = DynamicPaddingCollator(0, False)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert not batch["input_ids"].is_pinned()
    if torch.cuda.is_available():
        assert DynamicPaddingCollator(0, False, pin_memory=True)(rows)["input_ids"].is_pinned()


@pytest.mark.parametrize("impl,expect", [("auto", {"fused": True}), ("foreach", {"foreach": True}),
                                         ("for_loop", {"foreach": False}), ("fused", {"fused": True})])
def test_adam_kernel_choice(impl, expect):
    from rankwise.training.optim import adam_kernel

    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))]}]
    assert adam_kernel(groups, impl) == expect


def test_fused_adamw_matches_the_reference_update():
    """torch's fused AdamW (what ``auto`` picks on CPU) against AdamW's closed-form update."""
    from rankwise.config.schema import TrainingConfig
    from rankwise.training.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    cfg = TrainingConfig(learning_rate=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert all(g.get("fused") for g in opt.param_groups)
    w0 = model.weight.detach().clone()
    g = torch.randn_like(w0)
    model.weight.grad, model.bias.grad = g.clone(), torch.zeros(4)
    opt.step()
    b1, b2, eps, lr, wd = cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, 1e-2, 0.1
    m, v = (1 - b1) * g, (1 - b2) * g * g
    ref = w0 * (1 - lr * wd) - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    torch.testing.assert_close(model.weight.detach(), ref, rtol=1e-6, atol=1e-7)
