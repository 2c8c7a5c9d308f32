"""The offline engine end to end: eSpeak NG speech in, PocketSphinx, responder, eSpeak NG out."""

from __future__ import annotations

import asyncio
import ctypes.util
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import soxr

from agent.engine import (
    USER_SAMPLE_RATE,
    AudioChunk,
    HistoryItem,
    ReplyEvent,
    TextDelta,
    UserTranscript,
    UserTurn,
)
from models.offline import OfflineEngine, Responder, SpeechRecognizer, SpeechSynthesizer
from models.offline.responder import NOT_CAUGHT, extract_name
from models.offline.tts import EspeakNotFoundError, SynthesisCancelled, find_espeak, split_sentences

REPO_ROOT = Path(__file__).resolve().parents[1]
THREE_SENTENCES = "what can you do"  # the responder answers this in three sentences


@pytest.fixture(scope="module")
def synthesizer() -> SpeechSynthesizer:
    return SpeechSynthesizer()


@pytest.fixture(scope="module")
def recognizer() -> SpeechRecognizer:
    return SpeechRecognizer()


@pytest.fixture(scope="module")
def engine() -> Iterator[OfflineEngine]:
    engine = OfflineEngine()
    yield engine
    asyncio.run(engine.close())


def to_user_rate(audio: np.ndarray, rate: int) -> np.ndarray:
    return soxr.resample(audio, rate, USER_SAMPLE_RATE).astype(np.float32)


def speak(synthesizer: SpeechSynthesizer, text: str) -> np.ndarray:
    """`text` spoken by eSpeak NG, as a 16 kHz user turn's audio."""
    return to_user_rate(synthesizer.synthesize(text), synthesizer.sample_rate)


async def collect(reply: object) -> list[ReplyEvent]:
    return [event async for event in reply]  # type: ignore[attr-defined]


def answer_audio(events: list[ReplyEvent]) -> tuple[np.ndarray, int]:
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    return np.concatenate([c.samples for c in chunks]), chunks[0].sample_rate


# --- speech in, speech out ---------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello", "one two three"])
def test_synthesized_speech_is_recognized_back(
    synthesizer: SpeechSynthesizer, recognizer: SpeechRecognizer, text: str
) -> None:
    assert recognizer.transcribe(speak(synthesizer, text)) == text


def test_recognizer_accepts_int16_audio(
    synthesizer: SpeechSynthesizer, recognizer: SpeechRecognizer
) -> None:
    pcm = (speak(synthesizer, "hello") * 32767).astype(np.int16)
    assert recognizer.transcribe(pcm) == "hello"


def test_silence_is_recognized_as_nothing(recognizer: SpeechRecognizer) -> None:
    assert recognizer.transcribe(np.zeros(USER_SAMPLE_RATE, np.float32)) == ""


def test_synthesis_is_float_audio_at_the_library_rate(synthesizer: SpeechSynthesizer) -> None:
    audio = synthesizer.synthesize("Hello there.")
    assert synthesizer.sample_rate == 22050
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.3 < len(audio) / synthesizer.sample_rate < 3.0
    assert 0.05 < np.abs(audio).max() <= 1.0


def test_synthesis_stops_when_asked(synthesizer: SpeechSynthesizer) -> None:
    calls = 0

    def stop_after_two_pieces() -> bool:
        nonlocal calls
        calls += 1
        return calls > 2

    with pytest.raises(SynthesisCancelled):
        synthesizer.synthesize(
            "A long sentence that takes several seconds to say out loud, really.",
            stop_after_two_pieces,
        )
    assert calls == 3
    assert len(synthesizer.synthesize("hello")) > 0  # the library is usable afterwards


def test_synthesis_streams_one_sentence_at_a_time(synthesizer: SpeechSynthesizer) -> None:
    pieces = list(synthesizer.synthesize_sentences("Hello there. It is 3.5 degrees! Bye?"))
    assert [text for text, _ in pieces] == ["Hello there.", "It is 3.5 degrees!", "Bye?"]
    assert all(len(audio) > 0 for _, audio in pieces)


def test_unknown_voice_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no voice named"):
        SpeechSynthesizer(voice="no-such-voice").synthesize("hello")


def test_missing_library_is_a_clear_error() -> None:
    with pytest.raises(EspeakNotFoundError, match="not found"):
        find_espeak(library_path="/nonexistent/libespeak-ng.so")


@pytest.mark.skipif(ctypes.util.find_library("espeak-ng") is None, reason="no system libespeak-ng")
def test_system_library_speaks_when_the_bundled_one_is_missing() -> None:
    script = (
        "import models.offline.tts as tts\n"
        "tts._bundled_location = lambda: None\n"
        "synthesizer = tts.SpeechSynthesizer()\n"
        "print(synthesizer.sample_rate, len(synthesizer.synthesize('hello')) > 1000)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert done.stdout.split() == ["22050", "True"]


def test_sentences_split_at_end_punctuation_only() -> None:
    assert split_sentences("Hi!  It costs 3.50 dollars. OK? ") == [
        "Hi!",
        "It costs 3.50 dollars.",
        "OK?",
    ]


# --- the engine ---------------------------------------------------------------------------


async def test_engine_answers_a_spoken_question(
    engine: OfflineEngine, synthesizer: SpeechSynthesizer, recognizer: SpeechRecognizer
) -> None:
    reply = engine.respond(UserTurn(audio=speak(synthesizer, "what is your name")), [])
    events = await collect(reply)

    assert isinstance(events[0], UserTranscript)
    assert "name" in events[0].text.split()
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text.startswith("My name is Echo.")
    audio, rate = answer_audio(events)
    assert rate == 22050
    assert np.sqrt(np.mean(audio**2)) > 0.02
    assert "name" in recognizer.transcribe(to_user_rate(audio, rate)).split()
    assert {"asr", "responder", "tts_first_sentence"} <= reply.timings.stages.keys()


async def test_typed_turn_is_answered_without_recognition(engine: OfflineEngine) -> None:
    reply = engine.respond(UserTurn(text="  how are you "), [])
    events = await collect(reply)

    assert events[0] == UserTranscript("how are you")
    assert events[1] == TextDelta("I am doing well, thank you for asking.")
    assert all(isinstance(e, AudioChunk) for e in events[2:]) and len(events) > 2
    assert "asr" not in reply.timings.stages


async def test_audio_comes_in_short_chunks_after_each_sentence_text(engine: OfflineEngine) -> None:
    events = await collect(engine.respond(UserTurn(text=THREE_SENTENCES), []))

    kinds = ["text" if isinstance(e, TextDelta) else "audio" for e in events[1:]]
    assert kinds[0] == "text" and kinds.count("text") == 3
    assert "text" in kinds[kinds.index("audio") :]  # text of later sentences follows audio
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert all(c.samples.dtype == np.float32 for c in chunks)
    assert all(c.duration_s <= engine.chunk_s + 1e-9 for c in chunks)


class _RecordingSynthesizer(SpeechSynthesizer):
    """A real synthesizer that records when each sentence's synthesis ended."""

    def __init__(self) -> None:
        super().__init__()
        self.finished_at: list[float] = []
        self.threads: set[str] = set()

    def synthesize(self, text: str, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        audio = super().synthesize(text, should_stop)
        time.sleep(0.05)  # a slower machine: synthesis takes a noticeable time
        self.finished_at.append(time.perf_counter())
        return audio


async def test_first_audio_is_out_before_the_last_sentence_is_synthesized() -> None:
    synthesizer = _RecordingSynthesizer()
    engine = OfflineEngine(synthesizer=synthesizer)
    first_chunk_at = None
    try:
        async for event in engine.respond(UserTurn(text=THREE_SENTENCES), []):
            if isinstance(event, AudioChunk) and first_chunk_at is None:
                first_chunk_at = time.perf_counter()
    finally:
        await engine.close()

    assert len(synthesizer.finished_at) == 3
    assert first_chunk_at is not None and first_chunk_at < synthesizer.finished_at[-1]


class _ThreadRecordingRecognizer(SpeechRecognizer):
    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def transcribe(self, audio: np.ndarray, should_stop: Callable[[], bool] | None = None) -> str:
        self.threads.add(threading.current_thread().name)
        return super().transcribe(audio, should_stop)


async def test_model_work_runs_on_the_engine_worker_not_the_event_loop(
    synthesizer: SpeechSynthesizer,
) -> None:
    recognizer, spy_synthesizer = _ThreadRecordingRecognizer(), _RecordingSynthesizer()
    engine = OfflineEngine(recognizer=recognizer, synthesizer=spy_synthesizer)
    try:
        await collect(engine.respond(UserTurn(audio=speak(synthesizer, "hello")), []))
    finally:
        await engine.close()

    loop_thread = threading.current_thread().name
    assert len(recognizer.threads | spy_synthesizer.threads) == 1
    assert loop_thread not in recognizer.threads | spy_synthesizer.threads


async def test_closed_engine_refuses_new_turns() -> None:
    engine = OfflineEngine()
    await engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        await collect(engine.respond(UserTurn(text="hello"), []))


async def test_cancel_mid_answer_stops_promptly_and_no_more_chunks_come(
    engine: OfflineEngine,
) -> None:
    reply = engine.respond(UserTurn(text=THREE_SENTENCES), [])
    chunks_after_cancel = 0
    cancelled = False
    cancel_s = 0.0
    chunks = 0
    async for event in reply:
        if not isinstance(event, AudioChunk):
            continue
        chunks_after_cancel += cancelled
        chunks += 1
        if chunks == 2:
            start = time.perf_counter()
            await reply.cancel()
            cancel_s, cancelled = time.perf_counter() - start, True

    assert cancelled and chunks_after_cancel == 0
    assert cancel_s < 0.5
    assistant = reply.history(None)[1]
    assert assistant.interrupted


async def test_cancel_from_another_task_ends_a_reply_waiting_for_the_worker(
    engine: OfflineEngine, synthesizer: SpeechSynthesizer
) -> None:
    """A reply queued behind other work ends at once, without waiting for the worker."""
    release = threading.Event()
    blocker = engine.submit(release.wait, 5.0)
    reply = engine.respond(UserTurn(audio=speak(synthesizer, "hello")), [])
    events: list[ReplyEvent] = []

    async def consume() -> None:
        events.extend([e async for e in reply])

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    await reply.cancel()
    await asyncio.wait_for(consumer, timeout=1.0)
    cancel_s = time.perf_counter() - start
    release.set()
    await asyncio.wrap_future(blocker)

    assert cancel_s < 0.5
    assert events == []
    assert reply.history(None)[1].interrupted


async def test_concurrent_replies_share_the_worker_and_both_finish(engine: OfflineEngine) -> None:
    first = engine.respond(UserTurn(text=THREE_SENTENCES), [])
    second = engine.respond(UserTurn(text="how are you"), [])
    events_first, events_second = await asyncio.gather(collect(first), collect(second))

    assert first.history(None)[1].text.startswith("I can tell you the time and the date.")
    assert second.history(None)[1].text == "I am doing well, thank you for asking."
    assert not first.history(None)[1].interrupted and not second.history(None)[1].interrupted
    assert sum(isinstance(e, TextDelta) for e in events_first) == 3
    assert sum(isinstance(e, TextDelta) for e in events_second) == 1


async def test_reply_cancelled_before_it_starts_yields_nothing(engine: OfflineEngine) -> None:
    reply = engine.respond(UserTurn(text="hello"), [])
    await reply.cancel()
    assert await collect(reply) == []
    assert reply.history(None)[1] == HistoryItem(role="assistant", text="", interrupted=True)


async def test_history_keeps_only_the_played_share_of_the_answer(engine: OfflineEngine) -> None:
    reply = engine.respond(UserTurn(text=THREE_SENTENCES), [])
    durations: list[float] = []
    sentences: list[str] = []
    async for event in reply:
        if isinstance(event, TextDelta):
            sentences.append(event.text.strip())
            durations.append(0.0)
        elif isinstance(event, AudioChunk):
            durations[-1] += event.duration_s

    user, full = reply.history(None)
    assert user == HistoryItem(role="user", text=THREE_SENTENCES)
    assert full.text == " ".join(sentences) and not full.interrupted

    second_words = sentences[1].split()
    _, cut = reply.history(durations[0] + durations[1] * 0.5)
    assert cut.interrupted
    assert cut.text == " ".join([sentences[0], *second_words[: len(second_words) // 2]])

    _, nothing = reply.history(0.0)
    assert nothing.text == "" and nothing.interrupted


async def test_engine_remembers_the_users_name_across_turns(engine: OfflineEngine) -> None:
    first = engine.respond(UserTurn(text="my name is Ada"), [])
    await collect(first)
    second = engine.respond(UserTurn(text="what is my name"), first.history(None))
    texts = [e.text for e in await collect(second) if isinstance(e, TextDelta)]
    assert texts == ["Your name is Ada."]


# --- the responder ------------------------------------------------------------------------


def fixed_clock() -> datetime:
    return datetime(2026, 3, 5, 14, 7)


def test_responder_tells_the_time() -> None:
    assert Responder(now=fixed_clock).answer("what time is it") == ["It is 2:07 PM."]


def test_responder_tells_the_date() -> None:
    answer = Responder(now=fixed_clock).answer("what is the date")
    assert answer == ["Today is Thursday, March 5, 2026."]


def test_responder_remembers_a_name_given_earlier() -> None:
    history = [
        HistoryItem(role="user", text="my name is grace hopper"),
        HistoryItem(role="assistant", text="Nice to meet you, Grace Hopper."),
        HistoryItem(role="user", text="how are you"),
    ]
    assert Responder().answer("what's my name", history) == ["Your name is Grace Hopper."]
    assert Responder().answer("hello", history)[0] == "Hello, Grace Hopper!"


def test_responder_says_when_it_does_not_know_the_name() -> None:
    assert Responder().answer("what is my name")[0] == "You have not told me your name yet."


def test_responder_asks_again_on_empty_input() -> None:
    assert Responder().answer("  ")[0] == NOT_CAUGHT


def test_responder_recalls_what_the_user_said_before() -> None:
    history = [
        HistoryItem(role="user", text="turn on the lights"),
        HistoryItem(role="assistant", text="You said: turn on the lights."),
    ]
    assert Responder().answer("what did i say before", history) == [
        "Before this, you said: turn on the lights."
    ]


def test_responder_repeats_what_it_did_not_understand() -> None:
    assert Responder().answer("the weather is nice")[0] == "You said: the weather is nice."


def test_responder_answers_greeting_and_question_together() -> None:
    assert Responder(now=fixed_clock).answer("hello what time is it") == [
        "Hello!",
        "It is 2:07 PM.",
    ]


def test_name_stops_at_a_following_clause() -> None:
    assert extract_name("My name is John and I like tea") == "John"
    assert extract_name("call me Ishmael.") == "Ishmael"
    assert extract_name("what is my name") is None
