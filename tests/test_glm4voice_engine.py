"""The GLM-4-Voice engine: worker scheduling, streaming, cancellation and history cuts.

A scripted brain stands in for the models where the test is about the engine's own logic; the
tiny random-weight model set (`models.make_tiny`) runs the real models end to end.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from agent.engine import AudioChunk, EngineError, HistoryItem, TextDelta, UserTurn
from models.glm4voice.engine import EngineOptions, GLM4VoiceEngine, history_prefix
from models.glm4voice.worker import Job

AUDIO_OFFSET = 1000
STOP = 999
SAMPLES_PER_TOKEN = 1764  # 80 ms at 22.05 kHz


class ScriptedBrain:
    """Emits a fixed id sequence: 13 text ids (letters), 26 audio ids, repeated, then STOP."""

    sample_rate = 22050

    def __init__(self, rounds: int = 3, step_delay: float = 0.0, fail_at: int | None = None):
        self.script: list[int] = []
        for r in range(rounds):
            self.script += [ord("a") + (r + i) % 26 for i in range(13)]
            self.script += [AUDIO_OFFSET + 26 * r + i for i in range(26)]
        self.script.append(STOP)
        self.step_delay = step_delay
        self.fail_at = fail_at
        self.decoded_blocks: list[tuple[list[int], bool]] = []
        self.prompts: list[str] = []
        self.steps = 0
        self.busy = threading.Event()

    def start_job(self, job: Job) -> None:
        user = job.turn_text if job.turn_text is not None else f"<audio {len(job.turn_audio)}>"
        job.prompt = job.history_prefix + f"<|user|>\n{user}<|assistant|>streaming_transcription\n"
        self.prompts.append(job.prompt)
        job.lm_state = 0

    def next_token(self, job: Job) -> int:
        self.busy.set()
        time.sleep(self.step_delay)
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("boom")
        index = job.lm_state
        job.lm_state = index + 1
        self.busy.clear()
        return self.script[index]

    def decode_audio(self, job: Job, codes: list[int], final: bool) -> np.ndarray:
        self.decoded_blocks.append((list(codes), final))
        return np.full(len(codes) * SAMPLES_PER_TOKEN, 0.1, dtype=np.float32)

    def is_audio(self, token_id: int) -> bool:
        return token_id >= AUDIO_OFFSET

    def audio_code(self, token_id: int) -> int:
        return token_id - AUDIO_OFFSET

    def is_stop(self, token_id: int) -> bool:
        return token_id == STOP

    def decode_text(self, token_ids: list[int]) -> str:
        return "".join(f"<{t - AUDIO_OFFSET}>" if t >= AUDIO_OFFSET else chr(t) for t in token_ids)


async def _engine(brain: ScriptedBrain, **options) -> GLM4VoiceEngine:
    engine = GLM4VoiceEngine(lambda: brain, EngineOptions(**options))
    await engine.start()
    return engine


async def _collect(reply) -> list:
    return [event async for event in reply]


async def test_reply_streams_text_then_audio_in_blocks_of_the_schedule():
    brain = ScriptedBrain(rounds=3)
    engine = await _engine(brain, first_block_tokens=10, later_block_tokens=20)
    try:
        events = await _collect(engine.respond(UserTurn(text="hi"), []))
    finally:
        await engine.close()
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == "".join(chr(t) for t in brain.script[:-1] if t < AUDIO_OFFSET)
    sizes = [len(codes) for codes, _ in brain.decoded_blocks]
    assert sizes[0] == 10 and all(s == 20 for s in sizes[1:-1]) and sum(sizes) == 78
    assert [final for _, final in brain.decoded_blocks] == [False] * (len(sizes) - 1) + [True]
    audio = [e for e in events if isinstance(e, AudioChunk)]
    assert sum(len(a.samples) for a in audio) == 78 * SAMPLES_PER_TOKEN
    # The first text arrives before the first audio (13 text ids lead each 26 audio ids).
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
    assert first_text < first_audio


async def test_full_reply_history_keeps_prompt_and_completion_without_stop():
    brain = ScriptedBrain(rounds=1)
    engine = await _engine(brain)
    try:
        reply = engine.respond(UserTurn(text="hi"), [])
        await _collect(reply)
        user, assistant = reply.history(None)
    finally:
        await engine.close()
    assert user.role == "user" and user.payload == brain.prompts[0]
    assert assistant.role == "assistant" and not assistant.interrupted
    assert assistant.payload == brain.decode_text(brain.script[:-1])
    assert assistant.text == "abcdefghijklm"


async def test_interrupted_history_is_cut_after_the_last_heard_audio_token():
    brain = ScriptedBrain(rounds=2)
    engine = await _engine(brain)
    try:
        reply = engine.respond(UserTurn(text="hi"), [])
        await _collect(reply)
        total_tokens = 52
        heard_tokens = 30  # 26 of round one, then 4 of round two
        played_s = heard_tokens / total_tokens * (total_tokens * 0.08)
        _, assistant = reply.history(played_s)
    finally:
        await engine.close()
    assert assistant.interrupted
    expected = brain.script[: 13 + 26 + 13 + 4]
    assert assistant.payload == brain.decode_text(expected)
    assert assistant.payload.endswith("<29>")


async def test_history_of_an_answer_nobody_heard_is_empty_and_interrupted():
    brain = ScriptedBrain(rounds=1)
    engine = await _engine(brain)
    try:
        reply = engine.respond(UserTurn(text="hi"), [])
        await _collect(reply)
        _, assistant = reply.history(0.0)
    finally:
        await engine.close()
    assert assistant.interrupted and assistant.payload == "" and assistant.text == ""


async def test_next_prompt_extends_the_previous_prompt_and_completion():
    brain = ScriptedBrain(rounds=1)
    engine = await _engine(brain)
    try:
        first = engine.respond(UserTurn(text="one"), [])
        await _collect(first)
        history = first.history(None)
        second = engine.respond(UserTurn(text="two"), history)
        await _collect(second)
    finally:
        await engine.close()
    assert brain.prompts[1].startswith(brain.prompts[0] + history[1].payload)
    assert history_prefix(history) == brain.prompts[0] + history[1].payload


def test_history_prefix_ignores_items_without_engine_payloads():
    items = [HistoryItem("user", "hello"), HistoryItem("assistant", "hi there")]
    assert history_prefix(items) == ""


async def test_cancel_stops_the_worker_within_one_step():
    brain = ScriptedBrain(rounds=50, step_delay=0.01)
    engine = await _engine(brain, max_ahead_s=1000.0)
    try:
        reply = engine.respond(UserTurn(text="hi"), [])
        seen = 0
        async for event in reply:
            if isinstance(event, AudioChunk):
                seen += 1
                break
        steps_at_cancel = brain.steps
        await reply.cancel()
        steps_after = brain.steps
        await asyncio.sleep(0.1)
        assert brain.steps == steps_after
        assert steps_after - steps_at_cancel <= 2
        assert seen == 1
        # The worker is free for the next conversation.
        brain.script = [*brain.script[:39], STOP]
        events = await asyncio.wait_for(_collect(engine.respond(UserTurn(text="x"), [])), 30)
        assert any(isinstance(e, AudioChunk) for e in events)
    finally:
        await engine.close()


async def test_generation_pauses_when_far_ahead_of_playback():
    brain = ScriptedBrain(rounds=50)
    engine = await _engine(brain, max_ahead_s=2.0)
    try:
        reply = engine.respond(UserTurn(text="hi"), [])
        iterator = reply.__aiter__()
        await iterator.__anext__()  # start consuming, then stop reading
        await asyncio.sleep(0.3)
        produced = sum(len(c) for c, _ in brain.decoded_blocks) * 0.08
        assert produced < 2.0 + 20 * 0.08 + 1.0  # bounded by max_ahead plus one block
        assert brain.steps < len(brain.script) - 1
        await reply.cancel()
    finally:
        await engine.close()


async def test_failure_in_one_reply_raises_engine_error_and_worker_survives():
    brain = ScriptedBrain(rounds=1, fail_at=5)
    engine = await _engine(brain)
    try:
        with pytest.raises(EngineError, match="boom"):
            await _collect(engine.respond(UserTurn(text="hi"), []))
        brain.fail_at = None
        events = await _collect(engine.respond(UserTurn(text="again"), []))
        assert any(isinstance(e, AudioChunk) for e in events)
    finally:
        await engine.close()


async def test_concurrent_replies_share_the_worker_fairly():
    brain = ScriptedBrain(rounds=2, step_delay=0.002)
    engine = await _engine(brain)
    try:
        replies = [engine.respond(UserTurn(text=str(i)), []) for i in range(4)]
        results = await asyncio.gather(*(_collect(r) for r in replies))
    finally:
        await engine.close()
    for events in results:
        assert (
            sum(len(e.samples) for e in events if isinstance(e, AudioChunk))
            == 52 * SAMPLES_PER_TOKEN
        )
