"""Streaming sample-rate conversion and sample-format helpers.

A `StreamResampler` keeps the filter state between calls, so feeding a signal in arbitrary
chunks gives the same output as feeding it at once (up to float rounding). It is used twice per
session: the caller's 48 kHz stereo s16 audio down to 16 kHz mono for VAD and the engine, and the
engine's audio (16/22.05/24 kHz mono) up to 48 kHz for the outbound track.
"""

from __future__ import annotations

import numpy as np
import soxr

INT16_SCALE = 32768.0


def int16_to_float32(samples: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 in [-1, 1)."""
    return samples.astype(np.float32) / np.float32(INT16_SCALE)


def float32_to_int16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16 PCM, clipping out-of-range values."""
    scaled = np.clip(samples * INT16_SCALE, -INT16_SCALE, INT16_SCALE - 1)
    return np.round(scaled).astype(np.int16)


def to_mono_float32(samples: np.ndarray, channels: int = 1) -> np.ndarray:
    """Packed (interleaved) PCM of `channels` channels -> mono float32 [n].

    `samples` is int16 (scaled to [-1, 1)) or float; any shape whose size is a multiple of
    `channels` (e.g. av's packed s16 `(1, n * channels)`). Channels are averaged.
    """
    flat = samples.reshape(-1)
    mono = flat if channels == 1 else flat.reshape(-1, channels).mean(axis=1)
    if samples.dtype == np.int16:
        return (mono / INT16_SCALE).astype(np.float32)
    return mono.astype(np.float32, copy=False)


class StreamResampler:
    """Mono float32 sample-rate converter that keeps its state across chunks.

    `process(x)` takes float32 [n] at `in_rate` and returns float32 [m] at `out_rate`;
    `flush()` returns the samples still held in the filter at the end of a stream and makes the
    resampler ready for a new stream. The filter delays its output by a few milliseconds.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError("sample rates must be positive")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._quality = quality
        self._stream = self._new_stream()

    def _new_stream(self) -> soxr.ResampleStream | None:
        if self.in_rate == self.out_rate:
            return None
        return soxr.ResampleStream(
            self.in_rate, self.out_rate, 1, dtype="float32", quality=self._quality
        )

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample the next chunk; returns what the filter can emit so far."""
        x = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if self._stream is None:
            return x.copy()
        return self._stream.resample_chunk(x)

    def flush(self) -> np.ndarray:
        """Drain the filter's tail and start over for the next stream."""
        if self._stream is None:
            return np.zeros(0, np.float32)
        tail = self._stream.resample_chunk(np.zeros(0, np.float32), last=True)
        self._stream = self._new_stream()
        return tail

    def reset(self) -> None:
        """Drop the filter state (e.g. after a barge-in) without emitting the tail."""
        self._stream = self._new_stream()


__all__ = [
    "INT16_SCALE",
    "StreamResampler",
    "float32_to_int16",
    "int16_to_float32",
    "to_mono_float32",
]
