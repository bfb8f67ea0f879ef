"""Inference latency: warm-up, then timed forward passes; mean / p50 / p99 in milliseconds.

Each timed call is bracketed by ``synchronize()`` (``torch.cuda.synchronize`` on a GPU, nothing
on the CPU), so queued GPU work is neither charged to the next call nor left out of this one.
The clock and the synchroniser are parameters so that tests can inject a fake clock.

:func:`measure_latency` times one fixed call; :func:`measure_latency_cycled` times a sequence
of calls (e.g. forward passes over real evaluation batches of varied lengths), cycling
through them, so that percentiles describe the spread over inputs, not only timer noise.

Percentiles use linear interpolation between order statistics (numpy's default): with n
samples p99 lies between the largest two, so with few samples p99 is close to the maximum;
from n = 100 on, at least one sample lies above it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

Clock = Callable[[], float]
Synchronize = Callable[[], None] | None


@dataclass(frozen=True)
class LatencyStats:
    mean_ms: float
    p50_ms: float
    p99_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    n: int

    @classmethod
    def from_seconds(cls, samples: list[float]) -> LatencyStats:
        if not samples:
            raise ValueError("no timed samples")
        ms = np.asarray(samples, dtype=np.float64) * 1e3
        return cls(
            mean_ms=float(ms.mean()), p50_ms=float(np.percentile(ms, 50)),
            p99_ms=float(np.percentile(ms, 99)),
            std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
            min_ms=float(ms.min()), max_ms=float(ms.max()), n=len(ms),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronizer(device: torch.device) -> Synchronize:
    """``torch.cuda.synchronize`` for a CUDA device, else ``None``."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def timed_call(fn: Callable[[], Any], clock: Clock = time.perf_counter,
               synchronize: Synchronize = None) -> float:
    """Seconds one call of ``fn`` takes, synchronised before and after."""
    if synchronize is not None:
        synchronize()
    start = clock()
    fn()
    if synchronize is not None:
        synchronize()
    return clock() - start


def measure_latency(fn: Callable[[], Any], warmup: int, repeats: int,
                    clock: Clock = time.perf_counter, synchronize: Synchronize = None) -> LatencyStats:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    if synchronize is not None:
        synchronize()
    samples = [timed_call(fn, clock, synchronize) for _ in range(repeats)]
    return LatencyStats.from_seconds(samples)


def measure_latency_cycled(fns: Sequence[Callable[[], Any]], warmup: int, timed: int,
                           clock: Clock = time.perf_counter,
                           synchronize: Synchronize = None) -> LatencyStats:
    """Call ``fns[0], fns[1], ...`` (cycling) ``warmup`` times untimed, then ``timed`` times
    timed, continuing the cycle: timed call k runs ``fns[(warmup + k) % len(fns)]``."""
    if timed < 1:
        raise ValueError(f"timed must be >= 1, got {timed}")
    if not fns:
        raise ValueError("no calls to time")
    for i in range(warmup):
        fns[i % len(fns)]()
    if synchronize is not None:
        synchronize()
    samples = [timed_call(fns[(warmup + k) % len(fns)], clock, synchronize) for k in range(timed)]
    return LatencyStats.from_seconds(samples)
