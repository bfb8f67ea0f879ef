"""Compare two finished grids of the same runs: wall time, the cells' core-time, and whether every
run's per-seed predictions are byte-identical.

    python scripts/grid_benchmark.py NAME=RESULTS_DIR:WALL_S:THREADS ... [--out FILE.json]

``WALL_S`` is the grid command's measured end-to-end time; ``THREADS`` the threads each cell ran
with (cpus_per_run). A cell's core-time is its attempts' wall time × its threads (read from
``grid.json``); ``ideal_wall_s`` is the cells' core-time over the cores. The first grid is the
reference for the prediction check; ``--baseline`` names the grid the speed-ups are against.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def cell_seconds(results: Path) -> list[float]:
    cells = json.loads((results / "grid.json").read_text())["cells"]
    return [a["ended_at"] - a["started_at"] for c in cells.values() for a in c.get("attempts") or []
            if a.get("status") == "complete" and a.get("started_at") and a.get("ended_at")]


def prediction_digests(results: Path) -> dict[str, str]:
    """``<run_id>/<split>/seed<N>.jsonl`` -> sha256 of the file, for every run folder."""
    return {f"{p.parts[-4]}/{p.parts[-2]}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(results.glob("*/predictions/*/seed*.jsonl"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grids", nargs="+", help="NAME=RESULTS_DIR:WALL_S:THREADS")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--baseline", help="the grid the speed-ups are against (default: the first)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows, reference = [], None
    for spec in args.grids:
        name, rest = spec.split("=", 1)
        path, wall, threads = rest.rsplit(":", 2)
        results, wall_s, threads = Path(path), float(wall), int(threads)
        seconds = cell_seconds(results)
        core_s = sum(seconds) * threads
        digests = prediction_digests(results)
        reference = reference or digests
        same = [k for k in reference if digests.get(k) == reference[k]]
        rows.append({"grid": name, "wall_s": round(wall_s, 1), "cells": len(seconds),
                     "cell_core_s": round(core_s, 1), "ideal_wall_s": round(core_s / args.cores, 1),
                     "wall_over_ideal": round(wall_s / (core_s / args.cores), 3),
                     "prediction_files": len(digests),
                     "identical_to_first": f"{len(same)}/{len(reference)}"})
    base = next((r for r in rows if r["grid"] == args.baseline), rows[0])
    for row in rows:
        row[f"speedup_vs_{base['grid']}"] = round(base["wall_s"] / row["wall_s"], 3)
    text = json.dumps(rows, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
