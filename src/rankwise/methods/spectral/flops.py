"""FLOP accounting for the spectral layers (2 FLOPs per multiply-add, the convention of
``torch.utils.flop_counter``; elementwise work such as gate scaling is not counted, as there).

Cost of one open (token t, direction i) pair in :class:`SpectralLinear`. The layer computes
ΔW_i x_t = s_i [u_i (p_{V,i}·x_t) + p_{U,i} ((v_i + p_{V,i})·x_t)] (see ``layer.py``), i.e.

    two input projections   x_t·p_{V,i},  x_t·(v_i + p_{V,i})   2 · (2 · d_in) FLOPs
    two output expansions   · u_i,        · p_{U,i}             2 · (2 · d_out) FLOPs

so cost_per_pair = 4 · (d_in + d_out). The dense-masked path runs this for all R directions of
every token (in two matmuls with 2R columns); the sparse path runs it only for open pairs
(two matmuls per direction over that direction's open tokens), so its matmul FLOPs equal
open_pairs × cost_per_pair exactly. Both identities are checked against
``FlopCounterMode`` in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def adapter_flops_per_pair(d_in: int, d_out: int) -> int:
    """Matmul FLOPs of one open (token, direction) pair: 4 · (d_in + d_out)."""
    return 4 * (d_in + d_out)


def dense_adapter_flops(n_tokens: int, rank: int, d_in: int, d_out: int) -> int:
    """Matmul FLOPs of the dense-masked path over ``n_tokens`` rows (all R directions)."""
    return n_tokens * rank * adapter_flops_per_pair(d_in, d_out)


def measured_matmul_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run ``fn(*args, **kwargs)`` under ``FlopCounterMode`` and return the FLOPs it counted."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
