"""Acoustic echo cancellation on 10 ms frames of 16 kHz mono audio.

When the caller listens on speakers, the agent's own voice comes back in their microphone. An
echo canceller removes it, given the *far end*: exactly the audio the server sent, as 10 ms
frames lined up with the microphone frames they echo into.

    FarEndBuffer      the session pushes sent audio (any chunk size); it hands out, for each
                      microphone frame, the far frame sent `delay_ms` earlier
    EchoCanceller     process(near, far) -> near with the echo removed; backends:
                        WebRtcAec3Canceller  WebRTC AEC3 (pywebrtc-audio): strongest, damps the
                                             near talker during double talk, delays output 8 ms
                        SpeexCanceller       SpeexDSP adaptive filter (+ residual suppressor)
                        NullCanceller        passes the microphone through
    AlignedEchoCanceller  the two together: far_end(chunk) / process(near_frame)

`create_canceller("auto")` picks the strongest backend that is installed: AEC3, then speex,
then none. `bench/bench_aec.py` on simulated rooms: after convergence both AEC3 and speex with
its residual suppressor keep webrtcvad quiet on echo, but speex needs seconds to adapt (the VAD
fires on about half the echo frames of its first 3 s, AEC3 on none), which is when a call's
first reply would interrupt itself; AEC3 also copes better with a distorting loudspeaker.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from audio_dsp.aec_speex import SpeexEchoState, load_speexdsp
from audio_dsp.resample import float32_to_int16, int16_to_float32

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
FRAME_MS = 10
FRAME_SIZE = SAMPLE_RATE * FRAME_MS // 1000  # 160 samples
_DTYPES = (np.dtype(np.int16), np.dtype(np.float32))


class EchoCancellerUnavailable(RuntimeError):
    """A named echo-canceller backend cannot run here (its library is not installed)."""


def _check_frame(x: np.ndarray, label: str) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != 1 or x.shape[0] != FRAME_SIZE:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(
            f"{label} must be one 10 ms frame: 1-D, {FRAME_SIZE} samples at {SAMPLE_RATE} Hz; "
            f"got {shape}"
        )
    if x.dtype not in _DTYPES:
        raise ValueError(f"{label} must be int16 or float32, got {x.dtype}")


def _as_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """int16 <-> float32 in [-1, 1) conversion, contiguous, no copy when already right."""
    if x.dtype == dtype:
        return np.ascontiguousarray(x)
    return float32_to_int16(x) if dtype == np.int16 else int16_to_float32(x)


class EchoCanceller(ABC):
    """Removes the echo of the far end from the near end, one 10 ms frame at a time.

    `process(near, far)` takes two 1-D frames of 160 samples at 16 kHz mono, int16 or float32
    in [-1, 1): `near` from the microphone and `far` the audio the server sent that this frame's
    echo comes from. It returns the cleaned frame in `near`'s dtype and shape. Calls must come
    in stream order, one per 10 ms of audio, silence included, or the adaptive filter loses
    track. `latency_ms` is how far the output lags the input (callers aligning signals use it).
    """

    name: str = "abstract"
    latency_ms: float = 0.0

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        """Cleaned `near`: same dtype, [160]. ValueError for a frame of the wrong size/dtype."""
        _check_frame(near, "near")
        _check_frame(far, "far")
        return self._cancel(np.ascontiguousarray(near), _as_dtype(far, near.dtype))

    @abstractmethod
    def _cancel(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        """Backend work on validated, contiguous frames of one dtype."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything adapted so far (the echo path changed, or a new call starts)."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release native resources early; the canceller must not be used afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class NullCanceller(EchoCanceller):
    """Passes the microphone through unchanged (no canceller, or one turned off)."""

    name = "none"

    def _cancel(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        return near.copy()

    def reset(self) -> None:
        """Nothing to forget."""


class WebRtcAec3Canceller(EchoCanceller):
    """WebRTC's AEC3 through `pywebrtc-audio`: adaptive filter, delay estimator and suppressor.

    Removes 40+ dB of echo and keeps the VAD quiet on echo, but attenuates the near talker
    during double talk (by about 4-6 dB on simulated rooms). Its output lags its input by 8 ms
    (14 ms with the noise suppressor). `noise_suppression` adds WebRTC's noise suppressor
    (`ns_level` 0-3: 6/12/18/21 dB). `stream_delay_ms` is a hint of the far-to-near delay left after any external compensation;
    AEC3's own delay estimator finds the rest.
    """

    def __init__(
        self, noise_suppression: bool = False, ns_level: int = 1, stream_delay_ms: int = 0
    ) -> None:
        try:
            import pywebrtc_audio
        except ImportError as exc:
            raise EchoCancellerUnavailable(
                "WebRTC AEC3 needs `pip install pywebrtc-audio`"
            ) from exc
        self.name = "aec3+ns" if noise_suppression else "aec3"
        self.latency_ms = 14.0 if noise_suppression else 8.0  # measured by cross-correlation
        if noise_suppression:
            self._aec: Any = pywebrtc_audio.AudioProcessor(
                sample_rate=SAMPLE_RATE,
                echo_cancellation=True,
                noise_suppression=True,
                ns_level=ns_level,
                stream_delay_ms=stream_delay_ms,
            )
        else:
            self._aec = pywebrtc_audio.EchoCanceller(
                sample_rate=SAMPLE_RATE, num_channels=1, stream_delay_ms=stream_delay_ms
            )

    def _cancel(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        return self._aec.process(near, far)

    def reset(self) -> None:
        """Forget the adapted filter and delay estimate (the native reset keeps the config)."""
        self._aec.reset()


class SpeexCanceller(EchoCanceller):
    """SpeexDSP's frequency-domain adaptive filter (MDF) via ctypes to `libspeexdsp.so.1`.

    `filter_ms` is the echo tail the filter can model; it must cover the bulk delay not removed
    by a `FarEndBuffer` plus the room's reverberation (longer filters converge more slowly).
    The linear filter alone removes about 20-25 dB after a few seconds; `residual_suppression`
    runs Speex's preprocessor on the filter's residual-echo estimate for 10+ dB more. That
    also denoises (Speex applies echo gains through its denoiser) and delays the output 10 ms.
    """

    def __init__(
        self,
        filter_ms: int = 200,
        residual_suppression: bool = True,
        echo_suppress_db: int = -40,
        echo_suppress_active_db: int = -15,
        noise_suppress_db: int = -15,
    ) -> None:
        try:
            load_speexdsp()
        except OSError as exc:
            raise EchoCancellerUnavailable(str(exc)) from exc
        self.name = "speex+res" if residual_suppression else "speex"
        self.latency_ms = float(FRAME_MS) if residual_suppression else 0.0
        self._new_state = functools.partial(
            SpeexEchoState,
            frame_size=FRAME_SIZE,
            filter_length=filter_ms * SAMPLE_RATE // 1000,
            sample_rate=SAMPLE_RATE,
            residual_suppression=residual_suppression,
            echo_suppress_db=echo_suppress_db,
            echo_suppress_active_db=echo_suppress_active_db,
            noise_suppress_db=noise_suppress_db,
        )
        self._state = self._new_state()

    def _cancel(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        if near.dtype == np.int16:
            return self._state.cancel(near, far)
        out = self._state.cancel(float32_to_int16(near), float32_to_int16(far))
        return int16_to_float32(out)

    def reset(self) -> None:
        """Start over with fresh native state (filter and preprocessor's noise estimate)."""
        self._state.close()
        self._state = self._new_state()

    def close(self) -> None:
        """Free the native SpeexDSP state."""
        self._state.close()


class FarEndBuffer:
    """Lines the audio the server sent up with the microphone frames its echo arrives in.

    `push` takes sent audio in chunks of any size (1-D, 16 kHz mono, int16 or float32); `pop`
    returns the next 10 ms far frame (float32 [160]) for the next microphone frame. Both streams
    are real time and gap-free, so the n-th microphone frame gets the far audio sent `delay_ms`
    before it: the buffer starts with `delay_ms` of silence. Use it for the bulk of the round
    trip (playout and capture buffers, network); the canceller's adaptive filter covers the rest.
    Keep it below the shortest round trip expected: far audio handed out after its echo has
    reached the microphone cannot be cancelled. (On simulated rooms AEC3 finds delays up to
    ~400 ms by itself; speex only reaches as far as its `filter_ms`.)

    Underrun (the far audio of this slot has not been pushed yet) yields zeros for the missing
    samples. If the late audio arrives within `max_lag_ms` it is dropped rather than played into
    later slots, so alignment holds through jitter; a longer gap is taken as the far end having
    stopped, and the next push starts on time again. Above `max_buffered_ms` of queued audio
    (the far end runs faster than the microphone) the oldest samples are dropped.
    """

    def __init__(
        self,
        delay_ms: float = 0.0,
        max_lag_ms: float = 60.0,
        max_buffered_ms: float = 1000.0,
    ) -> None:
        if delay_ms < 0 or max_lag_ms < 0:
            raise ValueError("delay_ms and max_lag_ms must not be negative")
        self._delay = _ms_to_samples(delay_ms)
        self._max_lag = _ms_to_samples(max_lag_ms)
        self._max_buffered_setting = _ms_to_samples(max_buffered_ms)
        self._queue = np.zeros(self._delay, np.float32)
        self._owed = 0  # samples handed out as zeros whose real audio has not arrived yet
        self._streaming = False  # far audio arrived recently enough to keep slots for it
        self._overflowing = False  # warned about running ahead; quiet until it recovers

    @property
    def _max_buffered(self) -> int:
        return max(self._max_buffered_setting, self._delay + FRAME_SIZE)

    @property
    def delay_ms(self) -> float:
        """Bulk delay between sending audio and its echo reaching the microphone frames."""
        return self._delay * 1000 / SAMPLE_RATE

    @delay_ms.setter
    def delay_ms(self, value: float) -> None:
        """Change the delay now: more delay inserts silence, less drops the oldest audio."""
        if value < 0:
            raise ValueError("delay_ms must not be negative")
        new = _ms_to_samples(value)
        change, self._delay = new - self._delay, new
        if change > 0:
            self._queue = np.concatenate([np.zeros(change, np.float32), self._queue])
        else:
            self._queue = self._queue[-change:]

    @property
    def buffered(self) -> int:
        """Samples queued (the delay's silence included)."""
        return len(self._queue)

    def push(self, samples: np.ndarray) -> None:
        """Queue sent audio: 1-D, 16 kHz mono, int16 or float32 in [-1, 1), any length."""
        data = samples.reshape(-1)
        data = int16_to_float32(data) if data.dtype == np.int16 else data.astype(np.float32)
        if self._streaming and self._owed:
            late = min(self._owed, len(data))
            data, self._owed = data[late:], self._owed - late
        self._streaming = True
        self._queue = np.concatenate([self._queue, data])
        self._drop_overflow()

    def _drop_overflow(self) -> None:
        overflow = len(self._queue) - self._max_buffered
        if overflow <= 0:
            self._overflowing = False
            return
        log = logger.debug if self._overflowing else logger.warning
        log("far-end audio is %d samples ahead of the microphone: dropped", overflow)
        self._overflowing = True
        self._queue = self._queue[overflow:]

    def pop(self) -> np.ndarray:
        """The far frame for the next microphone frame: float32 [160], zeros where none came."""
        frame = np.zeros(FRAME_SIZE, np.float32)
        take = min(FRAME_SIZE, len(self._queue))
        frame[:take] = self._queue[:take]
        self._queue = self._queue[take:]
        if take < FRAME_SIZE:
            self._note_underrun(FRAME_SIZE - take)
        return frame

    def _note_underrun(self, missing: int) -> None:
        if not self._streaming:
            return
        self._owed += missing
        if self._owed > self._max_lag:
            logger.debug("far end silent for over %d samples: treated as stopped", self._max_lag)
            self._owed, self._streaming = 0, False

    def reset(self) -> None:
        """Drop queued audio and start again from `delay_ms` of silence."""
        self._queue = np.zeros(self._delay, np.float32)
        self._owed, self._streaming, self._overflowing = 0, False, False


def _ms_to_samples(ms: float) -> int:
    return int(round(ms * SAMPLE_RATE / 1000))


class AlignedEchoCanceller:
    """A canceller fed as a session sees audio: sent chunks on one side, mic frames on the other.

    `far_end(samples)` takes what the outbound track sent (any chunk size, 16 kHz mono);
    `process(frame)` cleans the next 10 ms microphone frame (float32 or int16 [160]) against
    the far audio `buffer` lines up with it, and returns it in the same dtype.
    """

    def __init__(self, canceller: EchoCanceller, buffer: FarEndBuffer | None = None) -> None:
        self.canceller = canceller
        self.buffer = buffer if buffer is not None else FarEndBuffer()

    @property
    def name(self) -> str:
        return self.canceller.name

    def far_end(self, samples: np.ndarray) -> None:
        """Queue audio the server sent."""
        self.buffer.push(samples)

    def process(self, frame: np.ndarray) -> np.ndarray:
        """The microphone frame with the echo of the matching far audio removed."""
        return self.canceller.process(frame, self.buffer.pop())

    def reset(self) -> None:
        """Forget the far audio and the adapted filter."""
        self.buffer.reset()
        self.canceller.reset()

    def close(self) -> None:
        """Release the canceller's native resources."""
        self.canceller.close()


_BACKENDS: dict[str, Callable[..., EchoCanceller]] = {
    "aec3": WebRtcAec3Canceller,
    "speex": SpeexCanceller,
    "none": NullCanceller,
}
# Strongest first, from bench/bench_aec.py (ERLE and VAD false-speech rate on echo).
AUTO_ORDER = ("aec3", "speex", "none")


def available_backends() -> list[str]:
    """Names of the backends that can be built here, strongest first."""
    names = []
    for name in AUTO_ORDER:
        try:
            _BACKENDS[name]().close()
        except EchoCancellerUnavailable:
            continue
        names.append(name)
    return names


def create_canceller(name: str = "auto", **options: Any) -> EchoCanceller:
    """An echo canceller by backend name: "auto", "aec3", "speex" or "none".

    "auto" takes the first of `AUTO_ORDER` that is installed, with its defaults, and logs the
    choice. For a named backend `options` go to its constructor (e.g. `noise_suppression=True`
    for aec3, `filter_ms=300` for speex). Raises ValueError for an unknown name or for options
    with "auto" (the backend they would apply to is not known ahead), TypeError for options a
    backend does not take, and EchoCancellerUnavailable when a named backend's library is
    missing.
    """
    if name == "auto":
        if options:
            raise ValueError(f"backend options {sorted(options)} need a backend name, not auto")
        return _create_auto()
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown echo canceller {name!r}; choose from auto, {', '.join(_BACKENDS)}"
        )
    canceller = _BACKENDS[name](**options)
    logger.info("echo canceller: %s", canceller.name)
    return canceller


def _create_auto() -> EchoCanceller:
    for name in AUTO_ORDER:
        try:
            canceller = _BACKENDS[name]()
        except EchoCancellerUnavailable as exc:
            logger.warning("echo canceller %s unavailable: %s", name, exc)
            continue
        logger.info("echo canceller: %s (auto)", canceller.name)
        return canceller
    return NullCanceller()  # unreachable while "none" is in AUTO_ORDER; keeps the type honest


__all__ = [
    "AUTO_ORDER",
    "FRAME_SIZE",
    "SAMPLE_RATE",
    "AlignedEchoCanceller",
    "EchoCanceller",
    "EchoCancellerUnavailable",
    "FarEndBuffer",
    "NullCanceller",
    "SpeexCanceller",
    "WebRtcAec3Canceller",
    "available_backends",
    "create_canceller",
]
