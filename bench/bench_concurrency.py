"""How many concurrent calls this machine holds before the agent's outbound audio underruns.

Starts the real server in a child process (so its CPU can be measured apart from the clients)
with the fake engine (a scripted reply, no model work: the cost of WebRTC, Opus and the session)
or the offline engine (ASR, responder and eSpeak NG). For each load level it dials that many
aiortc clients on loopback, keeps every agent talking, and measures for a few seconds, on the
server, each outbound frame's release time against its 20 ms schedule:

- talking: the share of frames that carried agent audio (the rest is silence between replies)
- late: frames released more than one frame period (20 ms) after their slot
- max late: the worst lateness seen
- starved: silence sent while the agent was speaking (the engine did not keep up)
- server CPU: the child process's CPU time over the window (100% = one core), and per call

It stops at the first level with more than 1% late or starved frames (or failed calls).

    python -m bench.bench_concurrency --engine fake
    python -m bench.bench_concurrency --engine offline --levels 1,2,4,8 --window 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack

from agent.engine import Engine
from agent.tracks import AUDIO_PTIME
from signaling import REGISTRY_KEY, Connection, ServerConfig, create_app
from tests.webrtc_client import OfferRefused, negotiate, serve_app

log = logging.getLogger("bench.concurrency")

DEFAULT_LEVELS = (1, 2, 4, 6, 8, 12, 16, 24)
LATE_S = AUDIO_PTIME  # a frame released a whole period after its slot is an underrun
FAILURE_RATIO = 0.01
STATS_PATH = "/bench/stats"


# -- server side (child process) --------------------------------------------------------------


@dataclass
class TrackTiming:
    """Release times of one outbound track's frames against their 20 ms schedule."""

    first: float | None = None
    index: int = 0
    frames: int = 0
    audio: int = 0
    late: int = 0
    starved: int = 0
    max_late_s: float = 0.0

    def on_frame(self, is_audio: bool, speaking: bool) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        lateness = now - (self.first + self.index * AUDIO_PTIME)
        self.index += 1
        self.frames += 1
        self.audio += is_audio
        self.max_late_s = max(self.max_late_s, lateness)
        self.late += lateness > LATE_S
        self.starved += speaking and not is_audio

    def reset(self) -> None:
        self.frames = self.audio = self.late = self.starved = 0
        self.max_late_s = 0.0


@dataclass
class ServerStats:
    timings: dict[str, TrackTiming] = field(default_factory=dict)

    def watch(self, conn: Connection) -> None:
        timing = TrackTiming()
        self.timings[conn.id] = timing
        session = conn.session

        def listener(_frame: Any, is_audio: bool) -> None:
            timing.on_frame(is_audio, session.turns.state == "speaking")

        session.output_track.add_frame_listener(listener)

    def summary(self, live: set[str]) -> dict[str, Any]:
        timings = [t for cid, t in self.timings.items() if cid in live]
        return {
            "sessions": len(timings),
            "frames": sum(t.frames for t in timings),
            "audio": sum(t.audio for t in timings),
            "late": sum(t.late for t in timings),
            "starved": sum(t.starved for t in timings),
            "max_late_ms": 1000 * max((t.max_late_s for t in timings), default=0.0),
        }

    def reset(self) -> None:
        for timing in self.timings.values():
            timing.reset()


def make_engine(name: str) -> Engine:
    if name == "offline":
        from models.offline import OfflineEngine

        return OfflineEngine()
    from tests.fakes import FakeEngine, Script

    return FakeEngine(Script(audio_s=20.0, chunk_s=0.2, first_delay_s=0.05))


async def watch_connections(app: web.Application, stats: ServerStats) -> None:
    """Attach a timing listener to every new session's outbound track."""
    registry = app[REGISTRY_KEY]
    while True:
        for conn in registry.connections():
            if conn.id not in stats.timings:
                stats.watch(conn)
        await asyncio.sleep(0.05)


async def serve(engine_name: str, port: int) -> None:
    """Run the server with timing probes until stdin closes."""
    engine = make_engine(engine_name)
    await engine.start()
    config = ServerConfig(
        static_dir=Path(os.devnull), max_sessions=1000, offer_burst=100_000, idle_timeout_s=60
    )
    app = create_app(engine, config)
    stats = ServerStats()

    async def stats_handler(request: web.Request) -> web.Response:
        summary = stats.summary({c.id for c in app[REGISTRY_KEY].connections()})
        if request.query.get("reset"):
            stats.reset()
        return web.json_response(summary)

    app.router.add_get(STATS_PATH, stats_handler)
    try:
        async with serve_app(app, port, access_log=False):
            watcher = asyncio.create_task(watch_connections(app, stats), name="bench-watcher")
            print("READY", flush=True)
            try:
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
    finally:
        await engine.close()


# -- client side ------------------------------------------------------------------------------


@dataclass
class Caller:
    pc: RTCPeerConnection
    channel: Any
    states: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def hang_up(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.pc.close()


async def discard(track: MediaStreamTrack) -> None:
    """Consume the agent's audio (aiortc queues it without bound otherwise)."""
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()


async def keep_talking(caller: Caller, text: str) -> None:
    """Ask for a reply now and whenever the agent is back to listening."""
    asked = 0
    while True:
        listening = caller.states[-1:] == ["listening"]
        if listening and caller.channel.readyState == "open" and asked <= len(caller.states):
            caller.channel.send(json.dumps({"type": "text", "text": text}))
            asked = len(caller.states) + 2  # wait for thinking -> ... -> listening again
        await asyncio.sleep(0.1)


async def dial(http: aiohttp.ClientSession, url: str, text: str) -> Caller:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())  # clock-paced silence, like a muted microphone
    channel = pc.createDataChannel("events")
    caller = Caller(pc, channel)
    channel.on("message", lambda raw: _on_message(caller, raw))
    pc.on("track", lambda track: caller.tasks.append(asyncio.create_task(discard(track))))
    try:
        await negotiate(pc, url, http)
    except OfferRefused:
        await pc.close()
        raise
    caller.tasks.append(asyncio.create_task(keep_talking(caller, text)))
    return caller


def _on_message(caller: Caller, raw: str) -> None:
    message = json.loads(raw)
    if message.get("type") == "state":
        caller.states.append(message["state"])


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Level:
    calls: int
    connected: int
    frames: int
    audio: int
    late: int
    starved: int
    max_late_ms: float
    cpu_percent: float

    @property
    def bad_ratio(self) -> float:
        return (self.late + self.starved) / max(1, self.frames)

    @property
    def ok(self) -> bool:
        return self.connected == self.calls and self.bad_ratio <= FAILURE_RATIO


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_level(
    http: aiohttp.ClientSession, url: str, pid: int, calls: int, window_s: float, text: str
) -> Level:
    results = await asyncio.gather(
        *(dial(http, url, text) for _ in range(calls)), return_exceptions=True
    )
    callers = [r for r in results if isinstance(r, Caller)]
    try:
        await asyncio.sleep(1.5)  # connect, first reply under way
        async with http.get(f"{url}{STATS_PATH}?reset=1"):
            pass
        cpu_before, start = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(window_s)
        cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - start)
        async with http.get(f"{url}{STATS_PATH}") as resp:
            stats = await resp.json()
    finally:
        await asyncio.gather(*(c.hang_up() for c in callers))
    await wait_for_no_sessions(http, url)
    return Level(
        calls,
        stats["sessions"],
        stats["frames"],
        stats["audio"],
        stats["late"],
        stats["starved"],
        stats["max_late_ms"],
        100 * cpu,
    )


async def wait_for_no_sessions(http: aiohttp.ClientSession, url: str, within_s: float = 15) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        async with http.get(f"{url}/healthz") as resp:
            if (await resp.json())["sessions"] == 0:
                return
        await asyncio.sleep(0.2)
    log.warning("sessions still open after %.0f s", within_s)


def print_row(level: Level) -> None:
    per_call = level.cpu_percent / max(1, level.connected)
    print(
        f"{level.calls:>5} {level.connected:>9} {level.frames:>7} "
        f"{100 * level.audio / max(1, level.frames):>7.0f}% {level.late:>6} "
        f"{level.starved:>7} {level.max_late_ms:>11.1f} {level.cpu_percent:>10.0f}% "
        f"{per_call:>12.1f}%  {'ok' if level.ok else 'UNDERRUN'}",
        flush=True,
    )


async def bench(args: argparse.Namespace) -> None:
    port = free_port()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bench_concurrency", "--serve", "--engine", args.engine,
        "--port", str(port), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stdin is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 120)
        if line.strip() != b"READY":
            raise SystemExit("the server did not start")
        await measure_levels(args, f"http://127.0.0.1:{port}", child.pid)
    finally:
        child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), 20)
        except TimeoutError:
            child.kill()
            await child.wait()


async def measure_levels(args: argparse.Namespace, url: str, pid: int) -> None:
    print(f"engine {args.engine}, {os.cpu_count()} CPU cores, {args.window:g} s per level")
    print("calls connected  frames talking   late starved max late ms server CPU CPU per call")
    async with aiohttp.ClientSession() as http:
        best = 0
        for calls in args.levels:
            level = await run_level(http, url, pid, calls, args.window, args.text)
            print_row(level)
            if not level.ok:
                break
            best = calls
    print(f"held without underruns: {best} concurrent call(s)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine", choices=("fake", "offline"), default="fake")
    p.add_argument(
        "--levels",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=DEFAULT_LEVELS,
        help="comma-separated numbers of concurrent calls",
    )
    p.add_argument("--window", type=float, default=5.0, help="seconds measured per level")
    p.add_argument("--text", default="please tell me a long story", help="what each caller asks")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.serve:
        asyncio.run(serve(args.engine, args.port))
    else:
        asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
