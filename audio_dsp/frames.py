"""Re-chunking audio of arbitrary lengths into frames of an exact size."""

from __future__ import annotations

import numpy as np


def frame_samples(sample_rate: int, frame_ms: int) -> int:
    """Samples in one frame of `frame_ms` at `sample_rate` (must divide evenly)."""
    n, rem = divmod(sample_rate * frame_ms, 1000)
    if rem or n <= 0:
        raise ValueError(f"{frame_ms} ms is not a whole number of samples at {sample_rate} Hz")
    return n


class FrameChunker:
    """Cuts a stream of 1-D chunks into frames of exactly `frame_size` samples.

    Samples that do not fill a frame yet are held until the next `push`. Frames keep the
    input dtype.
    """

    def __init__(self, frame_size: int, dtype: np.dtype | type = np.float32) -> None:
        if frame_size <= 0:
            raise ValueError("frame_size must be positive")
        self.frame_size = frame_size
        self._dtype = np.dtype(dtype)
        self._pending = np.zeros(0, self._dtype)

    @property
    def pending(self) -> int:
        """Samples held back, waiting for the rest of their frame."""
        return len(self._pending)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        """Add samples; returns every complete frame now available, in order."""
        data = samples.reshape(-1).astype(self._dtype, copy=False)
        if self._pending.size:
            data = np.concatenate([self._pending, data])
        whole = len(data) - len(data) % self.frame_size
        frames = [data[i : i + self.frame_size].copy() for i in range(0, whole, self.frame_size)]
        self._pending = data[whole:].copy()
        return frames

    def flush(self, pad: bool = True) -> list[np.ndarray]:
        """The held-back samples as a last frame (zero-padded), or nothing if `pad` is False."""
        if not self._pending.size or not pad:
            self._pending = np.zeros(0, self._dtype)
            return []
        frame = np.zeros(self.frame_size, self._dtype)
        frame[: len(self._pending)] = self._pending
        self._pending = np.zeros(0, self._dtype)
        return [frame]

    def reset(self) -> None:
        """Forget held-back samples."""
        self._pending = np.zeros(0, self._dtype)


__all__ = ["FrameChunker", "frame_samples"]
