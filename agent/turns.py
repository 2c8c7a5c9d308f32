"""Turn-taking: who holds the floor, the reply in flight, and what the conversation remembers.

States: `listening` (waiting for the user), `thinking` (a reply was requested, no audio yet) and
`speaking` (answer audio is being sent). The manager

- answers each finished user turn (speech or typed text) with `engine.respond`,
- streams the reply: transcripts to the client, audio to the output track,
- ducks the answer on the first sign of the user talking over it (a run of `duck_ms` of
  consecutive speech): the track holds its audio (sends silence, loses nothing) and the client
  is told to mute (`duck`). A barge-in confirmed within `duck_release_ms` proceeds as below;
  otherwise the answer resumes (`unduck`) with the held audio, after re-sending the last
  `duck_replay_ms` sent before the duck, which the client muted while it was on its way,
- on barge-in (the user talks over the answer for `barge_in_ms` of speech, as scored by
  `audio_dsp.bargein`) or an `interrupt` message: silences the answer at once (drops queued
  audio, tells the client to `flush`, stops the streaming task), then cancels the reply and keeps
  in the history only the part of the answer that was sent, marked interrupted,
- if the user starts talking again while the agent is still thinking, drops that reply and later
  answers the earlier and the new speech together as one turn, so nothing said is lost,
- starts a reply early, when the user pauses (`on_speech_paused`, `pause_ms` of silence, well
  before the hangover ends the turn): it runs out of sight, fetching events up to its first
  audio, and is used as the turn's answer if the turn ends at that pause with the history
  unchanged; if the user goes on (`on_speech_resumed`) or anything else happens first, it is
  cancelled and leaves no trace. The engine's work then overlaps the hangover.

Every public handler runs under one lock, so handlers never interleave. Ducking and silencing
change no state that an awaiting handler depends on, so they run at once, without the lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from agent import metrics
from agent.engine import (
    AudioChunk,
    Engine,
    EngineError,
    HistoryItem,
    Reply,
    ReplyEvent,
    TextDelta,
    TurnListener,
    UserTranscript,
    UserTurn,
)
from agent.protocol import encode
from agent.tasks import cancel_and_wait
from audio_dsp import SpeechEnded, SpeechPaused, SpeechStarted, StreamResampler

MAX_RECORDS = 1000
ANSWER_IN_FLIGHT = object()  # `TurnManager.interrupt`: whatever answer is in flight

State = Literal["listening", "thinking", "speaking"]
DuckEvent = Literal["duck", "release", "stop"]
SendMessage = Callable[[str], None]


class AudioOutput(Protocol):
    """Where answer audio goes (the outbound track, or a fake in tests)."""

    sample_rate: int
    played_samples: int

    async def write(self, samples: np.ndarray) -> None: ...
    async def drain(self) -> None: ...
    def flush(self) -> None: ...
    def hold(self) -> None: ...
    def resume(self, replay_samples: int = 0) -> int: ...
    def next_audio_sent(self) -> asyncio.Future[float]: ...
    def add_frame_listener(self, listener: Callable[[np.ndarray, bool], None]) -> None: ...


@dataclass(frozen=True)
class TurnConfig:
    """Turn-taking policy."""

    # Speech over the agent's answer (within the detector's window) that counts as a barge-in.
    # `bench/bench_bargein.py`, AEC3, 100 simulated rooms: echo alone scored at most 100 ms in
    # the second after the canceller's warm-up (4 s answers); over 7 s (`--echo-seconds 10`)
    # it reached 150 ms, a false barge-in, in 0-3 rooms of 100 (by set of rooms). 150 ms
    # catches the user in double talk 0.23 s after they start (median).
    barge_in_ms: float = 150.0
    # A run of this much consecutive speech over the answer (the detector's `onset_ms`) ducks
    # it: the audio is held and the client mutes, until the barge-in is confirmed or released.
    # The same bench: the agent stops 0.16 s after the user starts in double talk (median,
    # 0.23 s without ducking); echo ducked 0 of 100 four-second answers and 1 of 100 ten-second
    # ones. 0 = never duck.
    duck_ms: float = 60.0
    # A duck not confirmed as a barge-in within this long is released: the answer plays on.
    # (In the bench's double talk the barge-in followed the duck within 0.26 s, median 0.08 s.)
    duck_release_ms: float = 400.0
    # On release, re-send this much of the audio sent just before the duck: the client muted it
    # while it was still on its way (jitter buffer and playout: ~120 ms for an aiortc client on
    # loopback, less for a browser; too much repeats a little, too little loses a little).
    duck_replay_ms: float = 100.0
    # No barge-in for this long after the answer's first audio left (a canceller still adapting
    # to a new echo path may let the first words through); 0 = none.
    barge_in_guard_ms: float = 0.0
    # Oldest entries are dropped beyond this many history items.
    max_history_items: int = 64
    # How long a cancelled reply may take to stop before we stop waiting for it.
    cancel_timeout_s: float = 5.0


@dataclass
class TurnRecord:
    """Timing of one answered turn (clock seconds, `time.monotonic` by default)."""

    kind: Literal["audio", "text"]
    user_stop: float  # when the user stopped speaking (or sent the text)
    requested: float  # when the engine was asked
    first_audio_sent: float | None = None
    interrupted: bool = False
    early: bool = False  # the engine was asked at a pause, before the turn ended
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def first_audio_latency(self) -> float | None:
        """User stop -> first answer audio frame sent, in seconds."""
        if self.first_audio_sent is None:
            return None
        return self.first_audio_sent - self.user_stop


class _EarlyReply:
    """A reply started at a pause in the user's speech, before the turn is known to end.

    A task fetches its events, keeping them, up to and with the first audio chunk (an engine
    may do its work only while it is read); `events()` then gives those and the rest.
    """

    def __init__(
        self,
        pause: SpeechPaused,
        turn: UserTurn,
        reply: Reply,
        history_version: int,
        requested: float,
    ) -> None:
        self.pause = pause
        self.requested = requested  # clock time the engine was asked
        self.turn = turn
        self.reply = reply
        self.history_version = history_version
        self._iterator = aiter(reply)
        self._kept: list[ReplyEvent] = []
        self._more = asyncio.Event()
        self._ended = False
        self.fetch = asyncio.create_task(self._fetch(), name="early-reply")

    async def _fetch(self) -> None:
        try:
            while True:
                try:
                    event = await anext(self._iterator)
                except StopAsyncIteration:
                    self._ended = True
                    return
                self._kept.append(event)
                self._more.set()
                if isinstance(event, AudioChunk):
                    return
        finally:
            self._more.set()

    async def events(self) -> AsyncIterator[ReplyEvent]:
        """Every event of the reply, in order; raises what the reply raised."""
        index = 0
        try:
            while True:
                while index < len(self._kept):
                    yield self._kept[index]
                    index += 1
                if self.fetch.done():
                    break
                self._more.clear()
                await self._more.wait()
        finally:
            if not self.fetch.done():  # the reader stopped (cancelled) before the fetch did
                self.fetch.cancel()
        self._kept.clear()
        self.fetch.result()  # the reply's failure, if it failed
        if not self._ended:
            async for event in self._iterator:
                yield event


@dataclass
class _ActiveReply:
    turn: UserTurn
    reply: Reply
    record: TurnRecord
    events: AsyncIterable[ReplyEvent] | None = None  # default: the reply itself
    early_fetch: asyncio.Task[None] | None = None  # an early reply's own reader, if adopted
    task: asyncio.Task[None] | None = None
    text: str = ""
    text_final: bool = False  # its final transcript was sent
    audio_start: int | None = None  # output.played_samples when its first audio was queued
    resampler: StreamResampler | None = None
    first_sent: asyncio.Future[float] | None = None  # when its first audio frame left
    stopped_played_s: float | None = None  # audio sent when it was silenced (None: not yet)
    ducked_at: float | None = None  # clock time of the duck in force (None: not ducked)
    duck_since_s: float = 0.0  # how long the user had been talking when it ducked
    duck_armed: bool = True  # False after a duck until the speech run that caused it ends

    def close_record(self, interrupted: bool) -> None:
        """Copy the engine's stage timings into the record and stop waiting for audio."""
        self.record.interrupted = interrupted
        timings = getattr(self.reply, "timings", None)
        self.record.stages = dict(timings.stages) if timings is not None else {}
        if self.first_sent is not None and not self.first_sent.done():
            self.first_sent.cancel()


class TurnManager:
    """The conversation's state machine. Create it, call `start()`, feed it events."""

    def __init__(
        self,
        engine: Engine,
        output: AudioOutput,
        send: SendMessage,
        config: TurnConfig | None = None,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.output = output
        self.config = config or TurnConfig()
        self._send = send
        self._log = logger or logging.getLogger(__name__)
        self._clock = clock
        self._lock = asyncio.Lock()
        self._state: State = "listening"
        self._history: list[HistoryItem] = []
        self._active: _ActiveReply | None = None
        self._held_audio: np.ndarray | None = None  # speech whose reply was dropped mid-thought
        self._early: _EarlyReply | None = None  # started at a pause in the speech in progress
        self._dropping: set[asyncio.Task[None]] = set()  # early replies being cancelled
        self._history_version = 0  # changes whenever the history does
        self._closed = False
        # Recent turns and state changes, newest last (for logs, metrics and benchmarks).
        self.records: deque[TurnRecord] = deque(maxlen=MAX_RECORDS)
        self.state_log: deque[tuple[float, State]] = deque(maxlen=MAX_RECORDS)
        # Provisional barge-ins: (clock time, "duck" | "release" | "stop"), newest last.
        self.duck_log: deque[tuple[float, DuckEvent]] = deque(maxlen=MAX_RECORDS)
        self.output.add_frame_listener(self._on_frame_sent)

    @property
    def state(self) -> State:
        return self._state

    @property
    def history(self) -> list[HistoryItem]:
        """A copy of what the conversation remembers, oldest first."""
        return list(self._history)

    def start(self) -> None:
        """Announce the initial state."""
        self._set_state("listening", force=True)

    async def on_speech_started(self, event: SpeechStarted) -> None:
        """The user started talking: a thinking reply to earlier speech is set aside."""
        async with self._lock:
            active = self._active
            if self._state == "thinking" and active and active.turn.audio is not None:
                self._log.info("user resumed while thinking: merging with the next speech")
                self._held_audio = active.turn.audio
                await self._stop_active(keep_history=False, reason="resumed")

    async def on_speech_progress(self, voiced_ms: float, onset_ms: float = 0.0) -> None:
        """User speech heard just now: ducks the answer, or interrupts it on a barge-in.

        `voiced_ms`: the barge-in evidence (speech within the detector's window); `onset_ms`:
        the run of consecutive speech frames up to now, which ducks the answer at `duck_ms`.
        Call it for every frame while the agent may be speaking (0, 0 when nothing was heard).
        The answer falls silent in this call, before waiting for any other handler.
        """
        active = self._active
        if self._state != "speaking" or active is None or self._in_guard(active):
            return
        if voiced_ms < self.config.barge_in_ms:
            self._maybe_duck(active, onset_ms)
            return
        if active.stopped_played_s is None:
            self._log.info("barge-in after %.0f ms of speech over the answer", voiced_ms)
            since_s = voiced_ms / 1000 if active.ducked_at is None else active.duck_since_s
            self.silence(since_s=since_s)
        async with self._lock:
            if self._active is active:
                await self._stop_active(keep_history=True, reason="barge-in")

    @property
    def ducked(self) -> bool:
        """True while the answer in flight is held by a provisional barge-in."""
        return self._active is not None and self._active.ducked_at is not None

    def silence(self, since_s: float = 0.0) -> object | None:
        """Silence the answer in flight now, without the lock: the barge-in fast path.

        Drops queued audio, tells the client to flush its buffer and stops the streaming task;
        the handler that follows (`interrupt`, a barge-in) winds the reply up under the lock.
        `since_s`: how long ago the user began what caused it (recorded as stop latency).
        Returns the silenced reply as a token for `interrupt` (None when none was in flight).
        """
        active = self._active
        if active is None or active.stopped_played_s is not None:
            return active
        if active.task is not None:
            active.task.cancel()
        if active.ducked_at is not None:  # the flush below drops the held audio too
            active.ducked_at = None
            self.duck_log.append((self._clock(), "stop"))
            metrics.DUCKS_TOTAL.labels(outcome="stopped").inc()
        if active.audio_start is not None:
            self._flush_output()
            metrics.STOP_LATENCY_SECONDS.observe(since_s)
        active.stopped_played_s = self._played_s(active)
        return active

    async def on_speech_ended(
        self, event: SpeechEnded, user_stop: float, listener: TurnListener | None = None
    ) -> None:
        """A user turn ended at clock time `user_stop`: answer it (unless it was a backchannel).

        `listener` is the engine's ear that heard this speech as it was spoken, if any; it is
        closed if the turn goes unanswered, even when this call is cancelled.
        """
        early: _EarlyReply | None = None
        try:
            async with self._lock:
                early, self._early = self._early, None
                if self._state == "speaking" or self._closed:
                    self._log.info("ignoring %.2f s of speech over the answer", event.duration_s)
                    if listener is not None:
                        listener.close()
                    self._drop_early(early)
                    return
                audio = self._turn_audio(event.audio)
                if self._held_audio is not None:
                    self._held_audio = None
                    if listener is not None:  # it heard only the second part
                        listener.close()
                        listener = None
                await self._stop_active(keep_history=True, reason="new-turn")
                if early is not None and self._early_fits(early, event):
                    if listener is not None:  # the early reply has its own
                        listener.close()
                    self._adopt(early, user_stop)
                    return
                self._drop_early(early)
                turn = UserTurn(audio=audio, listener=listener)
                self._begin(turn, "audio", user_stop)
        except asyncio.CancelledError:  # before the turn reached the engine
            if listener is not None:
                listener.close()
            self._drop_early(early)  # taken above, neither adopted nor dropped yet
            raise

    async def on_speech_paused(
        self, event: SpeechPaused, listener: TurnListener | None = None
    ) -> bool:
        """The user paused: start answering the speech so far, out of sight (see module).

        Only while listening; the reply is used if the turn then ends at this pause.
        `listener`: the engine's ear on this speech; True when the early reply took it (the
        caller then needs a new one if the user goes on).
        """
        async with self._lock:
            self._drop_early(self._early)
            self._early = None
            if self._closed or self._state != "listening" or self._active is not None:
                return False
            if self._held_audio is not None:
                listener = None  # it heard only the latest speech, not the held part
            turn = UserTurn(audio=self._turn_audio(event.audio), listener=listener)
            try:
                reply = self.engine.respond(turn, list(self._history))
            except Exception as exc:  # the turn's own request, if it comes, reports it
                self._log.info("no early reply: the engine refused it (%s)", exc)
                return False
            version = self._history_version
            self._early = _EarlyReply(event, turn, reply, version, self._clock())
            pause_ms = 1000 * (event.detected_s - event.stop_s)
            self._log.debug("early reply started at a %.0f ms pause", pause_ms)
            return listener is not None

    async def on_speech_resumed(self) -> None:
        """The user went on after a pause: the early reply, if any, is dropped."""
        async with self._lock:
            if self._early is not None:
                self._log.debug("user went on after a pause: early reply dropped")
            self._drop_early(self._early)
            self._early = None

    async def on_user_text(self, text: str) -> None:
        """A typed turn: it replaces whatever answer is in flight."""
        async with self._lock:
            self._held_audio = None
            self._drop_early(self._early)
            self._early = None
            await self._stop_active(keep_history=True, reason="new-turn")
            self._begin(UserTurn(text=text), "text", self._clock())

    async def interrupt(self, silenced: object | None = ANSWER_IN_FLIGHT) -> None:
        """The client asked the agent to stop talking.

        `silenced`: what `silence` returned when the request came in. Only that reply is
        stopped: one begun since (a turn that ended in between) was not heard yet, and one
        that ended meanwhile has nothing left to stop. By default the answer in flight stops.
        """
        async with self._lock:
            if silenced is not ANSWER_IN_FLIGHT and self._active is not silenced:
                self._log.info("client interrupt: the reply it meant is over already")
                return
            await self._stop_active(keep_history=True, reason="client")

    async def close(self) -> None:
        """Stop any reply; the manager accepts nothing afterwards."""
        async with self._lock:
            self._closed = True
            self._drop_early(self._early)
            self._early = None
            await self._stop_active(keep_history=False, reason="closed")
        while self._dropping:
            await asyncio.wait(set(self._dropping))

    # -- reply lifecycle ---------------------------------------------------------------------

    def _begin(self, turn: UserTurn, kind: Literal["audio", "text"], user_stop: float) -> None:
        if self._closed:
            if turn.listener is not None:
                turn.listener.close()
            return
        record = TurnRecord(kind=kind, user_stop=user_stop, requested=self._clock())
        try:
            reply = self.engine.respond(turn, list(self._history))
        except Exception as exc:
            if turn.listener is not None:
                turn.listener.close()
            self._log.exception("the engine refused the turn")
            metrics.ENGINE_ERRORS_TOTAL.inc()
            metrics.record_reply_failure(exc)
            self._send(encode("error", message=_error_text(exc)))
            return
        self._run_reply(_ActiveReply(turn=turn, reply=reply, record=record), kind)

    def _run_reply(self, active: _ActiveReply, kind: Literal["audio", "text"]) -> None:
        self._active = active
        self.records.append(active.record)
        metrics.TURNS_TOTAL.labels(kind=kind).inc()
        self._set_state("thinking")
        active.task = asyncio.create_task(self._run(active), name="reply")

    # -- early replies ---------------------------------------------------------------------

    def _turn_audio(self, audio: np.ndarray) -> np.ndarray:
        """The turn's speech: any held earlier speech, then `audio` (float32)."""
        if self._held_audio is not None:
            audio = np.concatenate([self._held_audio, audio])
        return audio.astype(np.float32, copy=False)

    def _early_fits(self, early: _EarlyReply, event: SpeechEnded) -> bool:
        """The early reply answers exactly this turn: it ended at that pause, the reply has
        not failed, and the history it was given is still the history."""
        fetch = early.fetch
        failed = fetch.done() and not fetch.cancelled() and fetch.exception() is not None
        return (
            early.pause.ends(event)
            and early.history_version == self._history_version
            and not failed
            and not self._closed
        )

    def _adopt(self, early: _EarlyReply, user_stop: float) -> None:
        record = TurnRecord("audio", user_stop, requested=early.requested, early=True)
        metrics.EARLY_REPLIES_TOTAL.labels(outcome="used").inc()
        active = _ActiveReply(
            early.turn, early.reply, record, events=early.events(), early_fetch=early.fetch
        )
        self._run_reply(active, "audio")

    def _drop_early(self, early: _EarlyReply | None) -> None:
        """Cancel an early reply in the background (nothing waits for it but `close`)."""
        if early is None:
            return
        metrics.EARLY_REPLIES_TOTAL.labels(outcome="dropped").inc()
        task = asyncio.create_task(self._cancel_early(early), name="drop-early-reply")
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    async def _cancel_early(self, early: _EarlyReply) -> None:
        fetch = early.fetch
        if fetch.done() and not fetch.cancelled() and fetch.exception() is not None:
            self._log.debug("a dropped early reply had failed: %s", fetch.exception())
        await cancel_and_wait(fetch, self._log)
        await self._cancel_reply(early.reply)

    async def _run(self, active: _ActiveReply) -> None:
        try:
            await self._stream(active)
            await self._finish_audio(active)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log.exception("reply failed")
            metrics.ENGINE_ERRORS_TOTAL.inc()
            metrics.record_reply_failure(exc)
            if active.text and not active.text_final:  # the answer ends with what it said
                self._send(encode("transcript", role="assistant", text=active.text, final=True))
            self._send(encode("error", message=_error_text(exc)))
            self._finish(active, played_s=self._played_s(active), failed=True)
            return
        self._finish(active, played_s=None, failed=False)

    async def _stream(self, active: _ActiveReply) -> None:
        async for event in active.events or active.reply:
            if isinstance(event, UserTranscript):
                self._send(encode("transcript", role="user", text=event.text, final=True))
            elif isinstance(event, TextDelta):
                active.text += event.text
                self._send(encode("transcript", role="assistant", text=active.text, final=False))
            elif isinstance(event, AudioChunk):
                await self._play(active, event)
        self._send(encode("transcript", role="assistant", text=active.text, final=True))
        active.text_final = True

    async def _play(self, active: _ActiveReply, chunk: AudioChunk) -> None:
        if active.resampler is None or active.resampler.in_rate != chunk.sample_rate:
            tail = active.resampler.flush() if active.resampler else np.zeros(0, np.float32)
            await self.output.write(tail)
            active.resampler = StreamResampler(chunk.sample_rate, self.output.sample_rate)
        if active.audio_start is None:
            active.audio_start = self.output.played_samples
            active.first_sent = self.output.next_audio_sent()
            active.first_sent.add_done_callback(lambda f: self._on_first_audio(active, f))
            self._set_state("speaking")
        await self.output.write(active.resampler.process(chunk.samples))

    async def _finish_audio(self, active: _ActiveReply) -> None:
        if active.resampler is not None:
            await self.output.write(active.resampler.flush())
            await self.output.drain()

    def _finish(self, active: _ActiveReply, played_s: float | None, failed: bool) -> None:
        if self._active is not active:
            return
        if active.ducked_at is not None:  # nothing was left to hold: let the client listen again
            self._release_duck(active, replay=False)
        self._active = None
        active.close_record(interrupted=False)
        self._remember(self._history_of(active.reply, played_s))
        if failed and active.audio_start is not None:
            self._flush_output()
        self._set_state("listening")

    async def _stop_active(self, keep_history: bool, reason: str) -> None:
        """Cancel the reply in flight (if any), silence its audio, and record what was heard."""
        active = self._active
        if active is None:
            return
        self.silence()
        self._active = None
        played_s = active.stopped_played_s or 0.0
        try:
            await self._cancel_task(active)
            if active.early_fetch is not None:  # its stream may have stopped before reading it
                await cancel_and_wait(active.early_fetch, self._log)
        finally:  # even when this handler is cancelled itself (the session closing)
            await self._cancel_reply(active.reply)
        active.close_record(interrupted=True)
        metrics.INTERRUPTIONS_TOTAL.labels(reason=reason).inc()
        self._log.info("reply stopped (%s) after %.2f s of audio", reason, played_s)
        if keep_history:
            kept = self._history_of(active.reply, played_s)
            self._remember(kept)
            heard = next((i.text for i in kept if i.role == "assistant"), "")
            self._send(encode("transcript", role="assistant", text=heard, final=True))
        self._set_state("listening")

    async def _cancel_task(self, active: _ActiveReply) -> None:
        if active.task is not None:
            await cancel_and_wait(active.task, self._log)

    async def _cancel_reply(self, reply: Reply) -> None:
        try:
            await asyncio.wait_for(reply.cancel(), self.config.cancel_timeout_s)
        except TimeoutError:
            self._log.warning("engine took over %.1f s to cancel", self.config.cancel_timeout_s)
        except Exception:
            self._log.exception("engine failed to cancel a reply")

    def _flush_output(self) -> None:
        self.output.flush()
        self._send(encode("flush"))

    # -- ducking --------------------------------------------------------------------------------

    def _maybe_duck(self, active: _ActiveReply, onset_ms: float) -> None:
        if onset_ms <= 0:
            active.duck_armed = True
            return
        duck_ms = self.config.duck_ms
        if (
            duck_ms <= 0
            or onset_ms < duck_ms
            or not active.duck_armed
            or active.ducked_at is not None
            or active.audio_start is None
            or active.stopped_played_s is not None
        ):
            return
        active.ducked_at = self._clock()
        active.duck_since_s = onset_ms / 1000
        active.duck_armed = False
        self.output.hold()
        self.duck_log.append((active.ducked_at, "duck"))
        self._send(encode("duck"))
        self._log.info("ducked after %.0f ms of speech over the answer", onset_ms)

    def _on_frame_sent(self, _frame: np.ndarray, _is_audio: bool) -> None:
        """Every outbound frame (the track's clock): releases a duck that went unconfirmed."""
        active = self._active
        if active is None or active.ducked_at is None:
            return
        if self._clock() - active.ducked_at >= self.config.duck_release_ms / 1000:
            self._release_duck(active, replay=True)

    def _release_duck(self, active: _ActiveReply, replay: bool) -> None:
        active.ducked_at = None
        replay_samples = 0
        if replay and active.audio_start is not None:
            wanted = round(self.config.duck_replay_ms / 1000 * self.output.sample_rate)
            replay_samples = min(wanted, self.output.played_samples - active.audio_start)
        replayed = self.output.resume(replay_samples)
        self.duck_log.append((self._clock(), "release"))
        self._send(encode("unduck"))
        metrics.DUCKS_TOTAL.labels(outcome="released").inc()
        replayed_ms = 1000 * replayed / self.output.sample_rate
        self._log.info("duck released (no barge-in): replaying %.0f ms", replayed_ms)

    def _in_guard(self, active: _ActiveReply) -> bool:
        """True during the warm-up guard that follows the answer's first audio."""
        guard_s = self.config.barge_in_guard_ms / 1000
        sent = active.record.first_audio_sent
        if guard_s <= 0:
            return False
        return sent is None or self._clock() - sent < guard_s

    def _played_s(self, active: _ActiveReply) -> float:
        if active.audio_start is None:
            return 0.0
        return (self.output.played_samples - active.audio_start) / self.output.sample_rate

    def _on_first_audio(self, active: _ActiveReply, sent: asyncio.Future[float]) -> None:
        if sent.cancelled() or active.record.first_audio_sent is not None:
            return
        active.record.first_audio_sent = sent.result()
        latency = active.record.first_audio_latency
        assert latency is not None
        metrics.FIRST_AUDIO_SECONDS.observe(max(latency, 0.0))
        self._log.info("first audio %.0f ms after the user stopped", latency * 1000)

    def _history_of(self, reply: Reply, played_s: float | None) -> list[HistoryItem]:
        """What the exchange leaves in the history; nothing when the engine cannot say, so
        that the conversation goes on (without this exchange)."""
        try:
            return reply.history(played_s)
        except Exception:
            self._log.exception("the engine could not give the history of a reply")
            return []

    def _remember(self, items: list[HistoryItem]) -> None:
        self._history_version += 1
        self._history.extend(items)
        excess = len(self._history) - self.config.max_history_items
        if excess > 0:
            del self._history[:excess]

    def _set_state(self, state: State, force: bool = False) -> None:
        if state == self._state and not force:
            return
        self._state = state
        self.state_log.append((self._clock(), state))
        self._send(encode("state", state=state))


def _error_text(exc: Exception) -> str:
    """What the client is told: an EngineError's own words, otherwise nothing internal."""
    if metrics.is_out_of_memory(exc):
        return metrics.OUT_OF_MEMORY_MESSAGE
    if isinstance(exc, EngineError) and str(exc):
        return str(exc)
    return "the agent could not answer that turn"


__all__ = ["AudioOutput", "DuckEvent", "State", "TurnConfig", "TurnManager", "TurnRecord"]
