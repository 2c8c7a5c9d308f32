"""Edge cases of the offline engine's reply contract: cancellation, and what is logged."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from agent.engine import AudioChunk, ReplyEvent, UserTurn
from models.offline import OfflineEngine, SpeechRecognizer, SpeechSynthesizer

THREE_SENTENCES = "what can you do"  # the responder answers this in three sentences


@pytest.fixture(scope="module")
def synthesizer() -> SpeechSynthesizer:
    return SpeechSynthesizer()


@pytest.fixture(scope="module")
def engine(synthesizer: SpeechSynthesizer) -> Iterator[OfflineEngine]:
    engine = OfflineEngine(synthesizer=synthesizer)
    yield engine
    asyncio.run(engine.close())


def some_audio(seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.normal(0.0, 0.2, int(16_000 * seconds)).astype(np.float32)


class _SlowRecognizer(SpeechRecognizer):
    """Recognition that takes a while and records when it ended."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.started = threading.Event()
        self.finished_at: float | None = None

    def transcribe(self, audio: np.ndarray, should_stop: Callable[[], bool] | None = None) -> str:
        self.started.set()
        time.sleep(self.seconds)
        self.finished_at = time.perf_counter()
        return "hello"


async def test_cancelling_the_consuming_task_while_its_job_is_queued_cancels_the_task(
    engine: OfflineEngine,
) -> None:
    release = threading.Event()
    blocker = engine.submit(release.wait, 5.0)
    reply = engine.respond(UserTurn(audio=some_audio()), [])
    events: list[ReplyEvent] = []

    async def consume() -> None:
        async for event in reply:
            events.append(event)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    consumer.cancel()
    try:
        await asyncio.wait_for(consumer, timeout=1.0)
    except asyncio.CancelledError:
        pass
    finally:
        release.set()
        await asyncio.wrap_future(blocker)

    assert consumer.cancelled()
    assert events == []


async def test_no_transcript_comes_after_cancel_during_recognition(
    synthesizer: SpeechSynthesizer,
) -> None:
    recognizer = _SlowRecognizer(0.3)
    engine = OfflineEngine(recognizer=recognizer, synthesizer=synthesizer)
    reply = engine.respond(UserTurn(audio=some_audio()), [])
    events: list[ReplyEvent] = []

    async def consume() -> None:
        events.extend([e async for e in reply])

    consumer = asyncio.create_task(consume())
    try:
        await asyncio.to_thread(recognizer.started.wait, 5.0)
        await reply.cancel()
        await asyncio.wait_for(consumer, timeout=2.0)
    finally:
        await engine.close()

    assert events == []
    assert reply.history(None)[1].interrupted


async def test_no_sentence_text_comes_after_cancel_once_the_next_sentence_is_ready(
    synthesizer: SpeechSynthesizer,
) -> None:
    engine = OfflineEngine(synthesizer=synthesizer, chunk_s=100.0)  # one chunk per sentence
    reply = engine.respond(UserTurn(text=THREE_SENTENCES), [])
    after_cancel: list[ReplyEvent] = []
    cancelled = False
    try:
        async for event in reply:
            if cancelled:
                after_cancel.append(event)
            elif isinstance(event, AudioChunk):
                await asyncio.sleep(0.3)  # the second sentence is synthesized meanwhile
                await reply.cancel()
                cancelled = True
    finally:
        await engine.close()

    assert cancelled and after_cancel == []
    assert reply.history(None)[1].text == "I can tell you the time and the date."


async def test_cancel_after_the_consuming_task_was_cancelled_waits_for_the_worker(
    synthesizer: SpeechSynthesizer,
) -> None:
    recognizer = _SlowRecognizer(0.3)
    engine = OfflineEngine(recognizer=recognizer, synthesizer=synthesizer)
    reply = engine.respond(UserTurn(audio=some_audio()), [])

    async def consume() -> None:
        async for _ in reply:
            pass

    consumer = asyncio.create_task(consume())
    try:
        await asyncio.to_thread(recognizer.started.wait, 5.0)
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await reply.cancel()
        returned_at = time.perf_counter()
    finally:
        await engine.close()

    assert recognizer.finished_at is not None and recognizer.finished_at <= returned_at


class _FailingSynthesizer(SpeechSynthesizer):
    def synthesize(self, text: str, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        raise RuntimeError("the voice broke")


async def test_a_failed_synthesis_is_raised_once_not_also_logged_as_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = OfflineEngine(synthesizer=_FailingSynthesizer())
    caplog.set_level(logging.WARNING, logger="models.offline.engine")
    try:
        with pytest.raises(RuntimeError, match="the voice broke"):
            async for _ in engine.respond(UserTurn(text="hello"), []):
                pass
        await asyncio.sleep(0.05)  # done callbacks of dropped jobs run
    finally:
        await engine.close()

    assert not [r for r in caplog.records if "dropped synthesis job" in r.getMessage()]
