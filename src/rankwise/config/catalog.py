"""The run configs ``run=<id>`` can name (``rankwise run --list [FILTER]``).

The packaged ``configs/runs/*.yaml`` and ``<runs_dir>/*.yaml``, one row each: the run id that
``run=`` takes (the file's name), the algorithm its content selects, the task, the model, its
role label (the file's ``method``) and where it lies. A ``runs_dir`` file shadows the packaged
one of the same name, as ``run=<id>`` resolves it.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from pathlib import Path

from rankwise.errors import ConfigError

COLUMNS = ("run id", "algorithm", "task", "model", "role", "source")


@dataclass(frozen=True)
class RunEntry:
    run_id: str
    algorithm: str  # "invalid" when the file does not validate (``error`` says why)
    task: str
    model: str
    role: str
    source: str  # "packaged" or the runs_dir file's path
    error: str = ""

    def row(self) -> tuple[str, ...]:
        return astuple(self)[: len(COLUMNS)]


def run_files(runs_dir: str | Path) -> dict[str, Path]:
    """Run id -> the file ``run=<id>`` loads: ``<runs_dir>`` first, then the packaged ones."""
    from rankwise.config.loader import packaged_configs

    files = {p.stem: p for p in sorted((packaged_configs() / "runs").glob("*.yaml"))}
    local = Path(runs_dir).expanduser()
    files.update({p.stem: p for p in sorted(local.glob("*.yaml"))} if local.is_dir() else {})
    return dict(sorted(files.items()))


def run_entry(run_id: str, path: Path, packaged: bool) -> RunEntry:
    from rankwise.config.loader import read_yaml, split_run_sections
    from rankwise.config.schema import parse_run_config

    source = "packaged" if packaged else str(path)
    try:
        run = parse_run_config(split_run_sections(read_yaml(path, "run"))[0])
    except ConfigError as exc:
        return RunEntry(run_id, "invalid", "", "", "", source, str(exc))
    task = f"{run.dataset.name}/{run.dataset.subset}"
    return RunEntry(run_id, run.algorithm, task, run.model.name, run.method, source)


def run_entries(runs_dir: str | Path, pattern: str | None = None) -> list[RunEntry]:
    """Every run config, those with ``pattern`` (case-insensitive) in any column if given."""
    from rankwise.config.loader import packaged_configs

    packaged = packaged_configs() / "runs"
    entries = [run_entry(rid, path, path.parent == packaged) for rid, path in run_files(runs_dir).items()]
    if pattern:
        entries = [e for e in entries if pattern.lower() in " ".join(e.row()).lower()]
    return entries


def table(entries: list[RunEntry]) -> str:
    """Aligned columns, a header line, then one line per entry and each invalid file's error."""
    rows = [COLUMNS, *(e.row() for e in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"{e.run_id}: {e.error}" for e in entries if e.error]
    return "\n".join(lines)
