"""Top-R singular triplets of the frozen target weights, computed once and cached on disk.

For each target W_k ∈ R^{d_out×d_in} (float32): W_k = U S Vᵀ, keep U_R = U[:, :R],
s = diag(S)[:R] (descending), V_R = V[:, :R]. The cache file is keyed by

    model identity (``config._name_or_path``, for a readable name)
    + a BLAKE2 digest of every target's name, shape and float32 weight bytes
    + R,

so the same weights always hit, a different checkpoint (or a re-initialised tiny model) never
does, and the SVD of a 72-matrix DeBERTa-v3-base runs once per machine. Files live in
``<cache_dir>/svd`` (default ``$RANKWISE_CACHE_DIR/svd``) and are written atomically, under a
file lock (``<file>.lock``), so workers sharing the cache compute each entry once.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CACHE_FORMAT = 1


@dataclass(frozen=True)
class SpectralFactors:
    """Frozen top-R factors of one weight: U (d_out, R), s (R,), V (d_in, R), float32."""

    U: torch.Tensor
    s: torch.Tensor
    V: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])


def top_r_svd(weight: torch.Tensor, rank: int) -> SpectralFactors:
    """Exact top-``rank`` SVD of ``weight`` (d_out, d_in) in float32."""
    d_out, d_in = weight.shape
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} must be in [1, min(d_out, d_in) = {min(d_out, d_in)}]")
    U, S, Vh = torch.linalg.svd(weight.detach().float().cpu(), full_matrices=False)
    return SpectralFactors(
        U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].T.contiguous()
    )


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """BLAKE2b digest of the named weights (names, shapes and float32 bytes, in key order)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        w = weights[name].detach().float().cpu().contiguous()
        h.update(f"{name}:{tuple(w.shape)};".encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def svd_cache_path(cache_dir: Path, model_id: str, digest: str, rank: int) -> Path:
    # Last two path parts keep hub ids whole ("microsoft/deberta-v3-base") and local paths short;
    # the digest, not the name, is what identifies the weights.
    tail = "_".join(Path(model_id).parts[-2:])
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", tail).strip("_.")[:80] or "model"
    return cache_dir / "svd" / f"{readable}-R{rank}-{digest}.pt"


def model_identity(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "")
    return str(name or type(model).__name__)


def load_or_compute_factors(
    model: nn.Module, target_names: list[str], rank: int, cache_dir: Path
) -> tuple[dict[str, SpectralFactors], bool, Path]:
    """Factors of every target ``nn.Linear`` of ``model``; returns (factors, cache_hit, file)."""
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in target_names}
    digest = weights_digest(weights)
    path = svd_cache_path(cache_dir, model_identity(model), digest, rank)
    from rankwise.models import cache_lock

    with cache_lock(path):  # workers on one machine compute each entry once
        cached = _read(path, target_names, rank)
        if cached is not None:
            return cached, True, path
        factors = {name: top_r_svd(w, rank) for name, w in weights.items()}
        _write(path, factors, rank, digest)
    return factors, False, path


def _read(path: Path, target_names: list[str], rank: int) -> dict[str, SpectralFactors] | None:
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file is recomputed, not trusted
        return None
    if payload.get("format") != CACHE_FORMAT or payload.get("rank") != rank:
        return None
    stored = payload.get("factors", {})
    if any(name not in stored for name in target_names):
        return None
    return {
        name: SpectralFactors(stored[name]["U"], stored[name]["s"], stored[name]["V"])
        for name in target_names
    }


def _write(path: Path, factors: dict[str, SpectralFactors], rank: int, digest: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CACHE_FORMAT,
        "rank": rank,
        "digest": digest,
        "factors": {name: {"U": f.U, "s": f.s, "V": f.V} for name, f in factors.items()},
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
