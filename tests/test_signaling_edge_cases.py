"""Edge cases of the HTTP side: request bytes a handler must not choke on, whose offers spend
from which rate-limit bucket, and offers whose connection is closed while they are answered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCPeerConnection, RTCSessionDescription

import signaling.app
from agent import metrics
from signaling import REGISTRY_KEY, AuthConfig, ServerConfig, create_app
from tests.fakes import FakeEngine, wait_until
from tests.webrtc_client import offering_peer

BEARER = "static-bearer-token"
METRICS = "scrape-me"


async def status_of_raw_request(server: TestServer, request: bytes) -> int:
    """Send `request` byte for byte (no client library re-encodes it); the response status."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1])


async def test_an_authorization_header_with_non_utf8_bytes_is_refused_with_401(
    tmp_path: Path,
) -> None:
    auth = AuthConfig(bearer_token=BEARER, metrics_token=METRICS)
    app = create_app(FakeEngine(), ServerConfig(static_dir=tmp_path, auth=auth))
    async with TestServer(app) as server:
        for path in (b"/config", b"/metrics"):
            request = (
                b"GET " + path + b" HTTP/1.1\r\nHost: agent\r\n"
                b"Authorization: Bearer \xff\xfe\xc3\r\nConnection: close\r\n\r\n"
            )
            assert await status_of_raw_request(server, request) == 401, path


async def test_an_offer_declaring_an_unknown_charset_gets_a_4xx_json_error(
    tmp_path: Path,
) -> None:
    app = create_app(FakeEngine(), ServerConfig(static_dir=tmp_path))
    async with TestClient(TestServer(app)) as client:
        resp = await client.post(
            "/offer",
            data=b'{"sdp": "v=0", "type": "offer"}',
            headers={"Content-Type": "application/json; charset=no-such-charset"},
        )
        assert 400 <= resp.status < 500
        assert "charset" in (await resp.json())["error"]
        assert len(app[REGISTRY_KEY]) == 0


async def test_a_client_supplied_forwarded_for_header_does_not_escape_the_rate_limit(
    tmp_path: Path,
) -> None:
    """A proxy that appends its own X-Forwarded-For header line (HAProxy's `forwardfor`) leaves
    the client's header first: the client's real address is in the last one."""
    config = ServerConfig(
        static_dir=tmp_path, trust_forwarded_for=True, offer_burst=1, offer_rate_per_minute=1
    )
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as client:
        statuses = []
        for i in range(3):
            headers = [
                ("X-Forwarded-For", f"10.9.8.{i}"),  # made up by the client, new every time
                ("X-Forwarded-For", "203.0.113.5"),  # added by the proxy
            ]
            resp = await client.post(
                "/offer", json={"sdp": "hello", "type": "offer"}, headers=headers
            )
            statuses.append(resp.status)
        assert statuses == [400, 429, 429]


async def test_addresses_of_one_ipv6_subscriber_network_share_one_rate_bucket(
    tmp_path: Path,
) -> None:
    config = ServerConfig(
        static_dir=tmp_path, trust_forwarded_for=True, offer_burst=1, offer_rate_per_minute=1
    )
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as client:
        statuses = []
        for peer in ("2001:db8:1:2::1", "2001:db8:1:2:a:b:c:d", "2001:db8:1:3::1"):
            resp = await client.post(
                "/offer",
                json={"sdp": "hello", "type": "offer"},
                headers={"X-Forwarded-For": peer},
            )
            statuses.append(resp.status)
        # the second address is in the first one's /64; the third is another subscriber
        assert statuses == [400, 429, 400]


class SlowToAnswerPeerConnection(RTCPeerConnection):
    """Finishes its local description only once `released` is set, as ICE gathering does when
    a STUN or TURN server is slow to answer."""

    released: asyncio.Event

    async def setLocalDescription(self, sessionDescription: RTCSessionDescription) -> None:  # noqa: N802, N803 - aiortc's names
        await super().setLocalDescription(sessionDescription)
        await self.released.wait()


@pytest.mark.parametrize("closed_by", ["shutdown", "connect timeout"])
async def test_an_offer_whose_connection_closes_while_it_is_answered_gets_503_not_an_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed_by: str
) -> None:
    monkeypatch.setattr(SlowToAnswerPeerConnection, "released", asyncio.Event(), raising=False)
    monkeypatch.setattr(signaling.app, "RTCPeerConnection", SlowToAnswerPeerConnection)
    connect_timeout_s = 0.2 if closed_by == "connect timeout" else 30.0
    config = ServerConfig(
        static_dir=tmp_path,
        connect_timeout_s=connect_timeout_s,
        close_notice_s=0.0,
        busy_retry_after_s=4,
    )
    app = create_app(FakeEngine(), config)
    registry = app[REGISTRY_KEY]
    pc, mic = await offering_peer()
    try:
        async with TestClient(TestServer(app)) as client:
            offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
            post = asyncio.create_task(client.post("/offer", json=offer))
            await wait_until(lambda: len(registry) == 1, within=5)
            (conn,) = registry.connections()
            if closed_by == "shutdown":
                await app.shutdown()
            await wait_until(lambda: conn.session.closed, within=5)
            SlowToAnswerPeerConnection.released.set()
            resp = await post
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "4"
            assert "please call again" in (await resp.json())["error"]
            assert len(registry) == 0
    finally:
        mic.stop()
        await pc.close()


async def test_with_cors_on_every_response_varies_on_origin(tmp_path: Path) -> None:
    """A response to a request without an allowed Origin has no CORS headers; a shared cache
    must not serve it to a page on an allowed origin."""
    static = tmp_path / "static"
    static.mkdir()
    (static / "voice-agent.js").write_text("export {};")
    config = ServerConfig(static_dir=static, allowed_origins=("https://site.example",))
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as client:
        for headers in ({}, {"Origin": "https://elsewhere.example"}):
            for path in ("/static/voice-agent.js", "/config"):
                resp = await client.get(path, headers=headers)
                assert resp.status == 200
                assert "Access-Control-Allow-Origin" not in resp.headers
                assert "Origin" in resp.headers.get("Vary", ""), (path, headers)
        allowed = await client.get("/config", headers={"Origin": "https://site.example"})
        assert allowed.headers["Vary"] == "Origin"


async def test_an_oversized_offer_is_counted_as_invalid(tmp_path: Path) -> None:
    counter = metrics.OFFERS_TOTAL.labels(result="invalid")
    before = counter._value.get()
    config = ServerConfig(static_dir=tmp_path, max_body_bytes=1024)
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as client:
        resp = await client.post("/offer", json={"sdp": "v=0" + " " * 4096, "type": "offer"})
        assert resp.status == 413
        assert "too large" in (await resp.json())["error"]
    assert counter._value.get() == before + 1
