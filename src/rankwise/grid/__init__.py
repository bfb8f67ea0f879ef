"""``python -m rankwise.grid``: an experiment's grid of runs × seeds, trained once each wherever
the compute is (a local pool, Slurm through submitit, or Ray), resumable, ending in the comparison.

Modules: :mod:`~rankwise.grid.cells` (which cells), :mod:`~rankwise.grid.launchers` (where they
run), :mod:`~rankwise.grid.worker` (what runs one cell), :mod:`~rankwise.grid.state` and
:mod:`~rankwise.grid.progress` (grid.json and the live table), :mod:`~rankwise.grid.compare`
(rankwise.evaluate per task and overall), :mod:`~rankwise.grid.run` (the loop),
:mod:`~rankwise.grid.cli` (the command).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from rankwise.grid.cli import main as cli_main

    return cli_main(argv)
