"""Test doubles behind the real interfaces: a scripted engine, a mic track, a data channel."""

from __future__ import annotations

import asyncio
import fractions
import shutil
import subprocess
import time
import wave
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame
from pyee.asyncio import AsyncIOEventEmitter

from agent.engine import (
    AudioChunk,
    Engine,
    HistoryItem,
    Reply,
    ReplyEvent,
    StageTimings,
    TextDelta,
    UserTranscript,
    UserTurn,
    played_fraction,
)
from audio_dsp import StreamResampler, float32_to_int16, int16_to_float32


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `predicate` until it holds; fails the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def espeak_16k(text: str, workdir: Path) -> np.ndarray:
    """`text` spoken by eSpeak NG as 16 kHz mono float32 (skips the test without the tools)."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("espeak-ng and sox are needed to synthesize test speech")
    raw, out = workdir / "espeak-raw.wav", workdir / "espeak-16k.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out)], check=True)
    with wave.open(str(out)) as w:
        return int16_to_float32(np.frombuffer(w.readframes(w.getnframes()), np.int16))


def tone(seconds: float, sample_rate: int, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@dataclass
class Script:
    """What the fake engine answers, and how slowly."""

    transcript: str = "hello agent"
    text: str = "hello there how can I help"
    audio_s: float = 0.6
    sample_rate: int = 24_000
    chunk_s: float = 0.1
    first_delay_s: float = 0.05
    chunk_delay_s: float = 0.0
    freq: float = 440.0
    fail_after_chunks: int | None = None  # raise RuntimeError after this many audio chunks


class FakeReply(Reply):
    """Yields the script: user transcript, one delta per word, then tone audio chunks."""

    def __init__(self, turn: UserTurn, script: Script) -> None:
        self.turn = turn
        self.script = script
        self.timings = StageTimings()
        self.cancelled = False
        self.played_s: list[float | None] = []

    def __aiter__(self) -> AsyncIterator[ReplyEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[ReplyEvent]:
        s = self.script
        await asyncio.sleep(s.first_delay_s)
        self.timings.add("think", s.first_delay_s)
        yield UserTranscript(self.turn.text or s.transcript)
        for i, word in enumerate(s.text.split()):
            yield TextDelta(word if i == 0 else f" {word}")
        audio = tone(s.audio_s, s.sample_rate, s.freq)
        step = max(1, int(s.chunk_s * s.sample_rate))
        for n, start in enumerate(range(0, len(audio), step)):
            if s.fail_after_chunks is not None and n >= s.fail_after_chunks:
                raise RuntimeError("scripted engine failure")
            yield AudioChunk(audio[start : start + step], s.sample_rate)
            if s.chunk_delay_s:
                await asyncio.sleep(s.chunk_delay_s)

    async def cancel(self) -> None:
        self.cancelled = True

    def history(self, played_s: float | None) -> list[HistoryItem]:
        self.played_s.append(played_s)
        words = self.script.text.split()
        share = played_fraction(played_s, self.script.audio_s)
        heard = " ".join(words[: round(len(words) * share)])
        return [
            HistoryItem("user", self.turn.text or self.script.transcript),
            HistoryItem("assistant", heard, interrupted=share < 1.0),
        ]


class FakeEngine(Engine):
    """Answers every turn with the same script and records each call."""

    name = "fake"

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.calls: list[tuple[UserTurn, list[HistoryItem]]] = []
        self.replies: list[FakeReply] = []
        self.started = False
        self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def respond(self, turn: UserTurn, history: Sequence[HistoryItem]) -> FakeReply:
        self.calls.append((turn, list(history)))
        reply = FakeReply(turn, self.script)
        self.replies.append(reply)
        return reply


class MicTrack(MediaStreamTrack):
    """A microphone: 48 kHz stereo s16 20 ms frames paced by the clock, silence when idle.

    `say(samples, rate)` queues mono float32 audio to be "spoken" from the next frame on;
    `last_voiced_sent` is when the last frame peaking above VOICED_PEAK left.
    With `realtime=False` frames come as fast as they are read (for endpointer-only tests).
    """

    kind = "audio"
    RATE = 48_000
    FRAME = 960
    VOICED_PEAK = 0.02

    def __init__(self, realtime: bool = True) -> None:
        super().__init__()
        self._realtime = realtime
        self._pending: deque[np.ndarray] = deque()
        self._buffer = np.zeros(0, np.int16)
        self._start: float | None = None
        self._pts = 0
        self.frames_sent = 0
        self.last_voiced_sent = 0.0

    def say(self, samples: np.ndarray, sample_rate: int) -> float:
        """Queue speech; returns its duration in seconds."""
        rs = StreamResampler(sample_rate, self.RATE)
        up = np.concatenate([rs.process(samples), rs.flush()])
        self._buffer = np.concatenate([self._buffer, float32_to_int16(up)])
        return len(samples) / sample_rate

    @property
    def speaking(self) -> bool:
        return len(self._buffer) > 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._realtime:
            await self._pace()
        else:
            await asyncio.sleep(0)
        chunk = self._buffer[: self.FRAME]
        self._buffer = self._buffer[self.FRAME :]
        mono = np.zeros(self.FRAME, np.int16)
        mono[: len(chunk)] = chunk
        if len(chunk) and np.abs(chunk).max() > self.VOICED_PEAK * 32768:
            self.last_voiced_sent = time.monotonic()
        stereo = np.repeat(mono, 2).reshape(1, -1)
        frame = AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
        frame.sample_rate = self.RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, self.RATE)
        self._pts += self.FRAME
        self.frames_sent += 1
        return frame

    async def _pace(self) -> None:
        if self._start is None:
            self._start = time.monotonic()
            return
        wait = self._start + self._pts / self.RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)


class FakeChannel(AsyncIOEventEmitter):
    """An open `events` data channel that records what the server sends."""

    label = "events"

    def __init__(self, ready_state: str = "open") -> None:
        super().__init__()
        self.readyState = ready_state
        self.sent: list[str] = []

    def send(self, data: str | bytes) -> None:
        if self.readyState != "open":
            raise RuntimeError("channel is not open")
        self.sent.append(data if isinstance(data, str) else data.decode())

    def open(self) -> None:
        self.readyState = "open"
        self.emit("open")


@dataclass
class OutputPump:
    """Pulls frames from an outbound track like aiortc's RTP sender does, and keeps them."""

    track: MediaStreamTrack
    frames: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> OutputPump:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.track.recv()
                self.frames.append(frame.to_ndarray().reshape(-1).copy())
                self.times.append(time.monotonic())
        except MediaStreamError:
            return

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def audio_frames(self) -> int:
        return sum(1 for f in self.frames if np.abs(f).max() > 0)
