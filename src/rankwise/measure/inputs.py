"""Fixed-shape (batch, length) inputs for measurements: every position is a real token.

- :func:`token_stream_batch`: the token ids of real examples (e.g. the evaluation set),
  concatenated into one stream and cut into rows of ``length``, so gates see the token mix
  they were trained on; the stream is repeated when it is shorter than batch × length.
- :func:`random_token_batch`: uniformly drawn non-special ids, ``[CLS] … [SEP]`` framed, from a
  fixed seed (the benchmark, which needs no dataset).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch


def max_input_length(config) -> int | None:
    """Longest input the backbone accepts; ``None`` for relative positions only (DeBERTa)."""
    relative_only = getattr(config, "relative_attention", False) and not getattr(
        config, "position_biased_input", True)
    if relative_only:
        return None
    return getattr(config, "max_position_embeddings", None)


def _batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def token_stream_batch(rows: Iterable[Sequence[int]], batch_size: int, length: int) -> dict[str, torch.Tensor]:
    rows = [list(r) for r in rows if len(r)]
    if not rows:
        raise ValueError("no token ids to build a batch from")
    needed = batch_size * length
    stream = list(itertools.islice(itertools.cycle(itertools.chain.from_iterable(rows)), needed))
    return _batch(torch.tensor(stream, dtype=torch.long).view(batch_size, length))


def random_token_batch(tokenizer, batch_size: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
    g = torch.Generator().manual_seed(seed * 1_000_003 + length)
    ids = vocab[torch.randint(len(vocab), (batch_size, length), generator=g)]
    if length >= 2 and tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
        ids[:, 0] = tokenizer.cls_token_id
        ids[:, -1] = tokenizer.sep_token_id
    return _batch(ids)
