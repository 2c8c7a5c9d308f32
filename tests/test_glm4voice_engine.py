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
import torch

from agent.engine import AudioChunk, EngineError, HistoryItem, TextDelta, UserTurn
from models.glm4voice import brain as brain_module
from models.glm4voice.batching import KVCacheBatch, SerialBatch
from models.glm4voice.brain import LoadOptions
from models.glm4voice.engine import EngineOptions, GLM4VoiceEngine, history_prefix
from models.glm4voice.static_batch import StaticCacheConfig, StaticKVBatch
from models.glm4voice.tokens import (
    TokenConstraints,
    TokenMasks,
    TokenPattern,
    sample_nucleus,
    writes_cjk,
)
from models.glm4voice.worker import AudioBlock, BlockHold, Job, ModelWorker
from models.lm import LMStepper, build_random_lm
from models.lm.configuration_lm import ChatGLMConfig
from models.lm.tiny import tiny_config_dict

AUDIO_OFFSET = 1000
STOP = 999
SAMPLES_PER_TOKEN = 1764  # 80 ms at 22.05 kHz


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ScriptedText:
    """Text deltas of the scripted ids (letters), skipping audio and stop ids."""

    def push(self, token_id: int) -> str:
        return chr(token_id) if token_id < STOP else ""

    def flush(self) -> str:
        return ""


class ScriptedBrain:
    """Emits a fixed id sequence: 13 text ids (letters), 26 audio ids, repeated, then STOP."""

    sample_rate = 22050
    block_tokens = None
    max_sequences = None

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
        self.batch_sizes: list[int] = []
        self.start_batches: list[int] = []  # jobs per start_jobs call
        self.released: list[int] = []
        self.heard: list[np.ndarray] = []
        self.steps = 0
        self.busy = threading.Event()
        self.decode_calls: list[list[int]] = []  # job keys of each decoder call
        self.warm_ups: list[tuple[str, int, int]] = []  # (thread, max_batch, jobs started)
        self.warm_up_error: Exception | None = None

    def listen(self, listener, samples: np.ndarray) -> None:
        self.heard.append(samples)

    def start_jobs(self, jobs: list[Job]) -> list[BaseException | None]:
        self.start_batches.append(len(jobs))
        for job in jobs:
            user = job.turn_text if job.turn_text is not None else f"<audio {len(job.turn_audio)}>"
            prefix = job.history_prefix
            job.prompt = prefix + f"<|user|>\n{user}<|assistant|>streaming_transcription\n"
            self.prompts.append(job.prompt)
            job.logits = 0  # the scripted "logits" are the position in the script
        return [None] * len(jobs)

    def sample(self, jobs: list[Job]) -> list[int]:
        return [self.script[job.logits] for job in jobs]

    def step(self, jobs: list[Job], tokens: list[int]) -> None:
        self.busy.set()
        time.sleep(self.step_delay)
        self.steps += 1
        self.batch_sizes.append(len(jobs))
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("boom")
        for job in jobs:
            job.logits += 1
        self.busy.clear()

    def release(self, job: Job) -> None:
        self.released.append(job.key)

    def decode_audio(self, job: Job, codes: list[int], final: bool) -> np.ndarray:
        self.decoded_blocks.append((list(codes), final))
        return np.full(len(codes) * SAMPLES_PER_TOKEN, 0.1, dtype=np.float32)

    def decode_audio_many(self, blocks: list[AudioBlock]) -> list[np.ndarray]:
        self.decode_calls.append([block.job.key for block in blocks])
        return [self.decode_audio(block.job, block.codes, block.final) for block in blocks]

    def warm_up(self, max_batch: int) -> dict[str, float]:
        self.warm_ups.append((threading.current_thread().name, max_batch, len(self.prompts)))
        if self.warm_up_error is not None:
            raise self.warm_up_error
        return {"lm_step": 0.001, "decoder": 0.002}

    def text_stream(self) -> ScriptedText:
        return ScriptedText()

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


async def test_concurrent_replies_are_stepped_as_one_batch_per_round():
    brain = ScriptedBrain(rounds=2, step_delay=0.002)
    engine = await _engine(brain)
    try:
        replies = [engine.respond(UserTurn(text=str(i)), []) for i in range(4)]
        await asyncio.gather(*(_collect(r) for r in replies))
    finally:
        await engine.close()
    assert max(brain.batch_sizes) == 4
    # 4 replies of 79 ids each took about 79 batched steps, not 4 x 79.
    assert len(brain.batch_sizes) < 2 * 79
    assert sorted(brain.released) == sorted(r.job.key for r in replies)


async def test_a_reply_waiting_for_its_listener_leaves_the_batch_while_others_go_on():
    brain = ScriptedBrain(rounds=30)
    engine = await _engine(brain, max_ahead_s=1.0)
    try:
        slow = engine.respond(UserTurn(text="slow"), [])
        iterator = slow.__aiter__()
        await iterator.__anext__()  # start reading, then stop: its audio piles up
        fast = engine.respond(UserTurn(text="fast"), [])
        events = await asyncio.wait_for(_collect(fast), 30)
        assert sum(isinstance(e, AudioChunk) for e in events) > 5
        assert len(slow.job.generated) < len(brain.script) // 4
        await slow.cancel()
    finally:
        await engine.close()


async def test_cancelling_one_reply_of_a_batch_lets_the_others_finish():
    brain = ScriptedBrain(rounds=3, step_delay=0.002)
    engine = await _engine(brain)
    try:
        doomed = engine.respond(UserTurn(text="a"), [])
        kept = engine.respond(UserTurn(text="b"), [])
        await doomed.cancel()
        events = await asyncio.wait_for(_collect(kept), 30)
    finally:
        await engine.close()
    assert sum(len(e.samples) for e in events if isinstance(e, AudioChunk)) == 78 * 1764
    assert doomed.job.key in brain.released


async def test_a_streaming_decoder_gets_its_blocks_as_soon_as_they_fill_and_a_final_flush():
    brain = ScriptedBrain(rounds=1)
    brain.block_tokens = 10
    engine = await _engine(brain, first_block_tokens=10, later_block_tokens=20)
    try:
        reply = engine.respond(UserTurn(text="hi"), [])
        await _collect(reply)
    finally:
        await engine.close()
    assert [(len(c), final) for c, final in brain.decoded_blocks] == [
        (10, False),
        (10, False),
        (6, True),
    ]
    # The first block was decoded on the 10th audio id, not on the 11th.
    assert brain.decoded_blocks[0][0] == list(range(10))


async def test_history_cut_follows_played_seconds_not_the_decoded_share():
    """A decoder holds audio back, so the emitted audio covers fewer tokens than were decoded;
    the heard tokens are played_s / 80 ms whatever was emitted."""
    brain = ScriptedBrain(rounds=2)
    engine = await _engine(brain, max_ahead_s=1000.0)
    try:
        reply = engine.respond(UserTurn(text="hi"), [])
        await _collect(reply)
        _, assistant = reply.history(10 * 0.08)
    finally:
        await engine.close()
    assert assistant.interrupted
    assert assistant.payload == brain.decode_text(brain.script[: 13 + 10])


async def test_listener_feeds_only_audio_older_than_the_lag_and_stops_when_closed():
    brain = ScriptedBrain(rounds=1)
    engine = await _engine(brain, listen_lag_s=0.5)
    try:
        listener = engine.begin_turn()
        for _ in range(100):  # 2 s in 20 ms pieces
            listener.push(np.full(320, 0.01, dtype=np.float32))
        await asyncio.sleep(0.2)
        assert sum(len(a) for a in brain.heard) == 16_000 * 3 // 2
        listener.close()
        listener.push(np.zeros(16_000, dtype=np.float32))
        await asyncio.sleep(0.2)
        assert sum(len(a) for a in brain.heard) == 16_000 * 3 // 2
    finally:
        await engine.close()


async def test_respond_refuses_a_listener_of_another_engine():
    one, other = await _engine(ScriptedBrain()), await _engine(ScriptedBrain())
    try:
        with pytest.raises(ValueError):
            one.respond(UserTurn(audio=np.zeros(160, np.float32)), [], other.begin_turn())
    finally:
        await one.close()
        await other.close()


def test_events_after_the_event_loop_closed_do_not_stop_the_worker():
    brain = ScriptedBrain(rounds=5, step_delay=0.005)
    engine = GLM4VoiceEngine(lambda: brain, EngineOptions())

    async def abandon() -> None:
        await engine.start()
        engine.respond(UserTurn(text="hi"), [])  # never read, never cancelled
        await asyncio.sleep(0.05)

    asyncio.run(abandon())
    time.sleep(0.3)  # the worker keeps emitting into the closed loop
    assert engine.worker is not None and engine.worker._thread.is_alive()

    async def again() -> list:
        return await _collect(engine.respond(UserTurn(text="x"), []))

    try:
        events = asyncio.run(again())
        assert any(isinstance(e, AudioChunk) for e in events)
    finally:
        asyncio.run(engine.close())


# ----------------------------------------------------------------------------- real model parts


def test_load_options_pick_float32_on_cpu_and_bfloat16_on_gpus():
    assert LoadOptions(device="cpu").resolved_lm_dtype == torch.float32
    assert LoadOptions(device="cuda:0").resolved_lm_dtype == torch.bfloat16
    assert LoadOptions(device="cpu", lm_dtype=torch.bfloat16).resolved_lm_dtype == torch.bfloat16
    with pytest.raises(ValueError):
        LoadOptions(decoder_mode="fastest")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stepper() -> LMStepper:
    config = ChatGLMConfig.from_dict(tiny_config_dict(padded_vocab_size=512))
    return LMStepper(build_random_lm(config, dtype=torch.float32, seed=1))


def _alone(stepper: LMStepper, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    logits, state = stepper.prefill(torch.tensor([prompt]))
    rows = [logits[0]]
    for token in tokens:
        rows.append(stepper.decode(state, torch.tensor([token]))[0])
    return torch.stack(rows)


def test_batched_decoding_gives_each_sequence_the_logits_it_gets_alone(stepper):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    tokens = [torch.randint(0, 500, (8,), generator=gen).tolist() for _ in prompts]
    expected = [_alone(stepper, p, t) for p, t in zip(prompts, tokens, strict=True)]
    batch = KVCacheBatch(stepper)
    got: dict[str, list[torch.Tensor]] = {}
    for key, prompt in zip("abc", prompts, strict=True):
        got[key] = [batch.prefill(key, prompt)]
    position = dict.fromkeys("abc", 0)
    # Rows join, leave and come back: every membership change of a real server.
    for keys in ["abc", "ab", "b", "bc", "cab", "ca", "c", "abc", "ab", "b", "ab", "a", "ac", "c"]:
        keys = [k for k in keys if position[k] < 8]
        if not keys:
            continue
        step_tokens = [tokens["abc".index(k)][position[k]] for k in keys]
        logits = batch.step(keys, step_tokens)
        for row, key in enumerate(keys):
            got[key].append(logits[row])
            position[key] += 1
    for key, want in zip("abc", expected, strict=True):
        torch.testing.assert_close(torch.stack(got[key]), want[: len(got[key])], atol=1e-5, rtol=0)
    assert all(position[k] == 8 for k in "abc")


@pytest.mark.parametrize(
    "make", [KVCacheBatch, lambda s: StaticKVBatch(s, StaticCacheConfig(4, 64))]
)
def test_prompts_prefilled_together_get_the_logits_they_get_alone(stepper, make):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    tokens = [torch.randint(0, 500, (4,), generator=gen).tolist() for _ in prompts]
    batch = make(stepper)
    first = batch.prefill_many(list(zip("abc", prompts, strict=True)))
    got = {key: [row] for key, row in zip("abc", first, strict=True)}
    for step in range(4):
        logits = batch.step(list("abc"), [t[step] for t in tokens])
        for key, row in zip("abc", logits, strict=True):
            got[key].append(row)
    for key, prompt, steps in zip("abc", prompts, tokens, strict=True):
        want = _alone(stepper, prompt, steps)
        torch.testing.assert_close(torch.stack(got[key]), want, atol=1e-5, rtol=0)


def test_prefill_groups_keep_arrival_order_within_the_padded_budget():
    jobs = [_job(str(i), []) for i in range(5)]
    prepared = list(zip(jobs, [[1] * n for n in (10, 30, 20, 100, 5)], strict=True))
    groups = brain_module._prefill_groups(prepared, 90)
    assert [[len(ids) for _, ids in group] for group in groups] == [[10, 30, 20], [100], [5]]


def test_a_released_sequence_leaves_no_padding_behind(stepper):
    batch = KVCacheBatch(stepper)
    batch.prefill("long", list(range(40)))
    batch.prefill("short", [1, 2, 3])
    batch.step(["long", "short"], [5, 6])
    batch.release("long")
    logits = batch.step(["short"], [7])
    torch.testing.assert_close(logits[0], _alone(stepper, [1, 2, 3], [6, 7])[-1], atol=1e-5, rtol=0)
    assert batch.batch_keys == ["short"]
    assert batch._batch is not None and batch._batch.length == 5


def test_serial_batch_matches_the_kv_batch(stepper):
    serial, batched = SerialBatch(stepper), KVCacheBatch(stepper)
    for batch in (serial, batched):
        batch.prefill(1, [3, 4, 5])
        batch.prefill(2, [9, 8, 7, 6, 5, 4])
    a = serial.step([1, 2], [10, 11])
    b = batched.step([1, 2], [10, 11])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


class TinyVocab:
    """Ids 0-9 text, 10 special, 11 the turn end, 12-19 audio, 20-23 undefined padding."""

    def is_special(self, token_id: int) -> bool:
        return 10 <= token_id < 20

    def is_audio(self, token_id: int) -> bool:
        return 12 <= token_id < 20

    def decode_bytes(self, ids) -> bytes:
        if any(i >= 20 for i in ids):
            raise ValueError("undefined id")
        return b"x"

    def turn_stop_ids(self) -> frozenset[int]:
        return frozenset({11})


def _allowed(masks: TokenMasks, phase) -> set[int]:
    logits = masks.apply(torch.zeros(1, 24), [phase])
    return {i for i in range(24) if logits[0, i] > float("-inf")}


def test_masks_never_allow_ids_the_tokenizer_does_not_define():
    masks = TokenMasks.build(TinyVocab(), 24, TokenConstraints())
    assert _allowed(masks, "any") == set(range(20))
    assert _allowed(masks, "text") == set(range(10)) | {11}
    assert _allowed(masks, "audio") == set(range(12, 20)) | {11}
    assert _allowed(masks, "stop") == {11}


def test_allowed_text_ids_restrict_text_but_keep_audio_and_turn_end():
    masks = TokenMasks.build(TinyVocab(), 24, TokenConstraints(allowed_text_ids=frozenset({2, 3})))
    assert _allowed(masks, "text") == {2, 3, 11}
    assert _allowed(masks, "any") == {2, 3, 10, 11} | set(range(12, 20))


@pytest.mark.parametrize(
    ("text", "cjk"),
    [
        (" hello", False),
        (" café", False),
        ("\u2014\u201cquoted\u201d", False),  # em dash, curly quotes
        ("\U0001f600", False),  # an emoji
        ("你好", True),
        ("，", True),  # fullwidth comma
        ("。", True),
        ("こんにちは", True),
        ("カタカナ", True),
        ("안녕하세요", True),
        ("\u2e80", True),  # a CJK radical
        ("\U00020000", True),  # a supplementary ideograph
    ],
)
def test_writes_cjk_tells_chinese_japanese_and_korean_text_from_english(text, cjk):
    assert writes_cjk(text.encode()) is cjk
    assert writes_cjk(b"ok " + text.encode() + b" ok") is cjk


def test_writes_cjk_bars_lone_lead_bytes_of_cjk_characters_and_no_other_byte():
    """Byte-level BPE may split a character: the piece with its lead byte is barred, so the
    rest of the character can never follow."""
    barred = {b for b in range(256) if writes_cjk(bytes([b]))}
    assert barred == set(range(0xE3, 0xEE)) | {0xEF}


class PieceVocab(TinyVocab):
    """TinyVocab whose text ids 0-5 write these pieces (6-9: "x")."""

    pieces = [
        b" hello",
        "你".encode(),
        b"\xe4",
        " caf\u00e9".encode(),
        "，".encode(),
        b"\xbd",
    ]

    def decode_bytes(self, ids) -> bytes:
        (token_id,) = ids
        if token_id < len(self.pieces):
            return self.pieces[token_id]
        return super().decode_bytes(ids)


def test_english_replies_bar_text_ids_that_write_cjk_but_keep_audio_and_turn_end():
    english = TokenMasks.build(PieceVocab(), 24, TokenConstraints(reply_language="english"))
    assert _allowed(english, "text") == {0, 3, 5, 6, 7, 8, 9, 11}
    assert _allowed(english, "any") == {0, 3, 5, 6, 7, 8, 9} | set(range(10, 20))
    assert _allowed(english, "audio") == set(range(12, 20)) | {11}
    anything = TokenMasks.build(PieceVocab(), 24, TokenConstraints())
    assert _allowed(anything, "text") == set(range(10)) | {11}


def test_an_unknown_reply_language_is_refused():
    with pytest.raises(ValueError, match="reply_language"):
        TokenConstraints(reply_language="klingon")  # type: ignore[arg-type]


def test_token_pattern_interleaves_13_text_and_26_audio_and_may_end_anywhere():
    pattern = TokenPattern()
    phases = [pattern.phase(i) for i in range(80)]
    assert phases[:13] == ["text"] * 13 and phases[13:39] == ["audio"] * 26
    assert phases[39:52] == ["text"] * 13 and phases[52:78] == ["audio"] * 26


def test_token_pattern_with_a_fixed_length_ends_exactly_there():
    pattern = TokenPattern(stop_after=80)
    phases = [pattern.phase(i) for i in range(82)]
    assert phases[:13] == ["text_only"] * 13 and phases[13:39] == ["audio_only"] * 26
    assert phases[78:80] == ["text_only"] * 2 and phases[80:] == ["stop"] * 2
    masks = TokenMasks.build(TinyVocab(), 24, TokenConstraints(pattern=pattern))
    assert _allowed(masks, "text_only") == set(range(10))
    assert _allowed(masks, "audio_only") == set(range(12, 20))


@pytest.mark.parametrize("candidates", [1, 2, 256])
def test_nucleus_sampling_keeps_the_top_p_ids_with_their_renormalized_odds(candidates):
    """The fast path (nucleus inside the candidates) and the full-sort fallback agree."""
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    logits = probs.log().repeat(4000, 1)  # one row per draw, so both paths run batched
    ids = sample_nucleus(logits, 1.0, 0.75, torch.Generator().manual_seed(0), candidates)
    assert set(ids.tolist()) == {0, 1}
    assert (ids == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)


def test_nucleus_sampling_at_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]])
    assert sample_nucleus(logits, 0.0, 0.8).tolist() == [1, 0]


def test_a_paused_reply_resumes_only_once_playback_is_a_margin_behind():
    worker = ModelWorker(ScriptedBrain())
    job = Job(None, "hi", "", lambda event: None, 100, max_ahead_s=8.0, resume_margin_s=2.0)

    def ahead(seconds: float) -> bool:
        job.audio_samples_emitted = round((job.consumed_s + seconds) * 22050)
        return worker._too_far_ahead(job)

    assert [ahead(s) for s in (7.9, 8.2, 7.0, 6.1, 5.9, 7.5, 8.1)] == [
        False,  # under the limit
        True,  # over it: paused
        True,  # still paused: not a margin below the limit
        True,
        False,  # 2 s below: runs again
        False,
        True,
    ]


async def test_a_failed_batched_step_ends_the_replies_in_it_and_the_worker_serves_on():
    brain = ScriptedBrain(rounds=2, step_delay=0.002, fail_at=20)
    engine = await _engine(brain)
    try:
        replies = [engine.respond(UserTurn(text=str(i)), []) for i in range(2)]
        for reply in replies:
            with pytest.raises(EngineError, match="boom"):
                await asyncio.wait_for(_collect(reply), 30)
        brain.fail_at = None
        events = await asyncio.wait_for(_collect(engine.respond(UserTurn(text="x"), [])), 30)
    finally:
        await engine.close()
    assert sum(len(e.samples) for e in events if isinstance(e, AudioChunk)) == 52 * 1764
    assert sorted(brain.released)[:2] == sorted(r.job.key for r in replies)


async def test_an_unexpected_worker_failure_ends_the_replies_in_flight_and_it_serves_on(
    monkeypatch: pytest.MonkeyPatch,
):
    brain = ScriptedBrain(rounds=2, step_delay=0.002)
    engine = await _engine(brain)
    worker = engine.require_worker()
    regular = worker._on_token
    calls = iter(range(1000))

    def fails_once(job: Job, token: int) -> None:
        if next(calls) == 5:
            raise ValueError("bookkeeping bug")
        regular(job, token)

    monkeypatch.setattr(worker, "_guarded", lambda job, work: work(job))  # nothing catches it
    monkeypatch.setattr(worker, "_on_token", fails_once)
    try:
        replies = [engine.respond(UserTurn(text=str(i)), []) for i in range(2)]
        for reply in replies:
            with pytest.raises(EngineError, match="bookkeeping bug"):
                await asyncio.wait_for(_collect(reply), 30)
        assert worker._thread.is_alive()
        events = await asyncio.wait_for(_collect(engine.respond(UserTurn(text="x"), [])), 30)
    finally:
        await engine.close()
    assert sum(len(e.samples) for e in events if isinstance(e, AudioChunk)) == 52 * 1764
    assert sorted(brain.released)[:2] == sorted(r.job.key for r in replies)


# ----------------------------------------------------------------------------- warm-up


async def test_start_warms_up_on_the_worker_thread_before_any_reply():
    brain = ScriptedBrain(rounds=1)
    engine = await _engine(brain, max_jobs=8)
    try:
        assert brain.warm_ups == [("glm4voice-worker", 8, 0)]  # done when start() returned
        report = engine.warm_up_report
        assert report is not None and set(report.stages) == {"lm_step", "decoder"}
        assert report.total_s >= 0.0
        await _collect(engine.respond(UserTurn(text="hi"), []))
    finally:
        await engine.close()
    assert len(brain.warm_ups) == 1  # once per start, not per reply


async def test_warm_up_can_be_skipped():
    brain = ScriptedBrain(rounds=1)
    engine = await _engine(brain, warmup=False)
    try:
        assert brain.warm_ups == [] and engine.warm_up_report is None
        events = await _collect(engine.respond(UserTurn(text="hi"), []))
    finally:
        await engine.close()
    assert any(isinstance(e, AudioChunk) for e in events)


async def test_a_failed_warm_up_still_starts_a_serving_engine():
    brain = ScriptedBrain(rounds=1)
    brain.warm_up_error = RuntimeError("no memory for the warm-up")
    engine = await _engine(brain)
    try:
        assert engine.warm_up_report is None
        events = await _collect(engine.respond(UserTurn(text="hi"), []))
    finally:
        await engine.close()
    assert sum(len(e.samples) for e in events if isinstance(e, AudioChunk)) == 26 * 1764


# ----------------------------------------------------------------------------- decoder batching


def _job(text: str, events: list) -> Job:
    return Job(
        turn_audio=None,
        turn_text=text,
        history_prefix="",
        emit=events.append,
        max_new_tokens=1000,
        max_ahead_s=1e9,
    )


def test_blocks_ready_in_the_same_round_reach_the_decoder_in_one_call():
    """Rounds driven by hand: two replies submitted together run in lockstep."""
    brain = ScriptedBrain(rounds=2)
    brain.block_tokens = 10
    worker = ModelWorker(brain)
    events: list[list] = [[], []]
    jobs = [_job(str(i), events[i]) for i in range(2)]
    for job in jobs:
        worker.submit(job)
    while not all(job.finished.is_set() for job in jobs):
        assert worker._round()
    keys = sorted(job.key for job in jobs)
    assert [sorted(call) for call in brain.decode_calls] == [keys] * 6  # 5 blocks, 1 flush
    assert list(worker.decode_batch_sizes) == [2] * 6
    for reply_events in events:
        audio = [e for e in reply_events if isinstance(e, AudioChunk)]
        assert sum(len(a.samples) for a in audio) == 52 * 1764


@pytest.mark.parametrize("lane", [False, True], ids=["in-the-worker", "decoder-lane"])
async def test_a_failed_decoder_call_ends_only_the_replies_it_decoded(lane):
    # The reference rule decodes on the worker's thread; a streaming decoder on the lane's.
    brain = SlowDecoderBrain(rounds=2, decode_s=0.0) if lane else ScriptedBrain(rounds=2)
    original = brain.decode_audio_many

    def fail_for_text_a(blocks):
        if any(block.job.turn_text == "a" for block in blocks):
            raise RuntimeError("decoder out of memory")
        return original(blocks)

    brain.decode_audio_many = fail_for_text_a
    engine = await _engine(brain)
    try:
        doomed = engine.respond(UserTurn(text="a"), [])
        with pytest.raises(EngineError, match="decoder out of memory"):
            await _collect(doomed)
        events = await _collect(engine.respond(UserTurn(text="b"), []))
    finally:
        await engine.close()
    assert sum(len(e.samples) for e in events if isinstance(e, AudioChunk)) == 52 * 1764
    assert doomed.job.key in brain.released


def test_replies_beyond_the_brains_lm_rows_wait_for_a_row():
    brain = ScriptedBrain(rounds=1)
    brain.max_sequences = 2
    worker = ModelWorker(brain)
    events: list[list] = [[], [], []]
    jobs = [_job(str(i), events[i]) for i in range(3)]
    for job in jobs:
        worker.submit(job)
    assert worker._round()
    assert [job.started for job in jobs] == [True, True, False]
    while not all(job.finished.is_set() for job in jobs):
        assert worker._round()
    assert max(brain.batch_sizes) == 2
    assert brain.start_batches == [2, 1]  # the first two started together, the third later
    assert brain.prompts == [
        f"<|user|>\n{i}<|assistant|>streaming_transcription\n" for i in range(3)
    ]
    assert all(
        sum(len(e.samples) for e in ev if isinstance(e, AudioChunk)) == 26 * 1764 for ev in events
    )


def _staggered(hold: BlockHold | None, lag_rounds: int = 3) -> tuple[ScriptedBrain, list[list]]:
    """Two replies, the second submitted `lag_rounds` rounds after the first; nobody plays
    their audio, so it all stays ahead of playback."""
    brain = ScriptedBrain(rounds=2)
    brain.block_tokens = 10
    worker = ModelWorker(brain, hold=hold)
    events: list[list] = [[], []]
    jobs = [_job(str(i), events[i]) for i in range(2)]
    worker.submit(jobs[0])
    for _ in range(lag_rounds):
        worker._round()
    worker.submit(jobs[1])
    while not all(job.finished.is_set() for job in jobs):
        assert worker._round()
    return brain, events


def test_later_blocks_of_replies_out_of_step_wait_to_share_a_decoder_call():
    brain, events = _staggered(BlockHold(min_ahead_s=0.5, max_rounds=10))
    # First blocks never wait; later ones meet the other reply's block three rounds on; the
    # second reply's final flush has nobody left to wait for.
    assert [len(call) for call in brain.decode_calls] == [1, 1, 2, 2, 2, 2, 1]
    for reply_events in events:
        audio = [e for e in reply_events if isinstance(e, AudioChunk)]
        assert sum(len(a.samples) for a in audio) == 52 * 1764
    codes = [c for c, _ in brain.decoded_blocks]
    assert sorted(code for block in codes for code in block) == sorted(list(range(52)) * 2)


# Without waiting, the two replies share a call only where the first one's final flush falls
# in the round of the second one's last full block.
UNHELD_CALLS = [1] * 9 + [2, 1]


def test_blocks_do_not_wait_without_a_hold_policy_or_beyond_its_rounds():
    brain, _ = _staggered(None)
    assert [len(call) for call in brain.decode_calls] == UNHELD_CALLS
    brain, _ = _staggered(BlockHold(min_ahead_s=0.5, max_rounds=2))  # partner is 3 rounds off
    assert [len(call) for call in brain.decode_calls] == UNHELD_CALLS


def test_blocks_do_not_wait_when_playback_is_close_behind():
    brain, _ = _staggered(BlockHold(min_ahead_s=1e6, max_rounds=10))
    assert [len(call) for call in brain.decode_calls] == UNHELD_CALLS


async def test_model_step_times_and_queue_depths_are_exported_as_metrics():
    from agent import metrics

    def count(stage: str) -> float:
        return metrics.MODEL_STEP_SECONDS.labels(stage=stage)._sum.get()

    before = {stage: count(stage) for stage in ("prefill", "lm_step", "decoder_block")}
    brain = ScriptedBrain(rounds=1, step_delay=0.002)
    engine = await _engine(brain)
    try:
        await _collect(engine.respond(UserTurn(text="hi"), []))
    finally:
        await engine.close()
    after = {stage: count(stage) for stage in before}
    assert all(after[stage] > before[stage] for stage in before), (before, after)
    from prometheus_client import generate_latest

    text = generate_latest().decode()
    for queue in ("engine_replies_active", "decoder_blocks_waiting"):
        assert f'voice_agent_queue_depth{{queue="{queue}"}}' in text


# ----------------------------------------------------------------------------- decoder lane


class SlowDecoderBrain(ScriptedBrain):
    """A streaming-decoder brain whose decoder calls take `decode_s` on the lane's thread."""

    block_tokens = 10

    def __init__(self, rounds: int = 2, decode_s: float = 0.05, step_delay: float = 0.002):
        super().__init__(rounds=rounds, step_delay=step_delay)
        self.decode_s = decode_s
        self.steps_during_calls: list[int] = []  # LM steps taken while each call ran
        self.decoder_threads: set[str] = set()
        self.decoding = threading.Event()
        self.release_decoder = threading.Event()
        self.release_decoder.set()

    def decode_audio_many(self, blocks: list[AudioBlock]) -> list[np.ndarray]:
        self.decoder_threads.add(threading.current_thread().name)
        steps = self.steps
        self.decoding.set()
        time.sleep(self.decode_s)
        self.release_decoder.wait(10)
        self.decoding.clear()
        self.steps_during_calls.append(self.steps - steps)
        return super().decode_audio_many(blocks)


def _audio_samples(events: list) -> int:
    return sum(len(e.samples) for e in events if isinstance(e, AudioChunk))


async def test_the_lm_steps_on_while_the_decoder_lane_decodes_a_block():
    brain = SlowDecoderBrain(rounds=2, decode_s=0.05)
    engine = await _engine(brain)
    try:
        events = await _collect(engine.respond(UserTurn(text="hi"), []))
    finally:
        await engine.close()
    assert brain.decoder_threads == {"glm4voice-decoder"}
    assert brain.steps_during_calls[0] == 0  # the first block decodes with the LM waiting
    assert max(brain.steps_during_calls) >= 5  # 50 ms of decoding, 2 ms steps
    assert _audio_samples(events) == 52 * SAMPLES_PER_TOKEN
    # Blocks that completed during a call joined the next one, in order, the last one final.
    codes = [code for block, _ in brain.decoded_blocks for code in block]
    assert codes == list(range(52))
    assert [final for _, final in brain.decoded_blocks][-1] is True
    assert not any(final for _, final in brain.decoded_blocks[:-1])
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert len(text) == 26


async def test_concurrent_replies_share_lane_calls_and_each_gets_all_its_audio():
    brain = SlowDecoderBrain(rounds=3, decode_s=0.03)
    engine = await _engine(brain)
    try:
        replies = [engine.respond(UserTurn(text=t), []) for t in ("a", "b", "c")]
        results = await asyncio.gather(*(_collect(r) for r in replies))
    finally:
        await engine.close()
    assert all(_audio_samples(events) == 78 * SAMPLES_PER_TOKEN for events in results)
    assert max(len(call) for call in brain.decode_calls) == 3
    assert len(brain.decode_calls) < 3 * 8  # far fewer calls than blocks one by one


async def test_a_reply_cancelled_while_its_block_decodes_ends_when_that_call_returns():
    brain = SlowDecoderBrain(rounds=20, decode_s=0.0)
    engine = await _engine(brain, max_ahead_s=1000.0)
    try:
        reply = engine.respond(UserTurn(text="hi"), [])
        await _first_audio_event(reply)
        brain.release_decoder.clear()
        await asyncio.wait_for(asyncio.to_thread(brain.decoding.wait, 10), 10)
        cancelling = asyncio.create_task(reply.cancel())
        await asyncio.sleep(0.1)
        assert not cancelling.done()  # the decoder still works on its stream
        assert not reply.job.finished.is_set()
        assert reply.job.key in brain.released  # its LM row is free already
        chunks_before = len(reply.job.generated)
        brain.release_decoder.set()
        await asyncio.wait_for(cancelling, 10)
        assert await asyncio.to_thread(reply.job.finished.wait, 5)
        assert len(reply.job.generated) <= chunks_before + 1
        # The worker serves the next reply.
        brain.script = [*brain.script[:39], STOP]
        events = await asyncio.wait_for(_collect(engine.respond(UserTurn(text="x"), [])), 30)
        assert _audio_samples(events) == 26 * SAMPLES_PER_TOKEN
    finally:
        brain.release_decoder.set()
        await engine.close()


async def _first_audio_event(reply) -> AudioChunk:
    async for event in reply:
        if isinstance(event, AudioChunk):
            return event
    raise AssertionError("no audio")


async def test_closing_the_engine_mid_call_ends_the_reply_and_stops_both_threads():
    brain = SlowDecoderBrain(rounds=20, decode_s=0.0)
    engine = await _engine(brain, max_ahead_s=1000.0)
    reply = engine.respond(UserTurn(text="hi"), [])
    await _first_audio_event(reply)
    brain.release_decoder.clear()
    await asyncio.wait_for(asyncio.to_thread(brain.decoding.wait, 10), 10)
    worker = engine.worker
    closing = asyncio.create_task(engine.close())
    await asyncio.sleep(0.05)
    brain.release_decoder.set()
    await asyncio.wait_for(closing, 10)
    assert reply.job.finished.is_set()
    assert not worker._thread.is_alive()
    names = {thread.name for thread in threading.enumerate()}
    assert "glm4voice-decoder" not in names


async def test_the_lm_runs_at_most_two_blocks_ahead_of_a_slow_decoder():
    brain = SlowDecoderBrain(rounds=3, decode_s=0.2, step_delay=0.001)
    engine = await _engine(brain)
    try:
        events = await _collect(engine.respond(UserTurn(text="hi"), []))
    finally:
        await engine.close()
    assert _audio_samples(events) == 78 * SAMPLES_PER_TOKEN
    # A call decodes what waited for it: never more than the two blocks of the limit (plus
    # the final rest), however fast the LM is.
    assert max(len(codes) for codes, _ in brain.decoded_blocks) <= 20


def test_a_finished_answer_gives_its_lm_row_back_before_its_last_block_is_decoded():
    brain = SlowDecoderBrain(rounds=1, decode_s=0.0)
    brain.max_sequences = 1
    worker = ModelWorker(brain, overlap_decoder=True)
    events: list[list] = [[], []]
    jobs = [_job(str(i), events[i]) for i in range(2)]
    for job in jobs:
        worker.submit(job)
    try:
        while jobs[0].blocks_done == 0:  # the first block decodes with the LM waiting
            worker._round()
        assert [job.started for job in jobs] == [True, False]  # one LM row
        brain.release_decoder.clear()  # later decoder calls wait until released
        while not jobs[0].done:
            worker._round()
        # Its stop id came while its second block was being decoded.
        assert jobs[0].lm_released and jobs[0].key in brain.released
        assert not jobs[0].finished.is_set()
        worker._round()
        assert jobs[1].started  # it got the row before the first reply's audio was done
    finally:
        brain.release_decoder.set()
        while not all(job.finished.is_set() for job in jobs):
            worker._round()
        worker.overlap_decoder = False
        worker._sync_lane()  # stops the lane's thread
    assert worker._lane is None
    assert all(_audio_samples(ev) == 26 * SAMPLES_PER_TOKEN for ev in events)
