"""Where a run's tensors live and how they are computed: seeding, device, precision, and the
batch-to-model plumbing. Torch-only helpers below every other layer; the run builder
(:mod:`rankwise.training.build`), the loop, the measurement and the benches all use them.
"""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rankwise.errors import ConfigError

log = logging.getLogger(__name__)

# Batch entries that are not model inputs (``loss_weight``: a process's share, see distributed).
NOT_MODEL_INPUTS = ("labels", "idx", "loss_weight")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(name: str) -> torch.device:
    """``device=auto|cpu|cuda`` -> the torch device (ConfigError for cuda without CUDA)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device", "cuda requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(training, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``training.fp16`` / ``training.bf16`` ask for (None: float32).

    On CUDA the request is honoured. On the CPU it is honoured only with
    ``training.cpu_autocast: true``: the run then goes through the same ``torch.autocast`` and
    (fp16) ``GradScaler`` code as on CUDA, with the CPU's kernels, to rehearse the GPU's
    mixed-precision path; without the switch the run stays in float32 and says so."""
    if not (training.fp16 or training.bf16):
        return None
    name = "fp16" if training.fp16 else "bf16"
    if device.type != "cuda" and not (device.type == "cpu" and training.cpu_autocast):
        log.info("training.%s=true needs CUDA (or training.cpu_autocast=true on the CPU); "
                 "running in float32 on %s", name, device.type)
        return None
    if device.type == "cpu":
        log.info("training.%s=true on the CPU through CPU autocast (training.cpu_autocast)", name)
    return torch.float16 if training.fp16 else torch.bfloat16


PRECISION_NAMES = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def precision_record(device: torch.device | None, dtype: torch.dtype | None) -> dict[str, str | None]:
    """What metrics.json records of the precision a run used: ``precision`` (float32, bf16 or
    fp16) and ``autocast_device`` (the device type autocast ran on; None in float32)."""
    return {"precision": PRECISION_NAMES[dtype],
            "autocast_device": None if dtype is None else device.type}


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context without one."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def labels_on(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    return batch["labels"].to(device, non_blocking=True)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def count_params(model: torch.nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):
        return None
