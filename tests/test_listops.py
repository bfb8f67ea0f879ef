"""LRA ListOps: generator vs independent evaluators and an exact length distribution,
split hygiene, cache reuse, tokenisation (standalone and mapped onto backbones)."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections import Counter

import numpy as np
import pytest

from rankwise.config.schema import ListOpsConfig
from rankwise.data import listops
from rankwise.data.listops import (
    ListOpsTokenizer,
    check_length_fits,
    encode_listops,
    evaluate_listops,
    load_listops,
    max_sample_length,
)
from rankwise.errors import ConfigError, DataError

SMALL = ListOpsConfig(min_length=20, max_length=100, n_train=2000, n_validation=200, n_test=200)
OPERATOR_NAMES = {"[MIN", "[MAX", "[MED", "[SM"}


# --- an independent reading of the printed expression ---------------------------------
def parse(source: str):
    """Recursive-descent parse into ``int`` leaves and ``(operator, [children])`` nodes."""
    tokens = source.split()

    def node(i: int):
        if tokens[i] in OPERATOR_NAMES:
            op, children, i = tokens[i], [], i + 1
            while tokens[i] != "]":
                child, i = node(i)
                children.append(child)
            return (op, children), i + 1
        assert tokens[i] in {str(d) for d in range(10)}, tokens[i]
        return int(tokens[i]), i + 1

    tree, end = node(0)
    assert end == len(tokens), "trailing tokens"
    return tree


def tree_value(tree) -> int:
    """LRA's own semantics: MED is ``int(np.median(args))``."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    args = [tree_value(c) for c in children]
    return {"[MIN": min, "[MAX": max, "[MED": lambda a: int(np.median(a)),
            "[SM": lambda a: int(np.sum(a)) % 10}[op](args)


def tree_depth(tree) -> int:
    return 1 if isinstance(tree, int) else 1 + max(tree_depth(c) for c in tree[1])


def arg_counts(tree) -> list[int]:
    if isinstance(tree, int):
        return []
    return [len(tree[1])] + [n for c in tree[1] for n in arg_counts(c)]


def exact_length_distribution(cfg: ListOpsConfig) -> np.ndarray:
    """P(L = l) for l < cap and P(L >= cap) in the last cell, cap = cfg.max_length, by
    dynamic programming over depths (deepest first) of the LRA tree process."""
    cap, p = cfg.max_length, cfg.operator_prob
    n_counts = cfg.max_args - cfg.min_args + 1

    def clip(dist: np.ndarray) -> np.ndarray:  # fold the mass beyond cap into cell cap
        out = dist[: cap + 1].copy()
        out[cap] += dist[cap + 1:].sum()
        return out

    digit = np.zeros(cap + 1)
    digit[1] = 1.0
    subtree = digit
    for _ in range(cfg.max_depth - 1):
        operator = np.zeros(cap + 1)
        children = np.zeros(cap + 1)
        children[0] = 1.0
        for n in range(1, cfg.max_args + 1):
            children = clip(np.convolve(children, subtree))
            if n >= cfg.min_args:
                operator += clip(np.concatenate([[0.0, 0.0], children])) / n_counts
        subtree = (1 - p) * digit + p * operator
    return subtree


# --- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_listops(tmp_path_factory):
    return load_listops(SMALL, tmp_path_factory.mktemp("listops-cache"))


# --- generation -------------------------------------------------------------------------
def test_labels_equal_two_independent_evaluators(small_listops):
    for split in ("train", "validation", "test"):
        ds = small_listops[split]
        for source, label in zip(ds["source"], ds["label"]):
            assert evaluate_listops(source) == label, source
            assert tree_value(parse(source)) == label, source


def test_evaluator_on_hand_computed_expressions():
    assert evaluate_listops("[MAX 2 9 [MIN 4 7 ] 0 ]") == 9
    assert evaluate_listops("[MED 2 5 ]") == 3  # floor of 3.5, as int(np.median) in LRA
    assert evaluate_listops("[MED 1 2 3 4 ]") == 2  # floor of 2.5
    assert evaluate_listops("[MED 7 0 9 ]") == 7
    assert evaluate_listops("[SM 9 9 9 ]") == 7
    assert evaluate_listops("[MIN [SM 5 6 ] [MAX 3 [MED 8 8 0 ] ] 4 ]") == 1
    assert evaluate_listops("6") == 6
    for malformed in ("[MAX 1", "1 2", "]", "[FOO 1 ]", "[MAX ]", "[MIN 1 ] ]"):
        with pytest.raises(ValueError):
            evaluate_listops(malformed)


def test_lengths_inside_window_and_labels_cover_all_classes(small_listops):
    for split in ("train", "validation", "test"):
        lengths = [len(s.split()) for s in small_listops[split]["source"]]
        assert SMALL.min_length < min(lengths) and max(lengths) < SMALL.max_length
    train_labels = set(small_listops["train"]["label"])
    assert train_labels == set(range(10)), Counter(small_listops["train"]["label"])
    assert small_listops["train"].features["label"].names == [str(d) for d in range(10)]


def test_split_sizes_and_no_duplicates_within_or_across_splits(small_listops):
    sizes = {s: len(small_listops[s]) for s in ("train", "validation", "test")}
    assert sizes == {"train": SMALL.n_train, "validation": SMALL.n_validation,
                     "test": SMALL.n_test}
    every = [s for split in sizes for s in small_listops[split]["source"]]
    assert len(set(every)) == len(every)


def test_no_duplicates_where_the_process_repeats_itself_often(tmp_path):
    # Only 400 + 4000 expressions of length 4 or 5 exist: undeduplicated draws would
    # repeat many of the length-4 ones.
    cfg = ListOpsConfig(min_length=3, max_length=6, max_depth=2, min_args=2, max_args=3,
                        n_train=1500, n_validation=150, n_test=150)
    ds = load_listops(cfg, tmp_path)
    every = [s for split in ("train", "validation", "test") for s in ds[split]["source"]]
    assert len(every) == 1800 and len(set(every)) == len(every)
    assert Counter(len(s.split()) for s in every)[4] > 200


def test_structure_respects_operators_arguments_and_depth(tmp_path):
    cfg = ListOpsConfig(min_length=10, max_length=200, max_depth=4, min_args=3, max_args=5,
                        operator_prob=0.5, n_train=600, n_validation=10, n_test=10, seed=3)
    ds = load_listops(cfg, tmp_path)
    depths, counts, operators = Counter(), Counter(), Counter()
    for source in ds["train"]["source"]:
        tree = parse(source)
        depths[tree_depth(tree)] += 1
        counts.update(arg_counts(tree))
        operators.update(t for t in source.split() if t.startswith("["))
    assert max(depths) == cfg.max_depth  # reached, never exceeded
    assert set(counts) == {3, 4, 5}  # every allowed count occurs, no other
    assert set(operators) == OPERATOR_NAMES
    # Uniform operator choice: each within 5 binomial standard deviations of 1/4.
    total = sum(operators.values())
    for n in operators.values():
        assert abs(n - total / 4) < 5 * math.sqrt(total * 3 / 16)


def test_sampler_length_distribution_matches_exact_dynamic_programme():
    cfg = dataclasses.replace(SMALL, seed=11)
    exact = exact_length_distribution(cfg)
    assert exact.sum() == pytest.approx(1.0, abs=1e-12)
    sample = listops.make_expression_sampler(cfg, random.Random(cfg.seed))
    n_draws = 20_000
    lengths = []
    for _ in range(n_draws):
        drawn = sample()
        lengths.append(cfg.max_length if drawn is None else len(drawn[0]))
    lengths = np.array(lengths)
    events = {
        "digit root": (lengths == 1, exact[1]),
        "in window": ((lengths > cfg.min_length) & (lengths < cfg.max_length),
                      exact[cfg.min_length + 1: cfg.max_length].sum()),
        "abandoned": (lengths == cfg.max_length, exact[cfg.max_length]),
        "4 <= L <= 12": ((lengths >= 4) & (lengths <= 12), exact[4:13].sum()),
    }
    for name, (hits, p) in events.items():
        sigma = math.sqrt(p * (1 - p) / n_draws)
        assert abs(hits.mean() - p) < 5 * sigma, (name, hits.mean(), p)
    assert exact[1] == pytest.approx(1 - cfg.operator_prob)


def test_same_seed_same_splits_other_seed_different(tmp_path, small_listops):
    again = load_listops(SMALL, tmp_path / "a")  # fresh cache: generated again
    for split in ("train", "validation", "test"):
        assert again[split]["source"] == small_listops[split]["source"]
        assert again[split]["label"] == small_listops[split]["label"]
    other = load_listops(dataclasses.replace(SMALL, seed=1), tmp_path / "b")
    shared = set(other["train"]["source"]) & set(small_listops["train"]["source"])
    assert len(shared) < 0.05 * SMALL.n_train


def test_cache_written_once_then_reused(tmp_path, monkeypatch):
    cfg = dataclasses.replace(SMALL, n_train=300, n_validation=20, n_test=20)
    monkeypatch.setenv("RANKWISE_CACHE_DIR", str(tmp_path))
    first = load_listops(cfg)  # default location: $RANKWISE_CACHE_DIR/listops/<hash>
    folder = tmp_path / "listops" / listops.listops_cache_key(cfg)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["generation.json", "test.parquet", "train.parquet", "validation.parquet"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def must_not_generate(_cfg):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(listops, "generate_listops", must_not_generate)
    second = load_listops(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert second["train"]["source"] == first["train"]["source"]
    # Another config lands in another folder (and would need generating).
    assert listops.listops_cache_key(dataclasses.replace(cfg, seed=5)) != folder.name
    with pytest.raises(AssertionError, match="regenerated"):
        load_listops(dataclasses.replace(cfg, seed=5))
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "listops").iterdir())


def test_infeasible_or_exhausted_configs_fail_clearly(tmp_path, monkeypatch):
    # Depth 2 with at most 3 arguments: at most 5 tokens, so 5 < L is impossible.
    tiny = ListOpsConfig(min_length=5, max_length=50, max_depth=2, max_args=3)
    with pytest.raises(ConfigError) as err:
        load_listops(tiny, tmp_path)
    assert err.value.key == "dataset.listops.min_length"
    # Only 4 operators x 10 x 10 expressions of length 4 exist; ask for more.
    few = ListOpsConfig(min_length=3, max_length=5, max_depth=2, min_args=2, max_args=2,
                        n_train=450, n_validation=1, n_test=1)
    monkeypatch.setattr(listops, "MAX_FRUITLESS_ATTEMPTS", 20_000)
    with pytest.raises(DataError, match="only 400 distinct"):
        load_listops(few, tmp_path)


def test_max_sample_length_against_explicit_longest_tree():
    def longest_tree(depth: int, max_depth: int, max_args: int) -> str:
        if depth == max_depth:
            return "9"
        inner = " ".join(longest_tree(depth + 1, max_depth, max_args) for _ in range(max_args))
        return f"[SM {inner} ]"

    for max_depth, max_args in [(1, 2), (2, 3), (3, 4), (5, 3)]:
        cfg = ListOpsConfig(min_length=1, max_length=10_000, max_depth=max_depth,
                            max_args=max_args)
        expected = len(longest_tree(1, max_depth, max_args).split())
        assert max_sample_length(cfg) == expected
    assert max_sample_length(ListOpsConfig()) == 1999


# --- tokenisation -----------------------------------------------------------------------
SOURCE = "[MAX 2 9 [MIN 4 7 ] [MED 1 2 ] [SM 8 5 ] 0 ]"


def test_standalone_tokenizer_one_id_per_symbol_round_trip_and_save_load(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = ListOpsTokenizer.standalone()
    assert tok.vocab_size == 4 + 15
    assert sorted(tok.symbol_to_id.values()) == list(range(4, 19))
    ids = tok.encode(SOURCE)
    assert len(ids) == len(SOURCE.split()) + 2
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids) == SOURCE
    # The HF tokenizer on the raw text agrees with the symbol lookup ...
    assert tok.hf_tokenizer(SOURCE)["input_ids"] == ids
    assert "token_type_ids" not in tok.hf_tokenizer(SOURCE)
    # ... and survives save/load.
    tok.hf_tokenizer.save_pretrained(tmp_path)
    reloaded = ListOpsTokenizer.for_backbone(PreTrainedTokenizerFast.from_pretrained(tmp_path))
    assert reloaded.symbol_to_id == tok.symbol_to_id
    assert reloaded.hf_tokenizer(SOURCE)["input_ids"] == ids
    assert reloaded.hf_tokenizer.convert_ids_to_tokens(ids[1:-1]) == SOURCE.split()


def test_encode_listops_truncation_and_unknown_symbols():
    tok = ListOpsTokenizer.standalone()
    n = len(SOURCE.split())
    enc = encode_listops([SOURCE, "[MIN 3 1 ]"], tok, max_length=64, truncation=False)
    assert [len(x) for x in enc["input_ids"]] == [n + 2, 6]
    assert enc["attention_mask"] == [[1] * (n + 2), [1] * 6]
    cut = encode_listops([SOURCE], tok, max_length=6, truncation=True)["input_ids"][0]
    assert cut == tok.encode(" ".join(SOURCE.split()[:4]))
    with pytest.raises(DataError, match="row 0"):
        encode_listops([SOURCE], tok, max_length=6, truncation=False)
    with pytest.raises(DataError, match="unknown symbol '\\[FOO'"):
        encode_listops(["[FOO 1 ]"], tok, max_length=64, truncation=False)


def test_mapping_onto_tiny_bert_vocabulary():
    from rankwise.models import load_backbone

    _, hf_tok = load_backbone("tiny-bert", 10)
    tok = ListOpsTokenizer.for_backbone(hf_tok)
    assert tok.symbol_to_token == {"[MIN": "MIN", "[MAX": "MAX", "[MED": "MED", "[SM": "SM",
                                   "]": "]", **{str(d): str(d) for d in range(10)}}
    ids = encode_listops([SOURCE], hf_tok, max_length=64, truncation=False)["input_ids"][0]
    assert len(ids) == len(SOURCE.split()) + 2
    assert ids[0] == hf_tok.cls_token_id and ids[-1] == hf_tok.sep_token_id
    # Independent check: the backbone's own tokenizer on the spelled-out words.
    words = " ".join(tok.symbol_to_token[s] for s in SOURCE.split())
    assert hf_tok(words)["input_ids"] == ids
    assert tok.decode(ids) == SOURCE


def test_mapping_onto_minilm_vocabulary():
    from rankwise.models import load_backbone

    model, hf_tok = load_backbone("minilm", 10)
    tok = ListOpsTokenizer.for_backbone(hf_tok)
    assert [tok.symbol_to_token[s] for s in ("[MIN", "[MAX", "[MED", "[SM", "]")] == [
        "min", "max", "med", "sm", "]"]
    assert len(set(tok.symbol_to_id.values())) == 15
    ids = encode_listops([SOURCE], tok, max_length=512, truncation=False)["input_ids"][0]
    words = " ".join(tok.symbol_to_token[s] for s in SOURCE.split())
    assert hf_tok(words)["input_ids"] == ids
    assert max(ids) < model.config.vocab_size


def test_backbone_without_a_symbol_fails_naming_the_key():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "min", "max",
                                         "med", "]", *map(str, range(10))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                     cls_token="[CLS]", sep_token="[SEP]")
    with pytest.raises(ConfigError) as err:
        ListOpsTokenizer.for_backbone(hf_tok, key="model.tokenizer")
    assert err.value.key == "model.tokenizer" and "'[SM'" in err.value.message


def test_length_check_names_the_key():
    check_length_fits(512, 512)
    check_length_fits(128, 512, listops=SMALL)  # longest 99 + 2 special
    with pytest.raises(ConfigError) as err:
        check_length_fits(1024, 512)
    assert err.value.key == "dataset.max_seq_length" and "512" in err.value.message
    with pytest.raises(ConfigError) as err:  # LRA default lengths need 2001 positions
        check_length_fits(512, 512, listops=ListOpsConfig())
    assert err.value.key == "dataset.max_seq_length" and "2001" in err.value.message
    with pytest.raises(ConfigError) as err:
        check_length_fits(100, 512, key="data.len", listops=SMALL)
    assert err.value.key == "data.len"


def test_statistics_median_matches_numpy_on_even_counts():
    # The evaluator uses statistics.median, the reference tree_value np.median: both must
    # floor the mean of the two middle values, as LRA does.
    rng = np.random.default_rng(0)
    for _ in range(200):
        args = rng.integers(0, 10, size=int(rng.integers(2, 11))).tolist()
        assert int(statistics.median(args)) == int(np.median(args))
        assert evaluate_listops("[MED " + " ".join(map(str, args)) + " ]") == int(np.median(args))


def test_generated_files_are_in_the_requested_cache_root(tmp_path):
    cfg = dataclasses.replace(SMALL, n_train=50, n_validation=5, n_test=5, seed=9)
    load_listops(cfg, tmp_path)
    folder = tmp_path / "listops" / listops.listops_cache_key(cfg)
    assert listops.listops_cache_dir(cfg, tmp_path) == folder
    assert (folder / "train.parquet").exists()
