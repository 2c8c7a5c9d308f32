"""How close streamed audio is to offline audio: log-mel distance, overall and at block joins.

Streaming artefacts concentrate where chunks meet (clicks, phase jumps, mismatched frames), so
the distance is reported both over the whole signal and over the frames around each join.
The log-mel front end matches the decoder's training features: 22050 Hz, n_fft 1024, hop 256,
80 mel bands from 0 to 8 kHz (Slaney-style triangular filters on the HTK mel scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MelDistance", "log_mel", "log_mel_distance", "mel_filterbank"]

N_FFT = 1024
HOP = 256
N_MELS = 80
F_MAX = 8000.0
LOG_FLOOR = 1e-5  # log(max(mel, 1e-5)), as in the decoder's feature extraction


def _hz_to_mel(hz: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int = 22050, n_fft: int = N_FFT, n_mels: int = N_MELS, f_max: float = F_MAX
) -> Tensor:
    """Triangular, area-normalised mel filters [n_mels, n_fft // 2 + 1] (float64)."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = _mel_to_hz(
        torch.linspace(0.0, float(_hz_to_mel(torch.tensor(f_max))), n_mels + 2, dtype=torch.float64)
    )
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (center - lower)
    falling = (upper - freqs[None, :]) / (upper - center)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return weights * (2.0 / (upper - lower))


def log_mel(audio: Tensor, sample_rate: int = 22050) -> Tensor:
    """audio [S] or [1, S] -> log-mel [80, S // 256 + 1] (magnitude spectrum, float64)."""
    audio = audio.reshape(-1).double().cpu()
    window = torch.hann_window(N_FFT, dtype=torch.float64)
    spec = torch.stft(audio, N_FFT, HOP, N_FFT, window=window, return_complex=True).abs()
    mel = mel_filterbank(sample_rate) @ spec
    return torch.log(torch.clamp(mel, min=LOG_FLOOR))


@dataclass(frozen=True)
class MelDistance:
    """Mean |log-mel difference| (nats): overall, and over the frames near each join."""

    overall: float
    at_joins: float
    per_join: tuple[float, ...]
    n_frames: int


def log_mel_distance(
    streamed: Tensor,
    reference: Tensor,
    joins: Sequence[int] = (),
    join_radius_frames: int = 2,
    sample_rate: int = 22050,
) -> MelDistance:
    """Compare streamed audio [1, S] with reference audio [1, S'] over their common length.

    joins: sample indices where streamed chunks meet; each contributes the frames within
    join_radius_frames of it. `at_joins` is nan when there are no joins."""
    n = min(streamed.shape[-1], reference.shape[-1])
    diff = (
        log_mel(streamed[..., :n], sample_rate) - log_mel(reference[..., :n], sample_rate)
    ).abs()
    per_frame = diff.mean(dim=0)  # (T,)
    per_join = []
    for join in joins:
        center = round(join / HOP)
        lo, hi = (
            max(0, center - join_radius_frames),
            min(len(per_frame), center + join_radius_frames + 1),
        )
        if lo < hi:
            per_join.append(float(per_frame[lo:hi].mean()))
    at_joins = sum(per_join) / len(per_join) if per_join else float("nan")
    return MelDistance(float(per_frame.mean()), at_joins, tuple(per_join), int(per_frame.numel()))
