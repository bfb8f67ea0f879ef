"""``scripts/gpu_check.sh --device cpu --quick``: the GPU check's CPU fallback, in CI's long
checks (``pytest -m long``) so the script, the gpu-marked tests and both benchmarks keep running
without a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.long  # several processes; CI's second step (pytest -m long)
def test_gpu_check_cpu_fallback_writes_one_json(tmp_path, fake_glue):
    env = {**os.environ, "PYTHON": sys.executable, "RANKWISE_DATA_DIR": str(fake_glue),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["status"] == "ok" and report["device_requested"] == "cpu"
    tests = report["pytest"]
    assert tests["failed"] == 0 and tests["error"] == 0 and tests["passed"] >= 2
    names = {t["test"] for t in tests["tests"] if t["outcome"] == "passed"}
    assert any(n.startswith("test_mixed_precision_step") for n in names)
    assert any(n.startswith("test_sparse_and_dense_spectral_paths_agree") for n in names)
    assert any(n.startswith("test_mixed_precision_contract") for n in names)  # under autocast
    rows = {r["label"]: r for r in report["bench_train"]["results"]}
    assert rows["lora"]["examples_per_s"] > 0 and math.isfinite(rows["lora"]["step_time_s_median"])
    assert report["bench_train"]["batches"]["lengths"] == [32]  # pad_to=32
    inf = report["bench_inference"]["results"]
    assert {r["variant"] for r in inf} >= {"tabs", "lora"}
    assert all(r["latency_ms"]["mean_ms"] > 0 for r in inf)


def test_gpu_check_refuses_an_unknown_device(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "tpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--device must be cuda or cpu" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()
