"""Turn endpointing: where the user's speech starts and where it ends.

The endpointer consumes fixed-size mono frames (10 ms at 16 kHz by default) and emits
`SpeechStarted` once enough voiced audio has been heard within a short window, and
`SpeechEnded` once the speech has been followed by `hangover_ms` of silence (or has run for
`max_turn_s`). All times are stream times in seconds: frame `i` covers
`[i * frame_s, (i + 1) * frame_s)`, counted from the first frame processed.

The user actually stopped speaking at `SpeechEnded.stop_s`, which is `detected_s - hangover`:
latency figures start there, not at the moment the endpointer noticed. The turn audio begins
`preroll_ms` before the first voiced frame so the first syllable is never clipped.

Between the two, after `pause_ms` of silence, `SpeechPaused` carries the turn as it would end
if the silence lasted: the same stop and the same audio as the `SpeechEnded` that follows, so a
reply can be started early and used if the turn does end there. A voiced frame after it (the
user only paused) gives `SpeechResumed`, and the speech goes on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

from audio_dsp.frames import frame_samples
from audio_dsp.vad import VAD_FRAME_MS, VoiceActivityDetector


@dataclass(frozen=True)
class EndpointerConfig:
    """Endpointing thresholds (all durations are multiples of `frame_ms` after rounding)."""

    sample_rate: int = 16_000
    frame_ms: int = 10
    # A start needs this much voiced audio within `start_window_ms`: a 60 ms click never does.
    start_ms: int = 120
    start_window_ms: int = 200
    # Silence after the last voiced frame that ends the turn (the user's pause for breath).
    hangover_ms: int = 700
    # Silence after which the turn is reported as paused (`SpeechPaused`): a reply may start
    # then, ahead of the hangover. At least `tail_ms`; 0 (or hangover_ms and above) = never.
    pause_ms: int = 300
    # Audio kept before the first voiced frame, so the onset of the first syllable survives.
    preroll_ms: int = 300
    # Audio kept after the last voiced frame (trailing consonants are often unvoiced).
    tail_ms: int = 150
    # A turn is cut here even if the user keeps talking.
    max_turn_s: float = 30.0
    vad_aggressiveness: int = 2

    def __post_init__(self) -> None:
        if self.frame_ms not in VAD_FRAME_MS:
            raise ValueError(f"frame_ms must be one of {VAD_FRAME_MS}")
        frame_samples(self.sample_rate, self.frame_ms)
        if not 0 < self.start_ms <= self.start_window_ms:
            raise ValueError("need 0 < start_ms <= start_window_ms")
        if self.hangover_ms < self.frame_ms:
            raise ValueError("hangover_ms must be at least one frame")
        if self.preroll_ms < 0 or self.tail_ms < 0:
            raise ValueError("preroll_ms and tail_ms must not be negative")
        if 0 < self.pause_ms < self.tail_ms:
            raise ValueError("pause_ms must be 0 or at least tail_ms")
        if self.max_turn_s * 1000 <= self.start_window_ms:
            raise ValueError("max_turn_s must be longer than the start window")

    def frames(self, ms: float) -> int:
        """Whole frames in `ms` milliseconds (at least one for a positive duration)."""
        return max(1, round(ms / self.frame_ms)) if ms > 0 else 0


@dataclass(frozen=True)
class SpeechStarted:
    """The user started speaking at `onset_s`; the endpointer knew it at `detected_s`."""

    onset_s: float
    detected_s: float


@dataclass(frozen=True)
class SpeechEnded:
    """A finished stretch of speech.

    `audio` is float32 mono at the endpointer's rate, from `onset_s - preroll` to
    `stop_s + tail` (clamped to the audio actually seen).
    """

    onset_s: float
    stop_s: float
    detected_s: float
    audio: np.ndarray
    reason: Literal["silence", "max_length"]

    @property
    def duration_s(self) -> float:
        return self.stop_s - self.onset_s


@dataclass(frozen=True)
class SpeechPaused:
    """`pause_ms` of silence in the speech: the turn as it ends if the silence lasts.

    Fields as in `SpeechEnded` (reason "silence"); if the turn ends at this pause, its
    `SpeechEnded` has the same `onset_s`, `stop_s` and audio.
    """

    onset_s: float
    stop_s: float
    detected_s: float
    audio: np.ndarray

    def ends(self, event: SpeechEnded) -> bool:
        """True when `event` ends the turn at this pause."""
        return (
            event.reason == "silence"
            and event.onset_s == self.onset_s
            and event.stop_s == self.stop_s
            and len(event.audio) == len(self.audio)
        )


@dataclass(frozen=True)
class SpeechResumed:
    """Voice again after a `SpeechPaused`: the turn did not end there."""

    detected_s: float


EndpointerEvent = SpeechStarted | SpeechPaused | SpeechResumed | SpeechEnded


class Endpointer:
    """Frame-in, events-out speech endpointing with a pre-roll buffer."""

    def __init__(
        self, config: EndpointerConfig | None = None, vad: VoiceActivityDetector | None = None
    ) -> None:
        self.config = config or EndpointerConfig()
        cfg = self.config
        self._vad = vad or VoiceActivityDetector(cfg.sample_rate, cfg.vad_aggressiveness)
        self.frame_size = frame_samples(cfg.sample_rate, cfg.frame_ms)
        self._frame_s = cfg.frame_ms / 1000
        self._window = cfg.frames(cfg.start_window_ms)
        self._start_frames = cfg.frames(cfg.start_ms)
        self._hangover_frames = cfg.frames(cfg.hangover_ms)
        pause_frames = cfg.frames(cfg.pause_ms)
        self._pause_frames = pause_frames if pause_frames < self._hangover_frames else 0
        self._max_frames = round(cfg.max_turn_s / self._frame_s)
        self._history: deque[tuple[int, np.ndarray, bool]] = deque(
            maxlen=self._window + cfg.frames(cfg.preroll_ms)
        )
        self._index = 0  # frames processed so far
        self._speech: list[np.ndarray] | None = None
        self._speech_first = 0  # frame index of the first frame in `_speech`
        self._onset = 0  # frame index of the first voiced frame of the speech
        self._last_voiced = 0  # frame index of the last voiced frame of the speech
        self._voiced_count = 0
        self._paused = False  # a SpeechPaused was sent for the current silence

    @property
    def in_speech(self) -> bool:
        """True between a SpeechStarted and its SpeechEnded."""
        return self._speech is not None

    @property
    def voiced_ms(self) -> float:
        """Voiced audio heard since the current speech started (0 outside speech)."""
        return self._voiced_count * self.config.frame_ms if self.in_speech else 0.0

    def speech_so_far(self) -> np.ndarray:
        """The current speech's audio heard so far, pre-roll included (empty outside speech).

        A `SpeechEnded.audio` starts with exactly these samples.
        """
        if self._speech is None:
            return np.zeros(0, np.float32)
        return np.concatenate(self._speech).astype(np.float32, copy=False)

    @property
    def now_s(self) -> float:
        """Stream time at the end of the last frame processed."""
        return self._index * self._frame_s

    def process(self, frame: np.ndarray, voiced: bool | None = None) -> list[EndpointerEvent]:
        """Consume one frame (float32 [frame_size]); `voiced` overrides the VAD decision."""
        if frame.shape != (self.frame_size,):
            raise ValueError(f"expected a frame of {self.frame_size} samples, got {frame.shape}")
        if voiced is None:
            voiced = self._vad.is_speech(frame)
        index = self._index
        self._index += 1
        if self._speech is None:
            return self._idle_step(index, frame, voiced)
        return self._speech_step(index, frame, voiced)

    def reset(self) -> None:
        """Forget any speech in progress and the pre-roll (stream time keeps counting)."""
        self._speech = None
        self._history.clear()
        self._voiced_count = 0
        self._paused = False

    def _idle_step(self, index: int, frame: np.ndarray, voiced: bool) -> list[EndpointerEvent]:
        self._history.append((index, frame, voiced))
        window = list(self._history)[-self._window :]
        flags = [v for _, _, v in window]
        if sum(flags) < self._start_frames:
            return []
        onset = next(i for i, _, v in window if v)
        self._begin_speech(onset)
        return [SpeechStarted(onset_s=onset * self._frame_s, detected_s=self.now_s)]

    def _begin_speech(self, onset: int) -> None:
        first = max(onset - self.config.frames(self.config.preroll_ms), 0)
        kept = [(i, f, v) for i, f, v in self._history if i >= first]
        self._speech = [f for _, f, _ in kept]
        self._speech_first = kept[0][0]
        self._onset = onset
        self._voiced_count = sum(1 for i, _, v in kept if v and i >= onset)
        self._last_voiced = max(i for i, _, v in kept if v)
        self._history.clear()

    def _speech_step(self, index: int, frame: np.ndarray, voiced: bool) -> list[EndpointerEvent]:
        assert self._speech is not None
        self._speech.append(frame)
        events: list[EndpointerEvent] = []
        if voiced:
            self._last_voiced = index
            self._voiced_count += 1
            if self._paused:
                self._paused = False
                events.append(SpeechResumed(detected_s=self.now_s))
        silent = index - self._last_voiced
        if silent >= self._hangover_frames:
            return [*events, self._end_speech(self._last_voiced + 1, "silence")]
        if self._index - self._onset >= self._max_frames:
            return [*events, self._end_speech(self._index, "max_length")]
        if self._pause_frames and silent == self._pause_frames:
            self._paused = True
            stop = self._last_voiced + 1
            events.append(
                SpeechPaused(
                    self._onset * self._frame_s,
                    stop * self._frame_s,
                    self.now_s,
                    self._audio_until(stop),
                )
            )
        return events

    def _audio_until(self, stop: int) -> np.ndarray:
        """The speech's audio up to frame `stop` plus the tail (as far as heard)."""
        assert self._speech is not None
        end = min(stop + self.config.frames(self.config.tail_ms), self._index)
        audio = np.concatenate(self._speech)[: (end - self._speech_first) * self.frame_size]
        return audio.astype(np.float32, copy=False)

    def _end_speech(self, stop: int, reason: Literal["silence", "max_length"]) -> SpeechEnded:
        event = SpeechEnded(
            onset_s=self._onset * self._frame_s,
            stop_s=stop * self._frame_s,
            detected_s=self.now_s,
            audio=self._audio_until(stop),
            reason=reason,
        )
        self._speech = None
        self._voiced_count = 0
        self._paused = False
        return event


__all__ = [
    "Endpointer",
    "EndpointerConfig",
    "EndpointerEvent",
    "SpeechEnded",
    "SpeechPaused",
    "SpeechResumed",
    "SpeechStarted",
]
