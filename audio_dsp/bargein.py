"""Barge-in evidence: how much of the recent microphone audio is the user talking.

While the agent speaks, the (echo-cancelled) microphone carries the user's voice, what the
canceller left of the agent's echo, and background noise. `BargeInDetector` scores each 10 ms
frame and reports how many milliseconds of the last `window_ms` were user speech; the turn
manager calls it a barge-in once that reaches its threshold. A frame counts when

- webrtcvad calls it speech at `vad_aggressiveness` (mode 3 never fired on AEC3-cancelled echo
  in the simulated rooms of `tests/echo_sim.py`; mode 2 fired on 2-5% of those frames),
- it stands `noise_margin_db` above the background (the quietest microphone frame of the last
  `floor_window_ms`, measured before the canceller, which may hide the noise for a while
  and let it back in gradually): steady noise, however loud, never does, and
- it is louder than `min_level_dbfs`, and
- given the raw microphone frame too, the canceller removed less than `max_removed_db` of it:
  what remains of cancelled echo is 25-40 dB below the echo, while the user's voice loses a
  few dB at most once the canceller has noticed double talk.

The counted frames of the window must also span `min_spread_db` of level: speech moves between
vowels and consonants, a noise that just switched on stays flat. A short transient (a 60 ms
click) cannot reach a threshold of a few hundred milliseconds whatever it does.

`onset_ms` is the cheaper, earlier signal a provisional barge-in ("duck") acts on: how long the
current run of consecutive counted frames is, counting only frames the canceller took less
than `onset_max_removed_db` from (echo that leaks through the canceller mostly loses more), and
starting a new run at a frame `onset_max_drop_db` below the loudest of the run (a click dies
away within a few frames; the first syllable of speech holds its level).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import uniform_filter1d

from audio_dsp.frames import frame_samples
from audio_dsp.vad import VAD_FRAME_MS, VoiceActivityDetector

_EPS = 1e-12


@dataclass(frozen=True)
class BargeInConfig:
    """How speech over the agent's voice is told from echo, noise and clicks."""

    sample_rate: int = 16_000
    frame_ms: int = 10
    # Evidence is the speech found within this sliding window (speech has short gaps).
    window_ms: int = 400
    vad_aggressiveness: int = 3
    noise_margin_db: float = 9.0
    floor_window_ms: int = 1500
    min_level_dbfs: float = -55.0
    max_removed_db: float = 20.0
    min_spread_db: float = 6.0
    # A frame extends the `onset_ms` run only if the canceller removed less than this from it,
    # and if it is no more than `onset_max_drop_db` below the run's loudest frame (else it
    # starts a new run). bench/bench_bargein.py, 100 rooms x 7 s of echo: a 60 ms run ducked
    # in 7 rooms with 20 / no drop limit, 2 with 14 / none, 1 with 14 / 10.
    onset_max_removed_db: float = 14.0
    onset_max_drop_db: float = 10.0

    def __post_init__(self) -> None:
        if self.frame_ms not in VAD_FRAME_MS:
            raise ValueError(f"frame_ms must be one of {VAD_FRAME_MS}")
        frame_samples(self.sample_rate, self.frame_ms)
        if self.window_ms < self.frame_ms or self.floor_window_ms < self.frame_ms:
            raise ValueError("window_ms and floor_window_ms must span at least one frame")
        if self.noise_margin_db < 0 or self.min_spread_db < 0:
            raise ValueError("noise_margin_db and min_spread_db must not be negative")


def frame_level_db(frame: np.ndarray) -> float:
    """Mean-square level of a float32 frame in dB relative to full scale (0 dB = RMS 1)."""
    x = frame.astype(np.float64, copy=False)
    return 10.0 * float(np.log10(float(np.dot(x, x)) / len(x) + _EPS))


class BargeInDetector:
    """Frame-in, evidence-out scoring of user speech (float32 [frame_size] frames)."""

    def __init__(
        self, config: BargeInConfig | None = None, vad: VoiceActivityDetector | None = None
    ) -> None:
        self.config = cfg = config or BargeInConfig()
        self._vad = vad or VoiceActivityDetector(cfg.sample_rate, cfg.vad_aggressiveness)
        self.frame_size = frame_samples(cfg.sample_rate, cfg.frame_ms)
        self._levels: deque[float] = deque(maxlen=max(1, cfg.floor_window_ms // cfg.frame_ms))
        # Per frame of the window: the frame's level if it counted as speech, else None.
        self._window: deque[float | None] = deque(maxlen=max(1, cfg.window_ms // cfg.frame_ms))
        self._index = 0
        self._run = 0  # consecutive frames up to the last one that count towards `onset_ms`
        self._run_peak = -np.inf  # the loudest frame of that run (dBFS)
        self.last_counted = False  # whether the last frame processed counted as speech

    @property
    def evidence_ms(self) -> float:
        """Milliseconds of user speech within the last `window_ms` (0 if not speech-like)."""
        levels = [lv for lv in self._window if lv is not None]
        if not levels or max(levels) - min(levels) < self.config.min_spread_db:
            return 0.0
        return len(levels) * self.config.frame_ms

    @property
    def onset_ms(self) -> float:
        """Milliseconds of the run of consecutive speech frames ending with the last frame."""
        return self._run * self.config.frame_ms

    @property
    def first_speech_s(self) -> float | None:
        """Stream time of the oldest counted frame in the window (None when none counted)."""
        for age, level in enumerate(self._window):
            if level is not None:
                start = self._index - len(self._window) + age
                return start * self.config.frame_ms / 1000
        return None

    @property
    def noise_floor_db(self) -> float | None:
        """The background level the margin is measured from (None before any frame)."""
        return min(self._levels) if self._levels else None

    def process(self, frame: np.ndarray, mic: np.ndarray | None = None) -> float:
        """Score one frame; returns `evidence_ms` after it.

        `frame` is the echo-cancelled frame, float32 [frame_size]; `mic` the same frame before
        cancelling (None without a canceller).
        """
        if frame.shape != (self.frame_size,):
            raise ValueError(f"expected a frame of {self.frame_size} samples, got {frame.shape}")
        level = frame_level_db(frame)
        mic_level = level if mic is None else frame_level_db(mic)
        removed = mic_level - level
        counted = removed < self.config.max_removed_db and self._counts(frame, level)
        self._levels.append(mic_level)
        self._window.append(level if counted else None)
        self._index += 1
        self._extend_run(counted and removed < self.config.onset_max_removed_db, level)
        self.last_counted = counted
        return self.evidence_ms

    def _extend_run(self, onset: bool, level: float) -> None:
        if not onset:
            self._run, self._run_peak = 0, -np.inf
        elif level < self._run_peak - self.config.onset_max_drop_db:
            self._run, self._run_peak = 1, level
        else:
            self._run, self._run_peak = self._run + 1, max(self._run_peak, level)

    def forget_speech(self) -> None:
        """Empty the window (speech found so far no longer counts); keep the background level."""
        self._window.clear()
        self._run, self._run_peak = 0, -np.inf

    def reset(self) -> None:
        """Forget the window and the background level (stream time keeps counting)."""
        self._levels.clear()
        self._window.clear()
        self._run, self._run_peak = 0, -np.inf
        self.last_counted = False

    def _counts(self, frame: np.ndarray, level: float) -> bool:
        cfg = self.config
        if level < cfg.min_level_dbfs:
            return False
        floor = self.noise_floor_db
        if floor is not None and level < floor + cfg.noise_margin_db:
            return False
        return self._vad.is_speech(frame)


class EchoPresence:
    """Whether the agent's voice comes back into the microphone at all, per 10 ms frame levels.

    A canceller that has not learnt a call's echo path yet lets echo through, so the session
    guards barge-in for its first seconds, but only on calls that have echo: this says which.
    The microphone's level envelope (before cancelling) is correlated with the far end's over
    the last `window_frames` frames at every lag up to `max_lag_frames` (the echo round trip),
    both stripped of their slow trend (`trend_frames`) so that only syllables count, not the
    step of the agent starting to talk; echo follows the far end's syllables closely
    (correlation ~0.8) at one lag, estimate after estimate. Estimates start once the far end has talked for half a window long
    enough ago for its echo to be in the microphone window. `echo_found` is None until known;
    it becomes True on `confirmations` close matches in a row at a steady lag (and stays so:
    chance likenesses, e.g. of the user's voice, jump between lags), and False only while the microphone stays
    quiet too: the user talking over the agent can mask an echo, never prove there is none.
    """

    def __init__(
        self,
        window_frames: int = 50,
        max_lag_frames: int = 50,
        found_above: float = 0.5,
        absent_below: float = 0.3,
        floor_db: float = -70.0,
        every_frames: int = 10,
        trend_frames: int = 25,
        confirmations: int = 3,
    ) -> None:
        self.trend, self.confirmations = trend_frames, confirmations
        self._matches: list[int] = []  # lags of the close matches in a row so far
        self.window, self.max_lag = window_frames, max_lag_frames
        self.found_above, self.absent_below = found_above, absent_below
        self.floor_db, self.every = floor_db, every_frames
        size = window_frames + max_lag_frames
        self._far: deque[float] = deque(maxlen=size)
        self._mic: deque[float] = deque(maxlen=size)
        self._mic_frames = 0
        self.echo_found: bool | None = None
        self.correlation: float | None = None  # best of the last estimate

    def push_far(self, frame: np.ndarray) -> None:
        """A 10 ms frame the server sent (silence included), in order."""
        self._far.append(max(frame_level_db(frame), self.floor_db))

    def push_mic(self, frame: np.ndarray) -> None:
        """The next 10 ms microphone frame, before echo cancellation."""
        self._mic.append(max(frame_level_db(frame), self.floor_db))
        self._mic_frames += 1
        if self._mic_frames % self.every == 0:
            self._estimate()

    def _estimate(self) -> None:
        size = self.window + self.max_lag
        if self.echo_found or len(self._far) < size or len(self._mic) < self.window:
            return
        far = np.asarray(self._far, np.float64)
        talked = far[: self.window] > self.floor_db + 20.0  # echo of these is in the mic window
        if talked.sum() < self.window // 2:
            return
        far = far - uniform_filter1d(far, self.trend, mode="nearest")
        levels = np.asarray(self._mic, np.float64)
        mic = (levels - uniform_filter1d(levels, self.trend, mode="nearest"))[-self.window :]
        rows = sliding_window_view(far, self.window)  # row j: far ending max_lag - j frames ago
        corr = _pearson_rows(rows, mic)
        self.correlation = float(np.max(corr))
        if self.correlation >= self.found_above and mic.std() >= 2.0:  # syllables, not noise
            self._note_match(self.max_lag - int(np.argmax(corr)))
            return
        self._matches.clear()
        if self.correlation < self.absent_below and _mostly_quiet(levels[-self.window :]):
            self.echo_found = False

    def _note_match(self, lag: int) -> None:
        if self._matches and abs(lag - self._matches[-1]) > 2:
            self._matches.clear()
        self._matches.append(lag)
        if len(self._matches) >= self.confirmations:
            self.echo_found = True


def _mostly_quiet(levels_db: np.ndarray, within_db: float = 10.0, share: float = 0.9) -> bool:
    """True when nearly every frame sits within `within_db` of the quietest: only noise."""
    return float(np.mean(levels_db < levels_db.min() + within_db)) >= share


def _pearson_rows(rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Correlation of each row of `rows` [k, n] with `x` [n] (0 where either is flat)."""
    rc = rows - rows.mean(axis=1, keepdims=True)
    xc = x - x.mean()
    denom = np.sqrt((rc**2).sum(axis=1) * float(xc @ xc))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (rc @ xc) / denom
    return np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)


__all__ = ["BargeInConfig", "BargeInDetector", "EchoPresence", "frame_level_db"]
