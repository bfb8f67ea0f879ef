"""Per-target-matrix reports: where a matrix sits (layer, kind) and a layers × kinds heatmap.

IW-LoRA's ``importance.json`` / ``importance_heatmap.png`` and AdaLoRA's ``rank_pattern.json``
describe one number per adapted matrix; both name the matrix by the backbone's full module
name (``bert.encoder.layer.3.attention.self.query``) and lay it out by layer and kind.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

# Canonical kinds, in the column order of the heatmaps (BERT / RoBERTa / DeBERTa names).
MATRIX_KINDS: tuple[str, ...] = (
    "query", "key", "value", "in_proj", "attn_out", "intermediate", "output",
)

_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
_KIND_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("query", re.compile(r"(?:^|\.)(query|query_proj|q_proj)$")),
    ("key", re.compile(r"(?:^|\.)(key|key_proj|k_proj)$")),
    ("value", re.compile(r"(?:^|\.)(value|value_proj|v_proj)$")),
    ("in_proj", re.compile(r"(?:^|\.)in_proj$")),
    ("attn_out", re.compile(r"attention\.output\.dense$")),
    ("intermediate", re.compile(r"intermediate\.dense$")),
    ("output", re.compile(r"(?:^|\.)layers?\.\d+\.output\.dense$")),
)


def layer_index(module_name: str) -> int | None:
    """Index of the encoder layer holding ``module_name`` (``None`` outside the layer stack)."""
    match = _LAYER.search(module_name)
    return int(match.group(1)) if match else None


def matrix_kind(module_name: str) -> str:
    """One of :data:`MATRIX_KINDS`, or the module's last name component when unknown."""
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(module_name):
            return kind
    return module_name.rsplit(".", 1)[-1]


def backbone_module_name(peft_module_name: str) -> str:
    """Strip peft's wrapper prefix so names match the backbone's own module names."""
    return peft_module_name.removeprefix("base_model.model.")


def write_layer_kind_heatmap(
    values: Mapping[str, float], path_stem: Path, title: str, colorbar_label: str
) -> list[Path]:
    """Heatmap of one value per matrix (rows: layers, columns: kinds) as ``.png`` and ``.pdf``.

    Uses ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot global state), so it is
    safe in headless runs and in worker threads. Cells without a matrix stay blank.
    """
    import numpy as np
    from matplotlib.figure import Figure

    layers = sorted({layer_index(n) for n in values}, key=lambda i: -1 if i is None else i)
    present = {matrix_kind(n) for n in values}
    kinds = [k for k in MATRIX_KINDS if k in present] + sorted(present - set(MATRIX_KINDS))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for name, value in values.items():
        grid[layers.index(layer_index(name)), kinds.index(matrix_kind(name))] = value

    fig = Figure(figsize=(1.6 + 1.0 * len(kinds), 1.2 + 0.42 * len(layers)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), ["-" if i is None else str(i) for i in layers])
    ax.set_xlabel("matrix")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    if grid.size <= 120:  # annotate small grids; 12 × 6 (DeBERTa-base) still reads well
        finite = grid[np.isfinite(grid)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (i, j), value in np.ndenumerate(grid):
            if math.isfinite(value):
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7,
                        color="black" if value > middle else "white")
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths
