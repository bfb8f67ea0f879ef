"""From a validated run config to tokenised train/eval sets and batch loaders.

Rows are selected (``max_train_samples`` / ``max_eval_samples``, or the trial-mode cap)
*before* tokenising, so a trial run on MNLI never tokenises 393k rows. Tokenised sets are
cached on disk (``datasets`` arrow cache keyed by source, selection, tokenizer, length).
Batches are always padded dynamically to the longest sequence in the batch (masked padding
does not change an encoder's outputs; see tests/test_padding.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from rankwise.config.schema import DatasetConfig
from rankwise.data import glue
from rankwise.data.tasks import TaskSpec, get_task

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class EvalSplit:
    name: str  # e.g. "validation", "validation_mismatched"
    data: datasets.Dataset  # tokenised, with "labels" and "idx"


@dataclass
class TaskData:
    task: TaskSpec
    train: datasets.Dataset
    evals: list[EvalSplit]


def missing_eval_splits(cfg, task: TaskSpec) -> list[str]:
    """The task's default extra evaluation splits (MNLI's mismatched) that the source lacks."""
    if cfg.splits.extra_validation is not None:
        return []
    return [name for name in task.extra_validation
            if not (cfg.name == "glue" and glue.has_split(cfg.subset, name, cfg.data_dir))]


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    return _fingerprint(type(tokenizer).__name__, len(vocab), sorted(vocab.items())[:50],
                        getattr(tokenizer, "name_or_path", ""))


def _select(ds: datasets.Dataset, n: int | None, shuffle_seed: int | None) -> datasets.Dataset:
    if n is None or n >= len(ds):
        return ds
    if shuffle_seed is not None:
        # a seeded random subset (e.g. 4,000 SST-2 examples), independent of the run seed
        idx = np.random.default_rng(shuffle_seed).permutation(len(ds))[:n]
        return ds.select(np.sort(idx))
    return ds.select(range(n))


def _raw_split(cfg: DatasetConfig, split: str, cache_dir: Path) -> datasets.Dataset:
    if cfg.name == "glue":
        return glue.load_glue_split(cfg.subset, split, cfg.data_dir, cache_dir)
    from rankwise.data.listops import load_listops

    splits = load_listops(cfg.listops, cache_dir=cache_dir)
    if split not in splits:
        from rankwise.errors import DataError

        raise DataError(f"dataset.splits: ListOps has no split {split!r} (have: {', '.join(splits)})")
    return splits[split]


def _tokenise(ds: datasets.Dataset, task: TaskSpec, cfg: DatasetConfig, tokenizer, split: str,
              cache_dir: Path) -> datasets.Dataset:
    key = _fingerprint(cfg.name, cfg.subset, split, ds._fingerprint, tokenizer_fingerprint(tokenizer),
                       cfg.max_seq_length, cfg.preprocessing.truncation)
    cache_file = cache_dir / "tokenised" / f"{cfg.name}-{cfg.subset}-{split}-{key}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    if cfg.name == "lra":
        from rankwise.data.listops import encode_listops

        def encode(batch):
            return encode_listops(batch["source"], tokenizer, cfg.max_seq_length, cfg.preprocessing.truncation)
    else:
        def encode(batch):
            texts = [batch[c] for c in task.text_columns]
            return tokenizer(*texts, truncation=cfg.preprocessing.truncation,
                             max_length=cfg.max_seq_length, padding=False)

    if "idx" not in ds.column_names:
        ds = ds.add_column("idx", list(range(len(ds))))
    keep = {"idx", "label"}
    from rankwise.models import cache_lock

    with cache_lock(cache_file):  # one worker tokenises; the others wait and read its file
        out = ds.map(encode, batched=True, cache_file_name=str(cache_file), load_from_cache_file=True,
                     remove_columns=[c for c in ds.column_names if c not in keep],
                     desc=f"tokenising {split}")
    out = out.rename_column("label", "labels")
    if not cfg.preprocessing.truncation:
        too_long = [i for i, ids in enumerate(out["input_ids"]) if len(ids) > cfg.max_seq_length]
        if too_long:
            from rankwise.errors import DataError

            raise DataError(f"{split}: row {too_long[0]}, column 'input_ids': length exceeds "
                            f"dataset.max_seq_length={cfg.max_seq_length} with truncation off")
    return out


def load_task_data(cfg: DatasetConfig, tokenizer, cache_dir: Path, max_train: int | None = None,
                   max_eval: int | None = None, subset_seed: int = 0) -> TaskData:
    """Tokenised training set and evaluation splits for one run."""
    task = get_task(cfg.name, cfg.subset)
    if cfg.preprocessing.padding == "max_length":
        log.info("dataset.preprocessing.padding=max_length: batches are padded dynamically to the "
                 "longest sequence instead (identical outputs, less compute)")
    n_train = min(x for x in (cfg.max_train_samples, max_train, 10**12) if x is not None)
    n_eval = min(x for x in (cfg.max_eval_samples, max_eval, 10**12) if x is not None)

    def prepared(split: str, n: int, shuffle: bool, n_configured: int | None) -> datasets.Dataset:
        full = _raw_split(cfg, split, cache_dir)
        raw = _select(full, n if n < 10**12 else None, subset_seed if shuffle else None)
        if cfg.name == "glue":
            # The rows the configured run reads (trial mode trims to fewer; its check must not)
            checked = _select(full, n_configured, subset_seed if shuffle else None)
            glue.validate_rows(checked, task, split)
        return _tokenise(raw, task, cfg, tokenizer, split, cache_dir)

    train = prepared(cfg.splits.train, n_train, shuffle=True, n_configured=cfg.max_train_samples)
    eval_names = [cfg.splits.validation]
    extra = cfg.splits.extra_validation
    if extra is None:  # task default, only where the source has it (the local mirror may not)
        missing = missing_eval_splits(cfg, task)
        for name in missing:
            log.warning("extra evaluation split %s of %s not available in this source; skipped "
                        "(recorded in metrics.json task.missing_splits)", name, cfg.subset)
        eval_names += [name for name in task.extra_validation if name not in missing]
    else:
        eval_names += list(extra)
    evals = [EvalSplit(_eval_split_name(cfg, task, name),
                       prepared(name, n_eval, shuffle=False, n_configured=cfg.max_eval_samples))
             for name in eval_names]
    return TaskData(task, train, evals)


def _eval_split_name(cfg: DatasetConfig, task: TaskSpec, split: str) -> str:
    """Metric prefix of an eval split: the configured validation split is 'validation'."""
    if split == cfg.splits.validation:
        return "validation"
    return split


class DynamicPaddingCollator:
    """Pad a list of tokenised rows to the longest in the batch; labels as a tensor."""

    def __init__(self, pad_token_id: int, regression: bool, pin_memory: bool = False):
        self.pad_token_id = pad_token_id
        self.regression = regression
        self.pin_memory = pin_memory  # page-locked host tensors (CUDA: non-blocking copies)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        for key in MODEL_INPUTS:
            if key not in rows[0]:
                continue
            fill = self.pad_token_id if key == "input_ids" else 0
            out = torch.full((len(rows), longest), fill, dtype=torch.long)
            for i, r in enumerate(rows):
                out[i, : len(r[key])] = torch.as_tensor(r[key], dtype=torch.long)
            batch[key] = out
        labels = [r["labels"] for r in rows]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if self.regression else torch.long)
        batch["idx"] = torch.tensor([r["idx"] for r in rows], dtype=torch.long)
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of one epoch: a pure function of (seed, epoch), so resume is exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


MEGABATCH_BATCHES = 50  # batches per length-sorted mega-batch (HF's LengthGroupedSampler uses 50)


def row_lengths(ds: datasets.Dataset) -> list[int]:
    """Token count of every row (``input_ids``), in dataset order."""
    return [len(ids) for ids in ds.select_columns(["input_ids"])["input_ids"]]


def length_grouped_permutation(lengths: list[int], batch_size: int, seed: int, epoch: int,
                               megabatch: int = MEGABATCH_BATCHES) -> list[int]:
    """An epoch's order with batches of similar length, a pure function of (lengths, seed, epoch).

    The epoch's random permutation (:func:`epoch_permutation`) is cut into mega-batches of
    ``megabatch × batch_size`` examples; each is sorted by length (longest first, ties by
    position) and cut into batches; the full batches are then shuffled with the same seeded
    generator and the one short batch (if any) kept last, so batch b of the order is always
    ``order[b·batch_size:(b+1)·batch_size]`` and resume from a batch index is exact. Every
    example appears exactly once; each batch pads to a length close to its rows' own.
    """
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    size = megabatch * batch_size
    groups: list[list[int]] = []
    for start in range(0, n, size):
        mega = sorted(perm[start:start + size], key=lambda i: -lengths[i])
        groups += [mega[j:j + batch_size] for j in range(0, len(mega), batch_size)]
    short = [b for b in groups if len(b) < batch_size]
    full = [b for b in groups if len(b) == batch_size]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
    return [i for b in shuffled + short for i in b]


def eval_order(lengths: list[int]) -> list[int]:
    """Evaluation order: longest first (stable), so each batch pads little."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _batch_slices(order: list[int], batch_size: int, start: int, limit: int | None):
    """Batch ``b``'s indices ``order[b·batch_size:(b+1)·batch_size]`` from batch ``start``, at most ``limit``."""
    n_total = (len(order) + batch_size - 1) // batch_size
    stop = n_total if limit is None else min(n_total, limit)
    for b in range(start, stop):
        yield order[b * batch_size : (b + 1) * batch_size]


def _collated(view: datasets.Dataset, columns: list[str], idx: list[int], collate) -> dict[str, torch.Tensor]:
    chunk = view[idx]
    return collate([{k: chunk[k][i] for k in columns} for i in range(len(idx))])


def _view(ds: datasets.Dataset) -> tuple[datasets.Dataset, list[str]]:
    columns = [c for c in (*MODEL_INPUTS, "labels", "idx") if c in ds.column_names]
    return ds.select_columns(columns), columns


def batches(ds: datasets.Dataset, order: list[int], batch_size: int, collate, start: int = 0,
            limit: int | None = None, shard=None):
    """Yield collated batches of ``ds`` in ``order``, from batch ``start`` (resume), at most ``limit``.

    ``shard(indices) -> (own_indices, loss_weight)`` keeps one process's share of each global
    batch (see :mod:`rankwise.distributed`); its batches carry ``loss_weight``.
    """
    view, columns = _view(ds)
    for idx in _batch_slices(order, batch_size, start, limit):
        weight = None
        if shard is not None:
            idx, weight = shard(idx)
        batch = _collated(view, columns, idx, collate)
        if weight is not None:
            batch["loss_weight"] = weight
        yield batch


def length_buckets(idx: list[int], lengths: list[int], n: int) -> list[list[int]]:
    """``idx`` sorted by length (longest first, ties by position) and cut into ``min(n, len(idx))``
    contiguous parts that pad to the fewest tokens, Σ_parts rows × longest row (an exact
    dynamic programme over the cut points: O(len(idx)) for 2 parts, O(n·len(idx)²) at most)."""
    ranked = sorted(idx, key=lambda i: -lengths[i])
    m, k = len(ranked), max(1, min(n, len(ranked)))
    top = [lengths[i] for i in ranked]  # part [a, b) pads to top[a]
    # best[j][a]: fewest padded tokens for ranked[a:] in exactly j parts; cut[j][a]: its first cut
    best = [[math.inf] * (m + 1) for _ in range(k + 1)]
    cut = [[m] * (m + 1) for _ in range(k + 1)]
    best[1] = [(m - a) * top[a] for a in range(m)] + [math.inf]  # one part: ranked[a:]
    for j in range(2, k + 1):
        starts = range(m - j, -1, -1) if j < k else (0,)  # the last layer only from the start
        for a in starts:
            for b in range(a + 1, m - j + 2):
                cost = (b - a) * top[a] + best[j - 1][b]
                if cost < best[j][a]:
                    best[j][a], cut[j][a] = cost, b
    parts, a = [], 0
    for j in range(k, 0, -1):
        b = cut[j][a]
        parts.append(ranked[a:b])
        a = b
    return parts


def bucketed_batches(ds: datasets.Dataset, order: list[int], batch_size: int, collate,
                     lengths: list[int], buckets: int, start: int = 0, limit: int | None = None,
                     shard=None):
    """Yield each batch of :func:`batches` as a list of length-sorted parts.

    The batch (this process's share of it under ``shard``) is sorted by length and cut into
    ``buckets`` parts (:func:`length_buckets`), each padded to its own longest row; part ``j``
    carries ``loss_weight`` = (its rows / the batch's rows) × the shard's weight, so the
    weighted part losses sum to the batch's mean loss. The batch's rows, and so its gradient,
    are those of the plain batch: only the padding changes (masked padding does not change an
    encoder's outputs).
    """
    view, columns = _view(ds)
    for idx in _batch_slices(order, batch_size, start, limit):
        weight = 1.0
        if shard is not None:
            idx, weight = shard(idx)
        parts = []
        for part in length_buckets(idx, lengths, buckets):
            batch = _collated(view, columns, part, collate)
            batch["loss_weight"] = weight * len(part) / len(idx)
            parts.append(batch)
        yield parts


def n_batches(n: int, batch_size: int, limit: int | None = None) -> int:
    total = (n + batch_size - 1) // batch_size
    return total if limit is None else min(total, limit)
