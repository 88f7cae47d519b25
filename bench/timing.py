"""Timing shared by the benchmarks: wall-clock seconds with the device synchronised around."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock time of one call of ``fn``, queued GPU work included."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def median_seconds(fn: Callable[[], object], device: torch.device, repeat: int,
                   warmup: int = 0) -> float:
    """Median of ``repeat`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn, device) for _ in range(max(1, repeat)))
