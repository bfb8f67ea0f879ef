"""``<results_dir>/grid.json``: the state of every cell, shared by all grid commands on the folder.

Each grid command keeps its own view of the cells it selected and merges it into the file under
a lock (``grid.json.lock``), written atomically: a cell's latest status, exit code, error, log
and command, and every attempt any grid made (``attempts``: grid, try, host, pid, start, end,
status, exit code, error, log).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from rankwise.results import atomic_write_json, read_json

STATE_VERSION = 1
KEEP_GRIDS = 50


class GridState:
    def __init__(self, path: Path, token: str, argv: list[str]):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.token = token
        self.cells: dict[str, dict[str, Any]] = {}
        self.comparisons: dict[str, dict[str, Any]] = {}
        self.info: dict[str, Any] = {"token": token, "pid": os.getpid(), "host": socket.gethostname(),
                                     "argv": argv, "started_at": time.time(), "status": "running"}
        self.previous = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            data = read_json(self.path)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def cell(self, cid: str) -> dict[str, Any]:
        return self.cells.setdefault(cid, {"cell": cid, "attempts": []})

    def set(self, cid: str, /, **fields: Any) -> None:
        self.cell(cid).update(fields, updated_at=time.time(), grid=self.token)

    def add_attempt(self, cid: str, record: dict[str, Any]) -> None:
        attempts = self.cell(cid)["attempts"]
        key = (record.get("grid"), record.get("try"))
        attempts[:] = [a for a in attempts if (a.get("grid"), a.get("try")) != key] + [record]

    def save(self) -> None:
        """Merge this grid's view into grid.json (under its lock) and write it atomically."""
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(self.lock_path, timeout=60):
            disk = self._read()
            cells = disk.get("cells") if isinstance(disk.get("cells"), dict) else {}
            for run_id, ours in self.cells.items():
                theirs = cells.get(run_id) or {}
                merged = {a_key(a): a for a in (theirs.get("attempts") or [])}
                merged.update({a_key(a): a for a in ours["attempts"]})
                attempts = sorted(merged.values(), key=lambda a: a.get("started_at") or 0)
                cells[run_id] = {**theirs, **ours, "attempts": attempts}
            grids = [g for g in (disk.get("grids") or []) if g.get("token") != self.token]
            mark_lost(grids, cells)
            comparisons = {**(disk.get("comparisons") or {}), **self.comparisons}
            atomic_write_json(self.path, {"version": STATE_VERSION, "updated_at": time.time(),
                                          "grids": (grids + [self.info])[-KEEP_GRIDS:],
                                          "cells": cells, "comparisons": comparisons})

    def past_durations(self) -> dict[str, list[float]]:
        """Wall times of complete attempts per cell, from grid.json and this grid."""
        out: dict[str, list[float]] = {}
        sources = [*(self.previous.get("cells") or {}).items(), *self.cells.items()]
        for cid, cell in sources:
            for a in cell.get("attempts") or []:
                if a.get("status") == "complete" and a.get("started_at") and a.get("ended_at"):
                    out.setdefault(cid, []).append(a["ended_at"] - a["started_at"])
        return out


def pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def mark_lost(grids: list[dict[str, Any]], cells: dict[str, dict[str, Any]]) -> None:
    """Grids recorded as running whose process is gone from this host (killed outright, e.g.
    SIGKILL or a lost node) become ``lost``, and so do their running attempts: a later grid
    resumes those cells from their checkpoints."""
    host = socket.gethostname()
    lost = {g["token"] for g in grids if g.get("status") == "running" and g.get("host") == host
            and not pid_alive(g.get("pid"))}
    for g in grids:
        if g.get("token") in lost:
            g["status"] = "lost"
    for cell in cells.values():
        for a in cell.get("attempts") or []:
            if a.get("status") == "running" and a.get("grid") in lost:
                a["status"] = "lost"
                a["error"] = "the grid running it was killed; a later grid resumes the cell"


def a_key(attempt: dict[str, Any]) -> tuple:
    return attempt.get("grid"), attempt.get("try")
