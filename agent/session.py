"""One conversation per peer connection: inbound audio -> endpointing -> turns -> outbound audio.

    inbound track (av.AudioFrame, any rate/layout; browsers send 48 kHz stereo s16)
      -> mono float32 -> 16 kHz -> 10 ms frames
      -> echo canceller, fed the exact audio the outbound track sent, also at 16 kHz / 10 ms
      -> endpointer (turns, and pauses in them) and barge-in detector (speech over the answer)
      -> TurnManager -> engine -> AgentAudioTrack (48 kHz mono, 20 ms)

The server-side canceller (`SessionConfig.echo_canceller`, AEC3 when installed) backs up the
browser's own echo cancellation, which is often weak or missing (Firefox, Safari, speakers).
Its far end starts with the first microphone frame: from then on both streams run in real time,
so the n-th microphone frame meets the far audio sent `echo_far_delay_ms` before it, and the
canceller's own delay estimator covers the rest of the echo's round trip.

Full duplex: the session keeps listening while the agent speaks. Each clean frame goes to the
barge-in detector (`audio_dsp.bargein`) before the endpointer, so the answer is ducked (held,
the client muted) in the frame the first run of speech is found, and falls silent for good in
the frame a barge-in is confirmed. While the agent's echo may be in the microphone, the endpointer
counts only frames the detector calls speech. A new call's canceller has not learnt the room:
if the microphone does hear the agent (`EchoPresence`), speech over the agent is ignored for
the first `echo_warmup_s` of agent audio; if it plainly does not (the browser cancels its echo,
or headphones), the canceller is bypassed, since an unadapted AEC3 damps the user for seconds.

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
from typing import Any, Literal, Protocol

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent import metrics
from agent.engine import USER_SAMPLE_RATE, Engine, TurnListener
from agent.messages import DataChannel, EventChannel
from agent.protocol import ClientMessage, encode
from agent.tasks import cancel_and_wait
from agent.tracks import AUDIO_PTIME, OUTPUT_SAMPLE_RATE, AgentAudioTrack
from agent.turns import TurnConfig, TurnManager
from audio_dsp import (
    AlignedEchoCanceller,
    EchoCancellerUnavailable,
    Endpointer,
    EndpointerConfig,
    FrameChunker,
    SpeechEnded,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    StreamResampler,
    create_canceller,
    int16_to_float32,
    to_mono_float32,
)
from audio_dsp.aec import FarEndBuffer
from audio_dsp.bargein import BargeInConfig, BargeInDetector, EchoPresence

INTERRUPT = ClientMessage("interrupt", {})  # one the full inbox could not take

_ids = itertools.count(1)


class EchoCanceller(Protocol):
    """Removes the agent's own voice from the microphone signal.

    Both sides are 10 ms frames of 16 kHz mono float32. `far_end` receives, in order and in
    real time, exactly what the outbound track sent (silence included); `process` cleans the
    near-end frame received at the same time.
    """

    def far_end(self, frame: np.ndarray) -> None: ...
    def process(self, frame: np.ndarray) -> np.ndarray: ...


EchoBackend = Literal["none", "auto", "aec3", "speex"]


@dataclass(frozen=True)
class SessionConfig:
    """Per-conversation audio and turn-taking settings."""

    endpointer: EndpointerConfig = field(default_factory=EndpointerConfig)
    turns: TurnConfig = field(default_factory=TurnConfig)
    bargein: BargeInConfig = field(default_factory=BargeInConfig)
    # Outbound frames queued ahead of the clock: bounds how late a barge-in silences the agent.
    max_queued_frames: int = 3
    # Server-side echo canceller: "auto" takes AEC3 when installed (bench/bench_aec.py: 40+ dB,
    # the VAD never fires on its output), else speex; "none" trusts the browser's canceller.
    echo_canceller: EchoBackend = "auto"
    # Far audio reaches the canceller this long after it was sent: slack for the jitter of
    # arriving microphone frames. Keep it below the shortest echo round trip (>100 ms in WebRTC).
    echo_far_delay_ms: float = 40.0
    # For this long after the agent's last audio frame its echo may still reach the microphone:
    # meanwhile the endpointer hears speech only where the barge-in detector does.
    echo_tail_ms: float = 600.0
    # A canceller needs this much agent audio to learn a call's echo path: until then, on calls
    # whose microphone does pick up the agent (`EchoPresence`), speech over the agent neither
    # barges in nor starts a turn (bench/bench_bargein.py: unconverged AEC3 let echo barge in
    # 1-3 s into a call's first answer). Calls without echo are guarded only until that is
    # known (about a second of agent audio). 0 disables.
    echo_warmup_s: float = 3.0

    def __post_init__(self) -> None:
        if self.echo_canceller not in ("none", "auto", "aec3", "speex"):
            raise ValueError(f"unknown echo canceller {self.echo_canceller!r}")
        if self.turns.barge_in_ms > self.bargein.window_ms:
            raise ValueError("turns.barge_in_ms cannot exceed the barge-in window (bargein)")


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
        self.engine = engine
        self._listener: TurnListener | None = None  # the engine hearing the speech in progress
        self.output_track = AgentAudioTrack(self.config.max_queued_frames, clock=clock)
        self.events = EventChannel(self._on_client_message, self.log)
        self.turns = TurnManager(
            engine, self.output_track, self.events.send, self.config.turns, self.log, clock
        )
        self.endpointer = Endpointer(self.config.endpointer)
        self.bargein = BargeInDetector(self.config.bargein)
        self._inbound = _InboundAudio(self.endpointer.frame_size)
        self._near_started = False  # the far end is fed from the first microphone frame on
        self._last_agent_audio: float | None = None  # clock time of the last answer frame sent
        self._far_audio_s = 0.0  # agent audio the canceller has heard (its training so far)
        self.echo_presence = EchoPresence()
        self.output_track.add_frame_listener(self._on_frame_sent)
        self._echo = echo_canceller if echo_canceller is not None else self._build_canceller()
        if self._echo is not None:
            self._attach_far_end(self._echo)
        # client messages, each with the reply an interrupt silenced on arrival
        self._inbox: asyncio.Queue[tuple[ClientMessage, object | None]] = asyncio.Queue(64)
        # Replies silenced by interrupts that found the inbox full, to wind up all the same.
        self._overflow: list[object] = []
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
        self._drop_listener()
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
            self._near_started = True
            if self._echo is None:
                await self._on_user_frame(chunk)
                continue
            self._push_echo_presence(chunk)
            clean = self._echo.process(chunk)  # keeps adapting even when bypassed
            if self.echo_presence.echo_found is False:
                await self._on_user_frame(chunk)  # no echo: the raw voice is the better one
            else:
                await self._on_user_frame(clean, chunk)

    async def _on_user_frame(self, frame: np.ndarray, mic: np.ndarray | None = None) -> None:
        """One 10 ms frame, maybe echo-cancelled (`mic`: before cancelling): barge-in, turns.

        While the agent's echo may be in the microphone, the endpointer takes the barge-in
        detector's stricter view of which frames are speech, so echo never becomes a turn.
        """
        evidence_ms = self.bargein.process(frame, mic)
        onset_ms = self.bargein.onset_ms
        audible = self._agent_audible()
        if audible and self._echo_warming_up():
            self.bargein.forget_speech()  # afterwards evidence builds up from scratch
            evidence_ms = onset_ms = 0.0
        await self.turns.on_speech_progress(evidence_ms, onset_ms)
        voiced = (self.bargein.last_counted and evidence_ms > 0) if audible else None
        events = self.endpointer.process(frame, voiced)
        started = any(isinstance(event, SpeechStarted) for event in events)
        if not started and self._listener is not None and self.endpointer.in_speech:
            self._listener.push(frame)
        for event in events:
            if isinstance(event, SpeechStarted):
                self.log.info("speech started (onset %.2f s)", event.onset_s)
                self._start_listener()
                await self.turns.on_speech_started(event)
            elif isinstance(event, SpeechPaused):
                if await self.turns.on_speech_paused(event, self._listener):
                    self._listener = None  # the early reply has it
            elif isinstance(event, SpeechResumed):
                await self.turns.on_speech_resumed()
                if self._listener is None:
                    self._start_listener()  # hears the speech so far, then the rest
            elif isinstance(event, SpeechEnded):
                await self._on_speech_ended(event)

    def _start_listener(self) -> None:
        """Let the engine hear the new speech as it comes (from its pre-roll on)."""
        self._drop_listener()
        try:
            self._listener = self.engine.listen()
        except Exception:
            self.log.exception("the engine could not start listening; whole turns only")
            self._listener = None
        if self._listener is not None:
            self._listener.push(self.endpointer.speech_so_far())

    def _drop_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _on_speech_ended(self, event: SpeechEnded) -> None:
        user_stop = self._clock() - (event.detected_s - event.stop_s)
        self.log.info(
            "speech ended: %.2f s (%s), stopped %.0f ms ago",
            event.duration_s,
            event.reason,
            (event.detected_s - event.stop_s) * 1000,
        )
        listener, self._listener = self._listener, None
        await self.turns.on_speech_ended(event, user_stop, listener)

    def _on_client_message(self, message: ClientMessage) -> None:
        silenced = None
        if message.type == "interrupt":
            # now, ahead of anything queued; `_apply` winds that reply (and no later one) up
            silenced = self.turns.silence()
        try:
            self._inbox.put_nowait((message, silenced))
        except asyncio.QueueFull:
            if message.type == "interrupt":  # it silenced its answer: that must be wound up
                if silenced is not None and silenced not in self._overflow:
                    self._overflow.append(silenced)  # at most one per reply
                return
            self.log.warning("dropping a %s message: too many pending", message.type)
            note = f"too many messages at once: a '{message.type}' message was dropped"
            self.events.send(encode("error", message=note))

    async def _control_loop(self) -> None:
        while True:
            message, silenced = await self._inbox.get()
            await self._apply_logged(message, silenced)
            while self._overflow:
                await self._apply_logged(INTERRUPT, self._overflow.pop(0))

    async def _apply_logged(self, message: ClientMessage, silenced: object | None) -> None:
        try:
            await self._apply(message, silenced)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("failed to apply a %s message", message.type)

    async def _apply(self, message: ClientMessage, silenced: object | None) -> None:
        if message.type == "text":
            self.log.info("text turn (%d chars)", len(message.fields["text"]))
            await self.turns.on_user_text(message.fields["text"])
        elif message.type == "interrupt":
            self.log.info("client interrupt")
            await self.turns.interrupt(silenced)

    def _close_echo_canceller(self) -> None:
        close = getattr(self._echo, "close", None)  # optional: backends holding native state
        if close is None:
            return
        try:
            close()
        except Exception:
            self.log.exception("echo canceller failed to close")

    def _on_frame_sent(self, _frame: np.ndarray, is_audio: bool) -> None:
        if is_audio:
            self._last_agent_audio = self._clock()
            if self._near_started:
                self._far_audio_s += AUDIO_PTIME

    def _push_echo_presence(self, mic: np.ndarray) -> None:
        known = self.echo_presence.echo_found is not None
        self.echo_presence.push_mic(mic)
        if not known and self.echo_presence.echo_found is not None:
            self.log.info(
                "the microphone %s the agent (envelope correlation %.2f)%s",
                "hears" if self.echo_presence.echo_found else "does not hear",
                self.echo_presence.correlation or 0.0,
                "" if self.echo_presence.echo_found else ": bypassing the echo canceller",
            )

    def _echo_warming_up(self) -> bool:
        """True until the canceller has heard `echo_warmup_s` of the agent, on calls with echo."""
        if self._echo is None or self._far_audio_s >= self.config.echo_warmup_s:
            return False
        return self.echo_presence.echo_found is not False

    def _agent_audible(self) -> bool:
        """True while the agent's voice (or its echo) may still be in the microphone."""
        last = self._last_agent_audio
        return last is not None and self._clock() - last < self.config.echo_tail_ms / 1000

    def _build_canceller(self) -> EchoCanceller | None:
        """The canceller `config.echo_canceller` names, lined up by a far-end buffer."""
        name = self.config.echo_canceller
        if name == "none":
            return None
        try:
            backend = create_canceller(name)
        except EchoCancellerUnavailable as exc:
            self.log.error("echo canceller %s unavailable, running without: %s", name, exc)
            return None
        self.log.info("echo canceller: %s", backend.name)
        return AlignedEchoCanceller(backend, FarEndBuffer(self.config.echo_far_delay_ms))

    def _attach_far_end(self, canceller: EchoCanceller) -> None:
        """Feed `canceller` every frame the track sends (silence too) once the mic is live."""
        resampler = StreamResampler(OUTPUT_SAMPLE_RATE, USER_SAMPLE_RATE)
        chunker = FrameChunker(self.endpointer.frame_size)

        def feed(frame: np.ndarray, _is_audio: bool) -> None:
            if not self._near_started:
                return
            for chunk in chunker.push(resampler.process(int16_to_float32(frame))):
                canceller.far_end(chunk)
                self.echo_presence.push_far(chunk)

        self.output_track.add_frame_listener(feed)


__all__ = ["EchoBackend", "EchoCanceller", "Session", "SessionConfig"]
