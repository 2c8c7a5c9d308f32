"""Timing helpers shared by the benchmarks (a CUDA device is synchronized around each run),
and the process's peak memory on the CPU."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(repeats: int, device: torch.device, fn: Callable[[], object]) -> float:
    """Fastest wall time of `repeats` calls of `fn` (gradients off), in seconds."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - start)
    return best


def reset_peak_rss() -> bool:
    """Restart the count of the process's peak RSS (Linux: `/proc/self/clear_refs`), so that
    `peak_rss_mb` covers what runs next only. False where that is not allowed: the peak is
    then the process's lifetime peak, and a run after a bigger one adds nothing to it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _status_mb(name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """The process's resident memory now (its peak where that cannot be read), in MB."""
    now = _status_mb("VmRSS")
    return peak_rss_mb() if now is None else now


def peak_rss_mb() -> float:
    """The process's peak resident memory since `reset_peak_rss` (else since it started)."""
    peak = _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak
