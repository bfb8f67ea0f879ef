"""LRA ListOps: generator, evaluator, on-disk cache and a one-id-per-symbol tokenizer.

ListOps (Nangia & Bowman 2018) in the Long Range Arena form (Tay et al. 2021) is a
10-way classification of nested prefix expressions over the digits 0-9::

    [MAX 2 9 [MIN 4 7 ] 0 ]   ->   9

Operators (each takes ``min_args..max_args`` arguments, default 2..10):

- ``[MIN`` / ``[MAX``: minimum / maximum of the arguments,
- ``[MED``: the median *as LRA computes it*, ``int(np.median(args))``. For an odd count
  that is the middle value; for an even count ``np.median`` averages the two middle values
  and ``int`` truncates, i.e. ``floor((a_(n/2) + a_(n/2+1)) / 2)`` on the sorted arguments
  (``[MED 2 5 ]`` is 3, neither the lower (2) nor the upper (5) middle). We keep LRA's
  definition so labels mean the same thing as in the benchmark,
- ``[SM``: sum modulo 10.

Generative process (LRA's ``generate_tree``). A node at depth ``d`` (root: ``d = 1``) is an
operator with probability ``operator_prob`` if ``d < max_depth``, else a uniform digit. An
operator draws its symbol uniformly from the four, its argument count ``n`` uniformly
from ``{min_args, ..., max_args}`` and its ``n`` arguments as independent nodes at depth
``d + 1``. So the *depth* of an expression, the number of nodes on its longest
root-to-leaf path (digits included; ``[MAX 1 2 ]`` has depth 2), is at most
``max_depth``. The printed length ``L`` counts tokens: 2 per operator (``[OP`` and its
``]``) and 1 per digit. A sample is kept iff ``min_length < L < max_length``.

With the LRA defaults (``operator_prob = 0.25``, 2..10 arguments: 1.5 expected operator
children per operator) the process is supercritical, so lengths are bimodal: most trees
are tiny, a few would explode to ~10^9 tokens without the depth limit. Rejection sampling
is therefore cheap *if* a tree is abandoned as soon as it reaches ``max_length`` tokens;
conditioned on acceptance the samples have exactly LRA's distribution (the abandoned
trees would have been rejected anyway). For the default 500 < L < 2000, 8.3% of trees
are kept (2.4% for 20 < L < 100); these rates follow from an exact dynamic programme over
the length distribution, which the tests check the sampler against.

Samples are de-duplicated across all three splits (the printed source identifies the
tree), assigned in generation order to train, validation, test, and the whole set is a
deterministic function of the config (``random.Random(seed)``, one stream). Generated
splits are written once to ``<cache>/listops/<config hash>/{split}.parquet`` and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rankwise.config.schema import ListOpsConfig
from rankwise.config.typed import join, require
from rankwise.errors import ConfigError, DataError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

MIN, MAX, MED, SUM_MOD = "[MIN", "[MAX", "[MED", "[SM"
OPERATORS: tuple[str, ...] = (MIN, MAX, MED, SUM_MOD)
CLOSE = "]"
DIGITS: tuple[str, ...] = tuple(str(v) for v in range(10))
SYMBOLS: tuple[str, ...] = OPERATORS + (CLOSE,) + DIGITS
LABEL_NAMES: list[str] = list(DIGITS)
SPLITS: tuple[str, ...] = ("train", "validation", "test")

CONFIG_PATH = "dataset.listops"
# Bump when the generator's output for a given config changes: it is part of the cache key.
GENERATOR_VERSION = 1
# Give up when this many consecutive trees bring no new distinct in-range sample: the
# config admits (almost) no more distinct expressions than already found.
MAX_FRUITLESS_ATTEMPTS = 2_000_000


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------
def _lra_median(args: list[int]) -> int:
    """``int(np.median(args))`` for non-negative integers, by sorting (see module doc)."""
    ordered = sorted(args)
    n = len(ordered)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) // 2


_OPERATOR_VALUE: tuple[Callable[[list[int]], int], ...] = (
    min,
    max,
    _lra_median,
    lambda args: sum(args) % 10,
)


class _ReachedMaxLength(Exception):
    """Raised inside the sampler as soon as a tree cannot satisfy ``L < max_length``."""


def longest_possible_expression(max_depth: int, max_args: int) -> int:
    """Length in tokens of the longest expression the process can produce.

    T(max_depth) = 1 (a digit); T(d) = 2 + max_args · T(d + 1); the answer is T(1).
    """
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


def max_sample_length(cfg: ListOpsConfig) -> int:
    """Longest printed expression (in tokens, no special tokens) a config can yield."""
    return min(cfg.max_length - 1, longest_possible_expression(cfg.max_depth, cfg.max_args))


def make_expression_sampler(
    cfg: ListOpsConfig, rng: random.Random
) -> Callable[[], tuple[list[str], int] | None]:
    """Return ``sample()`` drawing one tree: ``(tokens, label)`` or ``None`` if it reached
    ``max_length`` tokens (abandoned early; it would be rejected anyway).

    The label is computed bottom-up while the tree grows, independently of
    :func:`evaluate_listops`. Draws use ``int(rng.random() * k)`` (uniform on
    ``{0..k-1}`` up to 2^-53) because it is several times faster than ``randrange``.
    """
    max_depth, operator_prob, max_length = cfg.max_depth, cfg.operator_prob, cfg.max_length
    min_args, n_arg_counts = cfg.min_args, cfg.max_args - cfg.min_args + 1
    draw = rng.random

    def grow(depth: int, tokens: list[str]) -> int:
        if depth < max_depth and draw() < operator_prob:
            op = int(draw() * 4)
            n_args = min_args + int(draw() * n_arg_counts)
            tokens.append(OPERATORS[op])
            args = [grow(depth + 1, tokens) for _ in range(n_args)]
            tokens.append(CLOSE)
            if len(tokens) >= max_length:
                raise _ReachedMaxLength
            return _OPERATOR_VALUE[op](args)
        value = int(draw() * 10)
        tokens.append(DIGITS[value])
        if len(tokens) >= max_length:
            raise _ReachedMaxLength
        return value

    def sample() -> tuple[list[str], int] | None:
        tokens: list[str] = []
        try:
            label = grow(1, tokens)
        except _ReachedMaxLength:
            return None
        return tokens, label

    return sample


def check_listops_feasible(cfg: ListOpsConfig, path: str = CONFIG_PATH) -> None:
    """Fail early when no expression can satisfy the length window."""
    cfg.validate(path)
    longest = longest_possible_expression(cfg.max_depth, cfg.max_args)
    require(
        longest > cfg.min_length,
        join(path, "min_length"),
        f"no expression with max_depth={cfg.max_depth}, max_args={cfg.max_args} is longer "
        f"than {longest} tokens, so none satisfies min_length ({cfg.min_length}) < L",
    )


def generate_listops(cfg: ListOpsConfig) -> Iterator[tuple[str, int]]:
    """Yield ``n_train + n_validation + n_test`` distinct ``(source, label)`` pairs in order.

    Raises DataError if ``MAX_FRUITLESS_ATTEMPTS`` consecutive trees bring nothing new.
    """
    check_listops_feasible(cfg)
    sample = make_expression_sampler(cfg, random.Random(cfg.seed))
    n_total = cfg.n_train + cfg.n_validation + cfg.n_test
    # 16-byte digests instead of the sources themselves keep memory flat at full size
    # (collision probability ~1e-29 for 10^5 samples).
    seen: set[bytes] = set()
    fruitless = 0
    while len(seen) < n_total:
        drawn = sample()
        fruitless += 1
        if drawn is None or len(drawn[0]) <= cfg.min_length:
            pass
        else:
            source = " ".join(drawn[0])
            digest = hashlib.blake2b(source.encode(), digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                fruitless = 0
                yield source, drawn[1]
        if fruitless >= MAX_FRUITLESS_ATTEMPTS:
            raise DataError(
                f"ListOps: only {len(seen)} distinct expressions with {cfg.min_length} < L < "
                f"{cfg.max_length} found after {MAX_FRUITLESS_ATTEMPTS} fruitless draws, "
                f"{n_total} requested; widen the length window or lower n_train/n_validation/"
                "n_test"
            )


# --------------------------------------------------------------------------------------
# Evaluation of a printed expression (independent of the generator's bookkeeping)
# --------------------------------------------------------------------------------------
def evaluate_listops(source: str) -> int:
    """Value of a printed ListOps expression, e.g. ``"[MAX 2 9 [MIN 4 7 ] 0 ]"`` -> 9.

    A shift-reduce pass over the tokens; ``[MED`` is LRA's ``int(statistics.median(...))``
    (equal to ``int(np.median(...))``). Raises ValueError on a malformed expression.
    """
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for position, token in enumerate(source.split()):
        if result is not None:
            raise ValueError(f"token {token!r} at {position} after the complete expression")
        if token in OPERATORS:
            stack.append((token, []))
            continue
        if token == CLOSE:
            if not stack:
                raise ValueError(f"unmatched ']' at token {position}")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"operator {op} closed without arguments at token {position}")
            if op == MIN:
                value = min(args)
            elif op == MAX:
                value = max(args)
            elif op == MED:
                value = int(statistics.median(args))
            else:
                value = sum(args) % 10
        elif token in DIGITS:
            value = int(token)
        else:
            raise ValueError(f"unknown ListOps token {token!r} at {position}")
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    if stack or result is None:
        raise ValueError(f"incomplete expression: {len(stack)} operator(s) left open")
    return result


# --------------------------------------------------------------------------------------
# Cache and datasets.DatasetDict
# --------------------------------------------------------------------------------------
def listops_cache_key(cfg: ListOpsConfig) -> str:
    """Hash of the generation config (and generator version): the cache folder name."""
    payload = {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(cfg)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def listops_cache_dir(cfg: ListOpsConfig, cache_dir: Path | None = None) -> Path:
    """``<cache_dir or $RANKWISE_CACHE_DIR>/listops/<config hash>``."""
    from rankwise.models import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "listops" / listops_cache_key(cfg)


def _write_splits(cfg: ListOpsConfig, out: Path, chunk_rows: int = 8192) -> dict[str, float]:
    """Generate and stream the three splits to ``out/{split}.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("source", pa.string()), ("label", pa.int64())])
    sizes = {"train": cfg.n_train, "validation": cfg.n_validation, "test": cfg.n_test}
    samples = generate_listops(cfg)
    start = time.perf_counter()
    for split in SPLITS:
        with pq.ParquetWriter(out / f"{split}.parquet", schema) as writer:
            remaining = sizes[split]
            while remaining:
                rows = [next(samples) for _ in range(min(chunk_rows, remaining))]
                remaining -= len(rows)
                writer.write_table(
                    pa.table({"source": [r[0] for r in rows], "label": [r[1] for r in rows]},
                             schema=schema)
                )
        logger.info("ListOps %s: %d samples (%.1fs)", split, sizes[split],
                    time.perf_counter() - start)
    return {"generation_seconds": time.perf_counter() - start}


def ensure_listops_cache(cfg: ListOpsConfig, cache_dir: Path | None = None) -> Path:
    """Generate the splits once into the cache folder; return that folder.

    Written to a temporary sibling and renamed into place, so an interrupted or concurrent
    generation never leaves a half-written cache behind.
    """
    final = listops_cache_dir(cfg, cache_dir)
    if (final / "generation.json").exists():
        return final
    from rankwise.models import cache_lock

    with cache_lock(final):  # one worker generates; the others wait for its folder
        if (final / "generation.json").exists():
            return final
        return _generate_into(cfg, final)


def _generate_into(cfg: ListOpsConfig, final: Path) -> Path:
    check_listops_feasible(cfg)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        stats = _write_splits(cfg, staging)
        meta = {"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg), **stats}
        (staging / "generation.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            staging.rename(final)
        except OSError:  # another process finished first; its splits are identical
            if not (final / "generation.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load_listops(cfg: ListOpsConfig, cache_dir: Path | None = None) -> datasets.DatasetDict:
    """ListOps splits ``train``/``validation``/``test`` with columns ``source`` (str) and
    ``label`` (ClassLabel "0".."9"), generated on first use and read from the cache after.

    ``cache_dir`` is the rankwise cache root (default ``$RANKWISE_CACHE_DIR``, else
    ``~/.cache/rankwise``); the files go to ``<cache_dir>/listops/<config hash>/``.
    """
    import datasets
    import pyarrow.parquet as pq

    folder = ensure_listops_cache(cfg, cache_dir)
    features = datasets.Features(
        {"source": datasets.Value("string"), "label": datasets.ClassLabel(names=LABEL_NAMES)}
    )
    splits = {}
    for split in SPLITS:
        table = pq.read_table(folder / f"{split}.parquet")
        # ClassLabel is stored as int64, so the table is used as-is (no cast or copy).
        info = datasets.DatasetInfo(features=features)
        splits[split] = datasets.Dataset(table, info=info, split=datasets.NamedSplit(split))
    return datasets.DatasetDict(splits)


# --------------------------------------------------------------------------------------
# Tokenisation: exactly one id per ListOps symbol
# --------------------------------------------------------------------------------------
STANDALONE_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")

# Backbone vocabulary tokens tried for each symbol, in order. The bracket of an operator
# carries no information beyond its ``]`` partner's existence, so ``[MIN`` maps to a word
# meaning "min" when the vocabulary has no "[MIN" token. Each spelling is also tried with
# a word-start marker first: SentencePiece's "▁" and byte-level BPE's "Ġ" (a bare piece
# is a word-*continuation* in those vocabularies), while in WordPiece the bare token is
# the word start.
BACKBONE_SPELLINGS: dict[str, tuple[str, ...]] = {
    MIN: (MIN, "MIN", "min"),
    MAX: (MAX, "MAX", "max"),
    MED: (MED, "MED", "med", "median"),
    SUM_MOD: (SUM_MOD, "SM", "sm", "sum"),
    CLOSE: (CLOSE,),
    **{d: (d,) for d in DIGITS},
}
WORD_START_MARKERS: tuple[str, ...] = ("▁", "Ġ", "")


def build_standalone_hf_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A WordLevel ``PreTrainedTokenizerFast`` over [PAD] [UNK] [CLS] [SEP] + the 15
    ListOps symbols (ids 0..18), whitespace pre-tokenised, ``[CLS] ... [SEP]`` template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(STANDALONE_SPECIAL_TOKENS + SYMBOLS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


@dataclasses.dataclass(frozen=True)
class ListOpsTokenizer:
    """Maps each ListOps symbol to exactly one vocabulary id of ``hf_tokenizer``.

    - :meth:`standalone`: a 19-token WordLevel vocabulary for randomly initialised models
      (``hf_tokenizer`` can be saved with ``save_pretrained`` and reloaded with
      ``PreTrainedTokenizerFast.from_pretrained`` + :meth:`for_backbone`);
    - :meth:`for_backbone`: each symbol is an existing token of a pretrained backbone's
      vocabulary (see ``BACKBONE_SPELLINGS``; BERT/MiniLM: ``[MIN`` -> "min", ``[SM`` ->
      "sm", ``]`` -> "]", digits -> digits).

    Encoding never runs the backbone's own text tokenizer: sources are split on
    whitespace and looked up, so one symbol is always one position.
    """

    symbol_to_id: Mapping[str, int]
    symbol_to_token: Mapping[str, str]  # the vocabulary token each symbol became
    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    hf_tokenizer: PreTrainedTokenizerBase

    @classmethod
    def standalone(cls, model_max_length: int = 4096) -> ListOpsTokenizer:
        return cls.for_backbone(build_standalone_hf_tokenizer(model_max_length))

    @classmethod
    def for_backbone(
        cls, tokenizer: PreTrainedTokenizerBase, key: str = "model.name"
    ) -> ListOpsTokenizer:
        """Pick one vocabulary id per symbol; ConfigError(``key``) if a symbol has none or
        two symbols would share one."""
        vocab = tokenizer.get_vocab()
        unk_id = tokenizer.unk_token_id
        symbol_to_id: dict[str, int] = {}
        symbol_to_token: dict[str, str] = {}
        for symbol, spellings in BACKBONE_SPELLINGS.items():
            candidates = [marker + s for s in spellings for marker in WORD_START_MARKERS]
            found = next((c for c in candidates if c in vocab and vocab[c] != unk_id), None)
            if found is None:
                raise ConfigError(
                    key,
                    f"the backbone tokenizer has no single vocabulary token for ListOps symbol "
                    f"{symbol!r} (tried {', '.join(map(repr, candidates))}); use a backbone "
                    "whose vocabulary has them or a random-init model with "
                    "ListOpsTokenizer.standalone()",
                )
            symbol_to_id[symbol], symbol_to_token[symbol] = vocab[found], found
        specials = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id,
                    "pad": tokenizer.pad_token_id}
        missing = [name for name, i in specials.items() if i is None]
        if missing:
            raise ConfigError(key, f"the backbone tokenizer defines no {'/'.join(missing)} token")
        ids = list(symbol_to_id.values())
        clashes = {i for i in ids if ids.count(i) > 1} | (set(ids) & set(specials.values()))
        if clashes:
            raise ConfigError(key, f"ListOps symbols would share vocabulary ids {sorted(clashes)}")
        return cls(symbol_to_id, symbol_to_token, specials["cls"], specials["sep"],
                   specials["pad"], tokenizer)

    @property
    def vocab_size(self) -> int:
        """Embedding rows a model needs for these ids."""
        return len(self.hf_tokenizer)

    def encode(
        self, source: str, max_length: int | None = None, truncation: bool = False
    ) -> list[int]:
        """``[CLS] s_1 ... s_L [SEP]`` ids. Longer than ``max_length``: keep the first
        ``max_length - 2`` symbols if ``truncation`` (the label is then generally no longer
        determined by the input), else raise DataError."""
        symbols = source.split()
        try:
            ids = [self.symbol_to_id[s] for s in symbols]
        except KeyError as exc:
            raise DataError(f"ListOps source has unknown symbol {exc.args[0]!r}") from None
        if max_length is not None and len(ids) + 2 > max_length:
            if not truncation:
                raise DataError(
                    f"ListOps source of {len(ids)} symbols (+2 special) exceeds max_length "
                    f"{max_length} and truncation is off"
                )
            ids = ids[: max_length - 2]
        return [self.cls_token_id, *ids, self.sep_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode` on symbol ids; special ids are dropped."""
        id_to_symbol = {i: s for s, i in self.symbol_to_id.items()}
        specials = {self.cls_token_id, self.sep_token_id, self.pad_token_id}
        return " ".join(id_to_symbol[i] for i in ids if i not in specials)


def encode_listops(
    sources: list[str],
    tokenizer: ListOpsTokenizer | PreTrainedTokenizerBase,
    max_length: int,
    truncation: bool,
) -> dict[str, list[list[int]]]:
    """``input_ids`` (``[CLS]`` + one id per symbol + ``[SEP]``) and ``attention_mask``,
    unpadded (batches are padded by the collator). A plain HF tokenizer is mapped with
    :meth:`ListOpsTokenizer.for_backbone` first."""
    if not isinstance(tokenizer, ListOpsTokenizer):
        tokenizer = ListOpsTokenizer.for_backbone(tokenizer)
    input_ids = []
    for row, source in enumerate(sources):
        try:
            input_ids.append(tokenizer.encode(source, max_length, truncation))
        except DataError as exc:
            raise DataError(f"row {row}, column 'source': {exc}") from None
    return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids]}


def check_length_fits(
    max_seq_length: int,
    model_max_positions: int | None,
    key: str = "dataset.max_seq_length",
    listops: ListOpsConfig | None = None,
) -> None:
    """ConfigError(``key``) unless the encoded ListOps sequences fit the backbone.

    ``max_seq_length`` is the length the run encodes to (``dataset.max_seq_length``);
    it must not exceed ``model_max_positions`` (e.g. ``config.max_position_embeddings``;
    ``None`` for relative positions only, which have no limit).
    With ``listops`` given it must also hold the longest sample plus [CLS] and [SEP], for every
    backbone and with truncation on or off: a truncated expression loses operands and closing
    brackets, so its label is no longer a function of the input.
    """
    if model_max_positions is not None:
        require(
            max_seq_length <= model_max_positions,
            key,
            f"{max_seq_length} exceeds the backbone's {model_max_positions} position embeddings; "
            f"lower it (and dataset.listops.max_length to at most {model_max_positions - 1}) or "
            "use a backbone with more positions",
        )
    if listops is not None:
        needed = max_sample_length(listops) + 2
        at_most = "" if model_max_positions is None else f" (at most {model_max_positions})"
        require(
            needed <= max_seq_length,
            key,
            f"ListOps samples reach {needed - 2} tokens, {needed} with [CLS]/[SEP], but "
            f"max_seq_length is {max_seq_length}; raise it{at_most} "
            f"or lower {CONFIG_PATH}.max_length to {max_seq_length - 1}",
        )