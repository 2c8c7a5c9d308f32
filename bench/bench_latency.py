"""First-audio latency of the voice agent over a WebRTC loopback call.

Starts the real server in-process with an engine (offline by default), calls it with an aiortc
client whose microphone plays eSpeak NG phrases in real time, and prints per turn:

- endpoint: silence the endpointer waits before it ends the turn (its hangover)
- early: whether the answer was started at a pause (`pause_ms` of silence), before the hangover
  ended the turn, and used
- engine stages: what the engine reports in `Reply.timings` (e.g. asr, respond, tts)
- server: the user's actual stop (endpointer stop time) -> first answer frame leaving the server
- client: the last voiced microphone frame sent -> first answer audio received by the client
  (both aiortc jitter buffers included; a browser adds its own playout delay)

    python -m bench.bench_latency --turns 3

By default every turn is said twice: with early replies off (`--pause-ms 0`) and on (the
endpointer's default pause), on the same engine, and the medians are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from agent.engine import Engine
from agent.session import SessionConfig
from agent.turns import TurnRecord
from audio_dsp import EndpointerConfig, StreamResampler, int16_to_float32
from signaling import REGISTRY_KEY, ServerConfig, create_app
from tests.fakes import wait_until
from tests.webrtc_client import Call, dial, serve_app

PHRASES = (
    "hello there, how are you today",
    "what is the weather like in paris",
    "please tell me a short story",
    "thank you very much, goodbye",
)
RATE = 48_000
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


async def run_turn(call: Call, phrase: np.ndarray, timeout_s: float) -> float | None:
    """Say a phrase, wait for the answer to finish; returns the client-side first-audio delay."""
    seen = len(call.states())
    call.mic.say(phrase, RATE)
    try:
        await wait_until(lambda: _answered(call.states()[seen:]), within=timeout_s)
    except AssertionError:  # not answered in time
        return None
    await asyncio.sleep(0.5)  # let the jitter buffer hand over the last frames
    stop = call.mic.last_voiced_sent
    arrival = call.first_audio_arrival(stop, VOICED_PEAK)
    return None if arrival is None else arrival - stop


def _answered(states: list[str]) -> bool:
    return "speaking" in states and states[-1] == "listening"


def ms(value: float | None) -> str:
    return "   -  " if value is None else f"{value * 1000:6.0f}"


def report(
    records: list[TurnRecord], client_delays: list[float | None], hangover_s: float
) -> tuple[float, float] | None:
    """One row per turn, one column per stage, in milliseconds; returns the (server, client)
    medians in seconds."""
    stage_names = sorted({name for r in records for name in r.stages})
    header = ["turn", "endpoint", "early", *stage_names, "server", "client"]
    widths = [max(8, len(h)) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for i, (record, delay) in enumerate(zip(records, client_delays, strict=False), 1):
        cells = [str(i), ms(hangover_s), "yes" if record.early else "no"]
        cells += [ms(record.stages.get(n)) for n in stage_names]
        cells += [ms(record.first_audio_latency), ms(delay)]
        print("  ".join(c.strip().rjust(w) for c, w in zip(cells, widths, strict=True)))
    server = [r.first_audio_latency for r in records if r.first_audio_latency is not None]
    client = [d for d in client_delays if d is not None]
    if not (server and client):
        return None
    medians = statistics.median(server), statistics.median(client)
    print(
        f"median first audio: server {medians[0] * 1000:.0f} ms, "
        f"client {medians[1] * 1000:.0f} ms (all figures in ms)"
    )
    return medians


async def one_call(
    engine: Engine, args: argparse.Namespace, pause_ms: int
) -> tuple[float, float] | None:
    """`args.turns` turns in one call whose endpointer reports pauses after `pause_ms`."""
    endpointer = EndpointerConfig(hangover_ms=args.hangover_ms, pause_ms=pause_ms)
    app = create_app(engine, ServerConfig(session=SessionConfig(endpointer)))
    async with serve_app(app, access_log=False) as url:
        call = await dial(url, within=10.0)
        try:
            (conn,) = app[REGISTRY_KEY].connections()
            delays = []
            for i in range(args.turns):
                delays.append(await run_turn(call, speak(PHRASES[i % len(PHRASES)]), 30.0))
                await asyncio.sleep(0.5)
            return report(conn.session.turns.records, delays, args.hangover_ms / 1000)
        finally:
            await call.hang_up()


async def bench(args: argparse.Namespace) -> None:
    from run_agent import GLMChoices, make_engine

    engine = make_engine(args.engine, args.model_dir, GLMChoices.from_args(args))
    await engine.start()
    medians: dict[int, tuple[float, float] | None] = {}
    try:
        for pause_ms in args.pause_ms:
            label = (
                f"early replies after {pause_ms} ms of silence" if pause_ms else "no early replies"
            )
            print(f"\n{label} (hangover {args.hangover_ms} ms)")
            medians[pause_ms] = await one_call(engine, args, pause_ms)
    finally:
        await engine.close()
    off, on = medians.get(0), next((m for p, m in medians.items() if p), None)
    if off and on:
        print(
            f"\nearly replies: median first audio x{on[0] / off[0]:.2f} at the server, "
            f"x{on[1] / off[1]:.2f} at the client ({1000 * (off[1] - on[1]):.0f} ms sooner)"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="First-audio latency over WebRTC loopback")
    p.add_argument("--engine", choices=("offline", "glm4voice"), default="offline")
    p.add_argument("--model-dir", type=Path, default=Path("checkpoints"))
    p.add_argument("--device", help="GLM-4-Voice device (default: cuda if present)")
    p.add_argument("--quantization", choices=("int4",))
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--hangover-ms", type=int, default=EndpointerConfig.hangover_ms)
    p.add_argument(
        "--pause-ms",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[0, EndpointerConfig.pause_ms],
        help="comma list of pauses to start early replies after, one call each (0 = off)",
    )
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
