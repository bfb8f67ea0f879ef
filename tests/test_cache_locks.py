"""Workers sharing one cache: several processes started together on a cold cache build each
entry once (under its file lock) and all read complete entries; and the search's study check
has no window in which a concurrent worker reads half of its attributes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import release_together

N_WORKERS = 3

# One worker: wait for ``go``, then fill the cache the way a run does (random model build,
# tokenised splits, top-R SVD factors). Builds are counted by appending to ``builds``.
WORKER = r"""
import hashlib, json, os, sys, time, pathlib
ready, go, builds, glue = sys.argv[1:5]
import numpy as np
import torch
import rankwise.models as models
from rankwise.config.schema import DatasetConfig, SplitsConfig
from rankwise.data.loading import load_task_data
from rankwise.methods.spectral.svd_cache import load_or_compute_factors

orig_save = models._save_random_model
def counted(spec, out):
    with open(builds, "a") as f:
        f.write(f"model {os.getpid()}\n")
    time.sleep(0.5)  # widen the window in which an unlocked build would be seen half-done
    return orig_save(spec, out)
models._save_random_model = counted

pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.01)
model, tok = models.load_backbone("tiny-bert", num_labels=2)
cfg = DatasetConfig(name="glue", subset="rte", data_dir=glue,
                    splits=SplitsConfig(validation="validation"))
data = load_task_data(cfg, tok, models.default_cache_dir())
ids = hashlib.sha256(json.dumps([list(data.train["input_ids"]), list(data.evals[0].data["input_ids"])]).encode())
targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in n]
factors, hit, path = load_or_compute_factors(model, targets, 4, models.default_cache_dir())
s = hashlib.sha256(b"".join(factors[n].s.numpy().tobytes() for n in targets))
print(json.dumps({"tokens": ids.hexdigest(), "svd": s.hexdigest(), "svd_hit": hit,
                  "weights": float(sum(p.double().sum() for n, p in model.named_parameters()
                                     if "classifier" not in n))}))  # the head is drawn per run
"""


@pytest.mark.long  # several processes; CI's second step (pytest -m long)
def test_workers_on_a_cold_cache_build_each_entry_once(tmp_path, fake_glue):
    import os

    cache = tmp_path / "cache"
    env = {**os.environ, "RANKWISE_CACHE_DIR": str(cache)}
    builds, go = tmp_path / "builds.txt", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(N_WORKERS)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(go), str(builds),
                               str(fake_glue)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in ready]
    outputs = release_together(procs, ready, go)
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    # every worker read the same complete entries
    for key in ("tokens", "svd", "weights"):
        assert len({r[key] for r in results}) == 1, key
    # each entry was built once: one model build, one SVD computation
    assert len(builds.read_text().splitlines()) == 1
    assert sorted(r["svd_hit"] for r in results) == [False] + [True] * (N_WORKERS - 1)
    # no staging folder or temporary file is left in the cache
    leftovers = [p for p in cache.rglob("*") if ".partial" in p.name or ".tmp" in p.name]
    assert not leftovers, leftovers


def test_a_model_build_that_dies_leaves_no_entry(tmp_path, monkeypatch):
    from rankwise import models

    def broken(spec, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{")  # half a model, then the process fails
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_save_random_model", broken)
    with pytest.raises(RuntimeError):
        models.build_tiny_model_dir("tiny-bert", tmp_path)
    assert not (tmp_path / "models" / "tiny-bert-p512").exists()
    assert not [p for p in (tmp_path / "models").iterdir() if ".partial" in p.name]
    monkeypatch.undo()
    out = models.build_tiny_model_dir("tiny-bert", tmp_path)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").read_text().startswith("{\n")


def test_study_check_never_sees_half_its_attributes(tmp_path):
    """Two workers open a new study at once. Whatever the first has written so far, the second
    worker's check must pass: replay it after each of the first worker's writes."""
    from rankwise.config.schema import parse_run_config
    from rankwise.search import _check_study_matches

    sys.path.insert(0, str(Path(__file__).parent))
    from search_worker import toy_run_config

    cfg = parse_run_config(toy_run_config("race", {"n_trials": 2})).optuna
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = optuna.create_study(study_name="race", storage=url, direction=cfg.direction)
    seen = []
    real_set = first.set_user_attr

    def set_then_let_the_other_worker_check(key, value):
        real_set(key, value)
        other = optuna.load_study(study_name="race", storage=url)
        seen.append(dict(other.user_attrs))
        _check_study_matches(other, cfg)  # must not raise

    first.set_user_attr = set_then_let_the_other_worker_check
    _check_study_matches(first, cfg)
    assert seen, "the check wrote no attribute"
    stored = optuna.load_study(study_name="race", storage=url).user_attrs
    assert stored["metric_name"] == cfg.metric_name and "search_space" in stored
