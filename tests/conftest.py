import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GLUE_DIR = Path(os.environ.get("RANKWISE_TEST_GLUE_DIR", SHARED / "data" / "glue"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep tiny models, tokenised data and SVD caches out of the user's cache."""
    cache = tmp_path_factory.mktemp("rankwise-cache")
    old = os.environ.get("RANKWISE_CACHE_DIR")
    os.environ["RANKWISE_CACHE_DIR"] = str(cache)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield cache
    if old is None:
        os.environ.pop("RANKWISE_CACHE_DIR", None)
    else:
        os.environ["RANKWISE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def glue_dir():
    if not (GLUE_DIR / "rte" / "train-00000-of-00001.parquet").exists():
        pytest.skip(f"GLUE mirror not found at {GLUE_DIR}")
    return GLUE_DIR


def _tiny(alias):
    from rankwise.models import load_backbone

    torch.manual_seed(0)
    return load_backbone(alias, num_labels=2)


@pytest.fixture
def tiny_bert():
    """(model, tokenizer): 2-layer hidden-32 random BERT."""
    return _tiny("tiny-bert")


@pytest.fixture
def tiny_deberta():
    """(model, tokenizer): 2-layer hidden-32 random DeBERTa-v2."""
    return _tiny("tiny-deberta")


WORDS = ["the", "a", "movie", "is", "good", "bad", "not", "it", "was", "and", "of", "to", "in"]


def write_fake_glue(root: Path, task: str, split: str, n: int, seed: int = 0, num_labels: int = 2,
                    columns=("sentence1", "sentence2")) -> Path:
    """A small GLUE-layout parquet file whose label is learnable from the text."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(num_labels))
        cue = ["bad", "good", "movie"][label]
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + f" {cue}" for _ in columns]
        rows.append({**dict(zip(columns, texts)), "label": label, "idx": i})
    path = root / task / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="session")
def fake_glue(tmp_path_factory):
    """Local GLUE mirror with small fake rte, sst2 and mnli (incl. both MNLI dev splits)."""
    root = tmp_path_factory.mktemp("glue")
    for split, n in (("train", 96), ("validation", 40)):
        write_fake_glue(root, "rte", split, n, seed=hash(split) % 100)
        write_fake_glue(root, "sst2", split, n, seed=hash(split) % 100 + 1, columns=("sentence",))
    for split, n in (("train", 96), ("validation_matched", 40), ("validation_mismatched", 40)):
        write_fake_glue(root, "mnli", split, n, seed=len(split), num_labels=3, columns=("premise", "hypothesis"))
    return root
