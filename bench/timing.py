"""Timing shared by the benchmarks: wall-clock seconds with the device synchronised around."""

from __future__ import annotations

import statistics
import time
from collections import Counter
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


def profile(fn: Callable[[], object], device: torch.device, top: int = 6) -> dict:
    """Where one call of ``fn`` spends its time (``torch.profiler``): wall seconds, how many GPU
    kernels ran and for how long in all, the share of the wall time the GPU was busy (near 1:
    bound by the GPU's work; low: by launches and the host), and the longest kernels by total
    time (on a CPU: the operators with the most own time). The profiler slows the host side, so
    the busy share is a lower bound."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sync(device)
    with profiler(activities=activities) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t
    by_name: Counter = Counter()
    count = 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            count += 1
            by_name[e.name] += e.time_range.elapsed_us() / 1e6
    if not gpu:  # no kernels: the operators with the most host time instead
        for e in prof.key_averages():
            by_name[e.key] = e.self_cpu_time_total / 1e6
    busy = sum(by_name.values()) if gpu else 0.0
    return {"wall_s": round(wall, 4), "kernels": count if gpu else None,
            "kernel_s": round(busy, 4) if gpu else None,
            "gpu_busy_share": round(busy / wall, 3) if gpu and wall > 0 else None,
            "top_kernels": [[name[:90], round(sec, 4)] for name, sec in by_name.most_common(top)]}
