"""`GLM4VoiceEngine`: the agent's engine interface over the GLM-4-Voice models.

The history kept per exchange is exactly what the reference demo keeps: the user item holds the
whole prompt string of its turn, the assistant item the decoded completion (audio ids written
as `<|audio_N|>`), so the next prompt is byte-identical to the reference's. An answer that was
interrupted is kept only up to the last audio token that was played, with the text the model
had written before it.

While the user speaks, `begin_turn()` returns a `TurnListener`: audio pushed into it is
tokenized on the worker as it arrives, so when the turn ends only its last partial 4 s block
is left to encode. Pass it to `respond(turn, history, listener=...)`.

`start()` returns once the worker has run a synthetic turn through every stage (unless
`EngineOptions.warmup` is off), so the first conversation's first answer does not pay for
first-call costs; `warm_up_report` says what that took.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.engine import (
    USER_SAMPLE_RATE,
    AudioChunk,
    Engine,
    EngineError,
    HistoryItem,
    Reply,
    ReplyEvent,
    StageTimings,
    UserTurn,
    played_fraction,
)
from agent.tasks import in_daemon_thread
from models.glm4voice.paths import ModelPaths
from models.glm4voice.worker import (
    AUDIO_TOKEN_S,
    BlockHold,
    DecodeSchedule,
    Job,
    ModelWorker,
    SpeechBrain,
    TurnListener,
    WarmUpReport,
)

if TYPE_CHECKING:
    from models.glm4voice.brain import LoadOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """Streaming policy of the engine (model placement lives in `brain.LoadOptions`)."""

    max_new_tokens: int = 2000
    # Block sizes of the reference decoder (the fast one streams its own 10-token blocks):
    # first audio after 10 speech tokens (0.8 s of speech), as the original demo schedule.
    first_block_tokens: int = 10
    later_block_tokens: int = 20
    max_ahead_s: float = 8.0  # stop generating a reply this far ahead of its playback
    # ... and go on once it is this much less ahead (None: a quarter of max_ahead_s).
    resume_margin_s: float | None = None
    max_jobs: int = 64
    # Speech reaches the streaming tokenizer this late, so that audio the endpointer later
    # trims off the end of a turn (its hangover) is never tokenized ahead of time.
    listen_lag_s: float = 1.0
    # Run a synthetic turn through every stage before `start()` returns, so that the first
    # conversation does not pay for first-call costs.
    warmup: bool = True
    # A later block of the streaming decoder may wait up to `decoder_hold_rounds` LM steps for
    # another reply's block, to share its decoder call, while its reply has at least
    # `decoder_hold_s` of audio ahead of playback (0 rounds: never wait).
    decoder_hold_s: float = 1.0
    decoder_hold_rounds: int = 10
    # Decode on a thread (and CUDA stream) of its own while the LM steps on (`DecoderLane`):
    # a block's decoding no longer holds up every reply's next LM step.
    overlap_decoder: bool = True
    schedule: DecodeSchedule = field(init=False)

    def __post_init__(self) -> None:
        if self.first_block_tokens < 1 or self.later_block_tokens < 1:
            raise ValueError("decoder block sizes must be >= 1 token")
        if not 0 <= self.resume_margin < self.max_ahead_s:
            raise ValueError("need 0 <= resume_margin_s < max_ahead_s")
        if self.decoder_hold_s < 0 or self.decoder_hold_rounds < 0:
            raise ValueError("need decoder_hold_s >= 0 and decoder_hold_rounds >= 0")
        object.__setattr__(
            self, "schedule", DecodeSchedule(self.first_block_tokens, self.later_block_tokens)
        )

    @property
    def resume_margin(self) -> float:
        if self.resume_margin_s is None:
            return self.max_ahead_s / 4
        return self.resume_margin_s


def history_prefix(history: Sequence[HistoryItem]) -> str:
    """The reference's `previous_prompt + previous_completion` from our history items.

    Only items this engine wrote (string payloads) can be replayed exactly; the last user item
    holds the whole prompt up to its turn, so the prefix is that plus every assistant payload
    after it.
    """
    last_user = None
    for index in range(len(history) - 1, -1, -1):
        item = history[index]
        if item.role == "user" and isinstance(item.payload, str):
            last_user = index
            break
    if last_user is None:
        return ""
    parts = [history[last_user].payload]
    parts += [
        item.payload
        for item in history[last_user + 1 :]
        if item.role == "assistant" and isinstance(item.payload, str)
    ]
    return "".join(parts)


class GLM4VoiceReply(Reply):
    """One answer in progress: events come from the worker through the event loop.

    The event queue needs no bound of its own: the worker stops generating a reply that is
    `max_ahead_s` of audio ahead of its consumer, and text is bounded by `max_new_tokens`.
    """

    def __init__(
        self,
        engine: GLM4VoiceEngine,
        turn: UserTurn,
        history: Sequence[HistoryItem],
        listener: TurnListener | None = None,
    ) -> None:
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[ReplyEvent | BaseException | None] = asyncio.Queue()
        self._audio_s = 0.0
        options = engine.options
        if listener is not None and turn.audio is None:
            listener.close()  # a typed turn: the speech heard is not part of it
            listener = None
        self._job = Job(
            turn_audio=turn.audio,
            turn_text=turn.text,
            history_prefix=history_prefix(history),
            emit=self._emit_threadsafe,
            max_new_tokens=options.max_new_tokens,
            max_ahead_s=options.max_ahead_s,
            resume_margin_s=options.resume_margin,
            schedule=options.schedule,
            listener=listener,
        )
        self.timings: StageTimings = self._job.timings
        self._turn = turn
        self._finished = asyncio.Event()
        try:
            engine.require_worker().submit(self._job)
        except queue.Full:
            raise EngineError("the voice model is busy with too many conversations") from None

    @property
    def job(self) -> Job:
        """The worker's record of this reply (read it only once the reply has ended)."""
        return self._job

    def _emit_threadsafe(self, event: ReplyEvent | BaseException | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            logger.debug("dropping a reply event: its event loop is closed")

    def _deliver(self, event: ReplyEvent | BaseException | None) -> None:
        if event is None:
            self._finished.set()
        self._events.put_nowait(event)

    async def _iterate(self) -> AsyncIterator[ReplyEvent]:
        while True:
            self._consumed()
            event = await self._events.get()
            if event is None or self._job.cancelled.is_set():
                return  # the end, or a cancel: what was queued before it is not wanted
            if isinstance(event, BaseException):
                raise EngineError(f"the voice model failed: {event}") from event
            if isinstance(event, AudioChunk):
                self._audio_s += event.duration_s
            yield event

    def _consumed(self) -> None:
        """The consumer asks for more: every chunk it took so far went to playback, which it
        feeds at playback pace. The worker stays at most max_ahead_s ahead of that."""
        if self._audio_s > self._job.consumed_s:
            self._job.consumed_s = self._audio_s
            worker = self._engine.worker
            if worker is not None:
                worker.wake()

    def __aiter__(self) -> AsyncIterator[ReplyEvent]:
        return self._iterate()

    async def cancel(self) -> None:
        self._job.cancelled.set()
        worker = self._engine.worker
        if worker is None:
            return
        worker.wake()
        await self._finished.wait()

    def history(self, played_s: float | None) -> list[HistoryItem]:
        job = self._job
        if not job.prompt:  # never started (cancelled while queued)
            return []
        user_text = self._turn.text if self._turn.text is not None else ""
        user = HistoryItem("user", user_text, payload=job.prompt)
        generated = job.generated
        if generated and self._engine.is_stop(generated[-1]):
            generated = generated[:-1]
        total_s = job.audio_samples_emitted / self._engine.sample_rate
        # A cancel may drop blocks of an answer generated whole: their ids were never heard.
        audio_ids = sum(1 for t in generated if self._engine.is_audio(t))
        dropped = job.audio_tokens_decoded < audio_ids
        if dropped and played_s is None:
            played_s = job.audio_tokens_decoded * AUDIO_TOKEN_S
        interrupted = not job.done or dropped or played_fraction(played_s, total_s) < 1.0
        if interrupted:
            generated = self._cut(generated, played_s)
        completion = self._engine.decode(generated)
        text = self._engine.decode([t for t in generated if not self._engine.is_audio(t)])
        return [user, HistoryItem("assistant", text, interrupted=interrupted, payload=completion)]

    def _cut(self, generated: list[int], played_s: float | None) -> list[int]:
        """Ids up to the last audio token heard (the text written before it included).

        Token n of an answer is audio from n * 80 ms on, in both decoders, so the heard tokens
        follow from the played seconds alone (the decoders hold back different amounts).
        """
        if played_s is None:
            return generated
        heard = int(played_s / AUDIO_TOKEN_S + 1e-6)
        if heard <= 0:
            return []  # nothing reached the listener
        seen, end = 0, 0
        for index, token in enumerate(generated):
            if self._engine.is_audio(token):
                seen, end = seen + 1, index + 1
                if seen == heard:
                    break
        return generated[:end]


class GLM4VoiceEngine(Engine):
    """GLM-4-Voice behind the engine interface; all sessions share one model worker."""

    name = "glm4voice"

    def __init__(
        self, brain_factory: Callable[[], SpeechBrain], options: EngineOptions | None = None
    ) -> None:
        """`brain_factory()` loads the models (called on a thread by `start`)."""
        self._brain_factory = brain_factory
        self.options = options or EngineOptions()
        self.brain: SpeechBrain | None = None
        self.worker: ModelWorker | None = None
        self._listeners: weakref.WeakSet[TurnListener] = weakref.WeakSet()

    async def start(self) -> None:
        if self.worker is not None:
            return
        # Own daemon threads: Ctrl-C during a load or warm-up of minutes exits at once.
        self.brain = await in_daemon_thread(self._brain_factory, "glm4voice-load")
        options = self.options
        hold = BlockHold(options.decoder_hold_s, options.decoder_hold_rounds)
        worker = ModelWorker(
            self.brain,
            options.max_jobs,
            warm_up=options.warmup,
            hold=hold,
            overlap_decoder=options.overlap_decoder,
        )
        self.worker = worker
        worker.start()
        await in_daemon_thread(worker.ready.wait, "glm4voice-warm-up-wait")

    @property
    def warm_up_report(self) -> WarmUpReport | None:
        """What the start-up warm-up ran (None when it was skipped or failed)."""
        return self.worker.warm_up_report if self.worker is not None else None

    async def close(self) -> None:
        if self.worker is not None:
            worker, self.worker = self.worker, None
            await asyncio.to_thread(worker.stop)

    @property
    def sample_rate(self) -> int:
        return self._require_brain().sample_rate

    def is_stop(self, token_id: int) -> bool:
        return self._require_brain().is_stop(token_id)

    def is_audio(self, token_id: int) -> bool:
        return self._require_brain().is_audio(token_id)

    def decode(self, token_ids: list[int]) -> str:
        return self._require_brain().decode_text(token_ids)

    def _require_brain(self) -> SpeechBrain:
        if self.brain is None:
            raise EngineError("the GLM-4-Voice engine has not been started")
        return self.brain

    def require_worker(self) -> ModelWorker:
        if self.worker is None:
            raise EngineError("the GLM-4-Voice engine is not running")
        return self.worker

    def begin_turn(self) -> TurnListener:
        """Start hearing a user turn: push its 16 kHz audio as it arrives, then pass the
        listener to `respond` with the finished turn (or `close()` it if there is none)."""
        lag = round(self.options.listen_lag_s * USER_SAMPLE_RATE)
        listener = TurnListener(self.require_worker(), lag)
        self._listeners.add(listener)
        return listener

    def listen(self) -> TurnListener:
        """The engine-interface name of `begin_turn` (see `TurnListener`)."""
        return self.begin_turn()

    def respond(
        self,
        turn: UserTurn,
        history: Sequence[HistoryItem],
        listener: TurnListener | None = None,
    ) -> Reply:
        """Answer `turn`; `listener` (from `begin_turn`) holds its speech tokenized so far.

        The listener is used only if the audio it heard is the start of `turn.audio`;
        otherwise the turn is tokenized whole, so a mismatch costs time, never correctness.
        """
        self._require_brain()
        if listener is None:
            listener = getattr(turn, "listener", None)  # a turn may carry its own
        if listener is not None and listener not in self._listeners:
            raise ValueError("the listener was not made by this engine")
        return GLM4VoiceReply(self, turn, history, listener)


def load_engine(
    paths: ModelPaths, load_options: LoadOptions | None = None, options: EngineOptions | None = None
) -> GLM4VoiceEngine:
    """An engine that loads the real models from `paths` when started."""
    from models.glm4voice.brain import GLM4VoiceBrain, LoadOptions

    chosen = load_options or LoadOptions()
    return GLM4VoiceEngine(lambda: GLM4VoiceBrain.load(paths, chosen), options)
