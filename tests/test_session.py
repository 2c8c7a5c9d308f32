"""Sessions, turn-taking and the outbound track, with a scripted engine and fake media."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame
from scipy.signal import correlate

from agent import metrics
from agent.engine import EngineError
from agent.session import Session, SessionConfig
from agent.tasks import cancel_and_wait
from agent.tracks import EDGE_FADE_SAMPLES, FRAME_SAMPLES, OUTPUT_SAMPLE_RATE, AgentAudioTrack
from agent.turns import TurnConfig, TurnManager
from audio_dsp import (
    EndpointerConfig,
    SpeechEnded,
    SpeechPaused,
    SpeechStarted,
    StreamResampler,
)
from audio_dsp.aec import available_backends
from audio_dsp.bargein import BargeInConfig
from tests.fakes import (
    FakeChannel,
    FakeEngine,
    MicTrack,
    OutputPump,
    Script,
    espeak_16k,
    tone,
    wait_until,
)

# --- the outbound track -----------------------------------------------------------------------


async def test_track_paces_frames_by_the_wall_clock() -> None:
    track = AgentAudioTrack()
    start = time.monotonic()
    frames = [await track.recv() for _ in range(11)]
    elapsed = time.monotonic() - start
    assert 0.19 <= elapsed <= 0.27  # ten 20 ms periods after the first frame
    assert [f.pts for f in frames] == [i * FRAME_SAMPLES for i in range(11)]
    assert {f.sample_rate for f in frames} == {OUTPUT_SAMPLE_RATE}
    assert {f.samples for f in frames} == {FRAME_SAMPLES}
    track.stop()


async def test_write_returns_only_when_the_track_has_room() -> None:
    track = AgentAudioTrack(max_queued_frames=3)
    writer = asyncio.create_task(track.write(tone(0.2, OUTPUT_SAMPLE_RATE)))
    await asyncio.sleep(0.05)
    assert not writer.done()
    assert track.queued_frames == 3
    for _ in range(7):
        await track.recv()
    await asyncio.wait_for(writer, 1.0)
    assert track.played_samples == 7 * FRAME_SAMPLES
    track.stop()


async def test_flush_drops_queued_audio_and_releases_the_writer() -> None:
    track = AgentAudioTrack(max_queued_frames=3)
    writer = asyncio.create_task(track.write(tone(1.0, OUTPUT_SAMPLE_RATE)))
    await asyncio.sleep(0.01)
    await track.recv()
    track.flush()
    await asyncio.wait_for(writer, 0.5)
    frames = [await track.recv() for _ in range(3)]
    assert all(not f.to_ndarray().any() for f in frames)
    assert track.played_samples == FRAME_SAMPLES
    track.stop()


async def test_drain_sends_the_padded_remainder_and_waits_until_sent() -> None:
    track = AgentAudioTrack()
    pump = OutputPump(track).start()
    await track.write(tone(0.05, OUTPUT_SAMPLE_RATE))  # 2.5 frames
    await asyncio.wait_for(track.drain(), 1.0)
    assert track.played_samples == 3 * FRAME_SAMPLES
    assert track.queued_frames == 0
    await pump.stop()
    track.stop()


async def test_frame_listeners_see_every_frame_sent_with_its_kind() -> None:
    track = AgentAudioTrack()
    seen: list[bool] = []
    track.add_frame_listener(lambda frame, is_audio: seen.append(is_audio))
    await track.recv()
    await track.write(tone(0.04, OUTPUT_SAMPLE_RATE))
    await track.recv()
    await track.recv()
    await track.recv()
    assert seen == [False, True, True, False]
    track.stop()


def numbered_frames(count: int) -> np.ndarray:
    """`count` 20 ms frames of float32 audio, frame i holding the constant (i + 1) / 100."""
    return np.concatenate([np.full(FRAME_SAMPLES, (i + 1) / 100, np.float32) for i in range(count)])


def frame_numbers(frames: list[AudioFrame]) -> list[int]:
    """Which numbered frame each sent frame carries (0 = silence), read mid-frame (past the
    fade of a frame that starts after silence)."""
    return [round(int(f.to_ndarray()[0, FRAME_SAMPLES // 2]) / 32767 * 100) for f in frames]


async def test_a_held_track_sends_silence_keeps_its_audio_and_the_writer_waits() -> None:
    track = AgentAudioTrack(max_queued_frames=3)
    writer = asyncio.create_task(track.write(numbered_frames(10)))
    await asyncio.sleep(0.01)  # the first frames are queued
    sent = [await track.recv() for _ in range(4)]
    track.hold()
    assert track.held
    held = [await track.recv() for _ in range(3)]
    assert frame_numbers(sent) == [1, 2, 3, 4]
    assert frame_numbers(held) == [0, 0, 0]
    assert track.played_samples == 4 * FRAME_SAMPLES  # silence sent while held is not played
    assert track.queued_frames == 3 and not writer.done()
    track.stop()
    await asyncio.wait_for(writer, 0.5)


async def test_resume_resends_the_audio_sent_just_before_the_hold_then_the_held_audio() -> None:
    track = AgentAudioTrack(max_queued_frames=3)
    writer = asyncio.create_task(track.write(numbered_frames(10)))
    await asyncio.sleep(0.01)  # the first frames are queued
    sent = [await track.recv() for _ in range(4)]
    track.hold()
    held = [await track.recv() for _ in range(2)]
    assert track.resume(replay_samples=2 * FRAME_SAMPLES) == 2 * FRAME_SAMPLES
    assert not track.held
    assert track.played_samples == 2 * FRAME_SAMPLES  # the replayed frames count once sent
    after = [await track.recv() for _ in range(9)]
    await asyncio.wait_for(writer, 0.5)
    assert frame_numbers(sent + held + after) == [1, 2, 3, 4, 0, 0, 3, 4, 5, 6, 7, 8, 9, 10, 0]
    assert track.played_samples == 10 * FRAME_SAMPLES
    track.stop()


async def test_flush_ends_a_hold_and_drops_the_held_audio() -> None:
    track = AgentAudioTrack(max_queued_frames=3)
    writer = asyncio.create_task(track.write(numbered_frames(10)))
    await asyncio.sleep(0.01)
    await track.recv()
    track.hold()
    track.flush()
    await asyncio.wait_for(writer, 0.5)
    assert not track.held and track.queued_frames == 0
    assert track.resume(replay_samples=FRAME_SAMPLES) == 0  # nothing held, nothing to replay
    await track.write(numbered_frames(1))
    assert frame_numbers([await track.recv()]) == [1]  # the next answer plays at once
    track.stop()


def _samples(frames: list[AudioFrame]) -> np.ndarray:
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int32)


async def test_audio_that_runs_out_fades_out_and_goes_on_fading_in_nothing_lost_or_repeated() -> (
    None
):
    """An engine behind playback: the track runs dry mid-answer, then gets the rest."""
    track = AgentAudioTrack()
    answer = tone(0.2, OUTPUT_SAMPLE_RATE, freq=430.0, amp=0.3)  # not at zero every 20 ms
    first, rest = answer[:4800], answer[4800:]
    writer = asyncio.create_task(track.write(first))
    await asyncio.sleep(0)  # the first frames are queued
    sent = [await track.recv() for _ in range(5)]
    gap = [await track.recv() for _ in range(2)]  # the engine is late
    await writer
    writer = asyncio.create_task(track.write(rest))
    sent += [await track.recv() for _ in range(5)]
    await writer
    assert not _samples(gap).any()
    audio = _samples(sent)
    expected = (np.clip(answer, -1, 1) * 32767).round().astype(np.int32)
    assert len(audio) == len(expected)  # nothing repeated, nothing lost
    edges = np.zeros(len(audio), bool)
    for start in (0, 4800 - EDGE_FADE_SAMPLES, 4800, len(audio) - EDGE_FADE_SAMPLES):
        edges[start : start + EDGE_FADE_SAMPLES] = True
    assert np.abs(audio - expected)[~edges].max() <= 1  # untouched away from the edges
    # no click where it stops or starts again: steps no bigger than the tone's own
    stream = _samples(sent[:5] + gap + sent[5:])
    tone_step = np.abs(np.diff(expected)).max()
    assert np.abs(np.diff(stream)).max() <= tone_step + 2
    assert abs(audio[4799]) < 0.01 * 32767 and abs(audio[4800]) < 0.01 * 32767
    track.stop()


async def test_a_writer_that_keeps_up_gets_no_fades_even_one_frame_ahead() -> None:
    track = AgentAudioTrack(max_queued_frames=1)  # the queue is empty after every frame sent
    answer = tone(0.2, OUTPUT_SAMPLE_RATE, freq=430.0, amp=0.3)
    writer = asyncio.create_task(track.write(answer))
    await asyncio.sleep(0)
    sent = [await track.recv() for _ in range(10)]
    await writer
    expected = (np.clip(answer, -1, 1) * 32767).round().astype(np.int32)
    inner = slice(EDGE_FADE_SAMPLES, -EDGE_FADE_SAMPLES)  # the answer's own start and end fade
    assert np.abs(_samples(sent)[inner] - expected[inner]).max() <= 1
    track.stop()


async def test_stopping_the_track_releases_a_blocked_writer() -> None:
    track = AgentAudioTrack(max_queued_frames=1)
    writer = asyncio.create_task(track.write(tone(0.5, OUTPUT_SAMPLE_RATE)))
    await asyncio.sleep(0.01)
    track.stop()
    await asyncio.wait_for(writer, 0.5)


# --- the turn manager -------------------------------------------------------------------------


class Harness:
    """A TurnManager wired to a real track (pulled in real time) and a message log."""

    def __init__(self, script: Script | None = None, config: TurnConfig | None = None) -> None:
        self.engine = FakeEngine(script)
        self.track = AgentAudioTrack()
        self.messages: list[dict] = []
        self.turns = TurnManager(
            self.engine, self.track, lambda m: self.messages.append(json.loads(m)), config
        )
        self.pump = OutputPump(self.track).start()
        self.turns.start()

    def states(self) -> list[str]:
        return [m["state"] for m in self.messages if m["type"] == "state"]

    def of_type(self, type_: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == type_]

    async def wait_state(self, state: str, within: float = 3.0) -> None:
        deadline = time.monotonic() + within
        while self.turns.state != state:
            if time.monotonic() > deadline:
                raise AssertionError(f"state {self.turns.state}, expected {state}")
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        await self.turns.close()
        await self.pump.stop()
        self.track.stop()


def speech_end(seconds: float = 0.5, fill: float = 0.1) -> SpeechEnded:
    audio = np.full(int(seconds * 16_000), fill, np.float32)
    return SpeechEnded(0.0, seconds, seconds + 0.7, audio, "silence")


async def test_a_speech_turn_goes_listening_thinking_speaking_listening() -> None:
    h = Harness()
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    await h.wait_state("listening")
    assert h.states() == ["listening", "thinking", "speaking", "listening"]
    ((turn, history),) = h.engine.calls
    assert turn.audio is not None and len(turn.audio) == 8000 and history == []
    assert [i.role for i in h.turns.history] == ["user", "assistant"]
    assert not h.turns.history[1].interrupted
    assert h.pump.audio_frames() >= 0.6 / 0.02 - 1
    await h.close()


async def test_transcripts_stream_partials_then_the_full_text() -> None:
    h = Harness(Script(text="one two three"))
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    await h.wait_state("listening")
    transcripts = [(m["role"], m["text"], m["final"]) for m in h.of_type("transcript")]
    assert transcripts == [
        ("user", "hello agent", True),
        ("assistant", "one", False),
        ("assistant", "one two", False),
        ("assistant", "one two three", False),
        ("assistant", "one two three", True),
    ]
    await h.close()


async def test_first_audio_latency_is_measured_from_the_user_stop() -> None:
    h = Harness(Script(first_delay_s=0.2))
    stop = time.monotonic() - 0.7  # the user stopped one hangover ago
    await h.turns.on_speech_ended(speech_end(), user_stop=stop)
    await h.wait_state("listening")
    latency = h.turns.records[0].first_audio_latency
    assert latency is not None and 0.9 <= latency <= 1.3  # 0.7 s ago + 0.2 s of thinking
    await h.close()


async def test_interrupt_cancels_flushes_and_cuts_history_to_what_was_played() -> None:
    h = Harness(Script(audio_s=3.0, text="a b c d e f g h i j"))
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    await asyncio.sleep(0.6)
    await h.turns.interrupt()
    reply = h.engine.replies[0]
    assert reply.cancelled
    assert h.turns.state == "listening"
    assert h.of_type("flush")
    played = reply.played_s[-1]
    assert played is not None and 0.55 <= played <= 1.0
    words = h.engine.script.text.split()
    heard = " ".join(words[: round(len(words) * played / 3.0)])
    assistant = h.turns.history[1]
    assert assistant.interrupted and assistant.text == heard
    assert h.of_type("transcript")[-1] == {
        "type": "transcript",
        "role": "assistant",
        "text": heard,
        "final": True,
    }
    frames_at_cut = len(h.pump.frames)
    await asyncio.sleep(0.1)
    assert not any(np.abs(f).max() for f in h.pump.frames[frames_at_cut:])
    await h.close()


async def test_barge_in_needs_enough_voiced_speech_over_the_answer() -> None:
    h = Harness(Script(audio_s=2.0), TurnConfig(barge_in_ms=350))
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    await h.turns.on_speech_started(SpeechStarted(1.0, 1.1))
    await h.turns.on_speech_progress(200)
    assert h.turns.state == "speaking"
    await h.turns.on_speech_progress(360)
    assert h.turns.state == "listening"
    assert h.engine.replies[0].cancelled
    assert h.turns.history[1].interrupted
    await h.turns.on_speech_ended(speech_end(0.8), user_stop=time.monotonic())
    assert len(h.engine.calls) == 2
    assert [i.role for i in h.engine.calls[1][1]] == ["user", "assistant"]
    await h.close()


async def test_a_duck_holds_the_answer_and_a_confirmed_barge_in_keeps_history_to_the_duck() -> None:
    h = Harness(Script(audio_s=3.0, text="a b c d e f g h i j"))
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    await asyncio.sleep(0.5)
    await h.turns.on_speech_progress(30.0, 50.0)  # a run shorter than duck_ms: nothing yet
    assert not h.of_type("duck")
    await h.turns.on_speech_progress(40.0, 60.0)
    assert h.turns.ducked and h.track.held and len(h.of_type("duck")) == 1
    played_at_duck, frames_at_duck = h.track.played_samples, len(h.pump.frames)
    await asyncio.sleep(0.2)
    assert not any(np.abs(f).max() for f in h.pump.frames[frames_at_duck:])  # silent meanwhile
    assert h.track.played_samples == played_at_duck
    await h.turns.on_speech_progress(150.0, 0.0)  # confirmed
    assert h.turns.state == "listening" and not h.turns.ducked
    assert len(h.of_type("flush")) == 1 and not h.of_type("unduck")
    reply = h.engine.replies[0]
    assert reply.cancelled
    assert reply.played_s == [pytest.approx(played_at_duck / OUTPUT_SAMPLE_RATE)]
    assert h.turns.history[1].interrupted
    assert [e for _, e in h.turns.duck_log] == ["duck", "stop"]
    await h.close()


async def test_an_unconfirmed_duck_is_released_and_the_whole_answer_is_played() -> None:
    config = TurnConfig(duck_release_ms=200, duck_replay_ms=100)
    h = Harness(Script(audio_s=1.5, text="a b c d e f"), config)
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    await asyncio.sleep(0.4)
    await h.turns.on_speech_progress(0.0, 60.0)
    assert h.turns.ducked
    ducked_at = time.monotonic()
    while not h.of_type("unduck"):
        await h.turns.on_speech_progress(0.0, 0.0)  # the speech stopped: no barge-in
        await asyncio.sleep(0.01)
    assert 0.18 <= time.monotonic() - ducked_at <= 0.3
    assert not h.turns.ducked and not h.track.held
    await h.wait_state("listening")
    reply = h.engine.replies[0]
    assert not reply.cancelled and reply.played_s == [None]
    assert not h.turns.history[1].interrupted
    # every frame of the answer went out once, and the 100 ms before the duck once more
    assert h.track.played_samples == pytest.approx(1.5 * OUTPUT_SAMPLE_RATE, abs=FRAME_SAMPLES)
    assert h.pump.audio_frames() == h.track.played_samples // FRAME_SAMPLES + 5
    assert [e for _, e in h.turns.duck_log] == ["duck", "release"]
    await h.close()


async def test_a_run_of_speech_ducks_only_once_until_it_ends() -> None:
    h = Harness(Script(audio_s=3.0), TurnConfig(duck_release_ms=100))
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    await h.turns.on_speech_progress(0.0, 60.0)
    await asyncio.sleep(0.2)  # released by the track's clock
    assert h.of_type("unduck")
    await h.turns.on_speech_progress(0.0, 300.0)  # the same run, still going: no new duck
    assert len(h.of_type("duck")) == 1
    await h.turns.on_speech_progress(0.0, 0.0)
    await h.turns.on_speech_progress(0.0, 60.0)  # a new run
    assert len(h.of_type("duck")) == 2
    await h.close()


async def test_ducking_can_be_turned_off() -> None:
    h = Harness(Script(audio_s=1.0), TurnConfig(duck_ms=0))
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    await h.turns.on_speech_progress(100.0, 100.0)
    assert not h.of_type("duck") and not h.track.held
    await h.close()


async def test_a_short_backchannel_over_the_answer_is_ignored() -> None:
    h = Harness(Script(audio_s=1.5), TurnConfig(barge_in_ms=250))
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    await h.turns.on_speech_started(SpeechStarted(1.0, 1.1))
    await h.turns.on_speech_progress(150)
    await h.turns.on_speech_ended(speech_end(0.2), user_stop=time.monotonic())
    assert h.turns.state == "speaking"
    assert len(h.engine.calls) == 1
    await h.wait_state("listening")
    await h.close()


async def test_speech_while_thinking_is_answered_together_with_the_earlier_turn() -> None:
    h = Harness(Script(first_delay_s=0.5))
    await h.turns.on_speech_ended(speech_end(0.5, fill=0.1), user_stop=time.monotonic())
    assert h.turns.state == "thinking"
    await h.turns.on_speech_started(SpeechStarted(2.0, 2.1))
    assert h.engine.replies[0].cancelled
    assert h.turns.state == "listening"
    await h.turns.on_speech_ended(speech_end(0.3, fill=0.2), user_stop=time.monotonic())
    merged = h.engine.calls[1][0].audio
    assert merged is not None and len(merged) == 8000 + 4800
    np.testing.assert_allclose(merged[:8000], 0.1)
    np.testing.assert_allclose(merged[8000:], 0.2)
    assert h.engine.calls[1][1] == []  # the dropped reply left no history
    await h.wait_state("listening", within=4)
    await h.close()


async def test_a_typed_turn_replaces_the_answer_in_flight() -> None:
    h = Harness(Script(audio_s=2.0))
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    await h.turns.on_user_text("what time is it")
    assert h.engine.replies[0].cancelled
    assert h.engine.calls[1][0].text == "what time is it"
    assert h.turns.state == "thinking"
    await h.close()


async def test_an_engine_failure_reports_an_error_and_returns_to_listening() -> None:
    h = Harness(Script(fail_after_chunks=2, audio_s=1.0))
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    await h.wait_state("listening")
    (error,) = h.of_type("error")
    assert "scripted" not in error["message"]  # internal details stay in the log
    assert h.of_type("flush")
    await h.turns.on_user_text("still there?")
    await h.wait_state("speaking")
    await h.close()


# --- early replies: started at a pause, used if the turn ends there ----------------------------


def pause_of(end: SpeechEnded, after_s: float = 0.3) -> SpeechPaused:
    """The pause the endpointer reports `after_s` into the silence that ends `end`."""
    return SpeechPaused(end.onset_s, end.stop_s, end.stop_s + after_s, end.audio)


def early_count(outcome: str) -> float:
    return metrics.EARLY_REPLIES_TOTAL.labels(outcome=outcome)._value.get()


async def test_a_reply_started_at_a_pause_answers_the_turn_that_ends_there_sooner() -> None:
    h = Harness(Script(first_delay_s=0.3))
    used = early_count("used")
    end = speech_end()
    assert await h.turns.on_speech_paused(pause_of(end)) is False  # no listener to take
    await asyncio.sleep(0.4)  # the rest of the hangover: the engine works meanwhile
    assert h.states() == ["listening"] and len(h.messages) == 1  # nothing shown yet
    await h.turns.on_speech_ended(end, user_stop=time.monotonic())
    await h.wait_state("listening", within=4)
    assert len(h.engine.calls) == 1  # the early reply was the answer
    assert h.states() == ["listening", "thinking", "speaking", "listening"]
    assert [m["role"] for m in h.of_type("transcript")][0] == "user"
    record = h.turns.records[0]
    latency = record.first_audio_latency
    assert record.early and latency is not None and latency < 0.2  # not 0.3 s of thinking
    assert [i.role for i in h.turns.history] == ["user", "assistant"]
    assert not h.engine.replies[0].cancelled
    assert early_count("used") == used + 1
    await h.close()


async def test_an_early_reply_still_thinking_when_the_turn_ends_streams_on_from_there() -> None:
    h = Harness(Script(first_delay_s=0.4, audio_s=0.4))
    end = speech_end()
    await h.turns.on_speech_paused(pause_of(end))
    await h.turns.on_speech_ended(end, user_stop=time.monotonic())
    assert h.turns.state == "thinking"
    await h.wait_state("speaking")
    await h.wait_state("listening", within=4)
    assert len(h.engine.calls) == 1
    assert h.pump.audio_frames() >= 0.4 / 0.02 - 1
    assert h.of_type("transcript")[-1]["final"]
    await h.close()


async def test_an_early_reply_is_dropped_without_a_trace_when_the_user_goes_on() -> None:
    h = Harness(Script(first_delay_s=0.05))
    dropped = early_count("dropped")
    first = speech_end(0.5)
    await h.turns.on_speech_paused(pause_of(first))
    await asyncio.sleep(0.1)  # it has its first audio, unseen
    await h.turns.on_speech_resumed()
    await wait_until(lambda: h.engine.replies[0].cancelled)
    assert h.states() == ["listening"] and h.pump.audio_frames() == 0
    assert early_count("dropped") == dropped + 1
    whole = speech_end(1.2)
    await h.turns.on_speech_ended(whole, user_stop=time.monotonic())
    await h.wait_state("listening", within=4)
    assert len(h.engine.calls) == 2
    turn, history = h.engine.calls[1]
    assert turn.audio is not None and len(turn.audio) == len(whole.audio) and history == []
    assert len(h.turns.history) == 2  # only the answered turn
    await h.close()


async def test_an_early_reply_is_not_used_for_a_turn_that_ends_elsewhere() -> None:
    h = Harness()
    await h.turns.on_speech_paused(pause_of(speech_end(0.5)))
    cut = SpeechEnded(0.0, 0.8, 0.8, np.zeros(12_800, np.float32), "max_length")
    await h.turns.on_speech_ended(cut, user_stop=time.monotonic())
    await h.wait_state("listening", within=4)
    assert h.engine.replies[0].cancelled and not h.engine.replies[1].cancelled
    assert len(h.engine.calls[1][0].audio) == 12_800
    assert not h.turns.records[0].early
    await h.close()


async def test_no_early_reply_starts_while_the_agent_is_answering() -> None:
    h = Harness(Script(audio_s=2.0))
    await h.turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    await h.wait_state("speaking")
    assert await h.turns.on_speech_paused(pause_of(speech_end(0.3))) is False
    assert len(h.engine.calls) == 1
    await h.close()


async def test_a_typed_turn_or_closing_drops_the_early_reply() -> None:
    h = Harness()
    await h.turns.on_speech_paused(pause_of(speech_end()))
    await h.turns.on_user_text("never mind")
    assert h.engine.calls[1][0].text == "never mind"
    await wait_until(lambda: h.engine.replies[0].cancelled)
    await h.wait_state("listening", within=4)
    await h.turns.on_speech_paused(pause_of(speech_end()))
    await h.close()
    assert h.engine.replies[2].cancelled
    assert not [
        t for t in asyncio.all_tasks() if t.get_name() in ("early-reply", "drop-early-reply")
    ]


async def test_an_early_reply_that_failed_is_asked_again_when_the_turn_ends() -> None:
    h = Harness(Script(fail_after_chunks=0))
    end = speech_end()
    await h.turns.on_speech_paused(pause_of(end))
    await asyncio.sleep(0.15)  # it fails, unseen
    assert not h.of_type("error")
    await h.turns.on_speech_ended(end, user_stop=time.monotonic())
    await h.wait_state("listening", within=4)
    assert len(h.engine.calls) == 2 and len(h.of_type("error")) == 1
    await h.close()


async def test_an_early_reply_takes_the_listener_and_a_resumed_turn_gets_a_new_one() -> None:
    h = Harness()
    listener = RecordingListener()
    assert await h.turns.on_speech_paused(pause_of(speech_end()), listener) is True
    assert h.engine.calls[0][0].listener is listener
    await h.turns.on_speech_resumed()
    await h.close()


# --- sessions ---------------------------------------------------------------------------------


def channel_messages(channel: FakeChannel, type_: str | None = None) -> list[dict]:
    messages = [json.loads(m) for m in channel.sent]
    return [m for m in messages if type_ is None or m["type"] == type_]


async def test_spoken_turn_through_a_session_reaches_the_engine_and_is_answered(
    tmp_path: Path,
) -> None:
    speech = espeak_16k("turn on the kitchen lights", tmp_path)
    engine = FakeEngine(Script(audio_s=0.4))
    session = Session(engine, SessionConfig(EndpointerConfig(hangover_ms=500)))
    channel = FakeChannel()
    session.attach_channel(channel)
    mic = MicTrack()
    pump = OutputPump(session.output_track).start()
    session.attach_input(mic)
    await asyncio.sleep(0.2)
    said_at = time.monotonic()
    speech_s = mic.say(speech, 16_000)
    await wait_until(lambda: len(engine.calls) == 1)
    await wait_until(lambda: session.turns.state == "listening" and pump.audio_frames() > 0)
    states = [m["state"] for m in channel_messages(channel, "state")]
    assert states == ["listening", "thinking", "speaking", "listening"]
    thinking_at = next(t for t, s in session.turns.state_log if s == "thinking")
    # the turn ends one hangover (0.5 s) after the speech, give or take eSpeak's trailing silence
    assert thinking_at - (said_at + speech_s) == pytest.approx(0.5, abs=0.25)
    record = session.turns.records[0]
    assert record.user_stop == pytest.approx(said_at + speech_s, abs=0.25)
    turn = engine.calls[0][0]
    assert turn.audio is not None
    assert turn.duration_s == pytest.approx(len(speech) / 16_000, abs=0.5)
    await session.close()
    await pump.stop()


async def test_typed_text_message_becomes_a_text_turn() -> None:
    engine = FakeEngine()
    session = Session(engine)
    channel = FakeChannel()
    session.attach_channel(channel)
    channel.emit("message", json.dumps({"type": "text", "text": "  hi there  "}))
    await wait_until(lambda: len(engine.calls) == 1)
    assert engine.calls[0][0].text == "hi there"
    await session.close()


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1, 2]",
        '{"type": "dance"}',
        '{"type": "text"}',
        '{"type": "text", "text": 5}',
        '{"type": "text", "text": "   "}',
        '{"type": "interrupt", "extra": 1}',
        b"\xff\xfe",
        "x" * 20_000,
    ],
)
async def test_malformed_client_messages_get_an_error_event_and_nothing_else(raw) -> None:  # type: ignore[no-untyped-def]
    engine = FakeEngine()
    session = Session(engine)
    channel = FakeChannel()
    session.attach_channel(channel)
    channel.emit("message", raw)
    await asyncio.sleep(0.02)
    errors = channel_messages(channel, "error")
    assert len(errors) == 1 and errors[0]["message"]
    assert engine.calls == []
    channel.emit("message", '{"type": "text", "text": "ok"}')
    await wait_until(lambda: len(engine.calls) == 1)  # the session still works
    await session.close()


async def test_messages_sent_before_the_channel_opens_are_delivered_on_open() -> None:
    session = Session(FakeEngine())
    channel = FakeChannel(ready_state="connecting")
    session.attach_channel(channel)
    assert channel.sent == []
    channel.open()
    assert channel_messages(channel, "state") == [{"type": "state", "state": "listening"}]
    await session.close()


async def test_closing_sessions_leaves_no_tasks_behind() -> None:
    baseline = len(asyncio.all_tasks())
    for _ in range(20):
        engine = FakeEngine(Script(audio_s=2.0))
        session = Session(engine)
        channel = FakeChannel()
        session.attach_channel(channel)
        pump = OutputPump(session.output_track).start()
        session.attach_input(MicTrack(realtime=False))
        channel.emit("message", '{"type": "text", "text": "talk"}')
        await wait_until(lambda s=session: s.turns.state == "speaking")
        await session.close()
        await pump.stop()
        assert engine.replies[0].cancelled
        assert session.output_track.readyState == "ended"
    await asyncio.sleep(0.01)
    assert len(asyncio.all_tasks()) == baseline


async def test_echo_canceller_is_fed_the_sent_audio_and_cleans_the_mic() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.far: list[np.ndarray] = []
            self.near = 0

        def far_end(self, frame: np.ndarray) -> None:
            self.far.append(frame)

        def process(self, frame: np.ndarray) -> np.ndarray:
            self.near += 1
            return np.zeros_like(frame)  # removes everything: no turn may start

    canceller = Recorder()
    engine = FakeEngine()
    session = Session(engine, echo_canceller=canceller)
    pump = OutputPump(session.output_track).start()
    mic = MicTrack()
    session.attach_input(mic)
    mic.say(tone(1.0, 16_000, freq=200, amp=0.5), 16_000)
    await asyncio.sleep(0.4)
    assert canceller.near >= 20 and len(canceller.far) >= 20
    assert {f.shape for f in canceller.far} == {(160,)}
    assert not session.endpointer.in_speech and engine.calls == []
    await session.close()
    await pump.stop()


async def test_an_engine_error_message_is_passed_to_the_client() -> None:
    class Busy(FakeEngine):
        def respond(self, turn, history):  # type: ignore[no-untyped-def]
            raise EngineError("the model is busy, try again in a moment")

    messages: list[dict] = []
    track = AgentAudioTrack()
    turns = TurnManager(Busy(), track, lambda m: messages.append(json.loads(m)))
    await turns.on_user_text("hi")
    assert messages[-1] == {"type": "error", "message": "the model is busy, try again in a moment"}
    track.stop()


async def test_an_engine_that_raises_on_respond_leaves_the_session_listening() -> None:
    class Refusing(FakeEngine):
        def respond(self, turn, history):  # type: ignore[no-untyped-def]
            raise RuntimeError("no capacity")

    messages: list[dict] = []
    track = AgentAudioTrack()
    turns = TurnManager(Refusing(), track, lambda m: messages.append(json.loads(m)))
    turns.start()
    await turns.on_speech_ended(speech_end(), user_stop=time.monotonic())
    assert turns.state == "listening"
    assert [m["type"] for m in messages] == ["state", "error"]
    track.stop()


async def test_cancel_and_wait_warns_about_a_task_that_swallows_cancellation(caplog) -> None:  # type: ignore[no-untyped-def]
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    log = logging.getLogger("test")
    with caplog.at_level(logging.WARNING):
        await cancel_and_wait(task, log, timeout_s=0.1)
    assert "stubborn ignored cancellation" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait({task})


async def test_planar_float_input_frames_are_understood(tmp_path: Path) -> None:
    """Decoders may hand over planar float frames instead of packed s16."""
    speech = espeak_16k("open the window", tmp_path)
    engine = FakeEngine()
    session = Session(engine, SessionConfig(EndpointerConfig(hangover_ms=300)))
    rs = StreamResampler(16_000, 48_000)
    up = np.concatenate([rs.process(speech), rs.flush(), np.zeros(48_000, np.float32)])
    frames = []
    for start in range(0, len(up) - 960, 960):
        block = np.stack([up[start : start + 960]] * 2)  # (2, 960) planar
        frame = AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
        frame.sample_rate = 48_000
        frames.append(frame)

    class Frames(MediaStreamTrack):
        kind = "audio"

        async def recv(self) -> AudioFrame:
            if not frames:
                raise MediaStreamError
            await asyncio.sleep(0)
            return frames.pop(0)

    session.attach_input(Frames())
    await wait_until(lambda: len(engine.calls) == 1)
    heard = engine.calls[0][0].audio
    assert heard is not None
    xcorr = correlate(heard, speech, mode="full", method="fft")
    similarity = xcorr.max() / (np.linalg.norm(heard) * np.linalg.norm(speech))
    assert similarity > 0.9  # the same waveform, not a garbled channel interleave
    await session.close()


# --- echo cancellation settings -------------------------------------------------------------------


def test_session_config_rejects_an_unknown_canceller_and_an_unreachable_barge_in() -> None:
    with pytest.raises(ValueError, match="echo canceller"):
        SessionConfig(echo_canceller="webrtc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="barge-in window"):
        SessionConfig(turns=TurnConfig(barge_in_ms=500), bargein=BargeInConfig(window_ms=400))


@pytest.mark.parametrize(
    ("name", "expected"), [("none", None), ("speex", "speex+res"), ("auto", "auto")]
)
async def test_each_session_builds_the_canceller_its_config_names(name: str, expected) -> None:  # type: ignore[no-untyped-def]
    if expected == "auto":
        expected = {"aec3": "aec3", "speex": "speex+res"}.get(available_backends()[0])
    elif expected is not None and "speex" not in available_backends():
        pytest.skip("libspeexdsp is not installed")
    session = Session(FakeEngine(), SessionConfig(echo_canceller=name))
    built = session._echo
    assert (built.name if built is not None else None) == expected
    await session.close()


async def test_the_far_end_is_fed_from_the_first_microphone_frame_on() -> None:
    """Far audio sent before the microphone starts would misalign the canceller."""
    fed: list[np.ndarray] = []

    class Recorder:
        def far_end(self, frame: np.ndarray) -> None:
            fed.append(frame)

        def process(self, frame: np.ndarray) -> np.ndarray:
            return frame

    session = Session(FakeEngine(), echo_canceller=Recorder())
    for _ in range(10):
        await session.output_track.recv()
    assert fed == []
    mic = MicTrack(realtime=False)
    session.attach_input(mic)
    await wait_until(lambda: mic.frames_sent > 0)
    for _ in range(3):
        await session.output_track.recv()
    assert 3 <= len(fed) <= 6  # 20 ms frames sent -> 10 ms far frames (resampler delay aside)
    await session.close()


async def test_running_out_of_gpu_memory_is_reported_in_words_and_counted() -> None:
    class OutOfMemoryError(RuntimeError):  # the name torch.cuda gives its exception
        pass

    class Exhausted(FakeEngine):
        def respond(self, turn, history):  # type: ignore[no-untyped-def]
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    before = metrics.ERRORS_TOTAL.labels(kind="out_of_memory")._value.get()
    messages: list[dict] = []
    track = AgentAudioTrack()
    turns = TurnManager(Exhausted(), track, lambda m: messages.append(json.loads(m)))
    await turns.on_user_text("hi")
    assert messages[-1] == {"type": "error", "message": metrics.OUT_OF_MEMORY_MESSAGE}
    assert metrics.ERRORS_TOTAL.labels(kind="out_of_memory")._value.get() == before + 1
    assert turns.state != "thinking"
    track.stop()


class RecordingListener:
    def __init__(self) -> None:
        self.pushed: list[np.ndarray] = []
        self.closed = False

    def push(self, samples: np.ndarray) -> None:
        assert not self.closed, "pushed after close"
        self.pushed.append(np.array(samples, np.float32))

    def close(self) -> None:
        self.closed = True

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.pushed) if self.pushed else np.zeros(0, np.float32)


class ListeningEngine(FakeEngine):
    def __init__(self, script: Script | None = None) -> None:
        super().__init__(script)
        self.listeners: list[RecordingListener] = []

    def listen(self) -> RecordingListener:
        self.listeners.append(RecordingListener())
        return self.listeners[-1]


async def test_the_engine_hears_the_speech_while_it_is_spoken_and_gets_it_with_the_turn(
    tmp_path: Path,
) -> None:
    speech = espeak_16k("turn on the kitchen lights", tmp_path)
    engine = ListeningEngine(Script(audio_s=0.4))
    session = Session(engine, SessionConfig(EndpointerConfig(hangover_ms=500)))
    session.attach_channel(FakeChannel())
    mic = MicTrack()
    pump = OutputPump(session.output_track).start()
    session.attach_input(mic)
    await asyncio.sleep(0.2)
    speech_s = mic.say(speech, 16_000)
    await asyncio.sleep(speech_s / 2)
    assert len(engine.listeners) == 1 and len(engine.listeners[0].pushed) > 1  # mid-speech
    await wait_until(lambda: len(engine.calls) == 1)
    turn = engine.calls[0][0]
    listener = engine.listeners[0]
    assert turn.listener is listener and not listener.closed
    heard = listener.audio
    # Everything it heard is the start of the turn's audio; only the endpointer's trimmed
    # trailing silence can be missing from the turn.
    assert 0 < len(turn.audio) <= len(heard)
    np.testing.assert_array_equal(heard[: len(turn.audio)], turn.audio)
    await session.close()
    await pump.stop()


async def test_speech_over_the_answer_that_is_ignored_closes_the_engine_listener() -> None:
    listener = RecordingListener()
    messages: list[dict] = []
    track = AgentAudioTrack()
    turns = TurnManager(FakeEngine(), track, lambda m: messages.append(json.loads(m)))
    turns._state = "speaking"  # the agent is talking: short speech is a backchannel
    await turns.on_speech_ended(speech_end(), user_stop=time.monotonic(), listener=listener)
    assert listener.closed
    track.stop()


async def test_a_session_answers_at_the_pause_that_ends_the_turn_and_drops_the_others(
    tmp_path: Path,
) -> None:
    words = espeak_16k("turn on the lights", tmp_path)
    loud = np.flatnonzero(np.abs(words) > 0.02)
    words = words[loud[0] : loud[-1] + 1]  # without eSpeak's leading and trailing silence
    gap = np.zeros(int(0.45 * 16_000), np.float32)  # a pause, shorter than the hangover
    engine = ListeningEngine(Script(audio_s=0.4, first_delay_s=0.2))
    config = SessionConfig(EndpointerConfig(hangover_ms=700, pause_ms=300))
    session = Session(engine, config)
    session.attach_channel(FakeChannel())
    mic = MicTrack()
    pump = OutputPump(session.output_track).start()
    session.attach_input(mic)
    await asyncio.sleep(0.2)
    mic.say(np.concatenate([words, gap, words]), 16_000)
    await wait_until(lambda: session.turns.records and pump.audio_frames() > 0, within=8)
    await wait_until(lambda: session.turns.state == "listening")
    record = session.turns.records[0]
    assert record.early
    # the engine was asked 0.3 s into the final silence, and answered 0.2 s later: the user
    # hears it when the 0.7 s hangover ends, not 0.2 s after
    latency = record.first_audio_latency
    assert latency is not None and latency < 0.7 + 0.15
    assert len(session.turns.history) == 2
    dropped = [reply for reply in engine.replies if reply.cancelled]
    assert len(dropped) == len(engine.replies) - 1 >= 1  # at the pause between the phrases
    final = engine.calls[-1][0]
    assert final.audio is not None and final.duration_s > 2 * len(words) / 16_000
    assert len(engine.listeners) == 1 + len(dropped)  # a new ear after each pause it went on
    assert final.listener is engine.listeners[-1]
    await session.close()
    await pump.stop()
