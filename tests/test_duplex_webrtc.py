"""Full duplex over real WebRTC on loopback: an aiortc client talks over the agent.

The client is a speakerphone without echo cancellation: its microphone hears the agent's audio
(as received over WebRTC) at -6 dB on top of the user's own voice. The server's canceller must
keep that echo from interrupting the agent, and the user's voice must still stop it quickly.
Stop latency here = the user's speech onset at the client -> the last agent audio frame with
energy received by the client. `bench/bench_bargein.py` measures its distribution.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from agent.session import SessionConfig
from audio_dsp import EndpointerConfig, StreamResampler, float32_to_int16
from audio_dsp.aec import available_backends
from signaling import REGISTRY_KEY
from tests.fakes import wait_until
from tests.test_barge_in import AGENT_TEXT, SpeakingEngine, VirtualClock, speech_of
from tests.webrtc_client import app_servers, dial

RATE = 48_000
FRAME = 960  # 20 ms
ENERGY = 0.01  # a received frame peaking above this carries agent audio


class ClientMic(MediaStreamTrack):
    """The caller's microphone: scripted speech plus, optionally, the agent's echo.

    Frames are 20 ms of 48 kHz mono s16, paced by the clock. `say()` queues speech and records
    when its first audible sample actually leaves (`onsets`). Audio passed to `hear()` (what
    the speaker plays) comes back into the microphone at `echo_gain`.
    """

    kind = "audio"

    def __init__(self, echo_gain: float = 0.0) -> None:
        super().__init__()
        self.echo_gain = echo_gain
        self._speech = np.zeros(0, np.float32)
        self._lead: deque[int] = deque()  # samples until each queued utterance's onset
        self._echo = np.zeros(0, np.float32)
        self._start: float | None = None
        self._pts = 0
        self.onsets: list[float] = []

    def say(self, samples: np.ndarray, sample_rate: int) -> None:
        """Queue mono float32 speech to be spoken once what is queued has been."""
        rs = StreamResampler(sample_rate, RATE)
        up = np.concatenate([rs.process(samples), rs.flush()])
        audible = int(np.argmax(np.abs(up) > ENERGY))
        self._lead.append(len(self._speech) + audible)
        self._speech = np.concatenate([self._speech, up])

    def hear(self, samples: np.ndarray) -> None:
        """The loudspeaker played `samples` (48 kHz mono float32)."""
        if self.echo_gain > 0:
            self._echo = np.concatenate([self._echo, self.echo_gain * samples])[-RATE:]

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pace()
        frame = _take(self, "_speech") + _take(self, "_echo")
        self._note_onsets()
        out = AudioFrame.from_ndarray(
            float32_to_int16(frame).reshape(1, -1), format="s16", layout="mono"
        )
        out.sample_rate, out.pts, out.time_base = RATE, self._pts, fractions.Fraction(1, RATE)
        self._pts += FRAME
        return out

    def _note_onsets(self) -> None:
        now = time.monotonic()
        lead = [n - FRAME for n in self._lead]
        while lead and lead[0] < 0:
            self.onsets.append(now + (lead.pop(0) + FRAME) / RATE)
        self._lead = deque(lead)

    async def _pace(self) -> None:
        if self._start is None:
            self._start = time.monotonic()
            return
        wait = self._start + self._pts / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)


def _take(mic: ClientMic, name: str) -> np.ndarray:
    buffer: np.ndarray = getattr(mic, name)
    part, rest = buffer[:FRAME], buffer[FRAME:]
    setattr(mic, name, rest)
    return np.pad(part, (0, FRAME - len(part)))


@pytest.fixture
async def serve(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start the real app on a free loopback port; yields start(engine, session config)."""
    async with app_servers(tmp_path) as start:
        yield start


@pytest.mark.slow
@pytest.mark.skipif("aec3" not in available_backends(), reason="pywebrtc-audio is not installed")
async def test_user_speech_stops_the_agent_over_webrtc_while_its_echo_does_not(serve) -> None:  # type: ignore[no-untyped-def]
    engine = SpeakingEngine(speech_of(AGENT_TEXT, 6.0), VirtualClock())
    base_url, app = await serve(engine, SessionConfig(EndpointerConfig(hangover_ms=600)))
    mic = ClientMic(echo_gain=0.5)
    call = await dial(base_url, mic, on_frame=mic.hear)
    try:
        call.send({"type": "text", "text": "tell me about the weather"})
        await wait_until(lambda: "speaking" in call.states(), within=5)
        await asyncio.sleep(3.5)  # the echo alone plays back into the microphone meanwhile
        assert call.states() == ["listening", "thinking", "speaking"]
        call.mic.say(speech_of("Excuse me, I have another question.", 1.2, "en-us+f3", 70), 16_000)
        await wait_until(lambda: call.first("flush") is not None, within=3)
        await asyncio.sleep(0.6)  # what was already on its way drains from the jitter buffer
        (onset,) = call.mic.onsets
        stopped = call.last_audio(onset, onset + 1.0, ENERGY)
        assert stopped is not None
        assert stopped - onset < 1.5
        assert (
            call.last_audio(stopped + 0.001, onset + 1.0, ENERGY) is None
        )  # silence after the stop
        ((conn),) = app[REGISTRY_KEY].connections()
        records = conn.session.turns.records
        assert [r.interrupted for r in records][:1] == [True]
        await wait_until(lambda: len(engine.calls) >= 2, within=5)
        assistant = engine.calls[1][1][1]
        assert assistant.interrupted and 0 < len(assistant.text.split()) < len(AGENT_TEXT.split())
    finally:
        await call.hang_up()
