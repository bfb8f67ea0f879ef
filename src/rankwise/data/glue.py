"""GLUE through ``datasets``: the hub (``nyu-mll/glue``) or a local mirror with its layout.

Local mirror layout (the hub's parquet export): ``<data_dir>/<task>/<split>-00000-of-00001.parquet``.
``dataset.data_dir`` wins, else env ``RANKWISE_DATA_DIR``, else the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from rankwise.data.tasks import TaskSpec
from rankwise.errors import DataError

HUB_ID = "nyu-mll/glue"


def mirror_dir(data_dir: str | None) -> Path | None:
    value = data_dir or os.environ.get("RANKWISE_DATA_DIR")
    return Path(value).expanduser() if value else None


def local_split_path(root: Path, subset: str, split: str) -> Path:
    return root / subset / f"{split}-00000-of-00001.parquet"


def available_local_splits(root: Path, subset: str) -> list[str]:
    return sorted(p.name.split("-00000-of-")[0] for p in (root / subset).glob("*-00000-of-*.parquet"))


def has_split(subset: str, split: str, data_dir: str | None) -> bool:
    """Whether ``split`` exists in the configured source (used for optional extra splits)."""
    root = mirror_dir(data_dir)
    if root is not None:
        return local_split_path(root, subset, split).is_file()
    return True  # the hub has every GLUE split


def load_glue_split(subset: str, split: str, data_dir: str | None, cache_dir: Path) -> datasets.Dataset:
    """One GLUE split as a ``datasets.Dataset`` (columns as on the hub)."""
    root = mirror_dir(data_dir)
    if root is not None:
        path = local_split_path(root, subset, split)
        if not path.is_file():
            have = available_local_splits(root, subset)
            raise DataError(
                f"dataset.splits: split {split!r} of glue/{subset} not found in the local mirror "
                f"{root} (expected {path.name}; available: {', '.join(have) or 'none'})"
            )
        return datasets.load_dataset(
            "parquet", data_files={split: str(path)}, split=split, cache_dir=str(cache_dir / "hf")
        )
    try:
        return datasets.load_dataset(HUB_ID, subset, split=split, cache_dir=str(cache_dir / "hf"))
    except Exception as exc:  # offline, unknown split, hub errors
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"dataset: cannot load {HUB_ID}/{subset} split {split!r} from the hub ({first}). "
            "Point dataset.data_dir=<dir> (or env RANKWISE_DATA_DIR) at a local GLUE mirror laid "
            "out as <dir>/<task>/<split>-00000-of-00001.parquet"
        ) from None


def validate_rows(ds: datasets.Dataset, task: TaskSpec, split: str) -> None:
    """Fail on the first corrupt row, naming split, row index and column."""
    missing = [c for c in (*task.text_columns, "label") if c not in ds.column_names]
    if missing:
        raise DataError(f"{split}: missing column {missing[0]!r} (have: {', '.join(ds.column_names)})")
    table = ds.select_columns([*task.text_columns, "label"]).to_pandas()
    for col in task.text_columns:
        bad = table[col].isna() | (table[col].astype(str).str.strip() == "")
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{split}: row {row}, column {col!r}: empty text")
    labels = table["label"]
    if labels.isna().any():
        row = int(labels.isna().to_numpy().nonzero()[0][0])
        raise DataError(f"{split}: row {row}, column 'label': missing label")
    if task.is_regression:
        return
    bad = (labels < 0) | (labels >= task.num_labels) | (labels != labels.round())
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(
            f"{split}: row {row}, column 'label': value {labels.iloc[row]!r} outside 0..{task.num_labels - 1}"
        )
