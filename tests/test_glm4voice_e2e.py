"""The GLM-4-Voice engine end to end on the tiny random-weight model set.

The models are the real code paths (speech tokenizer, LM with KV-cache batching, streaming or
reference decoder), loaded from the official file layouts written by `make_tiny`. Random weights
never follow the 13 text : 26 audio layout nor end a turn, so the engine is loaded with a
`TokenPattern` that forces it (and an allowed-text-ids mask for readable text): the decoder,
the played-out history cut and the turn end are exercised for real.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.engine import AudioChunk, EngineError, TextDelta, UserTurn
from agent.session import SessionConfig
from agent.tracks import AgentAudioTrack
from agent.turns import TurnManager
from audio_dsp import EndpointerConfig, SpeechEnded, SpeechPaused
from models.decoder import AudioDecoder, StreamingDecoder
from models.glm4voice import GLM4VoiceEngine, ModelPaths, load_engine
from models.glm4voice.brain import GLM4VoiceBrain, LoadOptions
from models.glm4voice.engine import EngineOptions
from models.glm4voice.static_batch import StaticCacheConfig
from models.glm4voice.tokens import TokenConstraints, TokenPattern, writes_cjk
from models.glm4voice.worker import BlockHold, Job, ModelWorker
from models.lm import GLM4VoiceTokenizer, SamplingConfig, audio_tokens_text, build_prompt
from models.make_tiny import write_tiny_model_set
from models.speech_tokenizer import SpeechTokenizer
from signaling import REGISTRY_KEY
from tests.fakes import OutputPump, espeak_16k, wait_until
from tests.webrtc_client import app_servers, dial

ANSWER_IDS = 13 + 26 + 13 + 10  # two text runs, 36 audio ids (2.88 s of speech), then the end
WORDS = "hello how are you the weather is today and it is"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> ModelPaths:
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny_glm4voice"))


@pytest.fixture(scope="session")
def tokenizer(tiny_paths: ModelPaths) -> GLM4VoiceTokenizer:
    return GLM4VoiceTokenizer.from_dir(tiny_paths.lm)


def _load_options(
    tokenizer: GLM4VoiceTokenizer, decoder_mode: str = "fast", answer_ids: int = ANSWER_IDS
) -> LoadOptions:
    words = frozenset(tokenizer.encode(WORDS, add_prefix=False))
    constraints = TokenConstraints(words, TokenPattern(stop_after=answer_ids))
    return LoadOptions(
        decoder_mode=decoder_mode,  # type: ignore[arg-type]
        sampling=SamplingConfig(seed=0),
        constraints=constraints,
    )


async def _started(
    paths: ModelPaths, tokenizer: GLM4VoiceTokenizer, decoder_mode: str = "fast", **options
) -> GLM4VoiceEngine:
    load = _load_options(tokenizer, decoder_mode, options.pop("answer_ids", ANSWER_IDS))
    engine = load_engine(paths, load, EngineOptions(**options))
    await engine.start()
    return engine


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Modulated tones and noise standing in for speech (the tokenizer has random weights).

    The loudest moment comes first: the log-mel floor of the tokenizer's features is then
    known from the start, and streamed blocks are final as soon as they are encoded.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    voiced = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    voiced[:4000] = 0.95 * np.sin(2 * np.pi * 1000 * t[:4000])
    return (voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


async def _collect(reply) -> list:
    return [event async for event in reply]


async def _first_audio(reply) -> AudioChunk:
    async for event in reply:
        if isinstance(event, AudioChunk):
            return event
    raise AssertionError("the reply ended without audio")


def _audio(events: list) -> np.ndarray:
    chunks = [e.samples for e in events if isinstance(e, AudioChunk)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _codes(tokenizer: GLM4VoiceTokenizer, ids: list[int]) -> list[int]:
    return [tokenizer.audio_code(t) for t in ids if tokenizer.is_audio(t)]


def _check_events(events: list, tokenizer: GLM4VoiceTokenizer, generated: list[int]) -> None:
    for event in events:
        assert isinstance(event, TextDelta | AudioChunk)
        if isinstance(event, AudioChunk):
            assert event.sample_rate == 22_050 and event.samples.dtype == np.float32
            assert event.samples.ndim == 1 and np.isfinite(event.samples).all()
            assert np.abs(event.samples).max() <= 1.0
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == tokenizer.decode([t for t in generated if not tokenizer.is_special(t)])
    assert generated[-1] in tokenizer.turn_stop_ids()


# ----------------------------------------------------------------------------- engine alone


async def test_audio_turn_then_text_turn_extend_one_prompt_and_stream_the_answer(
    tiny_paths, tokenizer
):
    from agent import metrics

    def prompt_ids(source: str) -> float:
        return metrics.PROMPT_IDS_TOTAL.labels(source=source)._value.get()

    counted = {source: prompt_ids(source) for source in ("reused", "prefilled")}
    speech = _speech(2.0)
    engine = await _started(tiny_paths, tokenizer)
    try:
        first = engine.respond(UserTurn(audio=speech), [])
        first_events = await _collect(first)
        history = first.history(None)
        second = engine.respond(UserTurn(text="how are you"), history)
        second_events = await _collect(second)
        second_history = second.history(None)
    finally:
        await engine.close()

    codes = SpeechTokenizer.from_pretrained(tiny_paths.tokenizer).tokenize(speech)
    user, assistant = history
    assert user.payload == build_prompt("", audio_tokens_text(codes), "audio")
    assert assistant.payload == tokenizer.decode(first.job.generated[:-1])
    assert not assistant.interrupted and assistant.text
    assert second_history[0].payload == build_prompt(
        user.payload + assistant.payload, "how are you", "text"
    )
    assert second_history[0].payload.startswith(user.payload + assistant.payload)
    for reply, events in ((first, first_events), (second, second_events)):
        generated = reply.job.generated
        assert len(generated) == ANSWER_IDS + 1
        _check_events(events, tokenizer, generated)
        audio = _audio(events)
        decoded, _ = StreamingDecoder.from_pretrained(tiny_paths.decoder).decode(
            torch.tensor([_codes(tokenizer, generated)])
        )
        np.testing.assert_allclose(audio, decoded[0].numpy(), atol=1e-5)
        assert len(audio) / 22_050 == pytest.approx(36 * 0.08, abs=0.05)
    stages = {"speech_tokenizer", "prefill", "lm_until_first_block", "first_decoder_block"}
    assert stages | {"decoder", "first_audio"} <= set(first.timings.stages)
    # The second turn continues the first: its keys/values are kept (the default static
    # cache), so only the new ids are prefilled. The first shares the system prompt with the
    # warm-up's turn at most.
    assert first.job.reused_ids < first.job.prompt_ids - len(codes)
    assert first.job.prompt_ids <= second.job.reused_ids < second.job.prompt_ids
    reused = first.job.reused_ids + second.job.reused_ids
    assert prompt_ids("reused") - counted["reused"] == reused
    total = first.job.prompt_ids + second.job.prompt_ids
    assert prompt_ids("prefilled") - counted["prefilled"] == total - reused


async def test_reference_decoder_mode_decodes_exactly_as_the_reference_decoder(
    tiny_paths, tokenizer
):
    engine = await _started(tiny_paths, tokenizer, decoder_mode="reference")
    try:
        reply = engine.respond(UserTurn(text="hello"), [])
        events = await _collect(reply)
    finally:
        await engine.close()
    codes = _codes(tokenizer, reply.job.generated)
    reference = AudioDecoder.from_pretrained(tiny_paths.decoder)
    blocks = list(reference.iter_blocks(torch.tensor([codes]), (10, 20)))
    chunks = [e.samples for e in events if isinstance(e, AudioChunk)]
    assert len(chunks) == len(blocks) == 3  # 36 codes: 10, 20, then the final 6
    for chunk, block in zip(chunks, blocks, strict=True):
        np.testing.assert_allclose(chunk, block[0].numpy(), atol=1e-5)


async def test_cancel_mid_turn_frees_the_worker_within_one_step(tiny_paths, tokenizer):
    engine = await _started(tiny_paths, tokenizer, answer_ids=5000, max_ahead_s=1000.0)
    try:
        reply = engine.respond(UserTurn(text="hello"), [])
        await _first_audio(reply)
        worker = engine.require_worker()
        steps_at_cancel = worker.steps
        await reply.cancel()
        steps_after = worker.steps
        await asyncio.sleep(0.2)
        assert worker.steps == steps_after  # nothing runs for the cancelled reply
        assert steps_after - steps_at_cancel <= 1
        assert reply.history(0.5)[1].interrupted
        # The worker is free: the next reply gets to its first audio and can be cancelled too.
        again = engine.respond(UserTurn(text="hi"), [])
        first = await asyncio.wait_for(_first_audio(again), 60)
        assert first.samples.size > 0
        await again.cancel()
    finally:
        await engine.close()


async def test_speech_tokenized_while_spoken_leaves_one_block_for_the_end_of_the_turn(
    tiny_paths, tokenizer
):
    speech = _speech(10.0, seed=1)
    engine = await _started(tiny_paths, tokenizer)
    try:
        listener = engine.begin_turn()
        for start in range(0, len(speech), 320):  # 20 ms frames, as a session receives them
            listener.push(speech[start : start + 320])
            if start % 16_000 == 0:
                await asyncio.sleep(0.02)  # let the worker catch up, as in real time
        await wait_until(lambda: listener.state is not None, within=10)
        reply = engine.respond(UserTurn(audio=speech), [], listener)
        await _collect(reply)
        user = reply.history(None)[0]
        stats = engine.brain.listen_stats
    finally:
        await engine.close()
    codes = SpeechTokenizer.from_pretrained(tiny_paths.tokenizer).tokenize(speech)
    assert user.payload == build_prompt("", audio_tokens_text(codes), "audio")
    assert stats.streamed_turns == 1 and stats.whole_turns == 0
    assert stats.last_finish_blocks == 1  # 10 s = blocks of 4 + 4 + 2 s: only the last one left


async def test_a_listener_that_heard_other_audio_falls_back_to_whole_tokenization(
    tiny_paths, tokenizer
):
    speech = _speech(6.0, seed=2)
    engine = await _started(tiny_paths, tokenizer, listen_lag_s=0.0)
    try:
        listener = engine.begin_turn()
        listener.push(_speech(6.0, seed=3))
        await wait_until(lambda: listener.state is not None, within=10)
        reply = engine.respond(UserTurn(audio=speech), [], listener)
        await _collect(reply)
        user = reply.history(None)[0]
        stats = engine.brain.listen_stats
    finally:
        await engine.close()
    codes = SpeechTokenizer.from_pretrained(tiny_paths.tokenizer).tokenize(speech)
    assert user.payload == build_prompt("", audio_tokens_text(codes), "audio")
    assert stats.whole_turns == 1 and stats.streamed_turns == 0


async def test_concurrent_replies_share_batched_steps_and_get_their_own_answers(
    tiny_paths, tokenizer
):
    engine = await _started(tiny_paths, tokenizer)
    try:
        replies = [engine.respond(UserTurn(text=f"hello {i}"), []) for i in range(3)]
        results = await asyncio.gather(*(_collect(r) for r in replies))
        sizes = list(engine.require_worker().rounds_batch_sizes)
    finally:
        await engine.close()
    assert max(sizes) == 3
    for reply, events in zip(replies, results, strict=True):
        # a typed first turn: its system prompt's keys/values were kept by the warm-up
        assert reply.job.reused_ids >= 16
        _check_events(events, tokenizer, reply.job.generated)
        assert len(_audio(events)) / 22_050 == pytest.approx(36 * 0.08, abs=0.05)


async def test_concurrent_spoken_replies_end_and_cancel_each_on_its_own(tiny_paths, tokenizer):
    """Replies are told apart by identity: two spoken turns of different lengths in flight
    together (their audio arrays cannot be compared) finish and cancel cleanly."""
    engine = await _started(tiny_paths, tokenizer)
    try:
        long, short, third = (
            engine.respond(UserTurn(audio=_speech(s, seed=s)), []) for s in (3, 2, 1)
        )
        await _first_audio(long)
        await third.cancel()
        events = await asyncio.wait_for(_collect(short), 60)
        await asyncio.wait_for(_collect(long), 60)
        worker = engine.require_worker()
        assert worker.active_jobs == 0 and engine.brain.sequences.live_keys == []
    finally:
        await engine.close()
    _check_events(events, tokenizer, short.job.generated)
    assert long.job.done and short.job.done and not third.job.done


async def test_replies_cancelled_at_any_point_leave_no_rows_streams_or_threads_behind(
    tiny_paths, tokenizer
):
    """Overlapping replies cancelled before, during and after their first audio: each
    conversation's next turn still works, and nothing of them is left in the engine."""
    threads_before = {t.name for t in threading.enumerate()}
    engine = await _started(tiny_paths, tokenizer, answer_ids=120, max_ahead_s=1000.0)
    try:
        history: list = []
        for cycle in range(6):
            replies = [engine.respond(UserTurn(text=f"hi {cycle} {i}"), history) for i in range(3)]
            await asyncio.sleep(0.01 * cycle)  # some not started yet, some decoding
            await _first_audio(replies[1])
            await asyncio.gather(*(reply.cancel() for reply in replies))
            cut = replies[1].history(0.1)
            assert cut[1].interrupted
            history = [*history, *cut]
        last = engine.respond(UserTurn(text="and now"), history)
        events = await asyncio.wait_for(_collect(last), 60)
        worker = engine.require_worker()
        brain = engine.brain
        assert worker.active_jobs == 0 and not worker._blocks and not worker._deferred
        assert brain.sequences.live_keys == []
    finally:
        await engine.close()
    assert any(isinstance(e, AudioChunk) for e in events)
    assert last.job.reused_ids > 0  # the history's keys/values were kept for it
    leftover = {t.name for t in threading.enumerate()} - threads_before
    assert not {name for name in leftover if name.startswith("glm4voice")}


async def test_a_conversation_longer_than_the_context_drops_its_oldest_exchanges(
    tiny_paths, tokenizer
):
    """With room for 600 ids and answers of up to 100, a prompt may take 500: the history is
    cut down to 3/4 of that, oldest exchanges first, the system prompt kept; every turn is
    answered."""
    load = replace(
        _load_options(tokenizer, answer_ids=40),
        static_cache=StaticCacheConfig(max_batch=2, max_len=600),
    )
    engine = load_engine(tiny_paths, load, EngineOptions(max_new_tokens=100, warmup=False))
    await engine.start()
    history: list = []
    prompts: list[list[int]] = []
    try:
        for turn in range(12):
            reply = engine.respond(UserTurn(text=f"turn {turn}"), history)
            events = await _collect(reply)
            assert any(isinstance(e, AudioChunk) for e in events)
            history = [*history, *reply.history(None)]
            prompts.append(tokenizer.encode(reply.job.prompt))
    finally:
        await engine.close()
    assert max(len(ids) for ids in prompts) <= 500
    last = history[-2].payload
    assert last.startswith("<|system|>") and last.count("<|system|>") == 1
    assert "turn 11" in last and "turn 0<" not in last
    # after a cut the next turns continue the kept history (not one cut per turn)
    cuts = [i for i in range(1, 12) if prompts[i][: len(prompts[i - 1])] != prompts[i - 1]]
    assert 1 <= len(cuts) <= 3


async def test_a_turn_too_long_for_the_context_fails_clearly_and_leaves_no_history(
    tiny_paths, tokenizer
):
    load = replace(
        _load_options(tokenizer, answer_ids=40),
        static_cache=StaticCacheConfig(max_batch=2, max_len=600),
    )
    engine = load_engine(tiny_paths, load, EngineOptions(max_new_tokens=100, warmup=False))
    await engine.start()
    try:
        reply = engine.respond(UserTurn(text="hello " * 600), [])
        with pytest.raises(EngineError, match="this turn alone takes"):
            await _collect(reply)
        assert reply.history(None) == []
        again = engine.respond(UserTurn(text="hello"), reply.history(None))
        assert any(isinstance(e, AudioChunk) for e in await _collect(again))
    finally:
        await engine.close()


# ----------------------------------------------------------------------------- early replies


def _heard(engine: GLM4VoiceEngine, speech: np.ndarray):
    """A listener that heard `speech` in 20 ms frames, as a session feeds it."""
    listener = engine.begin_turn()
    for start in range(0, len(speech), 320):
        listener.push(speech[start : start + 320])
    return listener


async def test_an_early_reply_dropped_at_a_pause_leaves_nothing_and_one_at_the_end_answers(
    tiny_paths, tokenizer
):
    """The turn manager over the real engine: the reply started at the first pause is
    cancelled when the user goes on (its LM row and decoder stream freed), the one started
    at the last pause becomes the answer, with the whole turn tokenized from its listener."""
    speech = _speech(6.0, seed=4)
    engine = await _started(tiny_paths, tokenizer)
    track = AgentAudioTrack()
    pump = OutputPump(track).start()
    turns = TurnManager(engine, track, lambda _message: None)
    turns.start()
    try:
        first = speech[: 16_000 * 3]
        taken = await turns.on_speech_paused(
            SpeechPaused(0.0, 3.0, 3.3, first), _heard(engine, first)
        )
        assert taken
        await asyncio.sleep(0.3)  # it runs unseen
        assert turns.state == "listening"
        await turns.on_speech_resumed()
        listener = _heard(engine, speech)
        await wait_until(lambda: listener.state is not None, within=10)
        assert await turns.on_speech_paused(SpeechPaused(0.0, 6.0, 6.3, speech), listener)
        await turns.on_speech_ended(SpeechEnded(0.0, 6.0, 6.7, speech, "silence"), time.monotonic())
        await wait_until(lambda: turns.state == "speaking", within=30)
        await wait_until(lambda: turns.state == "listening", within=30)
        record = turns.records[0]
        user, answer = turns.history
        worker, brain = engine.require_worker(), engine.brain
        assert worker.active_jobs == 0 and not worker._deferred
        assert brain.sequences.live_keys == []
        stats = brain.listen_stats
    finally:
        await turns.close()
        await pump.stop()
        track.stop()
        await engine.close()
    assert record.early and len(turns.records) == 1
    codes = SpeechTokenizer.from_pretrained(tiny_paths.tokenizer).tokenize(speech)
    assert user.payload == build_prompt("", audio_tokens_text(codes), "audio")
    assert not answer.interrupted and answer.payload.count("<|audio_") == 36
    assert stats.streamed_turns >= 1  # the answer's turn came from its listener


# ----------------------------------------------------------------------------- over WebRTC


@pytest.mark.slow
async def test_webrtc_conversation_holds_two_turns_and_can_be_interrupted(
    tiny_paths, tokenizer, tmp_path: Path
):
    engine = await _started(tiny_paths, tokenizer)
    session = SessionConfig(EndpointerConfig(hangover_ms=600))
    try:
        async with app_servers(tmp_path, session) as start:
            url, app = await start(engine)
            call = await dial(url)
            try:
                call.send({"type": "text", "text": "hello"})
                await wait_until(lambda: call.states()[-2:] == ["speaking", "listening"], within=30)
                assert call.voiced_audio(1e-4).size, "the answer's audio never reached the client"

                call.send({"type": "text", "text": "how are you"})
                await wait_until(lambda: call.states()[-1] == "speaking", within=30)
                await asyncio.sleep(0.5)
                call.send({"type": "interrupt"})
                await wait_until(lambda: call.of_type("flush"), within=5)
                await wait_until(lambda: call.states()[-1] == "listening", within=5)

                turns = app[REGISTRY_KEY].connections()[0].session.turns
                user1, answer1, user2, answer2 = turns.history
                assert not answer1.interrupted and answer2.interrupted
                assert user2.payload.startswith(user1.payload + answer1.payload)
                assert 0 < answer2.payload.count("<|audio_") < 36  # cut to what was played
                assert "hello" in user1.payload and "how are you" in user2.payload
            finally:
                await call.hang_up()
            await wait_until(lambda: len(app[REGISTRY_KEY]) == 0, within=10)
    finally:
        await engine.close()


@pytest.mark.slow
async def test_a_spoken_conversation_over_webrtc_answers_by_voice_and_stops_when_talked_over(
    tiny_paths, tokenizer, tmp_path: Path
):
    """The client speaks (eSpeak NG over its microphone track): each turn is heard while
    spoken, answered early or at its end, and the second answer is stopped by speech over it;
    what was said over it becomes the next turn, with the cut answer in its prompt."""
    question, other, stop = (
        espeak_16k(text, tmp_path)
        for text in ("what is the weather like", "and tomorrow", "wait, stop please")
    )
    engine = await _started(tiny_paths, tokenizer)
    session = SessionConfig(EndpointerConfig(hangover_ms=600), echo_canceller="none")
    try:
        async with app_servers(tmp_path, session) as start:
            url, app = await start(engine)
            call = await dial(url)
            try:
                call.mic.say(question, 16_000)
                await wait_until(lambda: call.states()[-2:] == ["speaking", "listening"], within=60)
                assert call.voiced_audio(1e-4).size, "the answer's audio never reached the client"
                seen = len(call.states())
                call.mic.say(other, 16_000)
                await wait_until(lambda: "speaking" in call.states()[seen:], within=60)
                await asyncio.sleep(0.6)
                call.mic.say(stop, 16_000)
                await wait_until(lambda: call.of_type("flush"), within=10)
                turns = app[REGISTRY_KEY].connections()[0].session.turns
                await wait_until(lambda: len(turns.history) >= 6, within=60)
                user1, answer1, user2, answer2, user3, _ = turns.history
                worker = engine.require_worker()
                await wait_until(lambda: worker.active_jobs == 0, within=10)
            finally:
                await call.hang_up()
            await wait_until(lambda: len(app[REGISTRY_KEY]) == 0, within=10)
    finally:
        await engine.close()
    assert [r.interrupted for r in turns.records][:2] == [False, True]
    assert all(r.early for r in turns.records)  # each answer was started at its last pause
    assert not answer1.interrupted and answer2.interrupted
    assert 0 < answer2.payload.count("<|audio_") < 36  # cut to what was played
    for user in (user1, user2, user3):
        assert "<|audio_" in user.payload  # spoken turns: speech tokens in the prompt
    assert user2.payload.startswith(user1.payload + answer1.payload)
    assert user3.payload.startswith(user2.payload + answer2.payload)
    finals = [m["text"] for m in call.of_type("transcript") if m["final"]]
    assert finals and finals[0], "the answer's text never reached the client"


# ----------------------------------------------------------------------------- speed paths


class StageSpy:
    """Records which stages of a loaded brain ran, on which thread, before the first reply."""

    def __init__(self, brain: GLM4VoiceBrain) -> None:
        self.calls: list[tuple[str, str, int]] = []  # (stage, thread, batch size)
        self._wrap(brain.speech_tokenizer, "tokenize", "speech_tokenizer", lambda a: 1)
        self._wrap(brain.sequences, "prefill", "prefill", lambda a: 1)
        self._wrap(brain.sequences, "step", "lm_step", lambda a: len(a[0]))
        self._wrap(brain.reply_decoder, "decode_many", "decoder", lambda a: len(a[0]))

    def _wrap(self, owner: object, name: str, stage: str, size) -> None:
        original = getattr(owner, name)

        def spied(*args, **kwargs):
            self.calls.append((stage, threading.current_thread().name, size(args)))
            return original(*args, **kwargs)

        setattr(owner, name, spied)

    def stages(self) -> set[str]:
        return {stage for stage, _, _ in self.calls}


async def test_warm_up_runs_every_stage_on_the_worker_before_start_returns(tiny_paths, tokenizer):
    spies: list[StageSpy] = []

    def load() -> GLM4VoiceBrain:
        brain = GLM4VoiceBrain.load(tiny_paths, _load_options(tokenizer))
        spies.append(StageSpy(brain))
        return brain

    engine = GLM4VoiceEngine(load, EngineOptions())
    await engine.start()
    try:
        spy = spies[0]
        assert spy.stages() == {"speech_tokenizer", "prefill", "lm_step", "decoder"}
        assert {thread for _, thread, _ in spy.calls} == {"glm4voice-worker"}
        assert [n for stage, _, n in spy.calls if stage == "lm_step"] == [1, 1, 1, 2, 2, 2]
        assert [n for stage, _, n in spy.calls if stage == "decoder"] == [2]
        report = engine.warm_up_report
        assert report is not None
        assert set(report.stages) == {
            "speech_tokenizer",
            "prefill",
            "sampling",
            "lm_step",
            "decoder",
        }
        brain = engine.brain
        assert brain.sequences.live_keys == [] and brain.listen_stats.whole_turns == 0
        # The first turn gets the answer it gets without a warm-up: the warm-up left no
        # LM rows behind and used no reply's sampling or decoder stream.
        warmed = engine.respond(UserTurn(audio=_speech(1.5)), [])
        warmed_events = await _collect(warmed)
    finally:
        await engine.close()
    cold_engine = await _started(tiny_paths, tokenizer, warmup=False)
    try:
        assert cold_engine.warm_up_report is None
        cold = cold_engine.respond(UserTurn(audio=_speech(1.5)), [])
        cold_events = await _collect(cold)
    finally:
        await cold_engine.close()
    assert warmed.job.generated == cold.job.generated
    np.testing.assert_allclose(_audio(warmed_events), _audio(cold_events), atol=1e-5)
    assert set(warmed.timings.stages) >= {"speech_tokenizer", "prefill", "first_audio"}


@pytest.mark.parametrize("lag_rounds", [0, 3])
def test_replies_decoded_in_one_batch_get_the_audio_each_gets_alone(
    tiny_paths, tokenizer, lag_rounds
):
    """Rounds driven by hand on the real models. In lockstep every block of one reply is
    batched with the other's; three rounds apart, later blocks wait for each other."""
    brain = GLM4VoiceBrain.load(tiny_paths, _load_options(tokenizer))
    worker = ModelWorker(brain, hold=BlockHold(min_ahead_s=0.0, max_rounds=10))
    events: list[list] = [[], []]
    jobs = [
        Job(None, f"hello {i}", "", events[i].append, max_new_tokens=1000, max_ahead_s=1e9)
        for i in range(2)
    ]
    with torch.inference_mode():
        worker.submit(jobs[0])
        for _ in range(lag_rounds):
            worker._round()
        worker.submit(jobs[1])
        while not all(job.finished.is_set() for job in jobs):
            worker._round()
    sizes = list(worker.decode_batch_sizes)
    if lag_rounds == 0:
        assert set(sizes) == {2}
    else:
        assert sizes.count(2) >= 2 and sizes.count(1) >= 2  # the first blocks never wait
    decoder = brain.reply_decoder.decoder
    for job, reply_events in zip(jobs, events, strict=True):
        codes = _codes(tokenizer, job.generated)
        alone, _ = decoder.decode(torch.tensor([codes]))
        np.testing.assert_allclose(_audio(reply_events), alone[0].numpy(), atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("language", ["any", "english"])
def test_an_english_only_brain_never_samples_text_that_writes_chinese(
    tiny_paths, tokenizer, language
):
    """Loaded with `reply_language="english"`, the brain draws a text id that writes no CJK
    even when the model puts nearly all its mass on one that does (here: the lead byte of 你)."""
    constraints = TokenConstraints(reply_language=language)  # type: ignore[arg-type]
    brain = GLM4VoiceBrain.load(
        tiny_paths, LoadOptions(sampling=SamplingConfig(seed=0), constraints=constraints)
    )
    lead = next(i for i in range(256) if tokenizer.decode_bytes([i]) == "你".encode()[:1])
    rows = brain.masks.table.shape[1]
    jobs = []
    for _ in range(8):
        job = Job(None, "hi", "", lambda event: None, 100, max_ahead_s=8.0)
        job.logits = torch.zeros(rows)
        job.logits[lead] = 30.0
        jobs.append(job)
    drawn = brain.sample(jobs)
    if language == "any":
        assert drawn == [lead] * 8
    else:
        assert lead not in drawn
        assert not any(writes_cjk(tokenizer.decode_bytes([t])) for t in drawn)
