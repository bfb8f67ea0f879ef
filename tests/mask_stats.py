"""Statistical checks shared by the dropout tests: a binomial count within Z standard
deviations, and the independence of two keep masks and of neighbouring elements."""

from __future__ import annotations

import math

import torch

Z = 4.5  # two-sided z bound: a correct sampler fails one check with probability ~7e-6


def assert_binomial(k: int, n: int, q: float) -> None:
    sd = math.sqrt(n * q * (1 - q))
    assert abs(k - n * q) <= Z * sd, f"{k} of {n} vs expected {n * q:.1f} ± {sd:.1f}"


def assert_independent_masks(a: torch.Tensor, b: torch.Tensor, p: float) -> None:
    """Boolean keep masks ``a`` and ``b`` (…, tokens, features) of drop probability ``p``: kept
    together with probability (1 − p)² across the two masks, between neighbouring elements of
    ``a`` and across a row boundary of ``a`` (last feature of one token, first of the next),
    and the two masks uncorrelated."""
    n, q = a.numel(), (1 - p) ** 2
    assert_binomial(int((a & b).sum()), n, q)
    flat = a.flatten()
    assert_binomial(int((flat[:-1] & flat[1:]).sum()), n - 1, q)
    assert_binomial(int((a[..., -1] & a[..., 0].roll(-1, dims=1)).sum()), n // a.shape[-1], q)
    r = torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1]
    assert abs(float(r)) < Z / math.sqrt(n)
