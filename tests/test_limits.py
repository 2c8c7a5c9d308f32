"""Limits: per-address offer rate, the session limit under concurrency, idle and duration caps."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.session import SessionConfig
from signaling import RATE_LIMITER_KEY, REGISTRY_KEY, ServerConfig, create_app
from signaling.audit import AuditLog
from signaling.limits import RateLimiter, retry_after_header
from tests.fakes import FakeEngine, Script, wait_until
from tests.webrtc_client import dial, offering_peer, serve_app


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- the token bucket ------------------------------------------------------------------------


def test_a_bucket_allows_the_burst_then_asks_to_wait_one_refill() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_minute=6, burst=3, clock=clock)  # one token every 10 s
    assert [limiter.check("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("a") == pytest.approx(10.0)
    clock.now = 5.0
    assert limiter.check("a") == pytest.approx(5.0)
    clock.now = 10.0
    assert limiter.check("a") == 0.0


def test_each_address_has_its_own_bucket() -> None:
    limiter = RateLimiter(per_minute=1, burst=1, clock=FakeClock())
    assert limiter.check("a") == 0.0
    assert limiter.check("a") > 0
    assert limiter.check("b") == 0.0


def test_the_bucket_table_is_bounded_by_forgetting_the_least_recent() -> None:
    limiter = RateLimiter(per_minute=1, burst=1, max_keys=100, clock=FakeClock())
    for i in range(1000):
        limiter.check(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert [retry_after_header(s) for s in (0.01, 1.0, 1.2, 59.9)] == ["1", "1", "2", "60"]


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        ServerConfig(max_sessions=-1)
    with pytest.raises(ValueError):
        ServerConfig(offer_burst=0)
    with pytest.raises(ValueError):
        ServerConfig(idle_timeout_s=-1)


# --- over HTTP -------------------------------------------------------------------------------


async def test_offers_beyond_the_burst_get_429_with_retry_after(tmp_path: Path) -> None:
    config = ServerConfig(static_dir=tmp_path, offer_rate_per_minute=2, offer_burst=2)
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as client:
        statuses = []
        for _ in range(3):
            resp = await client.post("/offer", json={"sdp": "hello", "type": "offer"})
            statuses.append(resp.status)
        assert statuses == [400, 400, 429]
        assert int(resp.headers["Retry-After"]) == 30
        assert "too many calls" in (await resp.json())["error"]
        assert (await client.get("/healthz")).status == 200  # only offers are rate-limited


async def test_forwarded_addresses_are_used_only_when_trusted(tmp_path: Path) -> None:
    for trusted, expected in ((True, [400, 400]), (False, [400, 429])):
        config = ServerConfig(
            static_dir=tmp_path, offer_burst=1, trust_forwarded_for=trusted, offer_rate_per_minute=1
        )
        async with TestClient(TestServer(create_app(FakeEngine(), config))) as client:
            statuses = []
            for peer in ("203.0.113.1", "203.0.113.2"):
                headers = {"X-Forwarded-For": f"198.51.100.7, {peer}"}
                body = {"sdp": "hello", "type": "offer"}
                statuses.append((await client.post("/offer", json=body, headers=headers)).status)
            assert statuses == expected
            limiter = client.server.app[RATE_LIMITER_KEY]
            assert len(limiter) == (2 if trusted else 1)


async def test_concurrent_offers_admit_exactly_max_sessions_and_503_the_rest(
    tmp_path: Path,
) -> None:
    config = ServerConfig(static_dir=tmp_path, max_sessions=3, busy_retry_after_s=7)
    app = create_app(FakeEngine(), config)
    peers = [await offering_peer() for _ in range(8)]
    try:
        async with TestClient(TestServer(app)) as client:

            async def post(sdp: str) -> tuple[int, dict, str | None]:
                resp = await client.post("/offer", json={"sdp": sdp, "type": "offer"})
                return resp.status, await resp.json(), resp.headers.get("Retry-After")

            results = await asyncio.gather(*(post(pc.localDescription.sdp) for pc, _ in peers))
            statuses = sorted(status for status, _, _ in results)
            assert statuses == [200] * 3 + [503] * 5
            assert len(app[REGISTRY_KEY]) == 3
            busy = [(body, retry) for status, body, retry in results if status == 503]
            assert all(
                retry == "7" and "session limit (3 calls)" in b["error"] for b, retry in busy
            )
        assert len(app[REGISTRY_KEY]) == 0  # shutdown closed the admitted three
    finally:
        for pc, mic in peers:
            mic.stop()
            await pc.close()


# --- idle and duration caps over WebRTC --------------------------------------------------------


@pytest.mark.slow
async def test_a_caller_whose_audio_stops_is_told_and_closed_after_the_idle_timeout(
    tmp_path: Path,
) -> None:
    config = ServerConfig(static_dir=tmp_path, idle_timeout_s=1.0, close_notice_s=0.2)
    app = create_app(FakeEngine(), config)
    async with serve_app(app) as url:
        call = await dial(url)
        await asyncio.sleep(1.5)  # audio flowing: not idle
        assert len(app[REGISTRY_KEY]) == 1
        call.mic.stop()  # the microphone's packets stop; the peer connection stays up
        await wait_until(lambda: call.of_type("error"), within=5)
        assert "without audio" in call.of_type("error")[0]["message"]
        await wait_until(lambda: len(app[REGISTRY_KEY]) == 0, within=3)
        await call.hang_up()


@pytest.mark.slow
async def test_a_call_reaching_its_maximum_length_is_told_then_closed(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    config = ServerConfig(
        static_dir=tmp_path,
        max_duration_s=1.5,
        close_notice_s=0.2,
        audit_log=audit,
        session=SessionConfig(),
    )
    app = create_app(FakeEngine(Script(audio_s=0.2)), config)
    async with serve_app(app) as url:
        call = await dial(url)
        await wait_until(lambda: call.of_type("error"), within=5)
        assert "limit" in call.of_type("error")[0]["message"]
        await wait_until(lambda: len(app[REGISTRY_KEY]) == 0, within=3)
        await call.hang_up()
    end = json.loads(audit.read_text().splitlines()[-1])
    assert end["event"] == "end" and end["reason"] == "max duration"
    assert 1.4 < end["duration_s"] < 4.0


async def test_the_audit_queue_is_bounded_and_drops_rather_than_blocks(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "logs" / "audit.jsonl", max_pending=2)
    for i in range(5):
        audit.record("start", session=f"s{i}")  # the writer is not running: the queue fills
    assert audit.dropped == 3
    audit.start()
    await audit.close()
    lines = (tmp_path / "logs" / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["session"] for line in lines] == ["s0", "s1"]
