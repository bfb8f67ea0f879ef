"""Atomic, verifiable training checkpoints for exact resume.

A checkpoint holds the trainable weights, optimiser, scheduler, GradScaler, RNG states
(python, numpy, torch, CUDA), the data position (epoch, batch within the epoch: the epoch's
order is a pure function of (seed, epoch)), counters, history and the method's own state
(IW-LoRA importance weights, AdaLoRA allocator, gate statistics). Files are written to a
temp file, fsynced and renamed; each carries a SHA-256 of its payload, so a torn or
corrupted file is detected and the previous checkpoint is used.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankwise.results import atomic_write_bytes

log = logging.getLogger(__name__)

PATTERN = re.compile(r"^step-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep_last: int) -> Path:
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    digest = hashlib.sha256(body).hexdigest().encode()
    path = directory / f"step-{step}.pt"
    atomic_write_bytes(path, digest + b"\n" + body)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The payload, or None when the file is torn/corrupt (hash mismatch, truncated)."""
    try:
        raw = path.read_bytes()
        digest, _, body = raw.partition(b"\n")
        if hashlib.sha256(body).hexdigest().encode() != digest:
            return None
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)
    except Exception:  # truncated pickle, I/O error
        return None


def latest_valid_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint that verifies; torn ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        payload = read_checkpoint(path)
        if payload is not None:
            return path, payload
        log.warning("checkpoint %s is torn or corrupt; falling back to the previous one", path.name)
    return None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
