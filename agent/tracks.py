"""The agent's outbound audio track: clock-paced, back-pressured, flushable.

aiortc pulls frames from `recv()`; the agent pushes audio with `await write(samples)`. Only a few
20 ms frames are ever queued ahead of the wall clock, so a barge-in (`flush()`) silences the
output within one or two frames, and `played_samples` tells how much of an answer actually left
the server. When nothing is queued the track sends silence, keeping the RTP clock running.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque
from collections.abc import Callable

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from audio_dsp import FrameChunker, float32_to_int16

AUDIO_PTIME = 0.020  # seconds of audio per outbound frame
OUTPUT_SAMPLE_RATE = 48_000
FRAME_SAMPLES = int(AUDIO_PTIME * OUTPUT_SAMPLE_RATE)  # 960
TIME_BASE = fractions.Fraction(1, OUTPUT_SAMPLE_RATE)

FrameListener = Callable[[np.ndarray, bool], None]


class AgentAudioTrack(MediaStreamTrack):
    """48 kHz mono s16 audio track fed by `write()`.

    `max_queued_frames` bounds how far ahead of the clock a writer may run (3 frames = 60 ms).
    Listeners added with `add_frame_listener` see every frame as it leaves (int16 [960], and
    whether it is agent audio rather than idle silence): the far end for an echo canceller.
    """

    kind = "audio"

    def __init__(
        self, max_queued_frames: int = 3, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        if max_queued_frames < 1:
            raise ValueError("max_queued_frames must be at least 1")
        self._max_queued = max_queued_frames
        self._clock = clock
        self._queue: deque[np.ndarray] = deque()
        self._chunker = FrameChunker(FRAME_SAMPLES, np.int16)
        self._room = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._generation = 0  # bumped by flush(): writers from before it stop writing
        self._start: float | None = None
        self._pts = 0
        self._silence = np.zeros(FRAME_SAMPLES, np.int16)
        self._listeners: list[FrameListener] = []
        self._audio_waiters: list[asyncio.Future[float]] = []
        self.played_samples = 0  # agent audio samples sent so far (silence not counted)
        self.sample_rate = OUTPUT_SAMPLE_RATE

    @property
    def played_s(self) -> float:
        """Seconds of agent audio sent so far (the played-out position)."""
        return self.played_samples / OUTPUT_SAMPLE_RATE

    @property
    def queued_frames(self) -> int:
        """Frames waiting to be sent."""
        return len(self._queue)

    def add_frame_listener(self, listener: FrameListener) -> None:
        """Call `listener(frame, is_audio)` for each frame sent (keep it cheap: it runs in recv)."""
        self._listeners.append(listener)

    async def write(self, samples: np.ndarray) -> None:
        """Queue float32 mono 48 kHz audio; returns once all of it is queued.

        Waits while the queue is full. A `flush()` or `stop()` during the wait drops the rest.
        Samples that do not fill a frame are held until the next write or `drain()`.
        """
        generation = self._generation
        for frame in self._chunker.push(float32_to_int16(samples)):
            if not await self._wait_for_room(generation):
                return
            self._enqueue(frame)

    async def drain(self) -> None:
        """Send any held partial frame (padded with silence), then wait until all is sent."""
        generation = self._generation
        for frame in self._chunker.flush():
            if not await self._wait_for_room(generation):
                return
            self._enqueue(frame)
        await self._empty.wait()

    def flush(self) -> None:
        """Drop everything queued now; pending writers return without queuing more."""
        self._generation += 1
        self._queue.clear()
        self._chunker.reset()
        self._room.set()
        self._empty.set()

    def next_audio_sent(self) -> asyncio.Future[float]:
        """A future resolved with the clock time at which the next agent audio frame is sent."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._audio_waiters.append(future)
        return future

    def stop(self) -> None:
        """End the track and release every waiting writer."""
        self.flush()
        for waiter in self._audio_waiters:
            waiter.cancel()
        self._audio_waiters.clear()
        self._listeners.clear()
        super().stop()

    async def recv(self) -> AudioFrame:
        """The next 20 ms frame, released on the wall clock (agent audio, else silence)."""
        if self.readyState != "live":
            raise MediaStreamError
        await self._wait_for_deadline()
        if self.readyState != "live":
            raise MediaStreamError
        samples, is_audio = self._next_samples()
        for listener in self._listeners:
            listener(samples, is_audio)
        return self._make_frame(samples)

    async def _wait_for_room(self, generation: int) -> bool:
        while len(self._queue) >= self._max_queued:
            self._room.clear()
            await self._room.wait()
            if generation != self._generation or self.readyState != "live":
                return False
        return generation == self._generation and self.readyState == "live"

    def _enqueue(self, frame: np.ndarray) -> None:
        self._queue.append(frame)
        self._empty.clear()

    async def _wait_for_deadline(self) -> None:
        if self._start is None:
            self._start = self._clock()
            return
        self._pts += FRAME_SAMPLES
        wait = self._start + self._pts / OUTPUT_SAMPLE_RATE - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)

    def _next_samples(self) -> tuple[np.ndarray, bool]:
        if not self._queue:
            return self._silence, False
        samples = self._queue.popleft()
        self.played_samples += FRAME_SAMPLES
        self._room.set()
        if not self._queue:
            self._empty.set()
        self._resolve_audio_waiters()
        return samples, True

    def _resolve_audio_waiters(self) -> None:
        if not self._audio_waiters:
            return
        now = self._clock()
        for waiter in self._audio_waiters:
            if not waiter.done():
                waiter.set_result(now)
        self._audio_waiters.clear()

    def _make_frame(self, samples: np.ndarray) -> AudioFrame:
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.pts = self._pts
        frame.sample_rate = OUTPUT_SAMPLE_RATE
        frame.time_base = TIME_BASE
        return frame


__all__ = ["AUDIO_PTIME", "FRAME_SAMPLES", "OUTPUT_SAMPLE_RATE", "AgentAudioTrack"]
