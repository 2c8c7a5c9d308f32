"""An in-process aiortc caller for the real app, and the app served on a loopback port.

`dial()` connects a client whose microphone is a clock-paced track (a `MicTrack` unless one is
given), opens the `events` data channel and records what the server sends: every message and
every received audio frame, each with its arrival time. `Call.muted_spans()` tells when the
browser client (`static/voice-agent.js`) would have muted the agent on those messages, so the
audio it would have played can be told from the audio received. `serve_app()` runs an app on
127.0.0.1 for the length of an `async with` block.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.engine import Engine
from agent.session import SessionConfig
from audio_dsp import to_mono_float32
from signaling import ServerConfig, create_app
from tests.fakes import MicTrack, wait_until

VOICED_PEAK = 0.02  # a received frame peaking above this carries agent audio
# static/voice-agent.js: how long the page mutes the agent after a `flush`, and at most after
# a `duck` that neither `unduck` nor `flush` follows.
CLIENT_FLUSH_MUTE_S = 0.300
CLIENT_DUCK_MUTE_MAX_S = 3.0


class OfferRefused(RuntimeError):
    """The server answered the offer with something other than 200."""


@dataclass
class Call:
    """The client side of one call, recording everything the server sends."""

    pc: RTCPeerConnection
    mic: Any  # the outbound track: a MicTrack or another clock-paced microphone
    channel: Any  # the `events` RTCDataChannel
    messages: list[tuple[float, dict]] = field(default_factory=list)  # (arrival, message)
    audio: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (arrival, mono 48k)
    reader: asyncio.Task[None] | None = None

    def of_type(self, type_: str) -> list[dict]:
        return [m for _, m in self.messages if m["type"] == type_]

    def states(self) -> list[str]:
        return [m["state"] for m in self.of_type("state")]

    def first(self, type_: str) -> float | None:
        """Arrival time of the first message of `type_`."""
        return next((t for t, m in self.messages if m["type"] == type_), None)

    def send(self, message: dict) -> None:
        self.channel.send(json.dumps(message))

    def voiced_audio(self, threshold: float = VOICED_PEAK) -> np.ndarray:
        frames = [f for _, f in self.audio if np.abs(f).max() > threshold]
        return np.concatenate(frames) if frames else np.zeros(0, np.float32)

    def first_audio_arrival(self, after: float, threshold: float = VOICED_PEAK) -> float | None:
        return next((t for t, f in self.audio if t > after and np.abs(f).max() > threshold), None)

    def last_audio(
        self, start: float, end: float, threshold: float = VOICED_PEAK, played: bool = False
    ) -> float | None:
        """Arrival time of the last frame with agent audio in [start, end).

        `played`: only frames the browser client would have played (not muted on arrival).
        """
        spans = self.muted_spans() if played else []
        times = [
            t
            for t, f in self.audio
            if start <= t < end
            and np.abs(f).max() > threshold
            and not any(a <= t < b for a, b in spans)
        ]
        return times[-1] if times else None

    def muted_spans(self) -> list[tuple[float, float]]:
        """[start, end) arrival-time spans in which the browser client mutes the agent's audio.

        Mirrors `static/voice-agent.js`: `duck` and `flush` mute at once, until `unduck`, or
        until a timer runs out (`CLIENT_FLUSH_MUTE_S` after the last `flush`,
        `CLIENT_DUCK_MUTE_MAX_S` after a `duck`).
        """
        spans: list[tuple[float, float]] = []
        start: float | None = None
        deadline = 0.0
        for t, message in self.messages:
            if start is not None and t >= deadline:
                spans.append((start, deadline))
                start = None
            kind = message.get("type")
            if kind in ("duck", "flush"):
                start = t if start is None else start
                deadline = t + (CLIENT_DUCK_MUTE_MAX_S if kind == "duck" else CLIENT_FLUSH_MUTE_S)
            elif kind == "unduck" and start is not None:
                spans.append((start, t))
                start = None
        if start is not None:
            spans.append((start, deadline))
        return spans

    async def vanish(self) -> None:
        """Take the client off the network: its ICE sockets close, nothing is said to the server."""
        await self.pc.sctp.transport.transport._connection.close()

    async def hang_up(self) -> None:
        self.mic.stop()
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        await self.pc.close()


async def _record(
    call: Call, track: MediaStreamTrack, on_frame: Callable[[np.ndarray], None] | None
) -> None:
    try:
        while True:
            frame = await track.recv()
            mono = to_mono_float32(frame.to_ndarray(), len(frame.layout.channels))
            call.audio.append((time.monotonic(), mono))
            if on_frame is not None:
                on_frame(mono)
    except MediaStreamError:
        return


async def negotiate(
    pc: RTCPeerConnection,
    base_url: str,
    http: aiohttp.ClientSession | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Post `pc`'s offer to `base_url`/offer and apply the answer; OfferRefused unless 200."""
    await pc.setLocalDescription(await pc.createOffer())
    offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
    async with AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(aiohttp.ClientSession())
        async with http.post(f"{base_url}/offer", json=offer, headers=headers) as resp:
            if resp.status != 200:
                raise OfferRefused(f"offer refused: {resp.status} {await resp.text()}")
            answer = await resp.json()
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))


async def offering_peer() -> tuple[RTCPeerConnection, MicTrack]:
    """A peer connection with a microphone and the `events` channel, its offer set locally."""
    pc = RTCPeerConnection()
    mic = MicTrack()
    pc.addTrack(mic)
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, mic


async def dial(
    base_url: str,
    mic: MediaStreamTrack | None = None,
    on_frame: Callable[[np.ndarray], None] | None = None,
    headers: dict[str, str] | None = None,
    within: float = 5.0,
) -> Call:
    """Connect an aiortc client to the server at `base_url`, ready to talk.

    `mic` is the outbound track (a new `MicTrack` by default); `on_frame` gets each received
    frame as 48 kHz mono float32 once it is recorded (a loudspeaker the microphone can hear).
    Returns once the channel is open and the agent is listening.
    """
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    mic = MicTrack() if mic is None else mic
    pc.addTrack(mic)
    channel = pc.createDataChannel("events")
    call = Call(pc, mic, channel)
    channel.on("message", lambda raw: call.messages.append((time.monotonic(), json.loads(raw))))

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        call.reader = asyncio.create_task(_record(call, track, on_frame))

    await negotiate(pc, base_url, headers=headers)
    await wait_until(
        lambda: channel.readyState == "open" and call.states() == ["listening"], within=within
    )
    return call


@asynccontextmanager
async def serve_app(
    app: web.Application, port: int = 0, access_log: bool = True
) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 (a free port by default); yields its base URL, then shuts down."""
    runner = web.AppRunner(app) if access_log else web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        host, bound = runner.addresses[0][:2]
        yield f"http://{host}:{bound}"
    finally:
        await runner.cleanup()


StartServer = Callable[..., Awaitable[tuple[str, web.Application]]]


@asynccontextmanager
async def app_servers(
    static_dir: Path, session: SessionConfig | None = None
) -> AsyncIterator[StartServer]:
    """Yields `start(engine, session=None)`: the real app on a loopback port, as (URL, app).

    A `start` without a session config uses `session` (else the default one). Every app
    started is shut down when the block ends.
    """
    async with AsyncExitStack() as stack:

        async def start(
            engine: Engine, session_config: SessionConfig | None = None
        ) -> tuple[str, web.Application]:
            config = session_config or session or SessionConfig()
            app = create_app(engine, ServerConfig(static_dir=static_dir, session=config))
            return await stack.enter_async_context(serve_app(app)), app

        yield start
