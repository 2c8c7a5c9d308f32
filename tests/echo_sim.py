"""A simulated room for echo-cancellation tests and benchmarks (16 kHz mono float32).

The far end (what the server sent) plays through a loudspeaker and comes back into the caller's
microphone after a bulk delay and an exponentially decaying reverberation tail; a near-end talker
and background noise may be added on top. Every component is kept apart, so a test can measure
how much echo a canceller removed (ERLE) and how much of the near talker it kept.

Speech comes from eSpeak NG when it is installed, else from a deterministic synthetic
speech-like signal (voiced pulse trains through formant resonators, cut into syllables), so the
helpers never need the network and always give the same samples for the same arguments.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
import wave
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
from scipy.signal import lfilter

SAMPLE_RATE = 16_000
FRAME_SIZE = 160  # 10 ms at 16 kHz
# Frames whose echo is this far below the loudest echo frame count as "no echo" (speech pauses).
ECHO_ACTIVE_RANGE_DB = 30.0


# --- speech -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _espeak_cached(text: str, voice: str, pitch: int) -> np.ndarray | None:
    if shutil.which("espeak-ng") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        cmd = ["espeak-ng", "-v", voice, "-p", str(pitch), "-w", str(path), text]
        subprocess.run(cmd, check=True, capture_output=True)
        with wave.open(str(path)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    samples = pcm.astype(np.float32) / 32768.0
    return soxr.resample(samples, rate, SAMPLE_RATE).astype(np.float32)


def espeak_speech(text: str, voice: str = "en-us", pitch: int = 50) -> np.ndarray | None:
    """`text` spoken by eSpeak NG as 16 kHz mono float32 [n], or None without espeak-ng.

    `pitch` is eSpeak's 0..99 pitch setting; a different voice and pitch make a second talker.
    """
    cached = _espeak_cached(text, voice, pitch)
    return None if cached is None else cached.copy()


def synthetic_speech(seconds: float, seed: int = 0, f0_hz: float = 120.0) -> np.ndarray:
    """A deterministic speech-like signal: float32 [seconds * 16000], peak 0.5.

    Syllables of 120-300 ms (voiced pulse trains with a drifting pitch around `f0_hz`, shaped by
    three formant resonators) alternate with 40-200 ms pauses, which gives the spectral colour
    and on/off rhythm that adaptive filters and VADs react to.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    out = np.zeros(n, np.float32)
    pos = int(rng.uniform(0.02, 0.1) * SAMPLE_RATE)
    while pos < n:
        length = int(rng.uniform(0.12, 0.30) * SAMPLE_RATE)
        syllable = _synthetic_syllable(length, rng, f0_hz)[: n - pos]
        out[pos : pos + len(syllable)] = syllable
        pos += length + int(rng.uniform(0.04, 0.20) * SAMPLE_RATE)
    return (0.5 * out / max(float(np.max(np.abs(out))), 1e-9)).astype(np.float32)


def _synthetic_syllable(length: int, rng: np.random.Generator, f0_hz: float) -> np.ndarray:
    t = np.arange(length) / SAMPLE_RATE
    f0 = f0_hz * (1.0 + 0.15 * np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 6)))
    phase = np.cumsum(f0 / SAMPLE_RATE)
    source = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)
    source += 0.05 * rng.standard_normal(length)  # breath noise keeps the spectrum full
    for formant in (rng.uniform(300, 900), rng.uniform(900, 2200), rng.uniform(2200, 3500)):
        source = _resonate(source, formant, bandwidth_hz=formant * 0.12)
    return (source * np.hanning(length)).astype(np.float32)


def _resonate(x: np.ndarray, freq_hz: float, bandwidth_hz: float) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth_hz / SAMPLE_RATE)
    theta = 2 * np.pi * freq_hz / SAMPLE_RATE
    return lfilter([1.0 - r], [1.0, -2 * r * np.cos(theta), r * r], x)


def speech(text: str, voice: str = "en-us", pitch: int = 50) -> np.ndarray:
    """`text` as 16 kHz float32 speech: eSpeak NG if installed, else synthetic speech.

    The synthetic fallback lasts about as long as eSpeak would take (70 ms per character) and is
    seeded from the arguments, so each (text, voice, pitch) is a stable, distinct talker.
    """
    spoken = espeak_speech(text, voice, pitch)
    if spoken is not None:
        return spoken
    seed = zlib.crc32(f"{voice}/{pitch}/{text}".encode())
    return synthetic_speech(0.07 * len(text), seed=seed, f0_hz=80.0 + 1.6 * pitch)


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """`x` repeated (with no gap) or cut to exactly `n` samples."""
    reps = -(-n // max(len(x), 1))
    return np.tile(x, reps)[:n].astype(np.float32)


# --- the echo path ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoPath:
    """Loudspeaker-to-microphone path: a bulk delay, then a decaying reverberation tail.

    `gain` is the L2 norm of the impulse response, so the echo carries about `gain**2` of the
    far end's energy (0.5 -> echo 6 dB below the far end). `reverb_ms` is the time the tail takes
    to fall by 60 dB (0 = a pure delay). `drive` > 0 overdrives the loudspeaker with tanh
    saturation (drive 1 squeezes a 0.5 peak by 8%, drive 2 by 24%): an echo no linear filter
    can model fully.
    """

    delay_ms: float
    gain: float = 0.5
    reverb_ms: float = 0.0
    drive: float = 0.0
    seed: int = 0

    def impulse_response(self) -> np.ndarray:
        """The path's impulse response: float64 [delay + tail] at 16 kHz."""
        delay = int(round(self.delay_ms * SAMPLE_RATE / 1000))
        tail_len = int(self.reverb_ms * SAMPLE_RATE / 1000)
        h = np.zeros(delay + max(tail_len, 1))
        h[delay] = 1.0
        if tail_len:
            rng = np.random.default_rng(self.seed)
            k = np.arange(tail_len)
            decay = 10 ** (-3.0 * k / tail_len)  # -60 dB (amplitude 1e-3) at the end
            h[delay : delay + tail_len] += 0.5 * rng.standard_normal(tail_len) * decay
        return self.gain * h / np.linalg.norm(h)

    def apply(self, far: np.ndarray) -> np.ndarray:
        """`far` float32 [n] through the path: float32 [n] (the tail past n is dropped)."""
        played = np.tanh(self.drive * far) / self.drive if self.drive > 0 else far
        return np.convolve(played, self.impulse_response())[: len(far)].astype(np.float32)

    def label(self) -> str:
        shape = f"room {self.reverb_ms:.0f} ms" if self.reverb_ms else "pure delay"
        label = f"{shape}, delay {self.delay_ms:.0f} ms, gain {20 * np.log10(self.gain):+.0f} dB"
        return label + (f", drive {self.drive:g}" if self.drive else "")


def room_path(gain: float = 0.5, seed: int = 0) -> EchoPath:
    """A small room: 20 ms to the microphone, a 60 ms reverberation tail."""
    return EchoPath(delay_ms=20.0, gain=gain, reverb_ms=60.0, seed=seed)


def delay_path(gain: float = 0.5) -> EchoPath:
    """A pure 150 ms delay, like a network round trip with a hard echo."""
    return EchoPath(delay_ms=150.0, gain=gain)


# --- a scene ----------------------------------------------------------------------------------


@dataclass
class EchoScene:
    """Every signal of one simulated call, float32 [n] at 16 kHz, n a whole number of frames.

    `mic` = `echo` + `near` + `noise` (clipped to [-1, 1]); `far` is what the server sent.
    """

    far: np.ndarray
    echo: np.ndarray
    near: np.ndarray
    noise: np.ndarray
    mic: np.ndarray

    @property
    def n_frames(self) -> int:
        return len(self.mic) // FRAME_SIZE

    def echo_frames(self, after_s: float = 0.0) -> np.ndarray:
        """bool [n_frames]: echo present, no near talker, and at or after `after_s`."""
        active = _active(self.echo) & ~_active(self.near, floor_db=-60.0)
        return active & (frame_times(self.n_frames) >= after_s)

    def double_talk_frames(self, after_s: float = 0.0) -> np.ndarray:
        """bool [n_frames]: echo and near talker both present, at or after `after_s`."""
        both = _active(self.echo) & _active(self.near)
        return both & (frame_times(self.n_frames) >= after_s)

    def near_frames(self, after_s: float = 0.0) -> np.ndarray:
        """bool [n_frames]: the near talker is speaking, at or after `after_s`."""
        return _active(self.near) & (frame_times(self.n_frames) >= after_s)


def simulate(
    far: np.ndarray,
    path: EchoPath,
    near: np.ndarray | None = None,
    near_start_s: float = 0.0,
    noise_dbfs: float | None = None,
    seed: int = 0,
) -> EchoScene:
    """Build a scene: `far` [n] through `path`, plus `near` placed at `near_start_s`, plus noise.

    The scene is cut to a whole number of 10 ms frames. `noise_dbfs` is the RMS of white noise
    relative to full scale (e.g. -60), or None for none.
    """
    n = len(far) - len(far) % FRAME_SIZE
    far = far[:n].astype(np.float32)
    echo = path.apply(far)
    near_sig = np.zeros(n, np.float32)
    if near is not None:
        start = int(near_start_s * SAMPLE_RATE)
        part = near[: max(n - start, 0)]
        near_sig[start : start + len(part)] = part
    noise = np.zeros(n, np.float32)
    if noise_dbfs is not None:
        rng = np.random.default_rng(seed)
        noise = (10 ** (noise_dbfs / 20) * rng.standard_normal(n)).astype(np.float32)
    mic = np.clip(echo + near_sig + noise, -1.0, 1.0).astype(np.float32)
    return EchoScene(far=far, echo=echo, near=near_sig, noise=noise, mic=mic)


# --- running and measuring --------------------------------------------------------------------


def frames(x: np.ndarray) -> np.ndarray:
    """[n] -> [n // 160, 160] (a trailing partial frame is dropped)."""
    n = len(x) // FRAME_SIZE
    return x[: n * FRAME_SIZE].reshape(n, FRAME_SIZE)


def frame_times(n_frames: int) -> np.ndarray:
    """Start time in seconds of each of `n_frames` 10 ms frames."""
    return np.arange(n_frames) * FRAME_SIZE / SAMPLE_RATE


def frame_energy(x: np.ndarray) -> np.ndarray:
    """Mean square per 10 ms frame: float64 [n // 160]."""
    return np.mean(frames(x).astype(np.float64) ** 2, axis=1)


def _active(x: np.ndarray, floor_db: float = -ECHO_ACTIVE_RANGE_DB) -> np.ndarray:
    energy = frame_energy(x)
    peak = float(energy.max()) if energy.size else 0.0
    if peak <= 0.0:
        return np.zeros(len(energy), bool)
    return energy > peak * 10 ** (floor_db / 10)


def run_canceller(
    process: Callable[[np.ndarray, np.ndarray], np.ndarray],
    scene: EchoScene,
    latency_samples: int = 0,
) -> np.ndarray:
    """Feed `scene` frame by frame to `process(near, far)`; float32 [n] output.

    `latency_samples` is the delay the canceller adds to its output; the returned signal is
    shifted back by it (zeros at the end), so it lines up sample for sample with `scene.mic`.
    """
    out = np.concatenate(
        [process(m, f) for m, f in zip(frames(scene.mic), frames(scene.far), strict=True)]
    ).astype(np.float32)
    if latency_samples:
        out = np.concatenate([out[latency_samples:], np.zeros(latency_samples, np.float32)])
    return out


def erle_db(mic: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
    """Echo return loss enhancement over the frames in `mask`: 10 log10(E[mic^2] / E[out^2])."""
    e_in = float(frame_energy(mic)[mask].sum())
    e_out = float(frame_energy(out)[mask].sum())
    return 10 * np.log10(max(e_in, 1e-20) / max(e_out, 1e-20))


def near_level_db(out: np.ndarray, near: np.ndarray, mask: np.ndarray) -> float:
    """Level of the near talker in `out` relative to the talker itself, in dB, over `mask`.

    The least-squares gain of `near` in `out` (what the canceller kept of the talker), so
    uncancelled echo in `out` does not count as kept speech. 0 dB = untouched.
    """
    o, s = _masked(out, mask), _masked(near, mask)
    gain = float(np.dot(o, s) / max(float(np.dot(s, s)), 1e-20))
    return 20 * np.log10(max(gain, 1e-6))


def near_correlation(out: np.ndarray, near: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of `out` with the near talker over the frames in `mask`."""
    o, s = _masked(out, mask), _masked(near, mask)
    return float(np.corrcoef(o, s)[0, 1])


def _masked(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return frames(x)[mask].reshape(-1).astype(np.float64)
