"""Fake finished runs for the comparison tests: ``metrics.json`` plus per-seed predictions."""

import json
from pathlib import Path

import numpy as np
from sklearn import metrics as skm


def fake_run(root: Path, run_id: str, role: str, algorithm: str, subset: str, preds_by_seed: dict,
             labels: np.ndarray, extra: dict | None = None, mode: str = "full", run: dict | None = None) -> None:
    """A complete run whose seed-s predictions on 'validation' are preds_by_seed[s]."""
    run_dir = root / run_id
    (run_dir / "predictions" / "validation").mkdir(parents=True)
    per_seed = {}
    for seed, preds in preds_by_seed.items():
        rows = [json.dumps({"idx": i, "label": int(y), "prediction": int(p)})
                for i, (y, p) in enumerate(zip(labels, preds))]
        (run_dir / "predictions" / "validation" / f"seed{seed}.jsonl").write_text("\n".join(rows) + "\n")
        per_seed[str(seed)] = {"validation_accuracy": float(np.mean(preds == labels)),
                               "validation_matthews_correlation": float(skm.matthews_corrcoef(labels, preds))}
    final = {k: float(np.mean([v[k] for v in per_seed.values()])) for k in next(iter(per_seed.values()))}
    final.update(extra or {})
    std = {k: float(np.std([v[k] for v in per_seed.values()], ddof=1)) if len(per_seed) > 1 else 0.0
           for k in next(iter(per_seed.values()))}
    metrics = {"run_id": run_id, "method": role, "algorithm": algorithm, "status": "complete", "mode": mode,
               "task": {"dataset": "glue", "subset": subset}, "final": final, "per_seed": per_seed,
               "seeds": list(preds_by_seed), "std": std, "params": {"trainable": 1000, "total": 10000},
               "wall_time_s": {"total": 12.5}, "config": {"model": {"adapter": {"rank": 8}}}, **(run or {})}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def edit_metrics(root: Path, run_id: str, edit) -> None:
    """Rewrite a fake run's metrics.json through ``edit(data)``."""
    path = root / run_id / "metrics.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def with_accuracy(labels: np.ndarray, acc: float, rng) -> np.ndarray:
    """Predictions right on exactly round(acc · n) random examples."""
    n = len(labels)
    right = np.zeros(n, bool)
    right[rng.permutation(n)[: round(acc * n)]] = True
    return np.where(right, labels, 1 - labels)


def seeds_with_gaps(labels, gaps, rng, base_acc=0.80):
    """Seed-matched runs: B at base_acc, A at base_acc + gap (points / 100) per seed."""
    a = {s + 1: with_accuracy(labels, base_acc + g / 100, rng) for s, g in enumerate(gaps)}
    b = {s + 1: with_accuracy(labels, base_acc, rng) for s in range(len(gaps))}
    return a, b
