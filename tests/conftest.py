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
