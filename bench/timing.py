"""Timing helpers shared by the benchmarks (a CUDA device is synchronized around each run)."""

from __future__ import annotations

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
