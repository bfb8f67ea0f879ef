"""Data-parallel training across processes (``torchrun``), kept out of the training loop.

Launch one run on K processes (K GPUs, or K CPU processes with gloo)::

    torchrun --nproc_per_node=K -m rankwise.main run=<run_id> results_dir=R [overrides]

``torchrun`` sets ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``; :func:`init_from_env` joins the
process group (NCCL on CUDA, gloo on CPU). Without those variables everything here is a
no-op and the run is the ordinary single-process one.

What a rank does (Li et al., 2020, "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training"):

- every rank walks the same global order of training examples; each global batch of
  ``training.batch_size`` examples is split across ranks (rank r takes rows r, r + K, ...),
  so the global batch, the number of steps and the schedule are those of one process;
- the model is wrapped in ``DistributedDataParallel`` for the training forward only, and DDP
  averages gradients over ranks. Rank r scales its loss by ``w_r = n_r K / N`` (``n_r`` of the
  batch's ``N`` rows are its own) so that the average is the gradient of the global-batch
  mean even when the last batch does not split evenly: (1/K) Σ_r w_r ∇L_r = Σ_r (n_r/N) ∇L_r.
  Regularisers are computed on every rank from the same weights, and Σ_r w_r / K = 1 keeps
  them exact too. A rank whose share is empty (a last batch smaller than K) runs one row
  with weight 0;
- method hooks (calibration, IW-LoRA's penalty, AdaLoRA's allocation, spectral statistics)
  always see the unwrapped module; with identical averaged gradients they stay identical on
  every rank;
- what is random per example (dropout, the spectral family's sampled gates) is drawn per
  rank, and a penalty computed from the batch (the spectral budget terms) is averaged over the
  shares weighted by examples: such runs match one process statistically, not to rounding;
- evaluation runs in full on every rank (hooks that change state while evaluating stay in
  step everywhere; rank 0 alone would take as long); only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- data ------------------------------------------------------------------------------
    def shard(self, batch_indices: list[int]) -> tuple[list[int], float]:
        """This rank's rows of one global batch and its loss weight ``n_r K / N``."""
        if not self.enabled:
            return batch_indices, 1.0
        own = batch_indices[self.rank :: self.world_size]
        if not own:  # fewer rows than ranks: run one row that contributes nothing
            return batch_indices[:1], 0.0
        return own, len(own) * self.world_size / len(batch_indices)

    # --- model -----------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run the training forward through (DDP when distributed)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids)

    # --- communication ---------------------------------------------------------------------
    def mean_of_weighted(
        self, terms: dict[str, torch.Tensor], weight: float
    ) -> dict[str, torch.Tensor]:
        """Σ_r w_r·term_r / K per term: the global-batch mean of per-rank loss terms."""
        if not self.enabled:
            return terms
        names = list(terms)
        stacked = torch.stack([terms[n].detach().float() for n in names]) * weight
        dist.all_reduce(stacked)
        stacked /= self.world_size
        return dict(zip(names, stacked.unbind()))

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (e.g. a stop signal seen by one process)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it fills the on-disk caches), then the others."""
        if self.enabled and not self.is_main:
            dist.barrier()
        yield
        if self.enabled and self.is_main:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def current() -> DistributedContext:
    """The context of this process: from the process group when one is initialised."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        )
    return DistributedContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> DistributedContext:
    """Join the process group ``torchrun`` describes (no-op for a single process)."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
