"""The live progress table: one line per cell (queued / running / complete / failed, with ETA).

On a terminal it is a ``rich`` live table; otherwise (logs, CI) one line is printed whenever a
cell changes status.
"""

from __future__ import annotations

import heapq
import math
import sys
import time
from typing import Any, Self


def fmt_s(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def grid_eta(running: list[float | None], queued: list[float | None], capacity: float) -> float | None:
    """When the last cell should end: running cells keep their slots, queued cells take the
    first free one (cells without an estimate count as the mean of the others)."""
    known = [x for x in running + queued if x is not None]
    if not known:
        return None if running or queued else 0.0
    fill = sum(known) / len(known)
    running = [fill if x is None else x for x in running]
    queued = [fill if x is None else x for x in queued]
    if math.isinf(capacity):
        return max(running + queued)
    slots = running + [0.0] * max(0, int(capacity) - len(running))
    heapq.heapify(slots)
    for est in queued:
        heapq.heappush(slots, heapq.heappop(slots) + est)
    return max(slots)


def cell_rows(grid) -> tuple[list[list[str]], str]:
    """Rows (cell, task, status, try, elapsed, ETA, note) and a footer with the grid's ETA:
    each cell's time from :class:`rankwise.grid.plan.Estimator` (a running seed's own step rate
    once it has logged steps), the queued cells placed on the first free worker."""
    now = time.time()
    state, capacity = grid.state, grid.launcher.capacity
    rows, running, queued = [], [], []
    for cid in grid.parts:
        c, part = state.cells[cid], grid.parts[cid]
        status, started = c.get("status", "queued"), c.get("started_at")
        elapsed = now - started if status == "running" and started else c.get("duration_s")
        if status == "running":
            eta = grid.estimator.remaining(part, elapsed)
            running.append(eta)
        else:
            eta = grid.estimator.seconds(part)
            if status in ("queued", "waiting"):
                queued.append(eta)
        pending = status in ("queued", "waiting", "running")
        note = c.get("error") or c.get("note") or ""
        rows.append([cid, c.get("task", ""), status, str(c.get("tries") or ""), fmt_s(elapsed) if elapsed else "",
                     fmt_s(eta) if pending else "", note[:120]])
    counts = {s: sum(1 for r in rows if r[2] == s)
              for s in ("complete", "failed", "interrupted", "running", "queued", "waiting")}
    left = grid_eta(running, queued, capacity)
    footer = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    footer += " — " + ("done" if not (running or queued) else f"ETA ~{fmt_s(left)}")
    state.info["eta_s"] = None if left is None or not (running or queued) else round(left, 1)
    state.info["eta_at"] = None if state.info["eta_s"] is None else round(now + left, 1)
    return rows, footer


HEADER = ["cell", "task", "status", "try", "elapsed", "ETA", "note"]
STYLE = {"complete": "green", "failed": "red", "running": "yellow", "queued": "dim", "waiting": "cyan",
         "interrupted": "magenta"}


class Progress:
    def __init__(self, grid, live: bool | None = None):
        self.grid, self.state = grid, grid.state
        self.live = sys.stdout.isatty() if live is None else live
        self._seen: dict[str, Any] = {}
        self._live = None

    def __enter__(self) -> Self:
        if self.live:
            from rich.live import Live

            self._live = Live(self._table(), refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(*exc)
            self._live = None

    def _table(self):
        from rich.table import Table

        rows, footer = cell_rows(self.grid)
        table = Table(*HEADER, title="rankwise grid", caption=footer, caption_justify="left")
        for row in rows:
            table.add_row(*row[:2], f"[{STYLE.get(row[2], '')}]{row[2]}[/]", *row[3:])
        return table

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._table())
            return
        changed = False
        for rid in list(self.grid.parts):  # plain output: one line per status change, then the grid's ETA
            c = self.state.cells[rid]
            key = (c.get("status"), c.get("tries"))
            if self._seen.get(rid) != key:
                self._seen[rid] = key
                changed = True
                note = c.get("error") or c.get("note") or ""
                print(f"[grid {time.strftime('%H:%M:%S')}] {c.get('status', 'queued'):<8} {rid}"
                      + (f" (try {c['tries']})" if c.get("tries") else "") + (f": {note}" if note else ""),
                      flush=True)
        if changed:
            print(f"[grid {time.strftime('%H:%M:%S')}] {cell_rows(self.grid)[1]}",
                  flush=True)

    def print_table(self) -> None:
        """The final table, as plain text."""
        rows, footer = cell_rows(self.grid)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
        for line in [HEADER, *rows]:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
        print(footer, flush=True)
