"""Full duplex in virtual time: barge-in, echo, clicks, noise, and the history kept.

A `SimulatedCall` drives a real `Session` (real track, canceller, VAD, endpointer, turn manager)
frame by frame on a virtual clock: every 20 ms it pulls the frame the outbound track sends (as
aiortc would), plays it into a simulated room (`tests/echo_sim.py`: network delay, then the
room's delay and reverberation), mixes in the user's scripted speech and noise, and hands that
microphone frame to the session. A scripted timeline ("user speaks 0.5-2.5 s, cuts in at
4.0 s") then runs in a fraction of its duration, and every timestamp is exact to the frame.
"""

from __future__ import annotations

import asyncio
import fractions
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack
from av import AudioFrame
from scipy.signal import lfilter

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
    played_fraction,
)
from agent.session import Session, SessionConfig
from agent.tracks import EDGE_FADE_SAMPLES
from agent.turns import TurnConfig
from audio_dsp import (
    Endpointer,
    EndpointerConfig,
    SpeechEnded,
    StreamResampler,
    float32_to_int16,
    int16_to_float32,
)
from audio_dsp.aec import available_backends
from audio_dsp.bargein import BargeInDetector, EchoPresence
from tests import echo_sim
from tests.fakes import FakeChannel

STEP_S = 0.020  # one outbound frame, one microphone frame
RATE = 16_000
STEP = int(STEP_S * RATE)
NETWORK_DELAY_MS = 60.0  # client jitter buffers and capture, on top of the room's own delay
AGENT_TEXT = (
    "Here is a rather long answer about the weather. Tomorrow will be sunny in the morning, "
    "with clouds coming in from the west after lunch, and a little rain late in the evening."
)

needs_aec3 = pytest.mark.skipif(
    "aec3" not in available_backends(), reason="pywebrtc-audio is not installed"
)


# --- a scripted engine speaking real speech, thinking in virtual time ------------------------


class VirtualClock:
    """Seconds that advance only when the call steps; coroutines may sleep on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self._tick = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        self.now = t
        self._tick.set()
        self._tick = asyncio.Event()

    async def sleep_until(self, t: float) -> None:
        while self.now < t:
            await self._tick.wait()


class SpokenReply(Reply):
    """Thinks for `think_s` of virtual time, then yields `audio` in 100 ms chunks."""

    def __init__(
        self, turn: UserTurn, audio: np.ndarray, text: str, think_s: float, clock: VirtualClock
    ) -> None:
        self.turn, self.audio, self.text = turn, audio, text
        self.think_s, self.clock = think_s, clock
        self.timings = StageTimings()
        self.cancelled = False
        self.played_s: list[float | None] = []

    def __aiter__(self) -> AsyncIterator[ReplyEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[ReplyEvent]:
        await self.clock.sleep_until(self.clock.now + self.think_s)
        yield UserTranscript("user words")
        yield TextDelta(self.text)
        for start in range(0, len(self.audio), RATE // 10):
            yield AudioChunk(self.audio[start : start + RATE // 10], RATE)

    async def cancel(self) -> None:
        self.cancelled = True

    def history(self, played_s: float | None) -> list[HistoryItem]:
        self.played_s.append(played_s)
        words = self.text.split()
        share = played_fraction(played_s, len(self.audio) / RATE)
        heard = " ".join(words[: round(len(words) * share)])
        return [HistoryItem("user", "user words"), HistoryItem("assistant", heard, share < 1.0)]


class SpeakingEngine(Engine):
    """Answers every turn with the same speech; records each call."""

    name = "speaking"

    def __init__(self, audio: np.ndarray, clock: VirtualClock, think_s: float = 0.0) -> None:
        self.audio, self.clock, self.think_s = audio, clock, think_s
        self.calls: list[tuple[UserTurn, list[HistoryItem]]] = []
        self.replies: list[SpokenReply] = []

    def respond(self, turn: UserTurn, history: Sequence[HistoryItem]) -> SpokenReply:
        self.calls.append((turn, list(history)))
        reply = SpokenReply(turn, self.audio, AGENT_TEXT, self.think_s, self.clock)
        self.replies.append(reply)
        return reply


# --- the simulated call -----------------------------------------------------------------------


class ScriptedMic(MediaStreamTrack):
    """The inbound track: frames handed in by the call; `idle` once the last one is consumed."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._frames: asyncio.Queue[AudioFrame] = asyncio.Queue()
        self.idle = asyncio.Event()

    async def recv(self) -> AudioFrame:
        if self._frames.empty():
            self.idle.set()
        frame = await self._frames.get()
        self.idle.clear()
        return frame

    async def feed(self, samples: np.ndarray, pts: int) -> None:
        """Hand over one 16 kHz mono frame and wait until the session has processed it."""
        frame = AudioFrame.from_ndarray(
            float32_to_int16(samples).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts, frame.time_base = RATE, pts, fractions.Fraction(1, RATE)
        self.idle.clear()
        self._frames.put_nowait(frame)
        await asyncio.wait_for(self.idle.wait(), 5.0)


class Room:
    """Streams sent audio (48 kHz int16 frames) into echo at 16 kHz through an `EchoPath`."""

    def __init__(self, path: echo_sim.EchoPath, network_delay_ms: float) -> None:
        self.path = path
        h = path.impulse_response()
        bulk = int(round(path.delay_ms * RATE / 1000))
        self._taps = h[bulk:]
        self._zi = np.zeros(len(self._taps) - 1)
        delay = bulk + int(round(network_delay_ms * RATE / 1000))
        self._line = np.zeros(delay, np.float32)
        self._down = StreamResampler(48_000, RATE)
        self._pending = np.zeros(0, np.float32)

    def echo(self, sent: np.ndarray) -> np.ndarray:
        """The echo heard during the next 20 ms, given the 20 ms frame just sent."""
        far = self._down.process(int16_to_float32(sent))
        if self.path.drive > 0:
            far = np.tanh(self.path.drive * far) / self.path.drive
        self._pending = np.concatenate([self._pending, far.astype(np.float32)])
        line = np.concatenate([self._line, self._pending[:STEP]])
        self._pending = self._pending[STEP:]
        out, self._line = line[:STEP], line[STEP:]
        if len(out) < STEP:  # the resampler's start-up delay
            out = np.concatenate([np.zeros(STEP - len(out), np.float32), out])
        filtered, self._zi = lfilter(self._taps, [1.0], out, zi=self._zi)
        return filtered.astype(np.float32)


@dataclass
class Step:
    """What happened in one 20 ms step."""

    t: float
    sent_audio: bool  # the outbound frame carried agent audio (not idle silence)
    sent_rms: float
    state: str
    queued: int


@dataclass
class SimulatedCall:
    """A session in a simulated room, advanced in 20 ms steps of virtual time."""

    session: Session
    engine: SpeakingEngine
    clock: VirtualClock
    room: Room | None
    channel: FakeChannel
    mic: ScriptedMic
    user: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    noise: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    steps: list[Step] = field(default_factory=list)
    _sent_audio: bool = False

    def _on_frame_sent(self, _frame: np.ndarray, is_audio: bool) -> None:
        self._sent_audio = is_audio

    @classmethod
    def start(
        cls,
        agent_audio: np.ndarray,
        path: echo_sim.EchoPath | None = None,
        echo_canceller: str = "auto",
        turns: TurnConfig | None = None,
        think_s: float = 0.0,
        network_delay_ms: float = NETWORK_DELAY_MS,
        echo_warmup_s: float = SessionConfig.echo_warmup_s,
    ) -> SimulatedCall:
        clock = VirtualClock()
        engine = SpeakingEngine(agent_audio, clock, think_s)
        config = SessionConfig(
            EndpointerConfig(hangover_ms=700),
            turns or TurnConfig(),
            echo_canceller=echo_canceller,  # type: ignore[arg-type]
            echo_warmup_s=echo_warmup_s,
        )
        session = Session(engine, config, clock=clock)
        channel, mic = FakeChannel(), ScriptedMic()
        session.attach_channel(channel)
        session.attach_input(mic)
        room = Room(path, network_delay_ms) if path is not None else None
        call = cls(session, engine, clock, room, channel, mic)
        session.output_track.add_frame_listener(call._on_frame_sent)
        return call

    def say(self, speech: np.ndarray, at_s: float) -> None:
        """Script the user saying `speech` (16 kHz float32) from `at_s` on."""
        self.user = _place(self.user, speech, at_s)

    def add_noise(self, noise: np.ndarray, at_s: float = 0.0) -> None:
        self.noise = _place(self.noise, noise, at_s)

    async def run_until(self, t_end: float) -> None:
        """Step the call until virtual time `t_end`."""
        track = self.session.output_track
        while self.clock.now < t_end - 1e-9:
            k = len(self.steps)
            self.clock.advance_to(k * STEP_S)
            frame = await track.recv()
            sent = frame.to_ndarray().reshape(-1)
            self.clock.advance_to((k + 1) * STEP_S)  # the mic frame of [k, k+1) is complete
            await self.mic.feed(self._mic_frame(k, sent), k * STEP)
            for _ in range(4):  # let the reply refill the track's queue
                await asyncio.sleep(0)
            self.steps.append(self._record(k, sent))

    def _mic_frame(self, k: int, sent: np.ndarray) -> np.ndarray:
        frame = _window(self.user, k) + _window(self.noise, k)
        if self.room is not None:
            frame = frame + self.room.echo(sent)
        return np.clip(frame, -1.0, 1.0).astype(np.float32)

    def _record(self, k: int, sent: np.ndarray) -> Step:
        track = self.session.output_track
        rms = float(np.sqrt(np.mean((sent / 32768.0) ** 2)))
        state = self.session.turns.state
        return Step(k * STEP_S, self._sent_audio, rms, state, track.queued_frames)

    # -- what happened --------------------------------------------------------------------

    def state_times(self) -> list[tuple[float, str]]:
        return list(self.session.turns.state_log)

    def messages(self, type_: str) -> list[dict]:
        return [m for m in map(json.loads, self.channel.sent) if m["type"] == type_]

    def interruptions(self) -> int:
        return sum(r.interrupted for r in self.session.turns.records)

    def last_audio_sent(self, before: float = float("inf")) -> float | None:
        times = [s.t for s in self.steps if s.sent_audio and s.t < before]
        return times[-1] if times else None

    def audio_frames_sent(self, start: float = 0.0, end: float = float("inf")) -> int:
        return sum(1 for s in self.steps if s.sent_audio and start <= s.t < end)

    async def close(self) -> None:
        await self.session.close()
        self.mic.stop()


def _place(track: np.ndarray, x: np.ndarray, at_s: float) -> np.ndarray:
    start = int(round(at_s * RATE))
    out = np.zeros(max(len(track), start + len(x)), np.float32)
    out[: len(track)] += track
    out[start : start + len(x)] += x
    return out


def _window(x: np.ndarray, k: int) -> np.ndarray:
    part = x[k * STEP : (k + 1) * STEP]
    return np.pad(part, (0, STEP - len(part))).astype(np.float32)


def speech_of(text: str, seconds: float, voice: str = "en-us", pitch: int = 50) -> np.ndarray:
    """`text` spoken (eSpeak NG, else synthetic speech), cut or looped to `seconds`."""
    return echo_sim.fit_length(echo_sim.speech(text, voice, pitch), int(seconds * RATE))


def click(seconds: float = 0.060, amp: float = 0.6, seed: int = 1) -> np.ndarray:
    """A broadband transient: a decaying noise burst (a knock, a dropped pen)."""
    n = int(seconds * RATE)
    rng = np.random.default_rng(seed)
    return (amp * rng.standard_normal(n) * np.exp(-np.arange(n) / (n / 4))).astype(np.float32)


def white_noise(seconds: float, dbfs: float, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (10 ** (dbfs / 20) * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


def reference_ends(user: np.ndarray, hangover_ms: int = 700) -> list[float]:
    """When an endpointer on the clean user signal alone (no echo, no canceller) ends turns."""
    endpointer = Endpointer(EndpointerConfig(hangover_ms=hangover_ms))
    ends = []
    for frame in echo_sim.frames(np.pad(user, (0, 2 * RATE))):
        ends += [e.detected_s for e in endpointer.process(frame) if isinstance(e, SpeechEnded)]
    return ends


@pytest.fixture(scope="module")
def agent_speech() -> np.ndarray:
    """Five seconds of the agent talking."""
    return speech_of(AGENT_TEXT, 5.0)


@pytest.fixture(scope="module")
def user_speech() -> np.ndarray:
    return speech_of("Excuse me, I have another question about that.", 1.5, "en-us+f3", 70)


# --- the scripted timeline ---------------------------------------------------------------------


@needs_aec3
async def test_user_cutting_in_at_4s_silences_the_agent_and_history_keeps_what_was_played(
    agent_speech: np.ndarray, user_speech: np.ndarray
) -> None:
    """The scripted timeline, on a call whose canceller has already learnt the room."""
    question = speech_of("What will the weather be like tomorrow in the city?", 2.0)
    call = SimulatedCall.start(agent_speech, echo_sim.room_path(0.25), echo_warmup_s=0.0)
    call.say(question, at_s=0.5)  # the user speaks 0.5-2.5 s
    call.say(user_speech, at_s=4.0)  # and cuts in at 4.0 s for 1.5 s
    await call.run_until(8.0)
    states = call.state_times()
    assert [s for _, s in states] == [
        "listening", "thinking", "speaking", "listening", "thinking", "speaking",
    ]  # fmt: skip
    _, (t_think, _), (t_speak, _), (t_barge, _), (t_think2, _), _ = states
    # the turn ends when an endpointer on the clean question would end it, within two frames
    end_question, end_cut_in = reference_ends(call.user)
    assert t_think == pytest.approx(end_question, abs=2 * STEP_S)
    assert 2.5 + 0.7 <= t_think <= 2.5 + 0.7 + 0.2  # one hangover after the stop + VAD hangover
    assert t_speak == pytest.approx(t_think, abs=0.02)
    # 150 ms of speech found in double talk; 0.7 s into the call's first answer AEC3 is still
    # converging and holds the user's first syllables down (later it takes ~0.2 s: see below)
    assert 4.0 + 0.15 <= t_barge <= 4.0 + 0.7
    # the converging canceller takes over 14 dB (`onset_max_removed_db`) off those syllables,
    # so no run of them ducked the answer first: the barge-in stops it
    assert call.messages("duck") == []
    # the agent's audio stops with the frame that was already on its way
    assert call.last_audio_sent(before=t_think2) == pytest.approx(t_barge - STEP_S, abs=1e-6)
    assert call.audio_frames_sent(t_barge, t_think2) == 0
    assert len(call.messages("flush")) == 1
    # the interrupted answer is remembered up to what was sent, and the next turn sees it
    first = call.engine.replies[0]
    played = call.audio_frames_sent(0, t_barge) * STEP_S
    assert first.cancelled and first.played_s == [pytest.approx(played)]
    assert played == pytest.approx(t_barge - t_speak, abs=0.03)
    (user_item, assistant_item) = call.session.turns.history[:2]
    words = AGENT_TEXT.split()
    assert assistant_item.interrupted
    assert assistant_item.text == " ".join(words[: round(len(words) * played / 5.0)])
    new_turn, history = call.engine.calls[1]
    assert history == [user_item, assistant_item]
    assert t_think2 == pytest.approx(end_cut_in, abs=2 * STEP_S)
    # the cut-in from the frame the detector found it (AEC3 held the first syllables down),
    # plus pre-roll and tail, up to its end
    assert 5.5 + 0.15 - (t_barge - 0.15 - 0.3) == pytest.approx(new_turn.duration_s, abs=0.1)
    # back-pressure: never more than three 20 ms frames queued ahead of the clock
    assert max(s.queued for s in call.steps) <= 3
    await call.close()


# --- echo, clicks and noise never barge in ----------------------------------------------------

ECHO_PATHS = [
    pytest.param(echo_sim.room_path(0.25), id="room-12dB"),
    pytest.param(echo_sim.room_path(0.5), id="room-6dB"),
    pytest.param(echo_sim.room_path(1.0), id="room-0dB"),
    pytest.param(echo_sim.delay_path(1.0), id="delay150-0dB"),
    pytest.param(echo_sim.EchoPath(20.0, 1.0, 60.0, drive=2.0), id="distorting-speaker"),
]


async def agent_answers_a_typed_turn(call: SimulatedCall, seconds: float) -> None:
    await call.session.turns.on_user_text("tell me about the weather")
    await call.run_until(seconds)


@needs_aec3
@pytest.mark.parametrize("path", ECHO_PATHS)
async def test_the_agents_own_echo_never_barges_in_nor_ducks_with_the_canceller_on(
    agent_speech: np.ndarray, path: echo_sim.EchoPath
) -> None:
    call = SimulatedCall.start(agent_speech, path)
    await agent_answers_a_typed_turn(call, 6.5)
    assert call.interruptions() == 0
    assert not call.session.turns.duck_log  # nor ducks it
    assert not call.session.turns.history[1].interrupted  # the whole answer was played
    assert call.audio_frames_sent() == pytest.approx(5.0 / STEP_S, abs=2)
    assert len(call.engine.calls) == 1  # and its echo tail did not become a user turn
    await call.close()


@needs_aec3
async def test_a_duck_confirmed_by_the_barge_in_stops_the_answer_at_the_duck(
    agent_speech: np.ndarray, user_speech: np.ndarray
) -> None:
    """Echo as loud as the user: the first 60 ms run of the user's speech ducks the answer
    (held, the client told to mute) before the barge-in is confirmed; the confirmed barge-in
    drops the held audio, and the history ends where the audio stopped: at the duck."""
    call = SimulatedCall.start(agent_speech, echo_sim.delay_path(1.0))
    call.say(user_speech, at_s=3.5)  # after the canceller's warm-up
    await agent_answers_a_typed_turn(call, 4.5)
    ducks = list(call.session.turns.duck_log)
    assert [e for _, e in ducks] == ["duck", "stop"]
    (t_duck, _), (t_stop, _) = ducks
    _, _, (t_speak, _), (t_barge, _) = call.state_times()
    assert t_stop == t_barge
    assert 3.5 + 0.06 <= t_duck <= t_barge - 0.1 <= 3.5 + 0.8
    assert call.last_audio_sent() == pytest.approx(t_duck - STEP_S, abs=1e-6)
    assert call.audio_frames_sent(t_duck) == 0  # nothing held went out
    assert len(call.messages("duck")) == len(call.messages("flush")) == 1
    assert call.messages("unduck") == []
    reply = call.engine.replies[0]
    played = call.audio_frames_sent(0, t_duck) * STEP_S
    assert reply.cancelled and reply.played_s == [pytest.approx(played)]
    assert played == pytest.approx(t_duck - t_speak, abs=0.03)
    assert call.session.turns.history[1].interrupted
    await call.close()


def record_sent_frames(call: SimulatedCall) -> list[np.ndarray]:
    """Every agent audio frame the call's track sends from now on (48 kHz int16 [960])."""
    sent: list[np.ndarray] = []
    call.session.output_track.add_frame_listener(
        lambda frame, is_audio: sent.append(frame.copy()) if is_audio else None
    )
    return sent


async def test_a_short_sound_over_the_answer_ducks_it_then_it_resumes_with_nothing_lost(
    agent_speech: np.ndarray, user_speech: np.ndarray
) -> None:
    """A 90 ms "eh" is a run of speech (it ducks the answer) but never a barge-in: after
    `duck_release_ms` the answer resumes with the 100 ms sent just before the duck (the client
    muted it on its way), then the held audio. Every frame is sent, in order, and the history
    keeps the whole answer."""
    reference = SimulatedCall.start(agent_speech, echo_canceller="none")
    expected = record_sent_frames(reference)
    await agent_answers_a_typed_turn(reference, 6.0)
    await reference.close()

    call = SimulatedCall.start(agent_speech, echo_canceller="none")
    sent = record_sent_frames(call)
    call.say(user_speech[: int(0.09 * RATE)], at_s=2.0)
    await agent_answers_a_typed_turn(call, 6.0)
    ducks = list(call.session.turns.duck_log)
    assert [e for _, e in ducks] == ["duck", "release"]
    (t_duck, _), (t_release, _) = ducks
    assert 2.06 <= t_duck <= 2.15
    assert t_release - t_duck == pytest.approx(0.4, abs=STEP_S + 1e-9)
    assert call.audio_frames_sent(t_duck, t_release) == 0  # silence while ducked
    assert len(call.messages("duck")) == len(call.messages("unduck")) == 1
    assert call.messages("flush") == [] and call.interruptions() == 0
    # the same frames as without the sound, the 5 before the duck twice; the first of those
    # fades in over its first 5 ms (it follows silence)
    k = call.audio_frames_sent(0, t_duck)
    replayed = expected[:k] + expected[k - 5 : k] + expected[k:]
    assert len(sent) == len(replayed)
    edge = EDGE_FADE_SAMPLES
    assert np.array_equal(sent[k][edge:], replayed[k][edge:])
    assert np.all(np.abs(sent[k][:edge].astype(int)) <= np.abs(replayed[k][:edge].astype(int)))
    del sent[k], replayed[k]
    assert all(np.array_equal(a, b) for a, b in zip(sent, replayed, strict=True))
    reply = call.engine.replies[0]
    assert not reply.cancelled and reply.played_s == [None]
    assert not call.session.turns.history[1].interrupted
    assert call.session.output_track.played_samples == len(expected) * 960
    await call.close()


async def test_without_a_canceller_the_echo_barges_in(agent_speech: np.ndarray) -> None:
    """The previous test's scene with the canceller off: shows what the canceller prevents."""
    call = SimulatedCall.start(agent_speech, echo_sim.room_path(0.5), echo_canceller="none")
    await agent_answers_a_typed_turn(call, 3.0)
    assert call.interruptions() >= 1
    await call.close()


@pytest.mark.parametrize("with_echo", [False, pytest.param(True, marks=needs_aec3)])
async def test_a_60ms_click_does_not_barge_in(agent_speech: np.ndarray, with_echo: bool) -> None:
    path = echo_sim.room_path(0.5) if with_echo else None
    call = SimulatedCall.start(agent_speech, path)
    call.say(click(), at_s=2.0)
    call.say(click(seed=5), at_s=3.0)
    await agent_answers_a_typed_turn(call, 5.5)
    assert call.interruptions() == 0
    await call.close()


@needs_aec3
@pytest.mark.parametrize("dbfs", [-40.0, -25.0])
async def test_steady_noise_does_not_barge_in(agent_speech: np.ndarray, dbfs: float) -> None:
    call = SimulatedCall.start(agent_speech, echo_sim.room_path(0.5))
    call.add_noise(white_noise(6.0, dbfs))
    await agent_answers_a_typed_turn(call, 5.5)
    assert call.interruptions() == 0
    await call.close()


# --- double talk --------------------------------------------------------------------------------


@needs_aec3
@pytest.mark.parametrize(
    ("path", "within_s"),
    [
        pytest.param(echo_sim.room_path(0.25), 0.5, id="room-12dB"),
        pytest.param(echo_sim.room_path(0.5), 0.5, id="room-6dB"),
        # echo as loud as the user: AEC3 holds the user down for longer in double talk
        pytest.param(echo_sim.room_path(1.0), 0.8, id="room-0dB"),
        pytest.param(echo_sim.delay_path(1.0), 0.8, id="delay150-0dB"),
    ],
)
async def test_barge_in_is_detected_in_double_talk(
    agent_speech: np.ndarray, user_speech: np.ndarray, path: echo_sim.EchoPath, within_s: float
) -> None:
    call = SimulatedCall.start(agent_speech, path)
    call.say(user_speech, at_s=3.5)  # after the canceller's warm-up
    await agent_answers_a_typed_turn(call, 4.5)
    assert call.interruptions() == 1
    barge_at = call.state_times()[3][0]
    assert 3.5 + 0.15 <= barge_at <= 3.5 + within_s
    await call.close()


@needs_aec3
async def test_the_warm_up_guard_holds_barge_in_until_it_ends(
    agent_speech: np.ndarray, user_speech: np.ndarray
) -> None:
    call = SimulatedCall.start(
        agent_speech, echo_canceller="none", turns=TurnConfig(barge_in_guard_ms=1000)
    )
    call.say(speech_of("No, no, no, wait, listen to me, I want something else.", 2.0), 0.2)
    await agent_answers_a_typed_turn(call, 2.5)
    first_audio = call.session.turns.records[0].first_audio_sent
    assert first_audio is not None
    barge_at = call.state_times()[3][0]
    assert barge_at == pytest.approx(first_audio + 1.0, abs=STEP_S)
    await call.close()


@needs_aec3
async def test_speech_during_the_cancellers_warm_up_is_ignored_and_later_speech_barges_in(
    agent_speech: np.ndarray, user_speech: np.ndarray
) -> None:
    """A new call's canceller has not learnt the room: its first seconds of echo look like a
    user, so speech over the agent counts only after `echo_warmup_s` of agent audio."""
    call = SimulatedCall.start(agent_speech, echo_sim.room_path(0.5))
    call.say(user_speech[:16_000], at_s=1.0)  # 1.0-2.0 s: within the 3 s warm-up
    call.say(user_speech, at_s=3.6)
    await agent_answers_a_typed_turn(call, 4.5)
    states = call.state_times()
    assert [s for _, s in states] == ["listening", "thinking", "speaking", "listening"]
    assert 3.6 + 0.15 <= states[3][0] <= 3.6 + 0.5
    assert len(call.engine.calls) == 1  # the speech in the warm-up did not become a turn
    await call.close()


@needs_aec3
async def test_a_call_without_echo_is_not_held_by_the_warm_up(
    agent_speech: np.ndarray, user_speech: np.ndarray
) -> None:
    """The client's own canceller works: the user can cut in early in the first answer."""
    call = SimulatedCall.start(agent_speech)  # the microphone hears only the user
    call.say(user_speech, at_s=1.5)
    await agent_answers_a_typed_turn(call, 2.5)
    assert call.session.echo_presence.echo_found is False
    assert call.interruptions() == 1
    assert 1.5 + 0.15 <= call.state_times()[3][0] <= 1.5 + 0.3
    await call.close()


# --- the user talking while the agent thinks ----------------------------------------------------


async def test_speech_while_the_agent_thinks_is_merged_into_one_turn_not_lost() -> None:
    call = SimulatedCall.start(speech_of(AGENT_TEXT, 1.0), think_s=1.0)
    first = speech_of("Turn on the kitchen lights.", 1.0)
    second = speech_of("And the hallway too please.", 1.0, pitch=60)
    call.say(first, at_s=0.3)  # ends 1.3 s -> thinking at 2.0 s
    call.say(second, at_s=2.5)  # resumes while the agent still thinks (until 3.0 s)
    await call.run_until(5.5)
    states = [s for _, s in call.state_times()]
    assert states[:4] == ["listening", "thinking", "listening", "thinking"]
    assert call.engine.replies[0].cancelled
    merged, history = call.engine.calls[1]
    assert history == []  # the dropped reply left nothing behind
    assert merged.audio is not None
    # both utterances are in the new turn: pre-roll + 1.0 s, then 0.5 s ... 1.0 s + tail
    assert merged.duration_s == pytest.approx(0.3 + 1.0 + 0.7 + 1.0 + 0.15, abs=0.15)
    assert "speaking" in states[4:]
    await call.close()


# --- the interrupt message ----------------------------------------------------------------------


async def test_interrupt_message_silences_the_agent_before_anything_queued_runs(
    agent_speech: np.ndarray,
) -> None:
    """Interruption bypasses the control queue: the track is empty the moment it arrives."""
    call = SimulatedCall.start(agent_speech)
    await agent_answers_a_typed_turn(call, 1.0)
    assert call.session.turns.state == "speaking"
    call.channel.emit("message", '{"type": "interrupt"}')
    assert call.session.output_track.queued_frames == 0  # no await has run yet
    assert len(call.messages("flush")) == 1
    await call.run_until(1.5)
    assert call.audio_frames_sent(1.0, 1.02) == 0
    reply = call.engine.replies[0]
    assert reply.cancelled
    assert reply.played_s[0] == pytest.approx(call.audio_frames_sent(0, 1.0) * STEP_S)
    assert call.session.turns.history[1].interrupted
    await call.close()


# --- the detector and the echo monitor on plain arrays -------------------------------------------


def evidence_over(x: np.ndarray, mic: np.ndarray | None = None) -> np.ndarray:
    """Evidence (ms) after each 10 ms frame of `x` (optionally with the raw microphone)."""
    detector = BargeInDetector()
    raw = echo_sim.frames(mic) if mic is not None else [None] * len(echo_sim.frames(x))
    return np.array([detector.process(f, m) for f, m in zip(echo_sim.frames(x), raw, strict=True)])


def test_detector_finds_speech_within_two_tenths_of_a_second(user_speech: np.ndarray) -> None:
    evidence = evidence_over(np.concatenate([np.zeros(RATE // 2, np.float32), user_speech]))
    onset = int(np.argmax(np.abs(user_speech) > 0.01)) // 160 + 50
    first = int(np.argmax(evidence >= TurnConfig().barge_in_ms))
    assert evidence[:onset].max() == 0
    assert 0.10 <= (first - onset) / 100 <= 0.25


def onset_over(x: np.ndarray, mic: np.ndarray | None = None) -> np.ndarray:
    """The detector's `onset_ms` run after each 10 ms frame of `x`."""
    detector = BargeInDetector()
    raw = echo_sim.frames(mic) if mic is not None else [None] * len(echo_sim.frames(x))
    runs = []
    for f, m in zip(echo_sim.frames(x), raw, strict=True):
        detector.process(f, m)
        runs.append(detector.onset_ms)
    return np.array(runs)


def test_detector_onset_run_reaches_a_duck_early_in_speech(user_speech: np.ndarray) -> None:
    runs = onset_over(np.concatenate([np.zeros(RATE // 2, np.float32), user_speech]))
    onset = int(np.argmax(np.abs(user_speech) > 0.01)) // 160 + 50
    first = int(np.argmax(runs >= TurnConfig().duck_ms))
    assert runs[:onset].max() == 0
    assert 0.05 <= (first - onset) / 100 <= 0.15  # well before the barge-in (0.10-0.25 s)


def test_detector_onset_run_of_a_click_never_reaches_a_duck() -> None:
    """A click dies away by several dB a frame: each frame far below the run's loudest starts a
    new run (`onset_max_drop_db`), so its run stays short even where the VAD calls it speech."""
    silence = np.zeros(RATE // 2, np.float32)
    x = np.concatenate([silence, click(), silence, click(seed=5), silence, click(seed=9)])
    assert onset_over(x).max() < TurnConfig().duck_ms


def test_detector_onset_run_ignores_frames_the_canceller_took_much_from(
    user_speech: np.ndarray,
) -> None:
    assert onset_over(0.15 * user_speech, mic=user_speech).max() == 0  # 16.5 dB removed
    assert onset_over(0.5 * user_speech, mic=user_speech).max() >= 200  # 6 dB removed


def test_detector_never_scores_a_click_as_a_barge_in() -> None:
    silence = np.zeros(RATE // 2, np.float32)
    evidence = evidence_over(np.concatenate([silence, click(), silence, click(seed=9), silence]))
    assert evidence.max() < TurnConfig().barge_in_ms


@pytest.mark.parametrize("dbfs", [-45.0, -30.0, -15.0])
def test_detector_ignores_steady_noise_however_loud(dbfs: float) -> None:
    assert evidence_over(white_noise(3.0, dbfs)).max() == 0


def test_detector_ignores_a_flat_noise_that_switches_on() -> None:
    """No speech edge: the counted frames of a noise onset do not move in level."""
    x = np.concatenate([np.zeros(RATE, np.float32), white_noise(2.0, -20.0)])
    assert evidence_over(x).max() == 0


def test_detector_ignores_frames_the_canceller_mostly_removed(user_speech: np.ndarray) -> None:
    """What is left of loud echo after cancelling is not the user, even if it sounds voiced."""
    residual = 0.05 * user_speech  # 26 dB below what the microphone heard
    assert evidence_over(residual, mic=user_speech).max() == 0
    assert evidence_over(0.7 * user_speech, mic=user_speech).max() >= 300


def feed_presence(far: np.ndarray, mic: np.ndarray) -> EchoPresence:
    presence = EchoPresence()
    for f, m in zip(echo_sim.frames(far), echo_sim.frames(mic), strict=True):
        presence.push_far(f)
        presence.push_mic(m)
    return presence


def test_echo_presence_recognises_the_agent_in_the_microphone(agent_speech: np.ndarray) -> None:
    mic = echo_sim.room_path(0.1).apply(agent_speech) + white_noise(5.0, -60.0)
    assert feed_presence(agent_speech, mic).echo_found is True


def test_echo_presence_says_no_echo_for_a_microphone_hearing_only_noise(
    agent_speech: np.ndarray,
) -> None:
    assert feed_presence(agent_speech, white_noise(5.0, -55.0)).echo_found is False


def test_echo_presence_never_says_no_echo_while_the_user_talks(
    agent_speech: np.ndarray, user_speech: np.ndarray
) -> None:
    """The user's voice can hide an echo: no verdict (or echo), never 'no echo'."""
    mic = np.resize(user_speech, len(agent_speech)) + white_noise(5.0, -60.0)
    assert feed_presence(agent_speech, mic).echo_found is not False
