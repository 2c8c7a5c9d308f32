"""Soak: many calls that connect, talk and vanish without a goodbye leave nothing behind.

Each round dials a few aiortc clients on loopback, has each ask for a reply, and drops them off
the network mid-answer (their ICE sockets close; no DTLS or SCTP goodbye reaches the server);
one of them instead speaks and vanishes in the silence after its speech, while the reply
started at that pause runs unseen (an early reply) and before the turn has ended. The
server must notice through its idle timeout, close the sessions and cancel their replies. After
the warm-up, asyncio tasks, threads, open file descriptors and RSS must not grow beyond a bound,
and no session, peer connection or outbound track may stay reachable.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from aiortc import RTCPeerConnection

from agent import metrics
from agent.session import Session
from agent.tracks import AgentAudioTrack
from signaling import REGISTRY_KEY, ServerConfig, create_app
from tests.fakes import FakeEngine, Script, espeak_16k, wait_until
from tests.webrtc_client import dial, serve_app

ROUNDS = 8
CALLS_PER_ROUND = 3
WARM_UP_ROUNDS = 2
RSS_GROWTH_LIMIT_MB = 48
LATE_RSS_GROWTH_LIMIT_MB = 16
FD_GROWTH_LIMIT = 6
THREAD_GROWTH_LIMIT = 2
# The loop's default executor starts its threads ("asyncio_N") as work needs them, up to this
# bound, and keeps them: a pool filling up under load, counted apart from other threads.
EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)


EARLY_USED = metrics.EARLY_REPLIES_TOTAL.labels(outcome="used")._value


@dataclass(frozen=True)
class Usage:
    tasks: int
    threads: int  # besides the default executor's
    executor_threads: int
    fds: int
    rss_mb: float


def usage() -> Usage:
    gc.collect()
    with open("/proc/self/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return Usage(
        tasks=len(asyncio.all_tasks()),
        threads=sum(not t.name.startswith("asyncio_") for t in threading.enumerate()),
        executor_threads=sum(t.name.startswith("asyncio_") for t in threading.enumerate()),
        fds=len(os.listdir("/proc/self/fd")),
        rss_mb=rss_kb / 1024,
    )


def live_objects() -> dict[str, int]:
    """How many sessions, peer connections and outbound tracks are still reachable."""
    gc.collect()
    kinds = {Session: 0, RTCPeerConnection: 0, AgentAudioTrack: 0}
    for obj in gc.get_objects():
        kind = type(obj)  # exact types: never asks an arbitrary object for its __class__
        if kind in kinds:
            kinds[kind] += 1
    return {kind.__name__: count for kind, count in kinds.items()}


async def settle(baseline: Usage, within_s: float = 5.0) -> Usage:
    """Usage once closing tasks and sockets are gone (or after `within_s`)."""
    deadline = time.monotonic() + within_s
    while True:
        now = usage()
        done = now.tasks <= baseline.tasks and now.fds <= baseline.fds
        if done or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.1)


async def talk_and_vanish(url: str) -> None:
    call = await dial(url)
    call.channel.send(json.dumps({"type": "text", "text": "tell me everything"}))
    await wait_until(lambda: "speaking" in call.states(), within=10)
    await call.vanish()
    await call.hang_up()


async def speak_and_vanish_at_the_pause(url: str, speech: np.ndarray) -> None:
    """Speak, then vanish 0.5 s into the silence: past the pause (0.3 s), before the turn's
    end (0.7 s), so an early reply is in flight and no turn was answered."""
    call = await dial(url)
    await asyncio.sleep(call.mic.say(speech, 16_000) + 0.5)
    await call.vanish()
    await call.hang_up()


@pytest.mark.slow
async def test_connect_talk_vanish_cycles_leak_no_tasks_threads_fds_or_memory(
    tmp_path: Path,
) -> None:
    speech = espeak_16k("good morning", tmp_path)
    loud = np.flatnonzero(np.abs(speech) > 0.02)
    speech = speech[: loud[-1] + 1]  # ends with its last sound: the silence is timed from there
    engine = FakeEngine(Script(audio_s=20.0, chunk_delay_s=0.05))
    config = ServerConfig(
        static_dir=tmp_path, idle_timeout_s=1.0, close_notice_s=0.05, offer_burst=1000
    )
    app = create_app(engine, config)
    registry = app[REGISTRY_KEY]
    early_used = EARLY_USED.get()
    async with serve_app(app) as url:

        async def one_round() -> None:
            calls = [talk_and_vanish(url) for _ in range(CALLS_PER_ROUND - 1)]
            calls.append(speak_and_vanish_at_the_pause(url, speech))
            await asyncio.gather(*calls)
            await wait_until(lambda: len(registry) == 0, within=10)

        for _ in range(WARM_UP_ROUNDS):
            await one_round()
        await asyncio.sleep(0.5)
        before = usage()
        objects_before = live_objects()
        for _ in range(ROUNDS // 2):
            await one_round()
        middle = await settle(before)
        for _ in range(ROUNDS - ROUNDS // 2):
            await one_round()
        after = await settle(before)
        leftovers = live_objects()
    print(
        f"soak: {ROUNDS * CALLS_PER_ROUND} calls\n before {before}\n middle {middle}\n after {after}"
    )
    assert leftovers == objects_before  # none of the 24 calls' objects is still reachable
    assert all(reply.cancelled for reply in engine.replies)
    typed = [turn for turn, _ in engine.calls if turn.text is not None]
    spoken = [turn for turn, _ in engine.calls if turn.audio is not None]
    assert len(typed) == (ROUNDS + WARM_UP_ROUNDS) * (CALLS_PER_ROUND - 1)
    assert len(spoken) >= ROUNDS  # early replies, dropped when their calls closed
    assert EARLY_USED.get() == early_used  # no spoken turn ever ended: none was used
    assert after.tasks <= before.tasks
    assert after.threads <= before.threads + THREAD_GROWTH_LIMIT
    assert after.executor_threads <= EXECUTOR_THREADS
    assert after.fds <= before.fds + FD_GROWTH_LIMIT
    assert after.rss_mb <= before.rss_mb + RSS_GROWTH_LIMIT_MB
    # the allocator settles in the first rounds; a per-call leak keeps growing in the second half
    assert after.rss_mb <= middle.rss_mb + LATE_RSS_GROWTH_LIMIT_MB
