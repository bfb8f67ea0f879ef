"""FLOP accounting for the spectral layers (2 FLOPs per multiply-add, the convention of
``torch.utils.flop_counter``; elementwise work such as gate scaling is not counted, as there).

Cost of one open (token t, direction i) pair in :class:`SpectralLinear`. The layer computes
ΔW_i x_t = s_i [u_i (p_{V,i}·x_t) + p_{U,i} ((v_i + p_{V,i})·x_t)] (see ``layer.py``), i.e.

    two input projections   x_t·p_{V,i},  x_t·(v_i + p_{V,i})   2 · (2 · d_in) FLOPs
    two output expansions   · u_i,        · p_{U,i}             2 · (2 · d_out) FLOPs

so cost_per_pair = 4 · (d_in + d_out). The dense-masked path runs this for all R directions of
every token (in two matmuls with 2R columns); the sparse path runs it only for open pairs
(a sampled matmul and a sparse × dense matmul over their pattern, two entries per pair), so
its matmul FLOPs equal open_pairs × cost_per_pair exactly. Both identities are checked against
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


def _sampled_addmm_flops(pattern, mat1, mat2, *args, out_val=None, **kwargs) -> int:
    """SDDMM: one length-k dot product per stored entry of the sparse pattern."""
    return 2 * pattern._nnz() * mat1.shape[1]


def _sparse_dense_addmm_flops(bias, sparse, dense, *args, out_val=None, **kwargs) -> int:
    """SpMM (sparse × dense): each stored entry scales one row of ``dense``."""
    return 2 * sparse._nnz() * dense.shape[1]


_sampled_addmm_flops._get_raw = True  # FlopCounterMode passes the tensors, not only shapes
_sparse_dense_addmm_flops._get_raw = True
SPARSE_FLOP_FORMULAS = {
    torch.ops.aten.sparse_sampled_addmm: _sampled_addmm_flops,
    torch.ops.aten._sparse_addmm: _sparse_dense_addmm_flops,
}


def measured_matmul_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run ``fn(*args, **kwargs)`` under ``FlopCounterMode`` and return the FLOPs it counted.

    ``FlopCounterMode`` has no formulas for sparse kernels; ``SPARSE_FLOP_FORMULAS`` adds the
    two the sparse path uses, counting from the number of entries the kernels actually get.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=SPARSE_FLOP_FORMULAS)
    with counter, torch.no_grad():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
