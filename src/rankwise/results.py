"""Self-describing run outputs, written atomically (temp file, fsync, rename).

``<results_dir>/<run_id>/``: ``metrics.json`` (status running|complete|failed|interrupted),
``history.jsonl``, ``predictions/<split>/seed<seed>.jsonl``, ``config.yaml``, ``checkpoints/``,
figures ``<run_id>_<topic>_seed<seed>.png/.pdf`` (:func:`run_figure_stem`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

STATUSES = ("running", "complete", "failed", "interrupted")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def per_seed_values(run: dict, metric: str) -> list[float]:
    """A finished run's ``metric`` per seed (``metrics.json`` ``per_seed``), else its one final value."""
    per_seed = run.get("per_seed") or {}
    values = [v.get(metric) for v in per_seed.values()]
    if per_seed and all(isinstance(v, (int, float)) for v in values):
        return [float(v) for v in values]
    value = run.get("final", {}).get(metric)
    return [float(value)] if isinstance(value, (int, float)) else []


def empty_folder(folder: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove everything in ``folder`` except the entries named in ``keep`` (links are removed,
    not followed)."""
    for entry in Path(folder).iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, yaml.safe_dump(obj, sort_keys=False).encode())


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the rankwise source tree (None outside a git checkout)."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=src, capture_output=True, text=True, timeout=5,
                                    check=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("rankwise", "torch", "transformers", "peft", "datasets", "optuna", "hydra-core",
                 "numpy", "scikit-learn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_description(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"type": str(device), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def provenance(device) -> dict[str, Any]:
    return {"git": git_state(), "versions": package_versions(), "device": device_description(device),
            "command": " ".join(sys.argv), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_figure_stem(seed_dir: Path, topic: str) -> Path:
    """Where a figure of one seed goes: ``<run_dir>/<run_id>_<topic>_seed<N>`` for a seed folder
    ``<run_dir>/seed<N>`` (the run folder is named by its run id); any other folder (a search
    trial's) keeps ``<folder>/<topic>``."""
    seed_dir = Path(seed_dir)
    match = re.fullmatch(r"seed(-?\d+)", seed_dir.name)
    if match is None:
        return seed_dir / topic
    run_dir = seed_dir.parent
    return run_dir / f"{run_dir.name}_{topic}_seed{match.group(1)}"
