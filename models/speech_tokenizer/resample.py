"""Band-limited resampling to the tokenizer's 16 kHz, numerically like `torchaudio.transforms.Resample`.

The tokenizer was fed audio resampled with a Hann-windowed sinc filter (6 zero crossings,
roll-off 0.99); this module computes the same polyphase kernel (in float64, stored float32) and
applies it as a strided convolution, so non-16 kHz input is tokenized as the reference does.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

LOWPASS_FILTER_WIDTH = 6  # sinc zero crossings kept on each side
ROLLOFF = 0.99  # cutoff as a fraction of the lower Nyquist frequency


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase kernel (new, 1, 2*width + orig) for reduced rates `orig` -> `new`, and `width`."""
    base_freq = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / base_freq)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    phases = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new
    t = ((phases + taps) * base_freq).clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernel = sinc * window * (base_freq / orig)
    return kernel.to(torch.float32), width


def resample(audio: np.ndarray, orig_freq: int, new_freq: int) -> np.ndarray:
    """Resamples 1-D float audio; returns float32 of length ceil(len * new / orig)."""
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_freq} -> {new_freq}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected 1-D audio, got shape {audio.shape}")
    if orig_freq == new_freq:
        return audio
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    kernel, width = _sinc_kernel(orig, new)
    x = F.pad(torch.from_numpy(audio)[None, None], (width, width + orig))  # (1, 1, N + pads)
    y = F.conv1d(x, kernel, stride=orig)  # (1, new, frames)
    y = y.transpose(1, 2).reshape(-1)  # interleave the phases
    target = math.ceil(new * len(audio) / orig)
    return y[:target].numpy().astype(np.float32, copy=False)


__all__ = ["resample"]
