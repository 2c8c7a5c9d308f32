"""Barge-in: false interruptions from echo, detection in double talk, and stop latency.

    python -m bench.bench_bargein                     # ~2.5 min on one core
    python -m bench.bench_bargein --trials 30 --webrtc-trials 5
    python -m bench.bench_bargein --echo-seconds 10 --double-talk-trials 0 --webrtc-trials 0

1. Echo only (virtual time, `tests/test_barge_in.SimulatedCall`): the agent answers with 4 s of
   eSpeak NG speech (varied texts and voices; `--echo-seconds`) that comes back through a random
   simulated room (echo -14..0 dB, room delay 10-200 ms, reverberation 0-120 ms, a distorting
   loudspeaker in a quarter of the rooms, 40-150 ms of network on top). Counted: trials with a
   false barge-in, with a false duck (a provisional barge-in, released later), and trials where
   the echo became a user turn, with the canceller on (`auto`) and off. The canceller's 3 s
   warm-up holds barge-in (and ducking) off for the first 3 s of each answer.
2. Double talk (virtual time): the user cuts in 3.2-5 s into the call's first answer, after
   the canceller's 3 s warm-up (varied utterances, -6..0 dB); detection delay = user speech
   onset -> barge-in confirmed, server stop = onset -> the agent's last audio frame sent (the
   duck, when one came first); "released" = trials where a duck was released although the
   user went on talking. "clean" = no echo and no canceller (the detector alone).
3. Over WebRTC on loopback (real time, aiortc client, echo at -12 dB at the client): onset at
   the client -> last agent frame sent by the server, -> last agent frame with energy received
   by the client, and -> last such frame the browser client would have played (it mutes the
   agent on `duck` and `flush`: `Call.muted_spans`), after one warm-up answer for the
   canceller. "stopped" = trials where the server stopped within 1 s of the onset, not before
   it; "quiet" = trials where the agent was in a pause at the client from the onset until it
   stopped (no client figure); "stale" = agent frames received more than 250 ms after the
   server sent its last one (audio that outlived the flush).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import web

from agent.engine import HistoryItem, UserTurn
from agent.session import SessionConfig
from audio_dsp import EndpointerConfig
from signaling import REGISTRY_KEY, ServerConfig, create_app
from tests import echo_sim
from tests.fakes import wait_until
from tests.test_barge_in import (
    STEP_S,
    SimulatedCall,
    SpeakingEngine,
    SpokenReply,
    VirtualClock,
    speech_of,
)
from tests.test_duplex_webrtc import ENERGY, ClientMic
from tests.webrtc_client import dial, serve_app

AGENT_LINES = [
    "Here is a rather long answer about the weather tomorrow, sunny then cloudy.",
    "Let me tell you about the history of this small town by the river.",
    "The recipe needs two eggs, a cup of flour, some milk and a pinch of salt.",
    "Numbers one two three four five six seven eight nine ten eleven twelve.",
    "Your train leaves at seven fifteen from platform four, so arrive early.",
]
USER_LINES = [
    "Excuse me, I have another question about that.",
    "Hold on a second, I want to ask something else.",
    "No no no, that is not what I meant at all.",
    "Wait, can you repeat the last part please?",
    "Stop, tell me about the weekend instead.",
]
VOICES = [("en-us", 50), ("en-gb", 40), ("en-us+f3", 70), ("en-us+m3", 30)]
ONSET_THRESHOLD = 0.01

_log = logging.getLogger("bench.bargein")


def random_path(rng: np.random.Generator) -> tuple[echo_sim.EchoPath, float]:
    """A random room and network delay (ms)."""
    path = echo_sim.EchoPath(
        delay_ms=float(rng.uniform(10, 200)),
        gain=float(10 ** (rng.uniform(-14, 0) / 20)),
        reverb_ms=float(rng.choice([0.0, rng.uniform(30, 120)])),
        drive=2.0 if rng.random() < 0.25 else 0.0,
        seed=int(rng.integers(1 << 16)),
    )
    return path, float(rng.uniform(40, 150))


def agent_audio(rng: np.random.Generator, seconds: float) -> np.ndarray:
    voice, pitch = VOICES[int(rng.integers(len(VOICES)))]
    return speech_of(AGENT_LINES[int(rng.integers(len(AGENT_LINES)))], seconds, voice, pitch)


# --- 1. echo only ---------------------------------------------------------------------------


@dataclass
class EchoResult:
    trials: int = 0
    false_barge_ins: int = 0
    false_ducks: int = 0
    false_turns: int = 0


async def echo_trial(seed: int, canceller: str, seconds: float = 4.0) -> tuple[bool, bool, bool]:
    """(barged in, ducked, made a turn) on the agent's own echo alone."""
    rng = np.random.default_rng(seed)
    path, network_ms = random_path(rng)
    call = SimulatedCall.start(
        agent_audio(rng, seconds), path, echo_canceller=canceller, network_delay_ms=network_ms
    )
    await call.session.turns.on_user_text("talk to me")
    await call.run_until(seconds + 0.8)
    ducked = any(event == "duck" for _, event in call.session.turns.duck_log)
    result = call.interruptions() > 0, ducked, len(call.engine.calls) > 1
    await call.close()
    return result


async def echo_only(trials: int, seconds: float = 4.0) -> dict[str, EchoResult]:
    results = {name: EchoResult() for name in ("auto", "none")}
    for seed in range(trials):
        for name, result in results.items():
            barged, ducked, turned = await echo_trial(seed, name, seconds)
            result.trials += 1
            result.false_barge_ins += barged
            result.false_ducks += ducked
            result.false_turns += turned
    return results


# --- 2. double talk ---------------------------------------------------------------------------


@dataclass
class DetectResult:
    delays: list[float] = field(default_factory=list)  # onset -> barge-in
    stops: list[float] = field(default_factory=list)  # onset -> last agent frame sent
    missed: int = 0
    released: int = 0  # ducks released while the user was talking


async def double_talk_trial(seed: int, clean: bool) -> tuple[float, float, bool] | None:
    """(onset -> barge-in, onset -> last agent frame sent, a duck was released), or None."""
    rng = np.random.default_rng(1000 + seed)
    path, network_ms = random_path(rng)
    voice, pitch = VOICES[int(rng.integers(len(VOICES)))]
    user = speech_of(USER_LINES[int(rng.integers(len(USER_LINES)))], 1.5, voice, pitch)
    user = user * float(10 ** (rng.uniform(-6, 0) / 20))
    call = SimulatedCall.start(
        agent_audio(rng, 6.5),
        None if clean else path,
        echo_canceller="none" if clean else "auto",
        network_delay_ms=network_ms,
    )
    at = float(rng.uniform(3.2, 5.0))
    call.say(user, at)
    onset = at + int(np.argmax(np.abs(user) > ONSET_THRESHOLD)) / 16_000
    await call.session.turns.on_user_text("talk to me")
    await call.run_until(onset + 1.5)
    barge = next((t for t, s in call.state_times()[3:4] if s == "listening"), None)
    last_sent = call.last_audio_sent()
    released = any(e == "release" and t > onset for t, e in call.session.turns.duck_log)
    await call.close()
    if barge is None or barge < onset or last_sent is None:
        return None
    return barge - onset, last_sent + STEP_S - onset, released


async def double_talk(trials: int) -> dict[str, DetectResult]:
    results = {"aec3, random room": DetectResult(), "clean (no echo)": DetectResult()}
    for seed in range(trials):
        for name, result in results.items():
            found = await double_talk_trial(seed, clean=name.startswith("clean"))
            if found is None:
                result.missed += 1
            else:
                result.delays.append(found[0])
                result.stops.append(found[1])
                result.released += found[2]
    return results


# --- 3. over WebRTC -----------------------------------------------------------------------------


class BenchEngine(SpeakingEngine):
    """Typed turns get a long spoken answer; spoken turns (the cut-ins) a silent one."""

    def respond(self, turn: UserTurn, history: Sequence[HistoryItem]) -> SpokenReply:
        reply = super().respond(turn, history)
        if turn.audio is not None:
            reply.audio = reply.audio[:0]
        return reply


@dataclass
class WebRtcResult:
    trials: int = 0
    server_stop: list[float] = field(default_factory=list)
    client_stop: list[float] = field(default_factory=list)  # received
    played_stop: list[float] = field(default_factory=list)  # played by the browser client
    stale_frames: int = 0
    quiet: int = 0  # the agent was in a pause at the client from the onset on
    early: int = 0  # the server stopped before the onset (echo or a glitch)
    late: int = 0  # the server had not stopped 1 s after the onset
    released: int = 0  # ducks released although the user was talking

    @property
    def stopped(self) -> int:
        return self.trials - self.early - self.late


async def webrtc_trials(trials: int) -> WebRtcResult:
    engine = BenchEngine(speech_of(AGENT_LINES[0], 8.0), VirtualClock())
    session = SessionConfig(EndpointerConfig(hangover_ms=500))
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(engine, ServerConfig(static_dir=Path(tmp), session=session))
        async with serve_app(app) as base_url:
            return await _run_webrtc(base_url, app, trials)


async def _run_webrtc(base_url: str, app: web.Application, trials: int) -> WebRtcResult:
    mic = ClientMic(echo_gain=0.25)
    call = await dial(base_url, mic, on_frame=mic.hear)
    (conn,) = app[REGISTRY_KEY].connections()
    sent: list[tuple[float, bool]] = []
    conn.session.output_track.add_frame_listener(lambda _f, a: sent.append((time.monotonic(), a)))
    result = WebRtcResult()
    rng = np.random.default_rng(7)
    try:
        await _warm_up(call, conn.session)
        for trial in range(trials):
            await _one_webrtc_trial(call, conn.session, sent, rng, trial, result)
    finally:
        await call.hang_up()
    return result


async def _warm_up(call, session) -> None:  # type: ignore[no-untyped-def]
    """One answer the caller listens to, so the canceller learns the echo path."""
    call.send({"type": "text", "text": "warm up"})
    await wait_until(lambda: session.turns.state == "speaking", within=5)
    await asyncio.sleep(3.5)
    call.send({"type": "interrupt"})
    await wait_until(lambda: session.turns.state == "listening", within=5)


async def _one_webrtc_trial(call, session, sent, rng, trial: int, result: WebRtcResult) -> None:  # type: ignore[no-untyped-def]
    call.send({"type": "text", "text": f"talk {trial}"})
    await wait_until(lambda: session.turns.state == "speaking", within=5)
    await asyncio.sleep(float(rng.uniform(1.5, 2.5)))
    voice, pitch = VOICES[trial % len(VOICES)]
    call.mic.say(speech_of(USER_LINES[trial % len(USER_LINES)], 1.0, voice, pitch), 16_000)
    await wait_until(lambda: len(call.mic.onsets) == trial + 1, within=3)
    onset = call.mic.onsets[-1]
    await asyncio.sleep(1.2)
    result.trials += 1
    log = session.turns.duck_log
    result.released += any(e == "release" and onset < t < onset + 1.2 for t, e in log)
    server_last = max((t for t, audio in sent if audio and t < onset + 1.2), default=None)
    if server_last is None or server_last < onset:
        result.early += 1
        _log.warning("trial %d: the agent stopped before the user spoke", trial)
    elif server_last >= onset + 1.0:
        result.late += 1
        _log.warning("trial %d: the agent did not stop within 1 s", trial)
    else:
        result.server_stop.append(server_last + STEP_S - onset)
        client_last = call.last_audio(onset, onset + 1.2, ENERGY)
        played_last = call.last_audio(onset, onset + 1.2, ENERGY, played=True)
        if client_last is None:
            result.quiet += 1
        else:
            result.client_stop.append(client_last - onset)
        if played_last is not None:
            result.played_stop.append(played_last - onset)
        late = (f for t, f in call.audio if server_last + 0.25 < t < onset + 1.2)
        result.stale_frames += sum(1 for f in late if np.abs(f).max() > ENERGY)
    # the cut-in becomes a (silently answered) turn of its own before the next trial starts
    spoken = lambda: sum(r.kind == "audio" for r in session.turns.records)  # noqa: E731
    await wait_until(lambda: spoken() == trial + 1 and session.turns.state == "listening", 5)
    await asyncio.sleep(0.3)


# --- report -------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> str:
    return f"{1000 * float(np.percentile(values, q)):.0f}" if values else "-"


def print_echo(results: dict[str, EchoResult], seconds: float) -> None:
    print(f"\n1. Echo only ({seconds:g} s answers): trials with a false barge-in / a false duck")
    print("   / the echo taken as a user turn")
    print("| canceller | trials | false barge-ins | false ducks | false turns |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r.trials} | {r.false_barge_ins} | {r.false_ducks} | {r.false_turns} |")


def print_double_talk(results: dict[str, DetectResult]) -> None:
    print("\n2. Double talk: user onset -> barge-in, and -> last agent frame sent (ms)")
    print(
        "| scene | detected | detect p50 | detect p90 | server stop p50 | server stop p90 "
        "| released |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        n = len(r.delays) + r.missed
        print(
            f"| {name} | {len(r.delays)}/{n} | {pct(r.delays, 50)} | {pct(r.delays, 90)} "
            f"| {pct(r.stops, 50)} | {pct(r.stops, 90)} | {r.released} |"
        )


def print_webrtc(r: WebRtcResult) -> None:
    print("\n3. WebRTC loopback (aiortc client, echo -12 dB): user onset at the client -> (ms)")
    print(
        "| trials | stopped | server last frame p50 | p90 | client received silence p50 | p90 "
        "| client played silence p50 | p90 | stale | quiet | released |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {r.trials} | {r.stopped} | {pct(r.server_stop, 50)} | {pct(r.server_stop, 90)} "
        f"| {pct(r.client_stop, 50)} | {pct(r.client_stop, 90)} "
        f"| {pct(r.played_stop, 50)} | {pct(r.played_stop, 90)} "
        f"| {r.stale_frames} | {r.quiet} | {r.released} |"
    )
    if r.early or r.late:
        print(f"(not stopped: {r.early} before the onset, {r.late} not within 1 s)")


async def run(args: argparse.Namespace) -> None:
    start = time.monotonic()
    if args.trials:
        print_echo(await echo_only(args.trials, args.echo_seconds), args.echo_seconds)
    if args.double_talk_trials:
        print_double_talk(await double_talk(args.double_talk_trials))
    if args.webrtc_trials:
        print_webrtc(await webrtc_trials(args.webrtc_trials))
    source = "eSpeak NG" if echo_sim.espeak_speech("a") is not None else "synthetic speech"
    print(f"\n(speech: {source}; {time.monotonic() - start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=100, help="echo-only trials per setting")
    parser.add_argument(
        "--echo-seconds", type=float, default=4.0, help="length of the echo-only answers"
    )
    parser.add_argument("--double-talk-trials", type=int, default=40)
    parser.add_argument("--webrtc-trials", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    _log.setLevel(logging.WARNING)  # why a WebRTC trial did not stop
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
