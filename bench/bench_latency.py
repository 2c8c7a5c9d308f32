"""First-audio latency of the voice agent over a WebRTC loopback call.

Starts the real server in-process with an engine (offline by default), calls it with an aiortc
client whose microphone plays eSpeak NG phrases in real time, and prints per turn:

- endpoint: silence the endpointer waits before it ends the turn (its hangover)
- engine stages: what the engine reports in `Reply.timings` (e.g. asr, respond, tts)
- server: the user's actual stop (endpointer stop time) -> first answer frame leaving the server
- client: the last voiced microphone frame sent -> first answer audio received by the client
  (both aiortc jitter buffers included; a browser adds its own playout delay)

    python -m bench.bench_latency --turns 3
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import logging
import statistics
import subprocess
import tempfile
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from agent.session import SessionConfig
from agent.turns import TurnRecord
from audio_dsp import (
    EndpointerConfig,
    StreamResampler,
    float32_to_int16,
    int16_to_float32,
    to_mono_float32,
)
from signaling import REGISTRY_KEY, ServerConfig, create_app

PHRASES = (
    "hello there, how are you today",
    "what is the weather like in paris",
    "please tell me a short story",
    "thank you very much, goodbye",
)
RATE = 48_000
FRAME = 960
VOICED_PEAK = 0.02  # a frame louder than this counts as speech or answer audio


def speak(text: str) -> np.ndarray:
    """eSpeak NG speech as mono float32 at 48 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "phrase.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True)
        with wave.open(str(path)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    rs = StreamResampler(rate, RATE)
    return np.concatenate([rs.process(int16_to_float32(pcm)), rs.flush()])


class PhraseMic(MediaStreamTrack):
    """A clock-paced 48 kHz stereo microphone that plays queued phrases, silence otherwise."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._buffer = np.zeros(0, np.int16)
        self._start: float | None = None
        self._pts = 0
        self.last_voiced_sent = 0.0

    def say(self, samples: np.ndarray) -> None:
        self._buffer = np.concatenate([self._buffer, float32_to_int16(samples)])

    @property
    def busy(self) -> bool:
        return len(self._buffer) > 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pace()
        mono = np.zeros(FRAME, np.int16)
        chunk, self._buffer = self._buffer[:FRAME], self._buffer[FRAME:]
        mono[: len(chunk)] = chunk
        if len(chunk) and np.abs(chunk).max() > VOICED_PEAK * 32768:
            self.last_voiced_sent = time.monotonic()
        frame = AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), "s16", "stereo")
        frame.sample_rate, frame.pts = RATE, self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += FRAME
        return frame

    async def _pace(self) -> None:
        if self._start is None:
            self._start = time.monotonic()
            return
        delay = self._start + self._pts / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass
class Client:
    pc: RTCPeerConnection
    mic: PhraseMic
    states: list[tuple[float, str]] = field(default_factory=list)
    voiced_arrivals: list[float] = field(default_factory=list)
    state_changed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        self.mic.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.pc.close()


async def _listen(client: Client, track: MediaStreamTrack) -> None:
    try:
        while True:
            frame = await track.recv()
            mono = to_mono_float32(frame.to_ndarray(), len(frame.layout.channels))
            if np.abs(mono).max() > VOICED_PEAK:
                client.voiced_arrivals.append(time.monotonic())
    except MediaStreamError:
        return


async def connect(base_url: str) -> Client:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    client = Client(pc, PhraseMic())
    pc.addTrack(client.mic)
    channel = pc.createDataChannel("events")

    @channel.on("message")
    def on_message(raw: str) -> None:
        message = json.loads(raw)
        if message["type"] == "state":
            client.states.append((time.monotonic(), message["state"]))
            client.state_changed.set()

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        client.tasks.append(asyncio.create_task(_listen(client, track)))

    await pc.setLocalDescription(await pc.createOffer())
    offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
    async with aiohttp.ClientSession() as http, http.post(f"{base_url}/offer", json=offer) as r:
        r.raise_for_status()
        answer = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    await wait_for_states(client, lambda states: bool(states), 10.0)
    return client


async def wait_for_states(
    client: Client, done: Callable[[list[str]], bool], within_s: float, since: int = 0
) -> None:
    """Wait until `done(states received since index `since`)` holds."""
    async with asyncio.timeout(within_s):
        while not done([s for _, s in client.states[since:]]):
            client.state_changed.clear()
            await client.state_changed.wait()


async def run_turn(client: Client, phrase: np.ndarray, timeout_s: float) -> float | None:
    """Say a phrase, wait for the answer to finish; returns the client-side first-audio delay."""
    seen = len(client.states)
    client.mic.say(phrase)
    try:
        await wait_for_states(client, _answered, timeout_s, since=seen)
    except TimeoutError:
        return None
    await asyncio.sleep(0.5)  # let the jitter buffer hand over the last frames
    stop = client.mic.last_voiced_sent
    return next((t - stop for t in client.voiced_arrivals if t > stop), None)


def _answered(states: list[str]) -> bool:
    return "speaking" in states and states[-1] == "listening"


def ms(value: float | None) -> str:
    return "   -  " if value is None else f"{value * 1000:6.0f}"


def report(records: list[TurnRecord], client_delays: list[float | None], hangover_s: float) -> None:
    """One row per turn, one column per stage, in milliseconds."""
    stage_names = sorted({name for r in records for name in r.stages})
    header = ["turn", "endpoint", *stage_names, "server", "client"]
    widths = [max(8, len(h)) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for i, (record, delay) in enumerate(zip(records, client_delays, strict=False), 1):
        cells = [str(i), ms(hangover_s), *(ms(record.stages.get(n)) for n in stage_names)]
        cells += [ms(record.first_audio_latency), ms(delay)]
        print("  ".join(c.strip().rjust(w) for c, w in zip(cells, widths, strict=True)))
    server = [r.first_audio_latency for r in records if r.first_audio_latency is not None]
    client = [d for d in client_delays if d is not None]
    if server and client:
        print(
            f"median first audio: server {statistics.median(server) * 1000:.0f} ms, "
            f"client {statistics.median(client) * 1000:.0f} ms (all figures in ms)"
        )


async def bench(args: argparse.Namespace) -> None:
    from run_agent import make_engine

    engine = make_engine(args.engine, args.model_dir, args.device, args.quantization)
    await engine.start()
    session = SessionConfig(EndpointerConfig(hangover_ms=args.hangover_ms))
    app = create_app(engine, ServerConfig(session=session))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    client = await connect(f"http://{host}:{port}")
    try:
        (conn,) = app[REGISTRY_KEY].connections()
        delays = []
        for i in range(args.turns):
            delays.append(await run_turn(client, speak(PHRASES[i % len(PHRASES)]), 30.0))
            await asyncio.sleep(0.5)
        report(conn.session.turns.records, delays, args.hangover_ms / 1000)
    finally:
        await client.close()
        await runner.cleanup()
        await engine.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="First-audio latency over WebRTC loopback")
    p.add_argument("--engine", choices=("offline", "glm4voice"), default="offline")
    p.add_argument("--model-dir", type=Path, default=Path("checkpoints"))
    p.add_argument("--device", help="GLM-4-Voice device (default: cuda if present)")
    p.add_argument("--quantization", choices=("int4",))
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--hangover-ms", type=int, default=EndpointerConfig.hangover_ms)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
