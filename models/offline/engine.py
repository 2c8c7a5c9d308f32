"""The offline engine: PocketSphinx -> a small responder -> eSpeak NG, all on the CPU.

Model work (recognition and synthesis) runs on one worker thread owned by the engine, never on
the event loop; replies from every session queue their jobs on it, one utterance or sentence at
a time, so they take turns and each reply has at most two jobs queued. A reply synthesizes one
sentence ahead of what it hands out: the first sentence's audio is yielded while the next is
being spoken into a buffer. Cancelling a reply drops its queued jobs and aborts its running one
within about 100 ms of audio (eSpeak NG) or one utterance (PocketSphinx).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

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
)
from models.offline.asr import RecognitionCancelled, SpeechRecognizer
from models.offline.responder import Responder
from models.offline.tts import SpeechSynthesizer, SynthesisCancelled

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Audio is handed out in chunks of this length so playback can start before a sentence ends.
DEFAULT_CHUNK_S = 0.25


class _Cancelled(Exception):
    """The reply was cancelled while one of its jobs waited or ran."""


@dataclass
class _SpokenSentence:
    """One sentence of the answer: its audio's length, and how much of it was handed out."""

    text: str
    duration_s: float
    handed_out_s: float = 0.0


@dataclass
class _Produced:
    """What a reply has handed out so far."""

    transcript: str = ""
    sentences: list[_SpokenSentence] = field(default_factory=list)
    planned_sentences: int = 0
    finished: bool = False

    @property
    def handed_out_s(self) -> float:
        return sum(s.handed_out_s for s in self.sentences)

    @property
    def complete(self) -> bool:
        return self.finished and len(self.sentences) == self.planned_sentences


class OfflineReply(Reply):
    """One answer in progress: transcript, then per sentence its text and audio chunks."""

    def __init__(
        self, engine: OfflineEngine, turn: UserTurn, history: Sequence[HistoryItem]
    ) -> None:
        self.timings = StageTimings()
        self._engine = engine
        self._turn = turn
        self._history = list(history)
        self._stop = threading.Event()
        self._jobs: set[Future[Any]] = set()
        self._produced = _Produced()
        self._started = time.perf_counter()

    def __aiter__(self) -> AsyncIterator[ReplyEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[ReplyEvent]:
        try:
            self._raise_if_stopped()
            transcript = await self._transcribe()
            self._raise_if_stopped()  # cancelled while the recognizer ran
            yield UserTranscript(transcript)
            sentences = self._plan(transcript)
            async for event in self._speak(sentences):
                yield event
            self._produced.finished = True
        except _Cancelled:
            logger.debug("offline reply cancelled after %.2f s", self._elapsed())
        finally:
            self._stop.set()

    async def _transcribe(self) -> str:
        if self._turn.text is not None:
            text = self._turn.text.strip()
        else:
            start = time.perf_counter()
            text = await self._run(
                self._engine.recognizer.transcribe, self._turn.audio, self._stopped
            )
            self.timings.add("asr", time.perf_counter() - start)
        self._produced.transcript = text
        return text

    def _plan(self, transcript: str) -> list[str]:
        start = time.perf_counter()
        sentences = self._engine.responder.answer(transcript, self._history)
        self.timings.add("responder", time.perf_counter() - start)
        self._produced.planned_sentences = len(sentences)
        return sentences

    async def _speak(self, sentences: list[str]) -> AsyncIterator[ReplyEvent]:
        """Text and audio per sentence, synthesizing the next sentence while this one is out."""
        rate = self._engine.synthesizer.sample_rate
        pending = self._synthesize(sentences[0]) if sentences else None
        try:
            for index, sentence in enumerate(sentences):
                assert pending is not None
                current, pending = pending, None  # its outcome reaches the caller from here
                audio = await current
                self._raise_if_stopped()  # cancelled while it was synthesized
                self._time_synthesis(index, audio.synthesis_s)
                following = sentences[index + 1] if index + 1 < len(sentences) else None
                pending = self._synthesize(following) if following is not None else None
                spoken = _SpokenSentence(sentence, len(audio.samples) / rate)
                self._produced.sentences.append(spoken)
                yield TextDelta(sentence if index == 0 else f" {sentence}")
                for chunk in _chunks(audio.samples, rate, self._engine.chunk_s):
                    self._raise_if_stopped()
                    if not self._produced.handed_out_s:
                        self.timings.add("first_audio", self._elapsed())
                    spoken.handed_out_s += len(chunk) / rate
                    yield AudioChunk(chunk, rate)
        finally:
            if pending is not None:
                self._stop.set()
                pending.add_done_callback(_consume_outcome)

    def _time_synthesis(self, index: int, seconds: float) -> None:
        self.timings.add("tts", seconds)
        if index == 0:
            self.timings.add("tts_first_sentence", seconds)

    def _synthesize(self, sentence: str) -> asyncio.Future[_SentenceAudio]:
        synthesizer = self._engine.synthesizer

        def job() -> _SentenceAudio:
            start = time.perf_counter()
            samples = synthesizer.synthesize(sentence, self._stopped)
            return _SentenceAudio(samples, time.perf_counter() - start)

        return asyncio.ensure_future(self._run(job))

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine's worker; raises `_Cancelled` if the reply is."""
        self._raise_if_stopped()
        job = self._engine.submit(self._guarded(fn), *args)
        self._jobs.add(job)
        try:
            return await asyncio.wrap_future(job)
        except (RecognitionCancelled, SynthesisCancelled) as exc:
            raise _Cancelled from exc
        except asyncio.CancelledError:
            if job.cancelled() and not _task_cancelling():  # `cancel()` or `close()` dropped it
                raise _Cancelled from None
            raise
        finally:
            if job.done():  # else `cancel()` still waits for it to leave the worker
                self._jobs.discard(job)

    def _guarded(self, fn: Callable[..., T]) -> Callable[..., T]:
        def guarded(*args: Any) -> T:
            if self._stop.is_set():  # cancelled while queued behind other work
                raise _Cancelled
            return fn(*args)

        return guarded

    def _stopped(self) -> bool:
        return self._stop.is_set()

    def _raise_if_stopped(self) -> None:
        if self._stop.is_set():
            raise _Cancelled

    def _elapsed(self) -> float:
        return time.perf_counter() - self._started

    async def cancel(self) -> None:
        """Stop synthesis/recognition for this reply; returns once the worker is off it."""
        self._stop.set()
        jobs = list(self._jobs)
        for job in jobs:
            job.cancel()  # only succeeds for jobs still waiting in the queue
        if jobs:
            await asyncio.gather(*(asyncio.wrap_future(j) for j in jobs), return_exceptions=True)

    def history(self, played_s: float | None) -> list[HistoryItem]:
        """The user's transcript, then the answer cut to the part that was heard."""
        produced = self._produced
        handed_out = produced.handed_out_s
        heard_s = handed_out if played_s is None else min(max(0.0, played_s), handed_out)
        text, cut = _heard_text(produced.sentences, heard_s)
        return [
            HistoryItem(role="user", text=produced.transcript),
            HistoryItem(role="assistant", text=text, interrupted=cut or not produced.complete),
        ]


@dataclass(frozen=True)
class _SentenceAudio:
    samples: np.ndarray
    synthesis_s: float


def _chunks(samples: np.ndarray, sample_rate: int, chunk_s: float) -> list[np.ndarray]:
    """`samples` in pieces of `chunk_s` seconds (the last may be shorter)."""
    size = max(1, int(chunk_s * sample_rate))
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def _task_cancelling() -> bool:
    """True if the running task itself is being cancelled (not just a job it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    """Collect the outcome of a job nobody waits for any more; log it if it failed."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, _Cancelled):
        logger.warning("dropped synthesis job failed", exc_info=error)


def _heard_text(sentences: Sequence[_SpokenSentence], heard_s: float) -> tuple[str, bool]:
    """The answer's text up to `heard_s` seconds of its audio, and whether it was cut.

    Whole sentences are kept while their audio was fully heard; the sentence being played when
    playback stopped keeps the share of its words matching the share of its audio heard.
    """
    kept: list[str] = []
    remaining = heard_s
    for sentence in sentences:
        if remaining >= sentence.duration_s - 1e-6:
            kept.append(sentence.text)
            remaining -= sentence.duration_s
            continue
        words = sentence.text.split()
        share = int(len(words) * remaining / sentence.duration_s + 1e-6)
        kept.extend(words[:share])
        return " ".join(kept), True
    return " ".join(kept), False


class OfflineEngine(Engine):
    """Speech in, speech out without a GPU or downloads: PocketSphinx, a responder, eSpeak NG.

    Args:
        recognizer, synthesizer, responder: the three stages (defaults: bundled English models,
            the "en-us" voice, and `Responder()`).
        chunk_s: length of the audio chunks a reply yields.
    """

    name = "offline"

    def __init__(
        self,
        recognizer: SpeechRecognizer | None = None,
        synthesizer: SpeechSynthesizer | None = None,
        responder: Responder | None = None,
        chunk_s: float = DEFAULT_CHUNK_S,
    ) -> None:
        self.recognizer = recognizer or SpeechRecognizer()
        self.synthesizer = synthesizer or SpeechSynthesizer()
        self.responder = responder or Responder()
        self.chunk_s = chunk_s
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offline-engine")
        self._closed = False

    @property
    def sample_rate(self) -> int:
        """Sample rate of the answers' audio."""
        return self.synthesizer.sample_rate

    async def start(self) -> None:
        """Build the decoder on the worker thread and speak once, so the first turn is quick."""
        await asyncio.wrap_future(self.submit(self._warm_up))

    def _warm_up(self) -> None:
        start = time.perf_counter()
        self.recognizer.warm_up()
        self.synthesizer.synthesize("Ready.")
        logger.info("offline engine warm in %.2f s", time.perf_counter() - start)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue `fn(*args)` on the engine's worker thread."""
        if self._closed:
            raise RuntimeError("the offline engine is closed")
        return self._worker.submit(fn, *args)

    def respond(self, turn: UserTurn, history: Sequence[HistoryItem]) -> OfflineReply:
        """Start answering `turn`; work begins when the reply is iterated."""
        return OfflineReply(self, turn, history)

    async def close(self) -> None:
        """Drop queued jobs and stop the worker thread once its current job is done."""
        self._closed = True
        await asyncio.to_thread(self._worker.shutdown, wait=True, cancel_futures=True)


__all__ = ["DEFAULT_CHUNK_S", "OfflineEngine", "OfflineReply"]
