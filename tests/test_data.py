"""GLUE loading from a local mirror: selection before tokenising, caching, corrupt rows."""

import pandas as pd
import pytest

from rankwise.config.schema import DatasetConfig, SplitsConfig
from rankwise.data.loading import DynamicPaddingCollator, batches, epoch_permutation, load_task_data
from rankwise.errors import DataError
from rankwise.models import load_backbone


@pytest.fixture(scope="module")
def tok():
    return load_backbone("tiny-bert", 2)[1]


def cfg(root, subset="rte", **kw):
    splits = kw.pop("splits", SplitsConfig(train="train", validation="validation"))
    return DatasetConfig(name="glue", subset=subset, splits=splits, data_dir=str(root), max_seq_length=16, **kw)


def test_select_before_tokenising_and_cache(fake_glue, tok, tmp_path):
    data = load_task_data(cfg(fake_glue, max_train_samples=10, max_eval_samples=7), tok, tmp_path)
    assert len(data.train) == 10 and len(data.evals[0].data) == 7
    assert max(len(x) for x in data.train["input_ids"]) <= 16
    cached = list((tmp_path / "tokenised").glob("*.arrow"))
    assert len(cached) == 2  # only the selected rows were tokenised and cached
    again = load_task_data(cfg(fake_glue, max_train_samples=10, max_eval_samples=7), tok, tmp_path)
    assert again.train["input_ids"] == data.train["input_ids"]
    assert sorted((tmp_path / "tokenised").glob("*.arrow")) == sorted(cached)


def test_mnli_evaluates_both_dev_splits_when_present(fake_glue, tok, tmp_path):
    splits = SplitsConfig(train="train", validation="validation_matched")
    data = load_task_data(cfg(fake_glue, subset="mnli", splits=splits), tok, tmp_path)
    assert [e.name for e in data.evals] == ["validation", "validation_mismatched"]


def test_missing_split_names_the_split(fake_glue, tok, tmp_path):
    with pytest.raises(DataError, match="'test_matched'.*available: train, validation"):
        load_task_data(cfg(fake_glue, splits=SplitsConfig(train="train", validation="test_matched")), tok, tmp_path)


@pytest.mark.parametrize("corrupt,expected", [
    (lambda df: df.assign(label=df.label.where(df.index != 3, 7)), "row 3, column 'label'"),
    (lambda df: df.assign(sentence1=df.sentence1.where(df.index != 5, "  ")), "row 5, column 'sentence1': empty"),
    (lambda df: df.drop(columns=["sentence2"]), "missing column 'sentence2'"),
])
def test_corrupt_rows_are_named(fake_glue, tok, tmp_path, corrupt, expected):
    root = tmp_path / "glue"
    (root / "rte").mkdir(parents=True)
    for split in ("train", "validation"):
        df = pd.read_parquet(fake_glue / "rte" / f"{split}-00000-of-00001.parquet")
        (corrupt(df) if split == "train" else df).to_parquet(root / "rte" / f"{split}-00000-of-00001.parquet")
    with pytest.raises(DataError, match=expected):
        load_task_data(cfg(root), tok, tmp_path / "cache")


def test_dynamic_padding_and_epoch_order(fake_glue, tok, tmp_path):
    data = load_task_data(cfg(fake_glue), tok, tmp_path)
    collate = DynamicPaddingCollator(tok.pad_token_id, regression=False)
    order = epoch_permutation(len(data.train), seed=1, epoch=0)
    assert order == epoch_permutation(len(data.train), seed=1, epoch=0)
    assert order != epoch_permutation(len(data.train), seed=1, epoch=1)
    first = list(batches(data.train, order, 8, collate, limit=3))
    resumed = list(batches(data.train, order, 8, collate, start=1, limit=3))
    assert len(first) == 3 and len(resumed) == 2
    assert first[1]["idx"].tolist() == resumed[0]["idx"].tolist()
    b = first[0]
    longest = max(len(data.train[i]["input_ids"]) for i in order[:8])
    assert b["input_ids"].shape == (8, longest)
    assert int(b["attention_mask"].sum(1).max()) == longest
    assert b["input_ids"][b["attention_mask"] == 0].eq(tok.pad_token_id).all()


def test_no_mirror_and_no_hub_is_one_clear_line(tok, tmp_path, monkeypatch):
    monkeypatch.delenv("RANKWISE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="dataset.data_dir"):
        load_task_data(DatasetConfig(name="glue", subset="rte"), tok, tmp_path)


def test_missing_mnli_mismatched_is_recorded(fake_glue, tok, tmp_path):
    import shutil

    from rankwise.data.loading import missing_eval_splits
    from rankwise.data.tasks import get_task

    mirror = tmp_path / "glue"
    shutil.copytree(fake_glue / "mnli", mirror / "mnli")
    splits = SplitsConfig(train="train", validation="validation_matched")
    task = get_task("glue", "mnli")
    assert missing_eval_splits(cfg(mirror, subset="mnli", splits=splits), task) == []
    (mirror / "mnli" / "validation_mismatched-00000-of-00001.parquet").unlink()
    dataset = cfg(mirror, subset="mnli", splits=splits)
    assert missing_eval_splits(dataset, task) == ["validation_mismatched"]
    data = load_task_data(dataset, tok, tmp_path)
    assert [e.name for e in data.evals] == ["validation"]
