import os
from pathlib import Path

import pytest
import torch

# Before any test module imports huggingface_hub / datasets / transformers (they read these once,
# at import): every hub lookup fails at once instead of retrying an unreachable network for ~50 s.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GLUE_DIR = Path(os.environ.get("RANKWISE_TEST_GLUE_DIR", SHARED / "data" / "glue"))


def release_together(procs: list, ready: list[Path], go: Path, timeout: int = 300,
                     start_timeout: int = 180) -> list[tuple[str, str]]:
    """Wait until every process has touched its ``ready`` file, touch ``go`` so they proceed at
    once, and return their (stdout, stderr); a process that dies early fails with its output."""
    import time

    try:
        deadline = time.monotonic() + start_timeout
        while not all(r.exists() for r in ready):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "workers did not get ready in time"
            time.sleep(0.05)
        go.touch()
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep tiny models, tokenised data and SVD caches out of the user's cache."""
    cache = tmp_path_factory.mktemp("rankwise-cache")
    old = os.environ.get("RANKWISE_CACHE_DIR")
    os.environ["RANKWISE_CACHE_DIR"] = str(cache)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield cache
    if old is None:
        os.environ.pop("RANKWISE_CACHE_DIR", None)
    else:
        os.environ["RANKWISE_CACHE_DIR"] = old



def draw_gate_parameters(model, seed: int, std: float) -> None:
    """Redraw every spectral gate controller / log α of ``model`` from N(0, std²) under
    ``seed``, so that some gates open at evaluation and some stay shut (ungated layers are
    left alone)."""
    from rankwise.methods.spectral import spectral_layers

    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in spectral_layers(model).values():
            for p in (layer.gate_source.parameters() if layer.gate_source is not None else []):
                p.normal_(0, std)


def history_share(history_file, name: str) -> float:
    """A regulariser's share of the training loss from a step log, mean over its logged steps."""
    import json

    rows = [json.loads(line) for line in history_file.read_text().splitlines()]
    rows = [r for r in rows if f"reg/{name}" in r and "task_loss" in r]
    return sum(r[f"reg/{name}"] / (r["task_loss"] + sum(v for k, v in r.items() if k.startswith("reg/")))
               for r in rows) / len(rows)


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
    for split, n, seed in (("train", 96, 11), ("validation", 40, 23)):  # fixed: the same rows every run
        write_fake_glue(root, "rte", split, n, seed=seed)
        write_fake_glue(root, "sst2", split, n, seed=seed + 1, columns=("sentence",))
    for split, n in (("train", 96), ("validation_matched", 40), ("validation_mismatched", 40)):
        write_fake_glue(root, "mnli", split, n, seed=len(split), num_labels=3, columns=("premise", "hypothesis"))
    return root


POSTGRES_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "postgres_local.sh"


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL storage URL: ``$RANKWISE_TEST_POSTGRES_URL``, else a throwaway server on
    127.0.0.1 started by scripts/postgres_local.sh (skips, saying why, when none can start)."""
    import shutil
    import socket
    import subprocess
    import tempfile

    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("no PostgreSQL driver: pip install -e '.[postgres]'")
    url = os.environ.get("RANKWISE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Under /tmp rather than pytest's private tmp folder: as root the server runs as another
    # user, who must be able to reach it.
    pg_dir = tempfile.mkdtemp(prefix="rankwise-pg-")
    env = {**os.environ, "RANKWISE_PG_DIR": pg_dir, "RANKWISE_PG_PORT": str(port)}
    try:
        started = subprocess.run(["bash", str(POSTGRES_SCRIPT), "start"], env=env,
                                 capture_output=True, text=True, timeout=180, check=False)
    except subprocess.TimeoutExpired:
        started = None
    try:
        if started is None or started.returncode != 0:
            why = "timed out" if started is None else (started.stderr.strip() or "no message")
            pytest.skip(f"cannot start a local PostgreSQL server: {why}")
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(POSTGRES_SCRIPT), "stop"], env=env, capture_output=True, check=False,
                       timeout=120)
        shutil.rmtree(pg_dir, ignore_errors=True)
