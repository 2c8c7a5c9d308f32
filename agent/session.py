"""One conversation per peer connection: inbound audio -> endpointing -> turns -> outbound audio.

    inbound track (av.AudioFrame, any rate/layout; browsers send 48 kHz stereo s16)
      -> mono float32 -> 16 kHz -> 10 ms frames
      -> [echo canceller, fed the exact audio the outbound track sent, also at 16 kHz / 10 ms]
      -> endpointer -> TurnManager -> engine -> AgentAudioTrack (48 kHz mono, 20 ms)

The session owns two tasks: the audio reader and the control loop that applies client messages
in order. `close()` cancels both and stops the outbound track; it is idempotent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent import metrics
from agent.engine import USER_SAMPLE_RATE, Engine
from agent.messages import DataChannel, EventChannel
from agent.protocol import ClientMessage
from agent.tasks import cancel_and_wait
from agent.tracks import OUTPUT_SAMPLE_RATE, AgentAudioTrack
from agent.turns import TurnConfig, TurnManager
from audio_dsp import (
    Endpointer,
    EndpointerConfig,
    FrameChunker,
    SpeechEnded,
    SpeechStarted,
    StreamResampler,
    int16_to_float32,
    to_mono_float32,
)

_ids = itertools.count(1)


class EchoCanceller(Protocol):
    """Removes the agent's own voice from the microphone signal.

    Both sides are 10 ms frames of 16 kHz mono float32. `far_end` receives, in order and in
    real time, exactly what the outbound track sent (silence included); `process` cleans the
    near-end frame received at the same time.
    """

    def far_end(self, frame: np.ndarray) -> None: ...
    def process(self, frame: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class SessionConfig:
    """Per-conversation audio and turn-taking settings."""

    endpointer: EndpointerConfig = field(default_factory=EndpointerConfig)
    turns: TurnConfig = field(default_factory=TurnConfig)
    # Outbound frames queued ahead of the clock: bounds how late a barge-in silences the agent.
    max_queued_frames: int = 3


class _PrefixLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['session']}] {msg}", kwargs  # type: ignore[index]


class _InboundAudio:
    """Any-rate, any-layout s16/float frames -> 10 ms mono float32 frames at 16 kHz."""

    def __init__(self, frame_size: int) -> None:
        self._resampler: StreamResampler | None = None
        self._chunker = FrameChunker(frame_size)

    def push(self, samples: np.ndarray, sample_rate: int, channels: int) -> list[np.ndarray]:
        if self._resampler is None or self._resampler.in_rate != sample_rate:
            self._resampler = StreamResampler(sample_rate, USER_SAMPLE_RATE)
        mono = to_mono_float32(samples, channels)
        return self._chunker.push(self._resampler.process(mono))


class Session:
    """A conversation with one client: give it the inbound track and the events channel."""

    def __init__(
        self,
        engine: Engine,
        config: SessionConfig | None = None,
        session_id: str | None = None,
        echo_canceller: EchoCanceller | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or SessionConfig()
        self.id = session_id or f"s{next(_ids)}"
        self.log = _PrefixLogger(logging.getLogger("agent.session"), {"session": self.id})
        self._clock = clock
        self.output_track = AgentAudioTrack(self.config.max_queued_frames, clock=clock)
        self.events = EventChannel(self._on_client_message, self.log)
        self.turns = TurnManager(
            engine, self.output_track, self.events.send, self.config.turns, self.log, clock
        )
        self.endpointer = Endpointer(self.config.endpointer)
        self._inbound = _InboundAudio(self.endpointer.frame_size)
        self._echo = echo_canceller
        if echo_canceller is not None:
            self._attach_far_end(echo_canceller)
        self._inbox: asyncio.Queue[ClientMessage] = asyncio.Queue(maxsize=64)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._has_input = False
        self.turns.start()
        self._spawn(self._control_loop(), "control")
        metrics.SESSIONS_ACTIVE.inc()
        metrics.SESSIONS_TOTAL.inc()

    @property
    def closed(self) -> bool:
        return self._closed

    def attach_channel(self, channel: DataChannel) -> None:
        """Use `channel` (label `events`) for state, transcripts and client messages."""
        self.events.attach(channel)

    @property
    def has_input(self) -> bool:
        """True once an inbound audio track is attached."""
        return self._has_input

    def attach_input(self, track: MediaStreamTrack) -> None:
        """Start listening to the caller's audio track (one per session)."""
        if self._has_input:
            raise RuntimeError("this session already has an input track")
        self._has_input = True
        self._spawn(self._read_audio(track), f"read-{track.kind}")

    async def close(self) -> None:
        """Stop the reply, the reader and the control loop; end the outbound track."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            await cancel_and_wait(task, self.log)
        await self.turns.close()
        self.output_track.stop()
        self._close_echo_canceller()
        metrics.SESSIONS_ACTIVE.dec()
        self.log.info("closed")

    # -- tasks -------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"{self.id}-{name}")
        self._tasks.append(task)

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        self.log.info("receiving audio")
        try:
            while True:
                frame = await track.recv()
                await self._on_audio_frame(frame)
        except MediaStreamError:
            self.log.info("inbound audio ended")
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("audio reader failed")

    async def _on_audio_frame(self, frame: Any) -> None:
        samples = frame.to_ndarray()  # packed: (1, n * channels); planar: (channels, n)
        if frame.format.is_planar:
            samples = samples.T
        channels = len(frame.layout.channels)
        for chunk in self._inbound.push(samples, frame.sample_rate, channels):
            if self._echo is not None:
                chunk = self._echo.process(chunk)
            await self._on_user_frame(chunk)

    async def _on_user_frame(self, frame: np.ndarray) -> None:
        for event in self.endpointer.process(frame):
            if isinstance(event, SpeechStarted):
                self.log.info("speech started (onset %.2f s)", event.onset_s)
                await self.turns.on_speech_started(event)
            elif isinstance(event, SpeechEnded):
                await self._on_speech_ended(event)
        if self.endpointer.in_speech:
            await self.turns.on_speech_progress(self.endpointer.voiced_ms)

    async def _on_speech_ended(self, event: SpeechEnded) -> None:
        user_stop = self._clock() - (event.detected_s - event.stop_s)
        self.log.info(
            "speech ended: %.2f s (%s), stopped %.0f ms ago",
            event.duration_s,
            event.reason,
            (event.detected_s - event.stop_s) * 1000,
        )
        await self.turns.on_speech_ended(event, user_stop)

    def _on_client_message(self, message: ClientMessage) -> None:
        try:
            self._inbox.put_nowait(message)
        except asyncio.QueueFull:
            self.log.warning("dropping a %s message: too many pending", message.type)

    async def _control_loop(self) -> None:
        while True:
            message = await self._inbox.get()
            try:
                await self._apply(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("failed to apply a %s message", message.type)

    async def _apply(self, message: ClientMessage) -> None:
        if message.type == "text":
            self.log.info("text turn (%d chars)", len(message.fields["text"]))
            await self.turns.on_user_text(message.fields["text"])
        elif message.type == "interrupt":
            self.log.info("client interrupt")
            await self.turns.interrupt()

    def _close_echo_canceller(self) -> None:
        close = getattr(self._echo, "close", None)  # optional: backends holding native state
        if close is None:
            return
        try:
            close()
        except Exception:
            self.log.exception("echo canceller failed to close")

    def _attach_far_end(self, canceller: EchoCanceller) -> None:
        resampler = StreamResampler(OUTPUT_SAMPLE_RATE, USER_SAMPLE_RATE)
        chunker = FrameChunker(self.endpointer.frame_size)

        def feed(frame: np.ndarray, _is_audio: bool) -> None:
            for chunk in chunker.push(resampler.process(int16_to_float32(frame))):
                canceller.far_end(chunk)

        self.output_track.add_frame_listener(feed)


__all__ = ["EchoCanceller", "Session", "SessionConfig"]
