"""The agent's outbound audio track: clock-paced, back-pressured, flushable, holdable.

aiortc pulls frames from `recv()`; the agent pushes audio with `await write(samples)`. Only a few
20 ms frames are ever queued ahead of the wall clock, so a barge-in (`flush()`) silences the
output within one or two frames, and `played_samples` tells how much of an answer actually left
the server. When nothing is queued the track sends silence, keeping the RTP clock running.

`hold()` pauses the audio without losing any (a provisional barge-in, "duck"): silence goes out,
the queue keeps what was written and the writer waits. `resume(replay_samples)` sends it after
all, preceded by the last `replay_samples` sent before the hold (the client muted that audio
while it was still on its way); audio counts as played only once it is sent (again).

Audio never starts or stops with a click: a frame sent after silence fades in over its first
5 ms, and a frame that nothing follows (the queue is empty and no writer is writing: the
answer ended, or the engine fell behind playback) fades out over its last 5 ms. An engine that
falls behind is heard as a clean pause where its audio ran out, then the rest; nothing is
repeated or lost.
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

MAX_REPLAY_FRAMES = 25  # a resume re-sends at most this much audio (0.5 s)
EDGE_FADE_SAMPLES = 240  # 5 ms fades where audio starts after silence or runs out


def _fade_in_weights(n: int) -> np.ndarray:
    """Raised-cosine weights rising from 0 towards 1 over `n` samples (float32)."""
    return (0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)).astype(np.float32)


_FADE_IN = _fade_in_weights(EDGE_FADE_SAMPLES)
_FADE_OUT = _FADE_IN[::-1].copy()

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
        self._held_at: int | None = None  # the frame count when hold() began (None: not held)
        self._frames_sent = 0  # frames sent so far, silence included (the track's clock)
        # The audio frames sent lately, each with the frame count it left at: a resume replays
        # the tail of these that was sent shortly before the hold.
        self._recent: deque[tuple[int, np.ndarray]] = deque(maxlen=MAX_REPLAY_FRAMES)
        self._writing = 0  # writers inside write() or drain(): more audio is on its way
        self._after_gap = True  # the last frame sent was silence, or faded out
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

    @property
    def held(self) -> bool:
        """True between `hold()` and the `resume()` or `flush()` that ends it."""
        return self._held_at is not None

    def add_frame_listener(self, listener: FrameListener) -> None:
        """Call `listener(frame, is_audio)` for each frame sent (keep it cheap: it runs in recv)."""
        self._listeners.append(listener)

    async def write(self, samples: np.ndarray) -> None:
        """Queue float32 mono 48 kHz audio; returns once all of it is queued.

        Waits while the queue is full. A `flush()` or `stop()` during the wait drops the rest.
        Samples that do not fill a frame are held until the next write or `drain()`.
        """
        await self._enqueue_all(self._chunker.push(float32_to_int16(samples)))

    async def drain(self) -> None:
        """Send any held partial frame (padded with silence), then wait until all is sent."""
        if await self._enqueue_all(self._chunker.flush()):
            await self._empty.wait()

    async def _enqueue_all(self, frames: list[np.ndarray]) -> bool:
        """Queue `frames` as room frees up; False if a flush or stop dropped the rest."""
        generation = self._generation
        self._writing += 1
        try:
            for frame in frames:
                if not await self._wait_for_room(generation):
                    return False
                self._enqueue(frame)
            return True
        finally:
            self._writing -= 1

    def flush(self) -> None:
        """Drop everything queued (or held) now; pending writers return without queuing more."""
        self._generation += 1
        self._queue.clear()
        self._recent.clear()
        self._held_at = None
        self._chunker.reset()
        self._room.set()
        self._empty.set()

    def hold(self) -> None:
        """Send silence from the next frame on, keeping what is queued; writers wait meanwhile."""
        if self._held_at is None:
            self._held_at = self._frames_sent

    def resume(self, replay_samples: int = 0) -> int:
        """End a hold: send the held audio, after re-sending what went out just before the hold.

        Replays the audio frames sent within the last `replay_samples` (rounded up to whole
        frames) before the hold began; they count as not played until they are sent again.
        Returns the number of samples replayed.
        """
        held_at, self._held_at = self._held_at, None
        if held_at is None:
            return 0
        first = held_at - -(-max(replay_samples, 0) // FRAME_SAMPLES)
        replay = [frame for sent_at, frame in self._recent if sent_at >= first]
        self._recent.clear()
        if replay:
            self._queue.extendleft(reversed(replay))
            self.played_samples -= len(replay) * FRAME_SAMPLES
            self._empty.clear()
        return len(replay) * FRAME_SAMPLES

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
        sent_at = self._frames_sent
        self._frames_sent += 1
        if not self._queue or self._held_at is not None:
            self._after_gap = True
            return self._silence, False
        samples = self._smoothed(self._queue.popleft())
        self._recent.append((sent_at, samples))
        self.played_samples += FRAME_SAMPLES
        self._room.set()
        if not self._queue:
            self._empty.set()
        self._resolve_audio_waiters()
        return samples, True

    def _smoothed(self, samples: np.ndarray) -> np.ndarray:
        """`samples` faded in after silence, and faded out when nothing follows them."""
        fade_in = self._after_gap
        fade_out = not self._queue and self._writing == 0
        self._after_gap = fade_out
        if not (fade_in or fade_out):
            return samples
        smoothed = samples.astype(np.float32)
        if fade_in:
            smoothed[:EDGE_FADE_SAMPLES] *= _FADE_IN
        if fade_out:
            smoothed[-EDGE_FADE_SAMPLES:] *= _FADE_OUT
        return np.round(smoothed).astype(np.int16)

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
