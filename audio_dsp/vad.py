"""Voice activity detection on short frames (WebRTC's GMM VAD)."""

from __future__ import annotations

import numpy as np
import webrtcvad

from audio_dsp.resample import float32_to_int16

VAD_FRAME_MS = (10, 20, 30)
VAD_SAMPLE_RATES = (8000, 16000, 32000, 48000)


class VoiceActivityDetector:
    """Says whether one 10/20/30 ms mono frame holds speech.

    `aggressiveness` 0 (most permissive) .. 3 (most eager to call a frame non-speech).
    Frames may be int16 or float32 in [-1, 1].
    """

    def __init__(self, sample_rate: int = 16_000, aggressiveness: int = 2) -> None:
        if sample_rate not in VAD_SAMPLE_RATES:
            raise ValueError(f"VAD sample rate must be one of {VAD_SAMPLE_RATES}")
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError("VAD aggressiveness must be 0, 1, 2 or 3")
        self.sample_rate = sample_rate
        self.aggressiveness = aggressiveness
        self._valid_sizes = {sample_rate * ms // 1000 for ms in VAD_FRAME_MS}
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: np.ndarray) -> bool:
        """True when the frame is voiced. Raises ValueError on a frame of the wrong length."""
        if frame.ndim != 1 or len(frame) not in self._valid_sizes:
            raise ValueError(
                f"VAD frames must be 1-D with {sorted(self._valid_sizes)} samples, got {frame.shape}"
            )
        pcm = frame if frame.dtype == np.int16 else float32_to_int16(frame)
        return self._vad.is_speech(pcm.tobytes(), self.sample_rate)


__all__ = ["VAD_FRAME_MS", "VoiceActivityDetector"]
