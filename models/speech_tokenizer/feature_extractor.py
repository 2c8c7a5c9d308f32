"""Whisper log-mel front end of the speech tokenizer, in torch.

Reproduces the torch path of `WhisperFeatureExtractor` (the one used to produce the tokenizer's
training features): a centred, reflect-padded STFT (n_fft 400, hop 160, periodic Hann window),
the last frame dropped, power spectrum, slaney mel filters (0 Hz to Nyquist),
`log10(clamp(x, 1e-10))`, a floor at (item maximum - 8), then `(x + 4) / 4`.

The floor uses the maximum over a whole padded batch item; `log_mel` and `normalize` are exposed
separately so that a streaming caller can apply the floor it knows at a given moment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .configuration_speech_tokenizer import FeatureExtractorConfig

logger = logging.getLogger(__name__)

LOG_CLAMP = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below the item's maximum (80 dB)


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    mels = freq / f_sp
    high = freq >= min_log_hz
    mels[high] = min_log_mel + np.log(freq[high] / min_log_hz) / logstep
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    freq = mels * f_sp
    high = mels >= min_log_mel
    freq[high] = min_log_hz * np.exp(logstep * (mels[high] - min_log_mel))
    return freq


def mel_filter_bank(
    num_frequency_bins: int,
    num_mel_filters: int,
    min_frequency: float,
    max_frequency: float,
    sampling_rate: int,
) -> np.ndarray:
    """Slaney-normalised triangular mel filters, float64 of shape (num_frequency_bins, num_mel).

    Filter edges are equally spaced on the slaney mel scale between the two frequencies; each
    triangle is scaled by 2 / (its width in Hz) so that every filter has unit area.
    """
    fft_freqs = np.linspace(0.0, sampling_rate / 2.0, num_frequency_bins)
    mel_edges = np.linspace(
        _hz_to_mel_slaney(np.array([min_frequency]))[0],
        _hz_to_mel_slaney(np.array([max_frequency]))[0],
        num_mel_filters + 2,
    )
    edges_hz = _mel_to_hz_slaney(mel_edges)
    widths = np.diff(edges_hz)  # (num_mel + 1,)
    slopes = edges_hz[None, :] - fft_freqs[:, None]  # (bins, num_mel + 2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[None, :]


@dataclass(frozen=True)
class BatchFeatures:
    """Features of a padded batch.

    input_features: (B, num_mel, F) float32 log-mel, F = padded samples / hop.
    attention_mask: (B, F) int32, 1 where the frame starts inside the item's real samples.
    """

    input_features: torch.Tensor
    attention_mask: torch.Tensor


def padded_length(num_samples: int, multiple: int) -> int:
    """`num_samples` rounded up to a multiple of `multiple` (at least one multiple)."""
    return max(1, -(-num_samples // multiple)) * multiple


class SpeechFeatureExtractor(nn.Module):
    """Log-mel features (100 frames/s) from 16 kHz audio; buffers follow `.to(device)`."""

    def __init__(self, config: FeatureExtractorConfig) -> None:
        super().__init__()
        self.config = config
        filters = mel_filter_bank(
            config.num_frequency_bins,
            config.feature_size,
            0.0,
            config.sampling_rate / 2.0,
            config.sampling_rate,
        )
        # (num_mel, bins) float32: the reference casts the float64 filters before the product.
        self.register_buffer(
            "mel_filters_t",
            torch.from_numpy(filters.T.astype(np.float32)).contiguous(),
            persistent=False,
        )
        # float64 STFT: float32 FFT rounding differs between CPU/GPU kernels by up to ~6e-5 in
        # the log-mel of quiet bands; computing it exactly keeps every platform within ~2e-5
        # of the float32 reference features.
        self.register_buffer(
            "window", torch.hann_window(config.n_fft, dtype=torch.float64), persistent=False
        )

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """Un-floored log10 mel power: (B, N) float32 -> (B, num_mel, N // hop)."""
        stft = torch.stft(
            waveform.to(torch.float64),
            self.config.n_fft,
            self.config.hop_length,
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        # (B, bins, F): the frame centred past the end is dropped
        power = (stft[..., :-1].abs() ** 2).to(torch.float32)
        mel = self.mel_filters_t @ power  # (B, num_mel, F)
        return torch.clamp(mel, min=LOG_CLAMP).log10()

    @staticmethod
    def normalize(log_mel: torch.Tensor, floor: torch.Tensor | float) -> torch.Tensor:
        """Floors at `floor` (the item maximum - 8) and rescales to roughly [-1, 1]."""
        floor_t = torch.as_tensor(floor, dtype=log_mel.dtype, device=log_mel.device)
        return (torch.maximum(log_mel, floor_t) + 4.0) / 4.0

    @staticmethod
    def item_floor(log_mel: torch.Tensor) -> torch.Tensor:
        """(B, num_mel, F) -> (B, 1, 1): each item's maximum minus the dynamic range."""
        return log_mel.amax(dim=(1, 2), keepdim=True) - DYNAMIC_RANGE

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Reference features of already padded audio: (B, N) -> (B, num_mel, N // hop)."""
        log_mel = self.log_mel(waveform)
        return self.normalize(log_mel, self.item_floor(log_mel))

    def pad_batch(
        self, segments: list[np.ndarray], pad_to_multiple_of: int, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pads 1-D segments with zeros to a common length.

        The length is the longest segment rounded up to `pad_to_multiple_of` unless `length` is
        given. Returns (waveform (B, N) float32, sample mask (B, N) int32) on this module's device.
        """
        if not segments:
            raise ValueError("no audio segments to pad")
        longest = max(len(s) for s in segments)
        target = padded_length(longest, pad_to_multiple_of) if length is None else length
        if target < longest:
            raise ValueError(f"pad length {target} is shorter than a segment ({longest})")
        waveform = np.zeros((len(segments), target), dtype=np.float32)
        mask = np.zeros((len(segments), target), dtype=np.int32)
        for row, segment in enumerate(segments):
            waveform[row, : len(segment)] = segment
            mask[row, : len(segment)] = 1
        device = self.window.device
        return torch.from_numpy(waveform).to(device), torch.from_numpy(mask).to(device)

    def batch(
        self, segments: list[np.ndarray], pad_to_multiple_of: int, length: int | None = None
    ) -> BatchFeatures:
        """Features and frame mask of a padded batch (see `pad_batch` for the length)."""
        waveform, sample_mask = self.pad_batch(segments, pad_to_multiple_of, length)
        return BatchFeatures(
            input_features=self(waveform),
            attention_mask=sample_mask[:, :: self.config.hop_length].contiguous(),
        )


__all__ = ["BatchFeatures", "SpeechFeatureExtractor", "mel_filter_bank", "padded_length"]
