"""Edge cases of the GLM-4-Voice worker and reply: the decoder lane stopped mid-answer, audio
dropped by a cancel, and events left over when a reply is cancelled.

The interleavings between the worker, the decoder lane and the event loop are forced with
events in the scripted brain, so each test is deterministic.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from agent.engine import AudioChunk, EngineError, UserTurn
from models.glm4voice.worker import AudioBlock, Job, ModelWorker, TurnListener
from tests.test_glm4voice_engine import (
    SAMPLES_PER_TOKEN,
    ScriptedBrain,
    SlowDecoderBrain,
    _audio_samples,
    _engine,
    _job,
)


def test_an_answer_whose_last_block_waits_when_the_lane_is_stopped_still_finishes():
    brain = SlowDecoderBrain(rounds=1, decode_s=0.0)
    worker = ModelWorker(brain, overlap_decoder=True)
    events: list = []
    job = _job("a", events)
    worker.submit(job)
    try:
        while job.blocks_done == 0:  # the first block decodes with the LM waiting
            worker._round()
        brain.release_decoder.clear()  # the second block's call stays under way
        while not job.done:
            worker._round()
        # The stop id came while the second block was being decoded: the final one waits.
        assert job.key in worker._blocks and worker._lane is not None and worker._lane.busy
        worker.overlap_decoder = False
        worker._wake.clear()
    finally:
        brain.release_decoder.set()
    assert worker._wake.wait(10)  # the lane's call has returned
    for _ in range(5):
        if job.finished.is_set():
            break
        worker._round()
    assert worker._lane is None
    assert job.finished.is_set()
    assert events[-1] is None
    assert _audio_samples(events) == 26 * SAMPLES_PER_TOKEN
    assert [code for codes, _ in brain.decoded_blocks for code in codes] == list(range(26))


class GatedFinalBlockBrain(SlowDecoderBrain):
    """A streaming decoder whose call holding a reply's final block waits for `let_final`."""

    def __init__(self, rounds: int = 1) -> None:
        super().__init__(rounds=rounds, decode_s=0.0)
        self.final_decoding = threading.Event()
        self.let_final = threading.Event()

    def decode_audio_many(self, blocks: list[AudioBlock]) -> list[np.ndarray]:
        if any(block.final for block in blocks):
            self.final_decoding.set()
            self.let_final.wait(10)
        return super().decode_audio_many(blocks)


async def test_history_of_an_answer_whose_last_block_was_dropped_by_cancel_is_cut():
    brain = GatedFinalBlockBrain(rounds=1)
    engine = await _engine(brain, max_ahead_s=1000.0)
    try:
        reply = engine.respond(UserTurn(text="hi"), [])
        iterator = reply.__aiter__()
        assert await asyncio.to_thread(brain.final_decoding.wait, 10)
        assert reply.job.done  # the whole answer was generated
        heard = []
        while sum(len(chunk.samples) for chunk in heard) < 20 * SAMPLES_PER_TOKEN:
            event = await asyncio.wait_for(iterator.__anext__(), 10)
            if isinstance(event, AudioChunk):
                heard.append(event)
        cancelling = asyncio.create_task(reply.cancel())
        await asyncio.sleep(0)  # the cancel is requested before the final block returns
        assert reply.job.cancelled.is_set()
        brain.let_final.set()
        await asyncio.wait_for(cancelling, 10)
        played_s = sum(chunk.duration_s for chunk in heard)  # every chunk that came out
        _, assistant = reply.history(played_s)
    finally:
        brain.let_final.set()
        await engine.close()
    # The last 6 audio ids were never heard: the answer is cut after the 20 that were.
    assert reply.job.audio_samples_emitted == 20 * SAMPLES_PER_TOKEN
    assert assistant.interrupted
    assert assistant.payload == brain.decode_text(brain.script[: 13 + 20])


class StallingBrain(ScriptedBrain):
    """Stops in the LM step that follows its second decoder call until `go` is set."""

    def __init__(self) -> None:
        super().__init__(rounds=20)
        self.stalled = threading.Event()
        self.go = threading.Event()

    def step(self, jobs: list[Job], tokens: list[int]) -> None:
        if len(self.decode_calls) >= 2 and not self.go.is_set():
            self.stalled.set()
            self.go.wait(10)
        super().step(jobs, tokens)


async def test_a_cancelled_reply_yields_no_audio_it_had_queued_before_the_cancel():
    brain = StallingBrain()
    engine = await _engine(brain, max_ahead_s=1000.0)
    try:
        reply = engine.respond(UserTurn(text="hi"), [])
        iterator = reply.__aiter__()
        while not isinstance(await asyncio.wait_for(iterator.__anext__(), 10), AudioChunk):
            pass
        # The second block's audio has gone out; the worker has not yet seen a cancel.
        assert await asyncio.to_thread(brain.stalled.wait, 10)
        cancelling = asyncio.create_task(reply.cancel())
        await asyncio.sleep(0)
        brain.go.set()
        await asyncio.wait_for(cancelling, 10)
        after = [event async for event in iterator]
    finally:
        brain.go.set()
        await engine.close()
    assert len(brain.decode_calls) >= 2
    assert not any(isinstance(event, AudioChunk) for event in after)


class ClosedMidListenBrain(ScriptedBrain):
    """Its tokenizer sets up state for a listener that the event loop closes meanwhile."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail

    def listen(self, listener, samples: np.ndarray) -> None:
        listener.close()  # the turn went unanswered while this speech was being tokenized
        listener.state = object()
        if self.fail:
            raise RuntimeError("the state was cleared under the tokenizer")


def test_a_listener_closed_while_tokenized_keeps_no_tokenizer_state():
    for fail in (False, True):
        worker = ModelWorker(ClosedMidListenBrain(fail=fail))
        listener = TurnListener(worker, lag_samples=0)
        listener.push(np.zeros(3200, dtype=np.float32))
        assert worker._serve_listeners()
        assert listener.state is None
        assert not listener.failed  # a closed listener is not a failed one


class MiscountingDecoderBrain(ScriptedBrain):
    """A decoder that gives no audio for the blocks of the reply to "bad"."""

    block_tokens = 10

    def decode_audio_many(self, blocks: list[AudioBlock]) -> list[np.ndarray]:
        speeches = super().decode_audio_many(blocks)
        return [s for b, s in zip(blocks, speeches, strict=True) if b.job.turn_text != "bad"]


def test_a_decoder_call_that_miscounts_ends_only_the_replies_in_it():
    worker = ModelWorker(MiscountingDecoderBrain(rounds=1))
    events: dict[str, list] = {"bad": [], "good": []}
    bad, good = _job("bad", events["bad"]), _job("good", events["good"])
    worker.submit(bad)
    worker._round()  # "bad" starts a round ahead: its blocks complete in rounds of their own
    worker.submit(good)
    for _ in range(200):
        if good.finished.is_set():
            break
        worker._round()
    assert isinstance(events["bad"][-2], Exception) and events["bad"][-1] is None
    assert not any(isinstance(e, Exception) for e in events["good"])
    assert _audio_samples(events["good"]) == 26 * SAMPLES_PER_TOKEN


class FailingStartBrain(ScriptedBrain):
    """Builds each prompt, then fails outside any one job's error path."""

    def start_jobs(self, jobs: list[Job]) -> list[BaseException | None]:
        super().start_jobs(jobs)
        raise RuntimeError("the decoder stream could not be made")


async def test_replies_that_could_not_start_leave_nothing_in_the_history():
    engine = await _engine(FailingStartBrain(rounds=1))
    try:
        reply = engine.respond(UserTurn(text="hello"), [])
        with pytest.raises(EngineError, match="could not be made"):
            async for _ in reply:
                pass
        assert reply.history(None) == []
        assert reply.history(0.0) == []
    finally:
        await engine.close()
