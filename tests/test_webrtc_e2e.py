"""A real call over WebRTC on loopback: an aiortc client talks to the real app.

The client sends eSpeak NG speech as a clock-paced microphone track, receives the agent's audio
track and the `events` data channel, and checks what came back.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from agent.session import SessionConfig
from audio_dsp import EndpointerConfig, StreamResampler
from signaling import REGISTRY_KEY
from tests.fakes import FakeEngine, Script, espeak_16k, wait_until
from tests.webrtc_client import app_servers, dial

# No echo path here and the agent plays a steady tone: the echo check could not settle.
SESSION = SessionConfig(EndpointerConfig(hangover_ms=600), echo_canceller="none")


@pytest.fixture
async def serve(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start the real app for an engine on a free loopback port; yields (base_url, app)."""
    async with app_servers(tmp_path, SESSION) as start:
        yield start


@pytest.mark.slow
async def test_repeated_calls_leave_no_sessions_or_tasks_behind(serve) -> None:  # type: ignore[no-untyped-def]
    base_url, app = await serve(FakeEngine())
    active_before = REGISTRY.get_sample_value("voice_agent_sessions_active")
    tasks_before = len(asyncio.all_tasks())
    for _ in range(5):
        call = await dial(base_url)
        call.channel.send(json.dumps({"type": "text", "text": "hi"}))
        await wait_until(lambda c=call: "speaking" in c.states())
        await call.hang_up()
        await wait_until(lambda: len(app[REGISTRY_KEY]) == 0, within=10)
    await asyncio.sleep(0.2)
    assert REGISTRY.get_sample_value("voice_agent_sessions_active") == active_before
    assert len(asyncio.all_tasks()) == tasks_before


def dominant_freq(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.slow
async def test_spoken_turn_over_webrtc_gets_the_reply_audio_and_events(serve, tmp_path) -> None:  # type: ignore[no-untyped-def]
    speech = espeak_16k("what is the weather like today", tmp_path)
    engine = FakeEngine(Script(audio_s=0.8, freq=440.0, text="it is sunny"))
    base_url, app = await serve(engine)
    call = await dial(base_url)
    try:
        call.mic.say(speech, 16_000)
        await wait_until(lambda: call.states()[-2:] == ["speaking", "listening"], within=10)
        await asyncio.sleep(0.3)  # the last frames are still in the jitter buffer
        assert call.states() == ["listening", "thinking", "speaking", "listening"]
        turn = engine.calls[-1][0]  # after any early reply dropped at a pause
        assert turn.audio is not None
        assert turn.duration_s == pytest.approx(len(speech) / 16_000, abs=0.5)
        finals = [(m["role"], m["text"]) for m in call.of_type("transcript") if m["final"]]
        assert finals == [("user", "hello agent"), ("assistant", "it is sunny")]
        reply = call.voiced_audio()
        assert len(reply) / 48_000 == pytest.approx(0.8, abs=0.15)
        assert dominant_freq(reply, 48_000) == pytest.approx(440, abs=10)
    finally:
        await call.hang_up()
    await wait_until(lambda: len(app[REGISTRY_KEY]) == 0, within=10)


@pytest.mark.slow
async def test_talking_over_the_agent_over_webrtc_stops_it_and_answers_again(
    serve, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    speech = espeak_16k("stop please, tell me something else", tmp_path)
    engine = FakeEngine(Script(audio_s=4.0, text="a long story about many things"))
    base_url, _ = await serve(engine)
    call = await dial(base_url)
    try:
        call.mic.say(speech[: 16_000 * 1], 16_000)
        await wait_until(lambda: "speaking" in call.states(), within=10)
        await asyncio.sleep(0.5)
        barge_at = time.monotonic()
        before = len(engine.replies)  # the answer (and any early reply dropped at a pause)
        call.mic.say(speech, 16_000)
        await wait_until(lambda: call.of_type("flush"), within=5)
        flush_at = next(t for t, m in call.messages if m["type"] == "flush")
        assert flush_at - barge_at < 1.0  # ~350 ms of voiced speech + network
        await wait_until(lambda: all(r.cancelled for r in engine.replies[:before]), within=1)
        # no stale audio: the track falls silent within the jitter buffer's depth
        await asyncio.sleep(0.7)
        late = [f for t, f in call.audio if t > flush_at + 0.25 and t < flush_at + 0.6]
        assert late and max(np.abs(f).max() for f in late) < 0.02
        seen = len(call.states())
        await wait_until(lambda: "speaking" in call.states()[seen:], within=10)
        history = engine.calls[-1][1]
        assert history[1].role == "assistant" and history[1].interrupted
        assert 0 < len(history[1].text.split()) < 6
    finally:
        await call.hang_up()


@pytest.mark.slow
async def test_offline_engine_answers_with_speech_that_repeats_a_word_the_user_said(  # type: ignore[no-untyped-def]
    serve, tmp_path
) -> None:
    try:
        from models.offline import OfflineEngine
        from models.offline.asr import SpeechRecognizer
    except ImportError as exc:
        pytest.skip(f"the offline engine is not available: {exc}")
    words = "hello my name is robert"
    speech = espeak_16k(words, tmp_path)
    engine = OfflineEngine()
    await engine.start()
    try:
        base_url, _ = await serve(engine)
        call = await dial(base_url)
        try:
            call.mic.say(speech, 16_000)
            await wait_until(
                lambda: call.of_type("error") or call.states()[-2:] == ["speaking", "listening"],
                within=30,
            )
            assert not call.of_type("error")
            await asyncio.sleep(0.3)
            reply = call.voiced_audio(threshold=0.005)
            assert len(reply) > 48_000 * 0.3
            rs = StreamResampler(48_000, 16_000)
            reply16 = np.concatenate([rs.process(reply), rs.flush()])
            heard = await asyncio.to_thread(SpeechRecognizer().transcribe, reply16)
            assert set(heard.lower().split()) & set(words.split()), heard
        finally:
            await call.hang_up()
    finally:
        await engine.close()
